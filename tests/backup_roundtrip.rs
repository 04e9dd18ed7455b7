//! Backup and restore round trips through the real binary: tables of many types with their
//! schema, configuration trees, deduplication, keys and write-only hosts.

mod backup_util;
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use backup_util::{
    fingerprint, identity, make_tables, ok, owner_config, reader_config, restore_setup, run,
    write_config,
};
use support::PgCluster;

fn config_tree(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("conf.d/sub")).unwrap();
    std::fs::write(root.join("invsync.toml"), "a = 1\n").unwrap();
    std::fs::write(root.join("conf.d/secret.key"), "k".repeat(3000)).unwrap();
    std::fs::set_permissions(
        root.join("conf.d/secret.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        root.join("conf.d/sub/big.bin"),
        (0..3_000_000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(root.join("empty"), "").unwrap();
    std::os::unix::fs::symlink("conf.d/secret.key", root.join("current.key")).unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(root.join("invsync.toml"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

#[test]
fn tables_and_config_round_trip_with_dedup_and_refusal() {
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 60_000);
    pg.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = identity(dir.path(), "owner");
    let repo_dir = dir.path().join("repo");
    let cfg = write_config(
        dir.path(),
        "invsync.toml",
        &[("src", pg.url("einvoice")), ("dst", pg.url("restored"))],
        &format!("file://{}", repo_dir.display()),
        &format!(
            "recipients = [\"{recipient}\"]\nidentity_file = \"{}\"",
            key.display()
        ),
    );
    let tree = dir.path().join("etc/app");
    config_tree(&tree);

    ok(&cfg, &["repo", "init"]);
    let (code, _, err) = run(&cfg, &["repo", "init"]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");

    let out = ok(
        &cfg,
        &[
            "backup",
            "--db",
            "src",
            "--tables",
            "public.*",
            "--config-dir",
            tree.to_str().unwrap(),
            "--tag",
            "nightly",
            "--json",
        ],
    );
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(first["tables"], 2);
    assert_eq!(first["rows"], 60_500);
    assert_eq!(first["files"], 4);
    let first_stored = first["stats"]["bytes_stored"].as_u64().unwrap();
    assert!(first_stored > 0);

    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["snapshots", "--json"])).unwrap();
    let snap = &listed[0];
    assert_eq!(snap["tags"][0], "nightly");
    assert!(snap["lsn"].as_str().unwrap().contains('/'));
    let items = snap["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.items")
        .unwrap();
    assert_eq!(items["rows"], 60_000);
    assert_eq!(snap["config_paths"][0], tree.to_str().unwrap());

    // Restore into an empty database: same rows, schema, indexes, sequences.
    ok(&cfg, &["restore", "latest", "--to-db", "dst"]);
    for (t, order) in [("items", "id"), ("tags", "kind, name")] {
        assert_eq!(
            fingerprint(&pg, "einvoice", t, order),
            fingerprint(&pg, "restored", t, order),
            "table {t}"
        );
    }
    let idx = pg.psql("restored", "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'items'");
    assert_eq!(idx, "items_code_key,items_day,items_pkey");
    assert_eq!(
        pg.psql(
            "restored",
            "SELECT nextval(pg_get_serial_sequence('items', 'id'))"
        ),
        "60001"
    );
    assert_eq!(
        pg.psql("restored", "SELECT attidentity FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'seq'"),
        "d"
    );
    assert_eq!(
        pg.psql(
            "restored",
            "INSERT INTO items (code) VALUES ('new') RETURNING qty, seq, id"
        ),
        "1|60001|60002"
    );
    assert_eq!(
        pg.psql(
            "restored",
            "SELECT count(*) FROM items WHERE total IS DISTINCT FROM amount * qty"
        ),
        "0"
    );

    // A non-empty target is refused, and left alone.
    pg.psql("restored", "DELETE FROM tags WHERE v > 10");
    let (code, _, err) = run(&cfg, &["restore", "latest", "--to-db", "dst"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--replace") && err.contains("public.items"),
        "{err}"
    );
    assert_eq!(pg.psql("restored", "SELECT count(*) FROM tags"), "10");
    ok(
        &cfg,
        &[
            "restore",
            "latest",
            "--to-db",
            "dst",
            "--tables",
            "public.tags",
            "--replace",
        ],
    );
    assert_eq!(
        fingerprint(&pg, "einvoice", "tags", "kind, name"),
        fingerprint(&pg, "restored", "tags", "kind, name")
    );

    // Config tree: contents, modes, mtimes, symlinks as links.
    let out_dir = dir.path().join("out");
    ok(
        &cfg,
        &["restore", "latest", "--to-dir", out_dir.to_str().unwrap()],
    );
    let restored = out_dir.join(tree.strip_prefix("/").unwrap());
    for f in [
        "invsync.toml",
        "conf.d/secret.key",
        "conf.d/sub/big.bin",
        "empty",
    ] {
        assert_eq!(
            std::fs::read(tree.join(f)).unwrap(),
            std::fs::read(restored.join(f)).unwrap(),
            "{f}"
        );
        let (a, b) = (
            std::fs::metadata(tree.join(f)).unwrap(),
            std::fs::metadata(restored.join(f)).unwrap(),
        );
        assert_eq!(a.mode() & 0o7777, b.mode() & 0o7777, "{f}");
        assert_eq!(a.mtime(), b.mtime(), "{f}");
    }
    assert_eq!(
        std::fs::read_link(restored.join("current.key"))
            .unwrap()
            .to_str(),
        Some("conf.d/secret.key")
    );

    // Second backup after a small change at the recent end of the key order stores little.
    pg.psql("einvoice", "UPDATE items SET note = 'changed' WHERE id > 59900; INSERT INTO items (code, amount) SELECT 'ZZ' || g, 1 FROM generate_series(1, 600) g");
    let out = ok(
        &cfg,
        &[
            "backup",
            "--db",
            "src",
            "--tables",
            "public.*",
            "--config-dir",
            tree.to_str().unwrap(),
            "--json",
        ],
    );
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    let second_stored = second["stats"]["bytes_stored"].as_u64().unwrap();
    assert!(
        second_stored * 10 < first_stored,
        "second backup stored {second_stored} of {first_stored}"
    );

    // verify repo finds nothing wrong, also reading all data.
    let out = ok(&cfg, &["verify", "repo", "--read-data", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["findings"].as_array().unwrap().len(), 0, "{out}");
    assert_eq!(report["snapshots"], 2);
}

#[test]
fn keys_wrong_key_passphrase_and_write_only_hosts() {
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 2000);
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    let dbs = [("src", pg.url("einvoice"))];
    let (owner_cfg, owner) = owner_config(dir.path(), &dbs, &url);
    let writer_cfg = write_config(
        dir.path(),
        "writer.toml",
        &dbs,
        &url,
        &format!("recipients = [\"{owner}\"]"),
    );
    let (stranger_cfg, _) = reader_config(dir.path(), "stranger", &dbs, &url);
    let (other_cfg, other) = reader_config(dir.path(), "other", &dbs, &url);
    ok(&owner_cfg, &["repo", "init"]);

    let count = || walk_count(&repo_dir);
    let before = count();
    // Wrong key: a clear error, nothing written.
    let (code, _, err) = run(
        &stranger_cfg,
        &["backup", "--db", "src", "--tables", "public.items"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("opens none of its 1 key(s)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(count(), before, "a failed open wrote nothing");

    // A write-only host backs up but cannot read.
    let out = ok(
        &writer_cfg,
        &[
            "backup",
            "--db",
            "src",
            "--tables",
            "public.items",
            "--jobs",
            "1",
            "--json",
        ],
    );
    let w: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (code, _, err) = run(&writer_cfg, &["snapshots"]);
    assert_ne!(code, 0);
    assert!(err.contains("write-only"), "{err}");
    let listed = ok(&owner_cfg, &["snapshots", "--json"]);
    assert!(listed.contains(w["snapshot"].as_str().unwrap()));
    pg.psql("postgres", "CREATE DATABASE r1");
    ok(&owner_cfg, &["restore", "latest", "--to-db", &pg.url("r1")]);
    assert_eq!(
        fingerprint(&pg, "einvoice", "items", "id"),
        fingerprint(&pg, "r1", "items", "id")
    );

    // Keys: add a reader, it can read; remove the owner, the owner cannot.
    let (code, _, _) = run(&other_cfg, &["snapshots"]);
    assert_ne!(code, 0);
    ok(&owner_cfg, &["key", "add", &other]);
    let keys: serde_json::Value =
        serde_json::from_str(&ok(&other_cfg, &["key", "list", "--json"])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let owner_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["recipient"] == owner.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&other_cfg, &["key", "remove", &owner_id]);
    let (code, _, err) = run(&owner_cfg, &["snapshots"]);
    assert_ne!(code, 0);
    assert!(err.contains("opens none"), "{err}");
    let other_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["recipient"] == other.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _, err) = run(&other_cfg, &["key", "remove", &other_id]);
    assert_ne!(code, 0);
    assert!(err.contains("only one"), "{err}");

    // Without --tables, the tables of the pipelines of --db.
    let mut with_pipeline = std::fs::read_to_string(&other_cfg).unwrap();
    with_pipeline.push_str(&format!(
        "\n[databases.dst]\nurl = \"{}\"\n[pipelines.p]\nsource = \"src\"\ntargets = [\"dst\"]\ntables = [\"public.tags\"]\n",
        pg.url("r1")
    ));
    let pipe_cfg = dir.path().join("pipe.toml");
    std::fs::write(&pipe_cfg, with_pipeline).unwrap();
    ok(&pipe_cfg, &["backup", "--db", "src"]);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&pipe_cfg, &["snapshots", "--json"])).unwrap();
    let last = listed.as_array().unwrap().last().unwrap();
    assert_eq!(last["tables"].as_array().unwrap().len(), 1);
    assert_eq!(last["tables"][0]["table"], "public.tags");

    // Passphrase repositories: the right one works, a wrong one is a clear error.
    let pass_url = format!("file://{}", dir.path().join("prepo").display());
    let good = write_config(
        dir.path(),
        "pass.toml",
        &dbs,
        &pass_url,
        "passphrase = \"correct horse\"",
    );
    let bad = write_config(
        dir.path(),
        "badpass.toml",
        &dbs,
        &pass_url,
        "passphrase = \"wrong horse\"",
    );
    ok(&good, &["repo", "init"]);
    ok(&good, &["backup", "--db", "src", "--tables", "public.tags"]);
    let before = walk_count(&dir.path().join("prepo"));
    let (code, _, err) = run(&bad, &["backup", "--db", "src", "--tables", "public.tags"]);
    assert_ne!(code, 0);
    assert!(err.contains("passphrase opens none"), "{err}");
    assert!(!err.contains("wrong horse"));
    assert_eq!(walk_count(&dir.path().join("prepo")), before);
}

fn walk_count(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walk_count(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

/// Runs invsync with `--config cfg` and the args; returns (exit code, stdout, stderr, peak
/// resident memory in bytes), the peak from the kernel's accounting of the ended process.
// The child is reaped by wait4, which unlike `Child::wait` returns its resource usage.
#[allow(clippy::zombie_processes)]
fn run_measured(cfg: &std::path::Path, args: &[&str]) -> (i32, String, String, u64) {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("INVSYNC_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run invsync");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = 0;
    // SAFETY: rusage is plain data, and the pid is our own unwaited child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // ru_maxrss is in KiB on Linux.
    let peak = usage.ru_maxrss as u64 * 1024;
    (code, out.join().unwrap(), err.join().unwrap(), peak)
}

/// Runs a command through [`run_measured`], asserts success and that its peak resident memory
/// stayed below `limit` MiB; returns stdout.
fn ok_within(cfg: &std::path::Path, args: &[&str], limit: u64) -> String {
    let (code, out, err, peak) = run_measured(cfg, args);
    assert_eq!(code, 0, "invsync {args:?} failed: {out}{err}");
    assert!(
        peak < limit << 20,
        "invsync {args:?} peaked at {} MiB resident, above {limit} MiB",
        peak >> 20
    );
    out
}

/// SQL for `mib` MiB of bytes that do not compress (md5 output), numbered by `seed`.
fn incompressible(mib: u32, seed: u32) -> String {
    format!(
        "(SELECT decode(string_agg(md5(({seed} * 100000000 + g)::text), '' ORDER BY g), 'hex') \
           FROM generate_series(1, {mib} * 65536) g)"
    )
}

#[test]
fn a_32_mb_value_backs_up_in_bounded_memory_and_restores_byte_identical() {
    let pg = PgCluster::start();
    pg.psql(
        "einvoice",
        &format!(
            "CREATE TABLE scans (id int PRIMARY KEY, doc bytea);
             INSERT INTO scans VALUES (1, {});",
            incompressible(32, 1)
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = restore_setup(&pg, dir.path());

    let out = ok_within(
        &cfg,
        &[
            "backup",
            "--db",
            "src",
            "--tables",
            "public.scans",
            "--json",
        ],
        300,
    );
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["rows"], 1, "{summary}");
    ok_within(&cfg, &["restore", "latest", "--to-db", "dst"], 300);
    let digest = "SELECT length(doc) || ':' || md5(doc) FROM scans";
    let source = pg.psql("einvoice", digest);
    assert!(source.starts_with("33554432:"), "{source}");
    assert_eq!(pg.psql("restored", digest), source);
}

#[test]
fn values_of_tens_of_mb_among_small_rows_round_trip() {
    let pg = PgCluster::start();
    // Small rows around three large ones: a document that does not compress, an XML text
    // that does, and one between; the large rows sit in the middle of the key order.
    pg.psql(
        "einvoice",
        &format!(
            "CREATE TABLE docs (id int PRIMARY KEY, kind text, body text, scan bytea);
             INSERT INTO docs SELECT g, 'small', 'row ' || g, decode(md5(g::text), 'hex')
               FROM generate_series(1, 20000) g;
             UPDATE docs SET kind = 'scan', scan = {} WHERE id = 5000;
             UPDATE docs SET kind = 'xml', body = repeat('<item><seller>12345678</seller></item>', 400000)
               WHERE id = 10000;
             UPDATE docs SET kind = 'both', scan = {}, body = repeat('中文', 2000000) WHERE id = 15000;",
            incompressible(16, 2),
            incompressible(8, 3)
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = restore_setup(&pg, dir.path());
    let out = ok_within(
        &cfg,
        &["backup", "--db", "src", "--tables", "public.docs", "--json"],
        300,
    );
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["rows"], 20000, "{summary}");
    ok_within(&cfg, &["restore", "latest", "--to-db", "dst"], 300);
    // Row by row, so no single string holds every large value at once.
    let digest =
        "SELECT count(*) || ':' || md5(string_agg(md5(t::text), ',' ORDER BY id)) FROM docs t";
    assert_eq!(pg.psql("restored", digest), pg.psql("einvoice", digest));
    let sizes = "SELECT string_agg(id || ':' || octet_length(body) || ':' || coalesce(length(scan), 0), ',' ORDER BY id) \
                 FROM docs WHERE kind <> 'small'";
    let large = "5000:8:16777216,10000:15200000:16,15000:12000000:8388608";
    assert_eq!(pg.psql("einvoice", sizes), large, "the fixture");
    assert_eq!(pg.psql("restored", sizes), large);
}
