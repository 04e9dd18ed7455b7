//! Faults: damaged repositories (restore refuses and names what is lost; verify names every
//! finding), interrupted backups, prune beside a running backup, unreachable endpoints.

mod backup_util;
mod support;

use std::path::Path;

use backup_util::{
    copy_dir, files, findings, identity, make_tables, ok, queued_on, run, run_env, spawn,
    write_config,
};
use support::{finish, send_signal, PgCluster};

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
    let mut kinds: Vec<String> = findings(&out).into_iter().map(|x| x.0).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["missing_snapshot", "unindexed_pack"],
        "one finding per interrupted backup"
    );

    // The next backup works; prune removes the leftovers (their backups' processes are gone).
    let packs_before = data_packs(&repo);
    ok(&cfg, &args);
    let report: serde_json::Value = serde_json::from_str(&ok(&cfg, &["prune", "--json"])).unwrap();
    // The unindexed pack goes; the interrupted session's indexed pack is reused by the next
    // backup (deduplication), so it stays. Each session here writes one pack (5000 rows are far
    // below a pack's 16 MiB): the next backup's pack came and the unindexed one went.
    assert_eq!(report["packs_deleted"], 1, "{report}");
    assert_eq!(report["running_backups"], 0);
    assert_eq!(data_packs(&repo), packs_before);
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
    let packs_before = data_packs(&repo);
    let report: serde_json::Value = serde_json::from_str(&ok(&cfg, &["prune", "--json"])).unwrap();
    // Every pack goes but the one holding the kept snapshot's configuration tree.
    assert_eq!(data_packs(&repo), 1, "{report}");
    assert_eq!(report["packs_deleted"], packs_before - 1, "{report}");
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
    // A slow run may also log that it is still retrying: the error itself is one line.
    let error: Vec<&str> = err.lines().filter(|l| !l.contains(" WARN ")).collect();
    assert_eq!(error.len(), 1, "{err}");
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

/// How many packs `repo` holds.
fn data_packs(repo: &Path) -> usize {
    files(repo)
        .iter()
        .filter(|p| p.starts_with("data/"))
        .count()
}

// ---- Restores beside other sessions, other restores, prune and signals ----

/// A config naming the source, a target database `r` and a new file repository (initialised,
/// empty); returns it and the repository's directory.
fn repository_and_target(f: &Fixture) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = f.dir.path().join("repo");
    let cfg = write_config(
        f.dir.path(),
        "c.toml",
        &[("src", f.pg.url("einvoice")), ("r", f.pg.url("r"))],
        &format!("file://{}", repo.display()),
        &format!(
            "recipients = [\"{}\"]\nidentity_file = \"{}\"",
            f.recipient,
            f.key.display()
        ),
    );
    ok(&cfg, &["repo", "init"]);
    f.pg.psql("postgres", "CREATE DATABASE r");
    (cfg, repo)
}

/// A repository with one snapshot of `public.*`, restored once into `r`; returns the config.
fn restored_target(f: &Fixture) -> std::path::PathBuf {
    let (cfg, _) = repository_and_target(f);
    ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    ok(&cfg, &["restore", "latest", "--to-db", "r"]);
    cfg
}

fn staging_schemas(f: &Fixture) -> String {
    f.pg.psql(
        "r",
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'invsync\\_restore\\_%'",
    )
}

/// A test session reading `items` in `r` (returned, its transaction open) and a
/// `restore --replace` into `r` queued behind it, with all the time in the world.
async fn replace_behind_a_reader(
    f: &Fixture,
    cfg: &Path,
) -> (tokio_postgres::Client, std::process::Child) {
    let holder = f.pg.client("r").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let child = spawn(
        cfg,
        &[
            "restore",
            "latest",
            "--to-db",
            "r",
            "--replace",
            "--lock-wait",
            "600",
        ],
    );
    queued_on(&f.pg, "r", "items").await;
    (holder, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_stops_a_restore_waiting_for_a_lock_and_leaves_nothing_behind() {
    let f = fixture();
    let cfg = restored_target(&f);
    f.pg.psql("r", "UPDATE items SET note = 'target' WHERE id = 1");
    let before = backup_util::fingerprint(&f.pg, "r", "items", "id");
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let (holder, child) = replace_behind_a_reader(&f, &cfg).await;
        assert_eq!(
            staging_schemas(&f),
            "1",
            "the restore has loaded its staging schema"
        );
        send_signal(&child, signal);
        let (exit, err) = finish(child).await;
        assert_eq!(exit, code, "SIG{signal}: {err}");
        assert!(
            err.contains(&format!("stopped by SIG{signal}"))
                && err.contains("nothing was restored")
                && err.contains("was dropped"),
            "{err}"
        );
        assert_eq!(staging_schemas(&f), "0", "SIG{signal}: {err}");
        holder.batch_execute("COMMIT").await.unwrap();
        assert_eq!(backup_util::fingerprint(&f.pg, "r", "items", "id"), before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_behind_a_long_lock_gives_up_naming_the_session_holding_it() {
    let f = fixture();
    let cfg = restored_target(&f);
    let before = backup_util::fingerprint(&f.pg, "r", "tags", "kind, name");
    let holder = f.pg.client("r").await;
    holder
        .batch_execute(
            "SET application_name = 'month-end-report'; BEGIN; LOCK TABLE tags IN ACCESS SHARE MODE",
        )
        .await
        .unwrap();
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let started = std::time::Instant::now();
    let (code, _, err) = run(
        &cfg,
        &[
            "restore",
            "latest",
            "--to-db",
            "r",
            "--replace",
            "--lock-wait",
            "3",
        ],
    );
    assert_ne!(code, 0);
    // A lower bound: the restore waited out its --lock-wait; how much longer the process took
    // (start-up, connecting, the last 2 s attempt) depends on the machine's load.
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));
    assert!(
        err.contains("stayed locked for 3s")
            && err.contains(&format!("pid {pid}"))
            && err.contains("month-end-report")
            && err.contains("idle in transaction")
            && err.contains("nothing was restored"),
        "{err}"
    );
    assert_eq!(
        err.trim().lines().last().map(|l| l.starts_with("error:")),
        Some(true),
        "{err}"
    );
    assert_eq!(staging_schemas(&f), "0");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        backup_util::fingerprint(&f.pg, "r", "tags", "kind, name"),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_restore_into_the_same_database_is_refused_and_leftovers_are_dropped() {
    let f = fixture();
    let cfg = restored_target(&f);
    let (holder, first) = replace_behind_a_reader(&f, &cfg).await;

    // A second restore meanwhile: a clear refusal, and the first one's schema is untouched.
    let (code, _, err) = run(&cfg, &["restore", "latest", "--to-db", "r", "--replace"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("another restore into database r is running (pid ")
            && !err.contains("duplicate key"),
        "{err}"
    );
    assert_eq!(staging_schemas(&f), "1");

    // The first one is killed outright: its staging schema stays behind...
    send_signal(&first, "KILL");
    let (exit, _) = finish(first).await;
    assert_eq!(exit, -9);
    holder.batch_execute("COMMIT").await.unwrap();
    let watch = f.pg.client("r").await;
    support::wait_until(
        std::time::Duration::from_secs(30),
        "the killed restore's sessions to end",
        || async {
            watch
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        },
    )
    .await;
    assert_eq!(staging_schemas(&f), "1");

    // ...and the next restore drops it, then restores.
    let (code, _, err) = run(&cfg, &["restore", "latest", "--to-db", "r", "--replace"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("dropped schema invsync_restore_")
            && err.contains("left behind by an interrupted restore"),
        "{err}"
    );
    assert_eq!(staging_schemas(&f), "0");
    assert_eq!(
        backup_util::fingerprint(&f.pg, "einvoice", "items", "id"),
        backup_util::fingerprint(&f.pg, "r", "items", "id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_beside_a_paused_restore_deletes_nothing_it_reads() {
    let f = fixture();
    let (cfg, repo) = repository_and_target(&f);
    ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    let tables_snapshot = backup_util::files(&repo)
        .into_iter()
        .find_map(|p| p.strip_prefix("snapshots/").map(str::to_string))
        .unwrap();
    // The newest snapshot holds only a configuration tree: once the first is forgotten, all
    // table data is garbage to a prune.
    ok(&cfg, &["backup", "--config-dir", f.tree.to_str().unwrap()]);

    // The restore of the first snapshot pauses on the empty target's `items`, held by a test
    // session, after it has located its blobs and before it reads them.
    f.pg.psql("r", "CREATE TABLE items (id int)");
    let holder = f.pg.client("r").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let restore = spawn(&cfg, &["restore", &tables_snapshot[..8], "--to-db", "r"]);
    queued_on(&f.pg, "r", "items").await;

    let packs = |repo: &Path| {
        files(repo)
            .into_iter()
            .filter(|p| p.starts_with("data/"))
            .collect::<Vec<_>>()
    };
    let before = packs(&repo);
    let out = ok(&cfg, &["forget", "--keep-last", "1", "--prune", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["prune"]["running_readers"], 1, "{report}");
    assert_eq!(report["prune"]["packs_deleted"], 0, "{report}");
    assert_eq!(
        packs(&repo),
        before,
        "prune deleted packs the restore reads"
    );

    // The restore goes on and restores the forgotten snapshot whole.
    holder.batch_execute("COMMIT").await.unwrap();
    let (code, err) = finish(restore).await;
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("WARNING"), "{err}");
    assert_eq!(
        backup_util::fingerprint(&f.pg, "einvoice", "items", "id"),
        backup_util::fingerprint(&f.pg, "r", "items", "id")
    );
    // With the restore gone, a prune removes the forgotten data: every pack but the one
    // holding the kept snapshot's configuration tree.
    let report: serde_json::Value = serde_json::from_str(&ok(&cfg, &["prune", "--json"])).unwrap();
    assert_eq!(report["running_readers"], 0, "{report}");
    assert_eq!(report["packs_deleted"], before.len() - 1, "{report}");
    assert_eq!(packs(&repo).len(), 1, "{report}");
}
