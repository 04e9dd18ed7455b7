//! The whole backup cycle against a real S3 API server on loopback.

mod backup_util;
mod support;

use backup_util::{files, findings, fingerprint, identity, make_tables, ok, run, write_config};
use support::{PgCluster, S3Server};

#[test]
fn s3_backup_restore_verify_forget_prune() {
    let s3 = S3Server::start();
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 4000);
    pg.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = identity(dir.path(), "k");
    let tree = dir.path().join("etc/app");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("d/app.conf"), "listen = 1\n").unwrap();
    let cfg = write_config(
        dir.path(),
        "c.toml",
        &[("src", pg.url("einvoice")), ("dst", pg.url("restored"))],
        &s3.url("backups/einvoice"),
        &format!(
            "recipients = [\"{recipient}\"]\nidentity_file = \"{}\"\noptions = {}",
            key.display(),
            s3.options_toml()
        ),
    );
    ok(&cfg, &["repo", "init"]);
    let (code, _, err) = run(&cfg, &["repo", "init"]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");

    ok(
        &cfg,
        &[
            "backup",
            "--db",
            "src",
            "--tables",
            "public.*",
            "--config-dir",
            tree.to_str().unwrap(),
        ],
    );
    pg.psql("einvoice", "UPDATE tags SET v = -v WHERE name = 'n7'");
    ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["snapshots", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);

    ok(&cfg, &["restore", "latest", "--to-db", "dst"]);
    assert_eq!(
        fingerprint(&pg, "einvoice", "items", "id"),
        fingerprint(&pg, "restored", "items", "id")
    );
    assert_eq!(
        fingerprint(&pg, "einvoice", "tags", "kind, name"),
        fingerprint(&pg, "restored", "tags", "kind, name")
    );

    let first = listed[0]["id"].as_str().unwrap();
    let out = dir.path().join("out");
    ok(
        &cfg,
        &["restore", &first[..8], "--to-dir", out.to_str().unwrap()],
    );
    let restored = out.join(tree.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read_to_string(restored.join("d/app.conf")).unwrap(),
        "listen = 1\n"
    );
    assert_eq!(files(&out).len(), 1);

    let out = ok(&cfg, &["verify", "repo", "--read-data", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");
    let forgot = ok(&cfg, &["forget", "--keep-last", "1", "--prune", "--json"]);
    let forgot: serde_json::Value = serde_json::from_str(&forgot).unwrap();
    assert_eq!(
        forgot["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["keep"] == false)
            .count(),
        1
    );
    let out = ok(&cfg, &["verify", "repo", "--read-data=50", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");
}
