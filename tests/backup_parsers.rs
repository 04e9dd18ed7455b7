//! The parsers of untrusted repository bytes, fed thousands of damaged inputs: truncated,
//! bit-flipped, spliced, padded and random variants of valid objects, from a seeded RNG so a
//! failure reproduces. Each parser must answer with an error, never a panic; for
//! authenticated objects (sealed index and snapshot objects, packs) every changed byte must
//! be rejected. The same harnesses back the fuzz targets in `fuzz/fuzz_targets/repo_*.rs`.

use invsync::backup::crypto::{BlobId, MasterKey, Reader};
use invsync::backup::fuzzing;
use invsync::backup::index::{IndexFile, KIND_INDEX};
use invsync::backup::pack::PackBuilder;
use invsync::backup::repository::encode_body;
use invsync::backup::snapshot::KIND_SNAPSHOT;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Cases per seed input.
const CASES: usize = 1500;

/// Byte strings that tend to break parsers, spliced into JSON.
const SPICE: &[&str] = &[
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "4294967295",
    "1e999",
    "\"../../etc/passwd\"",
    "\"/etc/passwd\"",
    "\"\"",
    "\"zz\"",
    "\"abc\"",
    "null",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "\"\\ud800\"",
];

/// One damaged variant of `seed`.
fn mutate(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut m = seed.to_vec();
    let pos = |rng: &mut ChaCha8Rng, len: usize| rng.gen_range(0..=len);
    match rng.gen_range(0..9) {
        0 => m.truncate(rng.gen_range(0..seed.len().max(1))),
        1 => {
            for _ in 0..rng.gen_range(1..=4) {
                if !m.is_empty() {
                    let i = rng.gen_range(0..m.len());
                    m[i] ^= 1 << rng.gen_range(0..8);
                }
            }
        }
        2 => {
            if !m.is_empty() {
                let i = rng.gen_range(0..m.len());
                m[i] = rng.gen();
            }
        }
        3 => {
            let at = pos(rng, m.len());
            let n = rng.gen_range(1..64);
            let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            m.splice(at..at, junk);
        }
        4 => {
            let a = pos(rng, m.len());
            let b = (a + rng.gen_range(1..256)).min(m.len());
            m.drain(a..b);
        }
        5 => {
            let a = pos(rng, m.len());
            let b = (a + rng.gen_range(1..256)).min(m.len());
            let copy = m[a..b].to_vec();
            let at = pos(rng, m.len());
            m.splice(at..at, copy);
        }
        6 => {
            let s = SPICE[rng.gen_range(0..SPICE.len())].as_bytes();
            let a = pos(rng, m.len());
            let b = (a + rng.gen_range(0..16)).min(m.len());
            m.splice(a..b, s.iter().copied());
        }
        7 => {
            let n = rng.gen_range(0..seed.len().max(1) * 2);
            m = (0..n).map(|_| rng.gen()).collect();
        }
        _ => {
            // A valid prefix followed by garbage: headers right, body wrong.
            let keep = pos(rng, m.len());
            m.truncate(keep);
            m.extend((0..rng.gen_range(0..128)).map(|_| rng.gen::<u8>()));
        }
    }
    m
}

/// Runs `harness` on `CASES` mutations of each seed; checks it accepts the seeds, never
/// panics, and rejects what `must_reject` says. Returns (accepted, rejected) counts.
fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    rng_seed: u64,
    harness: fn(&[u8]) -> bool,
    must_reject: fn(seed: &[u8], mutated: &[u8]) -> bool,
) -> (usize, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
    let (mut accepted, mut rejected) = (0, 0);
    for (s, seed) in seeds.iter().enumerate() {
        assert!(harness(seed), "{name}: seed {s} is not accepted");
        for case in 0..CASES {
            let m = mutate(seed, &mut rng);
            let ok = std::panic::catch_unwind(|| harness(&m)).unwrap_or_else(|_| {
                panic!("{name}: seed {s}, case {case} (rng seed {rng_seed}) panicked on {m:02x?}")
            });
            if ok {
                accepted += 1;
                assert!(
                    !must_reject(seed, &m),
                    "{name}: seed {s}, case {case} (rng seed {rng_seed}) accepted damaged input {m:02x?}"
                );
            } else {
                rejected += 1;
            }
        }
    }
    // Mutations that keep a JSON document valid exist, but most must be refused.
    assert!(
        rejected > accepted,
        "{name}: {accepted} accepted, {rejected} rejected"
    );
    (accepted, rejected)
}

/// Authenticated objects: any change is damage.
fn changed(seed: &[u8], m: &[u8]) -> bool {
    seed != m
}

/// Plain or decoded JSON: a proper prefix of a document is never a document.
fn truncated(seed: &[u8], m: &[u8]) -> bool {
    m.len() < seed.len() && seed.starts_with(m)
}

fn sample_pack() -> (Vec<u8>, invsync::backup::pack::PackEntry) {
    let keys = fuzzing::keyring();
    let id_key = &keys.master.as_ref().unwrap().id_key;
    let mut b = PackBuilder::new(keys).unwrap();
    for raw in [
        b"AB12345678\t2026-11-28\t12345678\t100\n".repeat(40),
        b"x".to_vec(),
        (0..600u32).flat_map(|i| i.to_le_bytes()).collect(),
    ] {
        b.add(id_key.id(&raw), &raw).unwrap();
    }
    b.finish().unwrap()
}

fn sample_index() -> IndexFile {
    let (_, entry) = sample_pack();
    IndexFile {
        version: 1,
        session: Some("0123456789abcdef".into()),
        id_key: None,
        packs: vec![entry],
    }
}

fn sample_snapshot() -> serde_json::Value {
    let id = BlobId([7; 32]).to_string();
    serde_json::json!({
        "version": 1,
        "session": "0123456789abcdef",
        "time": "2026-11-28T12:00:00Z",
        "host": "h",
        "tags": ["nightly"],
        "source": "src (postgres://u@h/db)",
        "lsn": "0/16B3748",
        "tables": [{
            "schema": {
                "name": {"schema": "public", "name": "invoice"},
                "columns": [
                    {"name": "invoice_number", "type_name": "text", "not_null": true,
                     "default": null, "identity": null, "generated": null},
                    {"name": "seq", "type_name": "integer", "not_null": true,
                     "default": "nextval('invoice_seq_seq'::regclass)", "identity": null, "generated": null}
                ],
                "primary_key": ["invoice_number"],
                "constraints": [["invoice_pkey", "PRIMARY KEY (invoice_number)"]],
                "indexes": ["CREATE INDEX i ON public.invoice USING btree (seq)"],
                "sequences": [{"column": "seq", "name": "public.invoice_seq_seq",
                               "last_value": 42, "is_called": true}]
            },
            "rows": 2, "bytes": 40, "chunks": [id]
        }],
        "trees": [{
            "root": "/etc/invsync",
            "entries": [
                {"path": "", "kind": "dir", "mode": 493, "mtime": 1, "mtime_nanos": 0,
                 "size": 0, "target": null, "chunks": []},
                {"path": "conf.toml", "kind": "file", "mode": 420, "mtime": 1, "mtime_nanos": 5,
                 "size": 3, "target": null, "chunks": [id]},
                {"path": "link", "kind": "symlink", "mode": 511, "mtime": 1, "mtime_nanos": 0,
                 "size": 0, "target": "conf.toml", "chunks": []}
            ]
        }],
        "stats": {"bytes_read": 43, "bytes_new": 43, "bytes_stored": 100, "blobs_new": 1,
                  "duration_ms": 5},
        "id_key": null
    })
}

#[test]
fn sealed_objects_reject_every_change() {
    let keys = fuzzing::keyring();
    let index = keys
        .seal_object(KIND_INDEX, &encode_body(&sample_index()).unwrap())
        .unwrap();
    let snapshot = keys
        .seal_object(KIND_SNAPSHOT, &encode_body(&sample_snapshot()).unwrap())
        .unwrap();
    fuzz(
        "sealed object",
        &[index, snapshot],
        1,
        fuzzing::sealed_object,
        changed,
    );
}

#[test]
fn packs_reject_every_change() {
    let (bytes, _) = sample_pack();
    fuzz("pack", &[bytes], 2, fuzzing::pack, changed);
}

#[test]
fn pack_trailers_never_panic() {
    let (_, entry) = sample_pack();
    let listed = serde_json::to_vec(&entry.blobs).unwrap();
    // The harness's pack holds no blob bytes: only an empty list is whole.
    assert!(!fuzzing::pack_trailer(&listed));
    fuzz(
        "pack trailer",
        &[b"[]".to_vec()],
        3,
        fuzzing::pack_trailer,
        truncated,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    for _ in 0..CASES {
        let m = mutate(&listed, &mut rng);
        assert!(!fuzzing::pack_trailer(&m) || m == b"[]");
    }
}

#[test]
fn index_bodies_never_panic() {
    let file = sample_index();
    let json = serde_json::to_vec(&file).unwrap();
    let body = encode_body(&file).unwrap();
    let (acc, _) = fuzz(
        "index body",
        &[json, body],
        4,
        fuzzing::index_body,
        truncated,
    );
    eprintln!("index body: {acc} damaged variants still decoded");
}

/// Found by `scripts/fuzz.sh repo_index_body`: a multi-byte character in a hex field split by a
/// two-byte step used to panic on a char boundary.
#[test]
fn index_bodies_with_non_ascii_hex_are_refused() {
    for bad in ["0\u{e9}0", "00\u{169}0", "0\u{e9}\u{e9}0", "zz"] {
        let mut file = sample_index();
        file.packs[0].key = bad.to_string();
        let json = serde_json::to_vec(&file).unwrap();
        assert!(!fuzzing::index_body(&json), "key {bad:?} accepted");
        let mut file = sample_index();
        file.id_key = Some(format!("{bad}{}", "0".repeat(64 - bad.len())));
        let json = serde_json::to_vec(&file).unwrap();
        assert!(!fuzzing::index_body(&json), "id key {bad:?} accepted");
    }
}

#[test]
fn snapshot_bodies_never_panic() {
    let snap = sample_snapshot();
    let json = serde_json::to_vec(&snap).unwrap();
    let body = encode_body(&snap).unwrap();
    fuzz(
        "snapshot body",
        &[json, body],
        5,
        fuzzing::snapshot_body,
        truncated,
    );
    // Hostile paths decode but are refused.
    let mut hostile = sample_snapshot();
    hostile["trees"][0]["entries"][1]["path"] = "../../x".into();
    assert!(!fuzzing::snapshot_body(
        &serde_json::to_vec(&hostile).unwrap()
    ));
    let mut escaping = sample_snapshot();
    escaping["trees"][0]["entries"][2]["target"] = "../../../etc/passwd".into();
    assert!(!fuzzing::snapshot_body(
        &serde_json::to_vec(&escaping).unwrap()
    ));
}

#[test]
fn key_files_and_config_never_panic() {
    let master = MasterKey::generate();
    let wrapped = master
        .wrap(&Reader::Recipient(fuzzing::reader().to_public()))
        .unwrap();
    let key_file = serde_json::to_vec(&serde_json::json!({
        "id": "0123456789abcdef",
        "kind": "x25519",
        "recipient": fuzzing::reader().to_public().to_string(),
        "created": "2026-11-28T12:00:00Z",
        "wrapped": wrapped,
    }))
    .unwrap();
    fuzz("key file", &[key_file], 6, fuzzing::key_file, truncated);
    let config = serde_json::to_vec(&serde_json::json!({
        "format": "invsync-repository",
        "version": 1,
        "id": "0123456789abcdef",
        "recipient": master.identity.to_public().to_string(),
        "chunker": {"min": 65536, "avg": 262144, "max": 1048576},
    }))
    .unwrap();
    fuzz("config", &[config], 7, fuzzing::repo_config, truncated);
}
