//! Harnesses for the parsers of untrusted repository bytes, one per kind of input, shared by
//! the fuzz targets (`fuzz/fuzz_targets/repo_*.rs`, run with `cargo fuzz`) and by the
//! deterministic mutation test (`tests/backup_parsers.rs`), which runs on stable.
//!
//! Everything a store returns is untrusted: a stored object can be truncated, bit-flipped or
//! replaced. Authentication does not end the matter: anyone who can write to the store knows
//! the repository recipient (it is in the plaintext `config`) and can seal any body they like,
//! so the decoders behind decryption get arbitrary bytes too. Each harness takes arbitrary
//! bytes, drives them through the same functions the product uses on data read from a store,
//! and returns whether they were accepted. The contract: a harness never panics, never
//! allocates without bound, and returns `false` (the parser reported an error) for anything
//! it cannot use.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use super::crypto::{self, BlobId, Keyring, MasterKey};
use super::index::{IndexFile, Locator, KIND_INDEX};
use super::pack::{self, KIND_PACK};
use super::repository::{self, KeyFile, RepoConfig};
use super::snapshot::{Snapshot, KIND_SNAPSHOT};
use super::tree;

/// The key every harness reads with: one per process, so a fuzzer's corpus entries that
/// reached deep code stay meaningful across runs of one process.
pub fn keyring() -> &'static Keyring {
    static KEYS: OnceLock<Keyring> = OnceLock::new();
    KEYS.get_or_init(|| {
        let master = MasterKey::generate();
        Keyring {
            recipient: master.identity.to_public(),
            master: Some(master),
        }
    })
}

/// An encrypted object as read from `index/` or `snapshots/`: plaintext header (magic, kind,
/// wrapped object key), then the sealed body, then the body's decoding.
pub fn sealed_object(data: &[u8]) -> bool {
    let header_ok = crypto::split_header(data).is_ok();
    let index = keyring()
        .open_object(KIND_INDEX, data)
        .map(|plain| index_body(&plain));
    let snapshot = keyring()
        .open_object(KIND_SNAPSHOT, data)
        .map(|plain| snapshot_body(&plain));
    header_ok && (index.unwrap_or(false) || snapshot.unwrap_or(false))
}

/// A pack object as read from `data/`: header, blobs, sealed trailer, trailer length. Reads
/// the trailer and then every blob it lists, as `verify repo --read-data` does.
pub fn pack(data: &[u8]) -> bool {
    let Ok((key, blobs)) = pack::read_trailer(keyring(), data) else {
        return false;
    };
    let id_key = keyring().master.as_ref().map(|m| &m.id_key);
    let mut all = true;
    for b in &blobs {
        let Some(sealed) = pack::sealed_in(data, 0, b) else {
            all = false;
            continue;
        };
        all &= pack::open_blob(&key, b, sealed, id_key).is_ok();
    }
    all
}

/// A pack trailer's plaintext (the JSON list of blob entries), sealed here into a pack that
/// is otherwise well formed (and holds no blob bytes), so the fuzzer reaches the trailer's
/// decoding and the blob reads that follow it without forging the authentication tag. Only
/// an empty list is whole.
pub fn pack_trailer(trailer: &[u8]) -> bool {
    let keys = keyring();
    let Ok((key, wrapped)) = keys.new_object_key() else {
        return false;
    };
    let Ok(mut bytes) = crypto::header(KIND_PACK, &wrapped) else {
        return false;
    };
    let sealed = key.seal_body(KIND_PACK, trailer);
    bytes.extend_from_slice(&sealed);
    bytes.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
    pack(&bytes)
}

/// A decrypted index object body (`u64 length | zstd(JSON)`), or its JSON alone; the decoded
/// index is then loaded as restore and backup load it.
pub fn index_body(data: &[u8]) -> bool {
    let mut ok = false;
    for file in [
        repository::decode_body::<IndexFile>(data).ok(),
        serde_json::from_slice::<IndexFile>(data).ok(),
    ]
    .into_iter()
    .flatten()
    {
        let mut loc = Locator::default();
        let all = loc.add(&file, None).is_ok();
        let wanted: HashSet<BlobId> = loc.blobs.keys().take(3).copied().collect();
        let some = Locator::default().add(&file, Some(&wanted)).is_ok();
        ok |= all && some;
    }
    ok
}

/// A decrypted snapshot body (`u64 length | zstd(JSON)`), or its JSON alone; the decoded
/// manifest's paths then go through the checks restore makes before writing anything.
pub fn snapshot_body(data: &[u8]) -> bool {
    let mut ok = false;
    for snap in [
        repository::decode_body::<Snapshot>(data).ok(),
        serde_json::from_slice::<Snapshot>(data).ok(),
    ]
    .into_iter()
    .flatten()
    {
        let _ = snap.blobs().count();
        let mut safe = true;
        for t in &snap.trees {
            let Some(root) = tree::root_below(&t.root) else {
                safe = false;
                continue;
            };
            for e in &t.entries {
                match tree::safe_relative(&e.path) {
                    Some(rel) => {
                        let target = e.target.as_deref().unwrap_or("");
                        let none = |_: &Path| false;
                        safe &= tree::link_stays_inside(&root.join(rel), target, &none);
                    }
                    None => safe = false,
                }
            }
        }
        for t in &snap.tables {
            // Restore builds its SQL from these; building must not panic whatever they hold.
            let _ = t.schema.copy_out_sql("TRUE");
            let _ = super::segment::parent_segments(t, &[], "", &[]);
            if let Ok(model) = t.schema.model() {
                let plan = crate::pg::schema::Plan::new(vec![&model], Default::default());
                let at = crate::pg::schema::Placement::Staging("s");
                let _ = (plan.create_tables(0, at), plan.copy_in_sql(0, at));
                let _ = (plan.build_statements(0, at), plan.finish_statements(0));
                let _ = (plan.function_statements(), plan.foreign_key_statements());
                let _ = (plan.prerequisites(), plan.extensions());
            }
        }
        ok |= safe;
    }
    ok
}

/// The reader identity [`key_file`] unwraps with (one per process).
pub fn reader() -> &'static age::x25519::Identity {
    static READER: OnceLock<age::x25519::Identity> = OnceLock::new();
    READER.get_or_init(age::x25519::Identity::generate)
}

/// A `keys/` object: plaintext JSON holding the armored, age-encrypted master key, unwrapped
/// with [`reader`].
pub fn key_file(data: &[u8]) -> bool {
    let Ok(kf) = serde_json::from_slice::<KeyFile>(data) else {
        return false;
    };
    // X25519 only: a passphrase stanza would make the harness run scrypt, which proves
    // nothing about parsing.
    let identities: Vec<Box<dyn age::Identity>> = vec![Box::new(reader().clone())];
    MasterKey::unwrap(&kf.wrapped, &identities).is_ok()
}

/// The plaintext `config` object.
pub fn repo_config(data: &[u8]) -> bool {
    serde_json::from_slice::<RepoConfig>(data)
        .is_ok_and(|c| c.recipient.parse::<age::x25519::Recipient>().is_ok())
}
