//! Keys and the commands that change a repository: a wrong key changes nothing, whatever the
//! command; `key add --passphrase-env` lets that passphrase read; `prune --dry-run` deletes
//! nothing and names exactly what a real prune then deletes.

mod backup_util;
mod support;

use std::collections::BTreeMap;
use std::path::Path;

use backup_util::*;
use support::PgCluster;

/// Every object of a file repository with its size and content hash: equal listings mean the
/// repository was not changed.
fn listing(dir: &Path) -> BTreeMap<String, (u64, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(
                    rel,
                    (
                        bytes.len() as u64,
                        blake3::hash(&bytes).to_hex().to_string(),
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn snapshot_count(cfg: &Path) -> usize {
    let listed: serde_json::Value =
        serde_json::from_str(&ok(cfg, &["snapshots", "--json"])).unwrap();
    listed.as_array().unwrap().len()
}

#[test]
fn a_wrong_key_changes_nothing_and_a_dry_run_prune_deletes_nothing() {
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 2000);
    pg.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    let dbs = [("src", pg.url("einvoice"))];
    let (owner_cfg, _) = owner_config(dir.path(), &dbs, &url);
    let (stranger_cfg, _) = reader_config(dir.path(), "stranger", &dbs, &url);
    ok(&owner_cfg, &["repo", "init"]);
    let backup = ["backup", "--db", "src", "--tables", "public.items"];
    ok(&owner_cfg, &backup);
    pg.psql(
        "einvoice",
        "UPDATE items SET code = code || '+' WHERE id % 3 = 0",
    );
    ok(&owner_cfg, &backup);
    ok(&owner_cfg, &backup);
    assert_eq!(snapshot_count(&owner_cfg), 3);

    // A key that opens none of the repository's keys: every command that would write or
    // delete fails with one clear line, and the repository and the target stay as they were.
    let before = listing(&repo_dir);
    let restored_tables =
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                           WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')";
    let tables_before = pg.psql("restored", restored_tables);
    for args in [
        &["restore", "latest", "--to-db", &pg.url("restored")][..],
        &["forget", "--keep-last", "1"],
        &["forget", "--keep-last", "1", "--prune"],
        &["prune"],
    ] {
        let (code, out, err) = run(&stranger_cfg, args);
        assert_ne!(code, 0, "{args:?} succeeded with a wrong key: {out}");
        assert!(err.contains("opens none"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert_eq!(
            listing(&repo_dir),
            before,
            "{args:?} changed the repository"
        );
        assert_eq!(
            pg.psql("restored", restored_tables),
            tables_before,
            "{args:?} wrote into the target"
        );
    }

    // forget without prune drops two snapshots; their unique data stays until a prune.
    ok(&owner_cfg, &["forget", "--keep-last", "1"]);
    assert_eq!(snapshot_count(&owner_cfg), 1);
    let forgotten = listing(&repo_dir);
    let dry: serde_json::Value =
        serde_json::from_str(&ok(&owner_cfg, &["prune", "--dry-run", "--json"])).unwrap();
    assert_eq!(dry["dry_run"], true);
    let would = dry["packs_deleted"].as_u64().unwrap();
    assert!(
        would > 0,
        "the updated rows left packs only the forgotten snapshots used: {dry}"
    );
    assert_eq!(
        listing(&repo_dir),
        forgotten,
        "prune --dry-run changed the repository"
    );
    let real: serde_json::Value =
        serde_json::from_str(&ok(&owner_cfg, &["prune", "--json"])).unwrap();
    assert_eq!(real["packs_deleted"].as_u64().unwrap(), would);
    assert_eq!(real["bytes_deleted"], dry["bytes_deleted"]);
    let packs_left = |l: &BTreeMap<String, (u64, String)>| {
        l.keys()
            .filter(|k| k.starts_with("data/") || k.contains("/data/"))
            .count()
    };
    assert_eq!(
        packs_left(&forgotten) - packs_left(&listing(&repo_dir)),
        would as usize,
        "prune deleted other packs than the dry run named"
    );
    // What is left still restores and checks whole.
    ok(
        &owner_cfg,
        &["restore", "latest", "--to-db", &pg.url("restored")],
    );
    assert_eq!(
        fingerprint(&pg, "einvoice", "items", "id"),
        fingerprint(&pg, "restored", "items", "id")
    );
    ok(&owner_cfg, &["verify", "repo", "--read-data"]);
}

#[test]
fn key_add_passphrase_env_lets_that_passphrase_read() {
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 200);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let dbs = [("src", pg.url("einvoice"))];
    let (owner_cfg, _) = owner_config(dir.path(), &dbs, &url);
    let pass_cfg = write_config(
        dir.path(),
        "pass.toml",
        &dbs,
        &url,
        "passphrase = \"${TEST_REPO_PASSPHRASE}\"",
    );
    ok(&owner_cfg, &["repo", "init"]);
    ok(
        &owner_cfg,
        &["backup", "--db", "src", "--tables", "public.items"],
    );
    let secret = "tide pool lantern 42";

    // Before the key is added the passphrase opens nothing.
    let with_pass = |args: &[&str]| run_env(&pass_cfg, args, &[("TEST_REPO_PASSPHRASE", secret)]);
    let (code, _, err) = with_pass(&["snapshots"]);
    assert_ne!(code, 0);
    assert!(err.contains("opens none"), "{err}");

    // An unset variable is a clear error that adds nothing.
    let (code, _, err) = run(
        &owner_cfg,
        &["key", "add", "--passphrase-env", "NO_SUCH_VAR_SET"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("NO_SUCH_VAR_SET"), "{err}");
    let keys: serde_json::Value =
        serde_json::from_str(&ok(&owner_cfg, &["key", "list", "--json"])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1);

    let (code, out, err) = run_env(
        &owner_cfg,
        &["key", "add", "--passphrase-env", "NEW_KEY_PASSPHRASE"],
        &[("NEW_KEY_PASSPHRASE", secret)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(secret) && !err.contains(secret));
    let keys: serde_json::Value =
        serde_json::from_str(&ok(&owner_cfg, &["key", "list", "--json"])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(!keys.to_string().contains(secret));

    // Now the passphrase reads the snapshot the owner wrote.
    let (code, out, err) = with_pass(&["snapshots", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (code, _, err) = with_pass(&["verify", "repo", "--read-data"]);
    assert_eq!(code, 0, "{err}");
}
