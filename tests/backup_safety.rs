//! Safety contracts tested through the library: prune beside running backups, hostile paths
//! in snapshots, and the in-memory store.

mod backup_util;
mod support;

use std::path::Path;
use std::time::Duration;

use invsync::backup::check::{check_repo, RepoCheckOptions};
use invsync::backup::lock::{Lock, LockKind};
use invsync::backup::repository::Repository;
use invsync::backup::restore::{self, RestoreDbOptions};
use invsync::backup::retention::{self, Policy};
use invsync::backup::session::{self, BackupOptions, DatabaseSource, Quiet};
use invsync::backup::snapshot::{self, Snapshot};
use invsync::backup::tree::{EntryKind, TreeEntry, TreeSnapshot};
use invsync::backup::{prune, BackupError};
use invsync::config::TablePattern;
use support::PgCluster;

fn packs(dir: &Path) -> Vec<String> {
    backup_util::files(dir)
        .into_iter()
        .filter(|p| p.starts_with("data/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_beside_a_running_backup_never_deletes_what_it_will_reference() {
    let pg = PgCluster::start();
    backup_util::make_tables(&pg, "einvoice", 5000);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "k");
    let repo_dir = dir.path().join("repo");
    let cfg = backup_util::repo_config(&format!("file://{}", repo_dir.display()), &key, &recipient);
    Repository::init(&cfg).await.unwrap();
    let repo = Repository::open(&cfg).await.unwrap();
    let tree = dir.path().join("conf");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("x"), "y").unwrap();

    let items = BackupOptions {
        database: Some(backup_util::tables_of(&pg, "public.items")),
        config_dirs: vec![],
        tags: vec![],
        fence: None,
    };
    let conf_only = BackupOptions {
        database: None,
        config_dirs: vec![tree.clone()],
        tags: vec![],
        fence: None,
    };
    session::backup(&repo, &items, &Quiet).await.unwrap();
    let item_packs = packs(&repo_dir);
    session::backup(&repo, &conf_only, &Quiet).await.unwrap();
    retention::forget(
        &repo,
        &Policy {
            keep_last: Some(1),
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();

    // A backup is running (it may deduplicate against the now unreferenced item blobs).
    let running = Lock::acquire(&repo, LockKind::Backup).await.unwrap();
    let r = prune::prune(&repo, false).await.unwrap();
    assert_eq!(r.running_backups, 1);
    assert_eq!(r.packs_deleted, 0);
    // Every pack of the forgotten snapshot is unreferenced now, and each is kept.
    assert_eq!(r.packs_deferred, item_packs.len());
    for p in &item_packs {
        assert!(
            repo_dir.join(p).exists(),
            "{p} was deleted under a running backup"
        );
    }
    running.release(&repo).await;

    // A real backup that reuses those blobs, paused mid-way (after it took its lock and began
    // its cut, before it reads `items`, which a test session holds), and a real prune run
    // while it waits: both locks are seen at once, and the snapshot the backup then publishes
    // is whole.
    let holder = pg.client("einvoice").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (b, p) = tokio::join!(session::backup(&repo, &items, &Quiet), async {
        backup_util::queued_on(&pg, "einvoice", "items").await;
        assert_eq!(
            lock_files(&repo_dir, "backup"),
            1,
            "the backup holds its lock"
        );
        let p = prune::prune(&repo, false).await;
        holder.batch_execute("COMMIT").await.unwrap();
        p
    });
    let summary = b.unwrap();
    let p = p.unwrap();
    assert_eq!(
        (p.running_backups, p.packs_deleted, p.packs_deferred),
        (1, 0, item_packs.len()),
        "prune saw the paused backup and kept what it reuses: {p:?}"
    );
    assert_eq!(lock_files(&repo_dir, "backup"), 0);
    let report = check_repo(
        &repo,
        &RepoCheckOptions {
            read_data: Some(100.0),
        },
    )
    .await
    .unwrap();
    assert!(!report.has_errors(), "{:?}", report.findings);
    let (_, snap) = snapshot::find(&repo, &summary.snapshot).await.unwrap();
    pg.psql("postgres", "CREATE DATABASE r");
    restore::restore_db(
        &repo,
        &snap,
        &pg.conn("r"),
        &RestoreDbOptions {
            tables: vec![],
            replace: false,
            access: Default::default(),
            lock_wait: Duration::from_secs(10),
        },
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        backup_util::fingerprint(&pg, "einvoice", "items", "id"),
        backup_util::fingerprint(&pg, "r", "items", "id")
    );

    // With nothing running, a second prune is exclusive and finds nothing left to defer, nor
    // to delete: the new snapshot references the item packs again.
    let r = prune::prune(&repo, false).await.unwrap();
    assert_eq!(
        (r.running_backups, r.packs_deferred, r.packs_deleted),
        (0, 0, 0)
    );
}

/// How many `locks/KIND-*` objects the file repository in `repo_dir` holds.
fn lock_files(repo_dir: &Path, kind: &str) -> usize {
    backup_util::files(repo_dir)
        .iter()
        .filter(|p| p.starts_with(&format!("locks/{kind}-")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_prune_processes_at_once_leave_a_whole_snapshot() {
    let pg = PgCluster::start();
    backup_util::make_tables(&pg, "einvoice", 5000);
    let dir = tempfile::tempdir().unwrap();
    let cfg = backup_util::restore_setup(&pg, dir.path());
    let repo_dir = dir.path().join("repo");
    let tree = dir.path().join("conf");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("x"), "y").unwrap();
    let items = [
        "backup",
        "--db",
        "src",
        "--tables",
        "public.items",
        "--json",
    ];
    backup_util::ok(&cfg, &items);
    let item_packs = packs(&repo_dir);
    backup_util::ok(&cfg, &["backup", "--config-dir", tree.to_str().unwrap()]);
    backup_util::ok(&cfg, &["forget", "--keep-last", "1"]);

    // The backup process pauses before it reads `items` (held by a test session), its lock
    // taken; the prune process runs to its end meanwhile.
    let holder = pg.client("einvoice").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let backup = backup_util::spawn(&cfg, &items);
    backup_util::queued_on(&pg, "einvoice", "items").await;
    assert_eq!(
        lock_files(&repo_dir, "backup"),
        1,
        "the backup holds its lock"
    );
    let report: serde_json::Value =
        serde_json::from_str(&backup_util::ok(&cfg, &["prune", "--json"])).unwrap();
    assert_eq!(report["running_backups"], 1, "{report}");
    assert_eq!(report["packs_deleted"], 0, "{report}");
    assert_eq!(report["packs_deferred"], item_packs.len(), "{report}");
    assert_eq!(packs(&repo_dir).len(), item_packs.len() + 1, "{report}");
    holder.batch_execute("COMMIT").await.unwrap();

    let out = tokio::task::spawn_blocking(move || backup.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = summary["snapshot"].as_str().unwrap();
    // Every pack reads back whole; the one finding is the index of the forgotten snapshot's
    // session, which the prune left in place because a backup was running.
    let verified = backup_util::ok(&cfg, &["verify", "repo", "--read-data", "--json"]);
    let kinds: Vec<String> = backup_util::findings(&verified)
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(kinds, ["missing_snapshot"], "{verified}");
    // With nothing beside it, a prune compacts the index and deletes nothing: the new
    // snapshot references the item packs again. Then the repository checks clean.
    let report: serde_json::Value =
        serde_json::from_str(&backup_util::ok(&cfg, &["prune", "--json"])).unwrap();
    assert_eq!(
        (&report["running_backups"], &report["packs_deleted"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "{report}"
    );
    let verified = backup_util::ok(&cfg, &["verify", "repo", "--read-data", "--json"]);
    assert!(backup_util::findings(&verified).is_empty(), "{verified}");
    backup_util::ok(&cfg, &["restore", &id[..8], "--to-db", "dst"]);
    assert_eq!(
        backup_util::fingerprint(&pg, "einvoice", "items", "id"),
        backup_util::fingerprint(&pg, "restored", "items", "id")
    );
}

fn entry(path: &str, kind: EntryKind, target: Option<&str>) -> TreeEntry {
    TreeEntry {
        path: path.into(),
        kind,
        mode: 0o644,
        mtime: 1_700_000_000,
        mtime_nanos: 0,
        size: 0,
        target: target.map(str::to_string),
        chunks: vec![],
    }
}

fn hostile_snapshot(root: &str, entries: Vec<TreeEntry>) -> Snapshot {
    let mut all = vec![
        entry("", EntryKind::Dir, None),
        entry("ok.txt", EntryKind::File, None),
    ];
    all.extend(entries);
    Snapshot {
        version: 1,
        session: "s".into(),
        time: chrono::Utc::now(),
        host: "h".into(),
        tags: vec![],
        source: None,
        lsn: None,
        cut: None,
        tables: vec![],
        trees: vec![TreeSnapshot {
            root: root.into(),
            entries: all,
        }],
        stats: Default::default(),
        id_key: None,
    }
}

#[tokio::test]
async fn hostile_paths_in_a_snapshot_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "k");
    let repo = Repository::init(&backup_util::repo_config("memory:///", &key, &recipient))
        .await
        .unwrap();
    let cases: Vec<(&str, Snapshot)> = vec![
        (
            "dot-dot entry",
            hostile_snapshot("/etc/app", vec![entry("../escape", EntryKind::File, None)]),
        ),
        (
            "nested dot-dot",
            hostile_snapshot(
                "/etc/app",
                vec![entry("a/../../../escape", EntryKind::File, None)],
            ),
        ),
        (
            "absolute entry",
            hostile_snapshot("/etc/app", vec![entry("/tmp/abs", EntryKind::File, None)]),
        ),
        ("dot-dot root", hostile_snapshot("/../../tmp", vec![])),
        (
            "symlink out",
            hostile_snapshot(
                "/etc/app",
                vec![entry("l", EntryKind::Symlink, Some("../../../../outside"))],
            ),
        ),
        (
            "absolute symlink",
            hostile_snapshot(
                "/etc/app",
                vec![entry("l", EntryKind::Symlink, Some("/etc/passwd"))],
            ),
        ),
        (
            "symlink through symlink",
            hostile_snapshot(
                "/",
                vec![
                    entry("a", EntryKind::Symlink, Some(".")),
                    entry("b", EntryKind::Symlink, Some("a/..")),
                ],
            ),
        ),
    ];
    for (what, snap) in cases {
        let id = snapshot::save(&repo, &snap).await.unwrap();
        let (_, snap) = snapshot::find(&repo, &id).await.unwrap();
        let target = dir.path().join(format!("t-{}", what.replace(' ', "-")));
        let err = restore::restore_dir(&repo, &snap, &target, &[])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BackupError::Restore(m) if m.contains("unsafe")),
            "{what}: {err}"
        );
        assert!(
            backup_util::files(&target).is_empty(),
            "{what}: something was written"
        );
    }

    // An existing symlink in the target directory is never written through.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("etc")).unwrap();
    let id = snapshot::save(&repo, &hostile_snapshot("/etc/app", vec![]))
        .await
        .unwrap();
    let (_, snap) = snapshot::find(&repo, &id).await.unwrap();
    let err = restore::restore_dir(&repo, &snap, &target, &[])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("refusing to write through it"),
        "{err}"
    );
    assert!(backup_util::files(&outside).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_round_trip() {
    let pg = PgCluster::start();
    backup_util::make_tables(&pg, "einvoice", 3000);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "k");
    let repo = Repository::init(&backup_util::repo_config("memory:///", &key, &recipient))
        .await
        .unwrap();
    let opts = BackupOptions {
        database: Some(backup_util::tables_of(&pg, "public.*")),
        config_dirs: vec![],
        tags: vec!["m".into()],
        fence: None,
    };
    let s = session::backup(&repo, &opts, &Quiet).await.unwrap();
    assert_eq!(s.tables, 2);
    let again = session::backup(&repo, &opts, &Quiet).await.unwrap();
    assert_eq!(
        again.stats.blobs_new, 0,
        "unchanged tables store nothing new"
    );
    let (_, snap) = snapshot::find(&repo, "latest").await.unwrap();
    pg.psql("postgres", "CREATE DATABASE r");
    let only_tags = RestoreDbOptions {
        tables: vec![TablePattern::parse("public.tags").unwrap()],
        replace: false,
        access: Default::default(),
        lock_wait: Duration::from_secs(10),
    };
    let done = restore::restore_db(
        &repo,
        &snap,
        &pg.conn("r"),
        &only_tags,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(
        backup_util::fingerprint(&pg, "einvoice", "tags", "kind, name"),
        backup_util::fingerprint(&pg, "r", "tags", "kind, name")
    );
    assert_eq!(
        pg.psql("r", "SELECT to_regclass('public.items') IS NULL"),
        "t"
    );
    let report = check_repo(
        &repo,
        &RepoCheckOptions {
            read_data: Some(100.0),
        },
    )
    .await
    .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_cut_at_one_instant_while_writes_go_on() {
    let pg = PgCluster::start();
    // Dumped in name order: a_pairs, then the big b_big, then c_pairs; a writer adds one row
    // to a_pairs and one to c_pairs in each transaction meanwhile.
    pg.psql(
        "einvoice",
        "CREATE TABLE a_pairs (id bigint PRIMARY KEY); CREATE TABLE c_pairs (id bigint PRIMARY KEY);
         CREATE TABLE b_big (id int PRIMARY KEY, pad text);
         INSERT INTO b_big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 100000) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "k");
    let repo = Repository::init(&backup_util::repo_config("memory:///", &key, &recipient))
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = pg.client("einvoice").await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                client
                    .batch_execute(&format!("BEGIN; INSERT INTO a_pairs VALUES ({i}); INSERT INTO c_pairs VALUES ({i}); COMMIT"))
                    .await
                    .unwrap();
            }
            i
        })
    };
    // Three readers: each table on its own connection, all joined to one exported snapshot.
    let opts = BackupOptions {
        database: Some(DatabaseSource {
            jobs: 3,
            ..backup_util::tables_of(&pg, "public.*")
        }),
        config_dirs: vec![],
        tags: vec![],
        fence: None,
    };
    // The backup starts once the writer is under way.
    let watch = pg.client("einvoice").await;
    let count = || async {
        watch
            .query_one("SELECT count(*) FROM a_pairs", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    support::wait_until(Duration::from_secs(60), "the writer to start", || async {
        count().await > 100
    })
    .await;
    let s = session::backup(&repo, &opts, &Quiet).await.unwrap();
    let after = count().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    let (_, snap) = snapshot::find(&repo, &s.snapshot).await.unwrap();
    let rows = |name: &str| {
        snap.tables
            .iter()
            .find(|t| t.schema.name.name == name)
            .unwrap()
            .rows
    };
    assert_eq!(
        rows("a_pairs"),
        rows("c_pairs"),
        "both tables at the same instant"
    );
    // The cut lies inside the writer's run: it wrote before it (waited for) and after it,
    // while the backup read b_big (about 26 MB) and the pairs.
    assert!(
        rows("a_pairs") > 100 && (rows("a_pairs") as i64) < after,
        "the writer did not run during the backup: {} rows at the cut, {after} after",
        rows("a_pairs")
    );
    pg.psql("postgres", "CREATE DATABASE r");
    restore::restore_db(
        &repo,
        &snap,
        &pg.conn("r"),
        &RestoreDbOptions {
            tables: vec![],
            replace: false,
            access: Default::default(),
            lock_wait: Duration::from_secs(10),
        },
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        pg.psql("r", "SELECT count(*) FROM a_pairs FULL JOIN c_pairs USING (id) WHERE a_pairs.id IS NULL OR c_pairs.id IS NULL"),
        "0"
    );
    assert_eq!(
        pg.psql("r", "SELECT count(*) FROM a_pairs"),
        rows("a_pairs").to_string()
    );
}
