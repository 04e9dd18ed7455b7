//! Faults: damaged repositories (restore refuses and names what is lost; verify names every
//! finding), interrupted backups, prune beside a running backup, unreachable endpoints.

mod backup_util;
mod support;

use std::path::Path;

use backup_util::{
    copy_dir, files, findings, identity, make_tables, ok, run, run_env, write_config,
};
use support::PgCluster;

struct Fixture {
    pg: PgCluster,
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
    recipient: String,
    tree: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 5000);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = identity(dir.path(), "owner");
    let tree = dir.path().join("etc/app");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("a.conf"), "x = 1\n").unwrap();
    Fixture {
        pg,
        dir,
        key,
        recipient,
        tree,
    }
}

impl Fixture {
    fn config(&self, name: &str, repo: &Path) -> std::path::PathBuf {
        write_config(
            self.dir.path(),
            name,
            &[("src", self.pg.url("einvoice"))],
            &format!("file://{}", repo.display()),
            &format!(
                "recipients = [\"{}\"]\nidentity_file = \"{}\"",
                self.recipient,
                self.key.display()
            ),
        )
    }
}

#[test]
fn damaged_repositories_are_reported_and_never_half_restored() {
    let f = fixture();
    let good = f.dir.path().join("good");
    let cfg = f.config("good.toml", &good);
    ok(&cfg, &["repo", "init"]);
    ok(
        &cfg,
        &[
            "backup",
            "--db",
            "src",
            "--tables",
            "public.*",
            "--config-dir",
            f.tree.to_str().unwrap(),
        ],
    );
    let packs: Vec<String> = files(&good)
        .into_iter()
        .filter(|p| p.starts_with("data/"))
        .collect();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let index: Vec<String> = files(&good)
        .into_iter()
        .filter(|p| p.starts_with("index/"))
        .collect();
    let snaps: Vec<String> = files(&good)
        .into_iter()
        .filter(|p| p.starts_with("snapshots/"))
        .collect();

    let damaged = |name: &str, damage: &dyn Fn(&Path)| {
        let repo = f.dir.path().join(name);
        copy_dir(&good, &repo);
        damage(&repo);
        (repo.clone(), f.config(&format!("{name}.toml"), &repo))
    };
    let db = |name: &str| {
        f.pg.psql("postgres", &format!("CREATE DATABASE {name}"));
        f.pg.url(name)
    };

    // A deleted pack.
    let (_, cfg) = damaged("nopack", &|r| {
        std::fs::remove_file(r.join(&packs[0])).unwrap()
    });
    let (code, out, _) = run(&cfg, &["verify", "repo", "--json"]);
    assert_eq!(code, 1);
    let found = findings(&out);
    let missing = found
        .iter()
        .find(|x| x.0 == "missing_pack")
        .unwrap_or_else(|| panic!("{found:?}"));
    assert_eq!(missing.1, packs[0]);
    assert!(
        missing.2.contains("table public.items")
            && missing.2.contains("table public.tags")
            && missing.2.contains("a.conf"),
        "{missing:?}"
    );
    let url = db("r_nopack");
    let (code, _, err) = run(&cfg, &["restore", "latest", "--to-db", &url]);
    assert_ne!(code, 0);
    assert!(
        err.contains("table public.items")
            && err.contains("is missing")
            && err.contains("nothing was restored"),
        "{err}"
    );
    assert_eq!(
        f.pg.psql(
            "r_nopack",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
    let out_dir = f.dir.path().join("out_nopack");
    let (code, _, err) = run(
        &cfg,
        &["restore", "latest", "--to-dir", out_dir.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("a.conf"), "{err}");
    assert!(files(&out_dir).is_empty());

    // A flipped byte inside a pack: found by --read-data; restore stops and rolls back.
    let (_, cfg) = damaged("flipped", &|r| {
        let p = r.join(&packs[0]);
        let mut b = std::fs::read(&p).unwrap();
        let i = b.len() / 2;
        b[i] ^= 0x40;
        std::fs::write(&p, b).unwrap();
    });
    let (code, out, _) = run(&cfg, &["verify", "repo", "--read-data", "--json"]);
    assert_eq!(code, 1, "{out}");
    let found = findings(&out);
    let bad = found
        .iter()
        .find(|x| x.0 == "corrupt_blob")
        .unwrap_or_else(|| panic!("{found:?}"));
    assert_eq!(bad.1, packs[0]);
    assert!(bad.2.contains("snapshot "), "{bad:?}");
    let url = db("r_flipped");
    let (code, _, err) = run(&cfg, &["restore", "latest", "--to-db", &url]);
    assert_ne!(code, 0);
    assert!(
        err.contains("nothing was restored") && err.contains(&packs[0]),
        "{err}"
    );
    assert_eq!(
        f.pg.psql(
            "r_flipped",
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'invsync_restore%'"
        ),
        "0",
        "the staging schema is gone"
    );
    assert_eq!(
        f.pg.psql(
            "r_flipped",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );

    // A truncated index object.
    let (_, cfg) = damaged("truncidx", &|r| {
        let p = r.join(&index[0]);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
    let (code, out, _) = run(&cfg, &["verify", "repo", "--json"]);
    assert_eq!(code, 1);
    let found = findings(&out);
    assert!(
        found
            .iter()
            .any(|x| x.0 == "unreadable_index" && x.1 == index[0]),
        "{found:?}"
    );
    let lost = found
        .iter()
        .find(|x| x.0 == "blob_not_indexed")
        .unwrap_or_else(|| panic!("{found:?}"));
    assert!(lost.2.contains("table public.items"), "{lost:?}");
    let url = db("r_truncidx");
    let (code, _, err) = run(&cfg, &["restore", "latest", "--to-db", &url]);
    assert_ne!(code, 0);
    assert!(
        err.contains("not in any readable index") && err.contains(&index[0]),
        "{err}"
    );

    // A missing snapshot manifest.
    let (_, cfg) = damaged("nosnap", &|r| {
        std::fs::remove_file(r.join(&snaps[0])).unwrap()
    });
    let (code, out, _) = run(&cfg, &["verify", "repo", "--json"]);
    assert_eq!(
        code, 0,
        "only unreachable data, nothing listed is damaged: {out}"
    );
    let found = findings(&out);
    assert!(
        found
            .iter()
            .any(|x| x.0 == "missing_snapshot" && x.1 == index[0]),
        "{found:?}"
    );
    assert!(ok(&cfg, &["snapshots"]).contains("0 snapshot(s)"));

    // And the undamaged original is clean.
    let out = ok(
        &f.config("good.toml", &good),
        &["verify", "repo", "--read-data", "--json"],
    );
    assert!(findings(&out).is_empty(), "{out}");
}

#[test]
fn interrupted_backups_leave_a_valid_repository_that_prune_cleans() {
    let f = fixture();
    let repo = f.dir.path().join("repo");
    let cfg = f.config("c.toml", &repo);
    ok(&cfg, &["repo", "init"]);
    let args = ["backup", "--db", "src", "--tables", "public.*"];
    ok(&cfg, &args);

    // Killed after the packs and index, before the manifest.
    f.pg.psql(
        "einvoice",
        "UPDATE items SET note = 'one' WHERE id % 100 = 0",
    );
    let (code, _, err) = run_env(
        &cfg,
        &args,
        &[("INVSYNC_FAILPOINT", "backup-before-snapshot")],
    );
    assert_ne!(code, 0, "{err}");
    // Killed after the packs, before their index.
    f.pg.psql(
        "einvoice",
        "UPDATE items SET note = 'two' WHERE id % 100 = 1",
    );
    let (code, _, err) = run_env(&cfg, &args, &[("INVSYNC_FAILPOINT", "backup-before-index")]);
    assert_ne!(code, 0, "{err}");

    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["snapshots", "--json"])).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "partial snapshots are never listed"
    );
    let (code, out, _) = run(&cfg, &["verify", "repo", "--json"]);
    assert_eq!(code, 0, "{out}");
    let kinds: Vec<String> = findings(&out).into_iter().map(|x| x.0).collect();
    assert!(
        kinds.contains(&"missing_snapshot".to_string())
            && kinds.contains(&"unindexed_pack".to_string()),
        "{kinds:?}"
    );

    // The next backup works; prune removes the leftovers (their backups' processes are gone).
    let packs_before = files(&repo)
        .iter()
        .filter(|p| p.starts_with("data/"))
        .count();
    ok(&cfg, &args);
    let report: serde_json::Value = serde_json::from_str(&ok(&cfg, &["prune", "--json"])).unwrap();
    // The unindexed pack goes; the interrupted session's indexed pack is reused by the next
    // backup (deduplication), so it stays.
    assert!(report["packs_deleted"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["running_backups"], 0);
    assert!(
        files(&repo)
            .iter()
            .filter(|p| p.starts_with("data/"))
            .count()
            < packs_before + 1
    );
    let out = ok(&cfg, &["verify", "repo", "--read-data", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");
    f.pg.psql("postgres", "CREATE DATABASE r");
    ok(&cfg, &["restore", "latest", "--to-db", &f.pg.url("r")]);
    assert_eq!(
        backup_util::fingerprint(&f.pg, "einvoice", "items", "id"),
        backup_util::fingerprint(&f.pg, "r", "items", "id")
    );

    // A prune killed between writing the compacted index and deleting packs: still valid.
    // (The newest snapshot holds only the config tree, so all table data becomes garbage.)
    ok(&cfg, &["backup", "--config-dir", f.tree.to_str().unwrap()]);
    let dry: serde_json::Value = serde_json::from_str(&ok(
        &cfg,
        &["forget", "--keep-last", "1", "--dry-run", "--json"],
    ))
    .unwrap();
    let would: Vec<bool> = dry["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["keep"].as_bool().unwrap())
        .collect();
    assert_eq!(
        would,
        vec![true, false, false],
        "newest kept, the rest would go"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["snapshots", "--json"])).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        3,
        "a dry run forgets nothing"
    );
    ok(&cfg, &["forget", "--keep-last", "1"]);
    let (code, _, _) = run_env(
        &cfg,
        &["prune"],
        &[("INVSYNC_FAILPOINT", "prune-after-index")],
    );
    assert_ne!(code, 0);
    let (code, out, _) = run(&cfg, &["verify", "repo", "--read-data", "--json"]);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&ok(&cfg, &["prune", "--json"])).unwrap();
    assert!(report["packs_deleted"].as_u64().unwrap() >= 1, "{report}");
    let out = ok(&cfg, &["verify", "repo", "--read-data", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");
    let out_dir = f.dir.path().join("out");
    ok(
        &cfg,
        &["restore", "latest", "--to-dir", out_dir.to_str().unwrap()],
    );
    assert_eq!(files(&out_dir).len(), 1);
}

#[test]
fn unreachable_repository_and_database_give_one_line_errors() {
    let f = fixture();
    let port = support::free_port();
    let s3 = write_config(
        f.dir.path(),
        "s3.toml",
        &[("src", format!("postgres://postgres@127.0.0.1:{port}/x?sslmode=disable"))],
        "s3://nobucket/p",
        &format!(
            "recipients = [\"{}\"]\nidentity_file = \"{}\"\noptions = {{ aws_endpoint = \"http://127.0.0.1:{port}\", aws_allow_http = \"true\", aws_access_key_id = \"a\", aws_secret_access_key = \"b\", aws_region = \"us-east-1\" }}",
            f.recipient,
            f.key.display()
        ),
    );
    let (code, _, err) = run(&s3, &["snapshots"]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("repository r (s3://nobucket/p)"), "{err}");

    let repo = f.dir.path().join("repo");
    let cfg = write_config(
        f.dir.path(),
        "db.toml",
        &[(
            "src",
            format!("postgres://postgres:hunter2@127.0.0.1:{port}/x?sslmode=disable"),
        )],
        &format!("file://{}", repo.display()),
        &format!(
            "recipients = [\"{}\"]\nidentity_file = \"{}\"",
            f.recipient,
            f.key.display()
        ),
    );
    let (code, _, err) = run(&cfg, &["snapshots"]);
    assert_ne!(code, 0);
    assert!(err.contains("repo init"), "{err}");
    ok(&cfg, &["repo", "init"]);
    let before = files(&repo);
    let (code, _, err) = run(&cfg, &["backup", "--db", "src", "--tables", "public.items"]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot connect to")
            && err.contains(&port.to_string())
            && !err.contains("hunter2"),
        "{err}"
    );
    assert_eq!(files(&repo), before, "nothing written");
}
