//! `invsync archive`: the change stream of a database under `einvoice-gen load` stored as
//! segments in a real repository (local files), read back transaction by transaction.

mod backup_util;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backup_util::{owner_config, repo_config};
use invsync::backup::archive::{self, SegmentManifest};
use invsync::backup::repository::Repository;
use invsync::cdc::decoder::Message;
use support::{finish, invsync, send_signal, PgCluster};

const TABLES: [&str; 4] = ["invoice", "invoice_item", "allowance", "carrier"];

fn ok(cfg: &Path, args: &[&str]) -> String {
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = invsync(&all);
    assert_eq!(code, 0, "invsync {args:?}: {out} {err}");
    out
}

fn archiver(cfg: &Path, failpoint: Option<&str>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_invsync"));
    c.args(["--config", cfg.to_str().unwrap(), "archive", "run", "src"])
        .args(["--tables", "public.*", "--segment-seconds", "1"])
        .env_remove("INVSYNC_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(f) = failpoint {
        c.env("INVSYNC_FAILPOINT", f);
    }
    c.spawn().expect("run invsync archive run")
}

fn counts(c: &PgCluster) -> BTreeMap<&'static str, i64> {
    TABLES
        .iter()
        .map(|t| {
            let n = c.psql("einvoice", &format!("SELECT count(*) FROM public.{t}"));
            (*t, n.trim().parse().unwrap())
        })
        .collect()
}

async fn segments(repo: &Repository) -> Vec<SegmentManifest> {
    archive::list_segments(repo)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}

async fn wait_for_segments(repo: &Repository, more_than: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while segments(repo).await.len() <= more_than {
        assert!(Instant::now() < deadline, "no new segment within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn status(cfg: &Path) -> (i32, serde_json::Value) {
    let (code, out, err) = invsync(&[
        "--config",
        cfg.to_str().unwrap(),
        "archive",
        "status",
        "--json",
    ]);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (code, v)
}

fn backup(cfg: &Path) -> (String, String) {
    let out = ok(
        cfg,
        &["backup", "--db", "src", "--tables", "public.*", "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["snapshot"].as_str().unwrap().to_string();
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(cfg, &["snapshots", "--json"])).unwrap();
    let lsn = snaps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id.as_str())
        .unwrap()["lsn"]
        .as_str()
        .unwrap()
        .to_string();
    (id, lsn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_holds_every_transaction_once_across_crashes_and_chains_onto_snapshots() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let (cfg, recipient) = owner_config(dir.path(), &[("src", pg.url("einvoice"))], &url);
    ok(&cfg, &["repo", "init"]);
    let db_url = pg.url("einvoice");
    let gen = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
            .args(args)
            .args(["--url", &db_url])
            .env_remove("EINVOICE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    assert!(gen(&["fill", "--invoices", "200", "--seed", "3"])
        .wait()
        .unwrap()
        .success());
    let repo = Repository::open(&repo_config(
        &url,
        &dir.path().join("owner.key"),
        &recipient,
    ))
    .await
    .unwrap();

    // First run: dies right after storing its first segment of transactions, before the slot
    // is confirmed. The load runs from when the slot exists.
    let before = counts(&pg);
    let first = archiver(&cfg, Some("archive-after-segment"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg
        .psql("einvoice", "SELECT count(*) FROM pg_replication_slots")
        .trim()
        == "0"
    {
        assert!(
            Instant::now() < deadline,
            "the archive's slot was not created"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut load = gen(&[
        "load",
        "--rate",
        "400",
        "--duration",
        "12",
        "--connections",
        "2",
    ]);
    let (code, err) = finish(first).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("failpoint archive-after-segment"), "{err}");
    let first_segments = segments(&repo).await;
    assert!(first_segments.iter().any(|m| m.transactions > 0));

    // Under load: a restart, a backup, a kill -9 and a restart, another backup.
    let mut run = archiver(&cfg, None);
    wait_for_segments(&repo, 2).await;
    let (first_snap, _) = backup(&cfg);
    wait_for_segments(&repo, 4).await;
    run.kill().unwrap();
    run.wait().unwrap();
    let run = archiver(&cfg, None);
    let n = segments(&repo).await.len();
    wait_for_segments(&repo, n + 1).await;
    let (second_snap, second_lsn) = backup(&cfg);
    assert!(load.wait().unwrap().success());
    let after = counts(&pg);
    let end = pg.psql("einvoice", "SELECT pg_current_wal_lsn()::text");
    let end: invsync::pg::Lsn = end.trim().parse().unwrap();
    // Wait until the archive has passed the end of the load, then stop it as a person would.
    let deadline = Instant::now() + Duration::from_secs(60);
    while segments(&repo).await.iter().map(|m| m.end).max().unwrap() < end {
        assert!(Instant::now() < deadline, "the archive did not reach {end}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    send_signal(&run, "TERM");
    let (code, err) = finish(run).await;
    assert_eq!(code, 0, "{err}");

    // Every transaction once, in commit order, and their changes add up to the tables.
    let (_, st) = status(&cfg);
    let label = st[0]["db"].as_str().unwrap().to_string();
    assert!(label.starts_with("src ("), "{st}");
    let txns = archive::read_transactions(&repo, &label).await.unwrap();
    assert!(
        txns.len() > 100,
        "only {} transactions archived",
        txns.len()
    );
    let xids: HashSet<u32> = txns.iter().map(|t| t.xid).collect();
    assert_eq!(xids.len(), txns.len(), "a transaction is archived twice");
    assert!(txns.windows(2).all(|w| w[0].end_lsn < w[1].end_lsn));
    // Not only read once: stored once, although runs died after storing before confirming.
    let mut stored = 0;
    for m in segments(&repo).await {
        stored += archive::read_segment(&repo, &m).await.unwrap().len();
    }
    assert_eq!(
        stored,
        txns.len(),
        "some transaction is stored in two segments"
    );
    // Each segment is self-contained: read alone, every change follows its table's Relation.
    for m in segments(&repo).await {
        let mut known = HashSet::new();
        for t in archive::read_segment(&repo, &m).await.unwrap() {
            for msg in t.decode().unwrap() {
                match msg {
                    Message::Relation(r) => {
                        known.insert(r.id);
                    }
                    Message::Insert { relation, .. }
                    | Message::Update { relation, .. }
                    | Message::Delete { relation, .. } => assert!(
                        known.contains(&relation),
                        "segment {}..{}: a change to relation {relation} before its description",
                        m.start,
                        m.end
                    ),
                    _ => {}
                }
            }
        }
    }
    let mut net: BTreeMap<String, i64> = BTreeMap::new();
    let mut names = std::collections::HashMap::new();
    for t in &txns {
        for m in t.decode().unwrap() {
            match m {
                Message::Relation(r) => {
                    names.insert(r.id, r.name.clone());
                }
                Message::Insert { relation, .. } => {
                    *net.entry(names[&relation].clone()).or_default() += 1
                }
                Message::Delete { relation, .. } => {
                    *net.entry(names[&relation].clone()).or_default() -= 1
                }
                Message::Truncate { .. } => panic!("the load truncates nothing"),
                _ => {}
            }
        }
    }
    for t in TABLES {
        assert_eq!(
            net.get(t).copied().unwrap_or(0),
            after[t] - before[t],
            "table {t}: archived inserts minus deletes differ from the rows the load added"
        );
    }
    assert!(
        after["invoice"] > before["invoice"],
        "the load wrote nothing"
    );

    // The window starts at the first snapshot; no gap.
    let (code, st) = status(&cfg);
    assert_eq!(code, 0, "{st}");
    let db = &st[0];
    assert!(db["gaps"].as_array().unwrap().is_empty(), "{st}");
    assert_eq!(db["earliest"]["snapshot"], first_snap.as_str(), "{st}");

    ok(&cfg, &["verify", "repo", "--read-data", "--json"]);

    // Forgetting the first snapshot lets prune delete the segments only it needed.
    ok(&cfg, &["forget", "--keep-last", "1", "--prune", "--json"]);
    let second_lsn: invsync::pg::Lsn = second_lsn.parse().unwrap();
    let kept = segments(&repo).await;
    assert!(!kept.is_empty());
    assert!(
        kept.iter().all(|m| m.end >= second_lsn),
        "a needed segment is gone or an unneeded one kept"
    );
    assert!(
        kept.iter().any(|m| m.start <= second_lsn),
        "the segment reaching the kept snapshot is gone"
    );
    let (code, st) = status(&cfg);
    assert_eq!(code, 0, "{st}");
    assert_eq!(st[0]["earliest"]["snapshot"], second_snap.as_str(), "{st}");

    // A dropped and recreated slot is a gap, never papered over.
    let slot = db["slot"].as_str().unwrap();
    pg.psql(
        "einvoice",
        &format!("SELECT pg_drop_replication_slot('{slot}')"),
    );
    let n = segments(&repo).await.len();
    let run = archiver(&cfg, None);
    wait_for_segments(&repo, n).await;
    send_signal(&run, "TERM");
    let (code, err) = finish(run).await;
    assert_eq!(code, 0, "{err}");
    let (code, st) = status(&cfg);
    assert_eq!(code, 3, "{st}");
    let gaps = st[0]["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{st}");
    assert!(
        gaps[0]["reason"].as_str().unwrap().contains("slot changed"),
        "{st}"
    );
    assert!(
        st[0]["earliest"].is_null(),
        "no snapshot after the gap: {st}"
    );

    // A prune beside a running archive works as if alone (the archive holds no backup lock),
    // and a snapshot after the gap starts the window again.
    let n = segments(&repo).await.len();
    let run = archiver(&cfg, None);
    wait_for_segments(&repo, n).await;
    let (third_snap, _) = backup(&cfg);
    let report: serde_json::Value = serde_json::from_str(&ok(
        &cfg,
        &["forget", "--keep-last", "1", "--prune", "--json"],
    ))
    .unwrap();
    let text = report.to_string();
    assert!(text.contains("\"running_backups\":0"), "{text}");
    assert!(text.contains("\"packs_deferred\":0"), "{text}");
    send_signal(&run, "TERM");
    let (code, err) = finish(run).await;
    assert_eq!(code, 0, "{err}");
    let (code, st) = status(&cfg);
    assert_eq!(
        code, 0,
        "the segments before the only snapshot are gone: {st}"
    );
    assert_eq!(st[0]["earliest"]["snapshot"], third_snap.as_str(), "{st}");
}

#[test]
fn status_of_a_repository_without_an_archive_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let (cfg, _) = owner_config(
        dir.path(),
        &[("src", "postgres://u@127.0.0.1:1/x".into())],
        &url,
    );
    ok(&cfg, &["repo", "init"]);
    let (code, out, err) = invsync(&["--config", cfg.to_str().unwrap(), "archive", "status"]);
    assert_eq!(code, 1, "{out} {err}");
    assert!(
        err.contains("holds no change archive") && err.contains("invsync archive run"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
