//! The backup cycle against a real Azure Blob API server (Azurite) on loopback: the second
//! cloud of the platform may well be Azure.

mod backup_util;
mod support;

use backup_util::{findings, fingerprint, identity, make_tables, run_env, write_config};
use support::{AzureServer, PgCluster};

#[test]
fn azure_backup_restore_verify_forget_prune() {
    let az = AzureServer::start();
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 4000);
    pg.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = identity(dir.path(), "k");
    let cfg = write_config(
        dir.path(),
        "c.toml",
        &[("src", pg.url("einvoice")), ("dst", pg.url("restored"))],
        &az.url("backups/einvoice"),
        &format!(
            "recipients = [\"{recipient}\"]\nidentity_file = \"{}\"\noptions = {}",
            key.display(),
            az.options_toml()
        ),
    );
    let env = az.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = |args: &[&str]| run_env(&cfg, args, &env);
    let ok = |args: &[&str]| {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "invsync {args:?} failed: {out}{err}");
        out
    };

    ok(&["repo", "init"]);
    let (code, _, err) = run(&["repo", "init"]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");

    ok(&["backup", "--db", "src", "--tables", "public.*"]);
    pg.psql("einvoice", "UPDATE tags SET v = -v WHERE name = 'n7'");
    ok(&["backup", "--db", "src", "--tables", "public.*"]);
    let listed: serde_json::Value = serde_json::from_str(&ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);

    ok(&["restore", "latest", "--to-db", "dst"]);
    for (table, order) in [("items", "id"), ("tags", "kind, name")] {
        assert_eq!(
            fingerprint(&pg, "einvoice", table, order),
            fingerprint(&pg, "restored", table, order)
        );
    }

    let out = ok(&["verify", "repo", "--read-data", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");
    let forgot: serde_json::Value =
        serde_json::from_str(&ok(&["forget", "--keep-last", "1", "--prune", "--json"])).unwrap();
    let forgotten = forgot["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == false)
        .count();
    assert_eq!(forgotten, 1);
    let listed: serde_json::Value = serde_json::from_str(&ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let out = ok(&["verify", "repo", "--read-data", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");

    // The kept snapshot still restores after the prune.
    pg.psql("postgres", "CREATE DATABASE again");
    ok(&["restore", "latest", "--to-db", &pg.url("again")]);
    assert_eq!(
        fingerprint(&pg, "einvoice", "items", "id"),
        fingerprint(&pg, "again", "items", "id")
    );
}
