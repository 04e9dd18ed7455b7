//! Switchover between real clusters with a load writing through the application role that the
//! switchover pauses: over to the target and back again (both directions exercised, every table
//! identical, the write pause reported, sequences never behind the keys, a pipeline the other
//! way streaming on), and `kill -9` of `invsync` at three recorded steps (paused, reverse set up,
//! committed), after which a rerun finishes or `--rollback` undoes it, with no acknowledged
//! write lost either way.

mod agent_common;
mod support;
mod sync_common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use invsync::pg::ConnInfo;
use support::{invsync, PgCluster};
use sync_common::*;

const SCHEMA: &str = "CREATE ROLE app LOGIN;
    CREATE TABLE invoice (id bigserial PRIMARY KEY, writer int NOT NULL, n bigint NOT NULL,
                          note text, UNIQUE (writer, n));
    CREATE TABLE item (id bigserial PRIMARY KEY, invoice_id bigint NOT NULL, amount bigint);
    CREATE TABLE carrier (id bigserial PRIMARY KEY, code text NOT NULL);
    GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
    GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;";

/// Two clusters with the schema and role on both, 300 invoices on `a`, pipeline `p` set up from
/// `a` to `b` and its reverse `p_back` configured (not set up), and `carriers` from `b` to `a`
/// (the other way, over another table) set up.
fn set_up() -> (PgCluster, PgCluster, tempfile::TempDir, std::path::PathBuf) {
    let a = PgCluster::start();
    let b = PgCluster::start();
    a.psql("einvoice", SCHEMA);
    b.psql("einvoice", SCHEMA);
    a.psql(
        "einvoice",
        "INSERT INTO invoice (writer, n, note) SELECT 0, g, 'before' FROM generate_series(1, 300) g;
         INSERT INTO item (invoice_id, amount) SELECT id, id * 10 FROM invoice;",
    );
    let dir = tempfile::tempdir().unwrap();
    let tables: &[&str] = &["public.invoice", "public.item"];
    let cfg = write_config(
        dir.path(),
        &[("a", a.url("einvoice")), ("b", b.url("einvoice"))],
        &[
            ("p", "a", &["b"], tables),
            ("p_back", "b", &["a"], tables),
            ("carriers", "b", &["a"], &["public.carrier"]),
        ],
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "[pipelines.p]\n",
            "[pipelines.p]\napplication_roles = [\"app\"]\n",
        )
        .replace(
            "[pipelines.p_back]\n",
            "[pipelines.p_back]\napplication_roles = [\"app\"]\n",
        );
    std::fs::write(&cfg, text).unwrap();
    for p in ["p", "carriers"] {
        let (code, _, err) = invsync(&["--config", cfg.to_str().unwrap(), "sync", "setup", p]);
        assert_eq!(code, 0, "{err}");
    }
    (a, b, dir, cfg)
}

/// The application: one writer inserting invoices (each with an item) through role `app` into
/// whichever database it is told is the primary, retrying a write until it is acknowledged.
struct Load {
    primary: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    /// Writes refused or cut off (read-only, session ended): the pause as the application saw it.
    refused: Arc<AtomicU64>,
    /// Inserts that hit another row's primary key: a sequence behind the keys.
    collisions: Arc<AtomicU64>,
    acked: Arc<Mutex<BTreeSet<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(primary: &PgCluster) -> Load {
        let url = Arc::new(Mutex::new(primary.url_as("app", "einvoice")));
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let collisions = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let (u, s, r, col, k) = (
            url.clone(),
            stop.clone(),
            refused.clone(),
            collisions.clone(),
            acked.clone(),
        );
        let task = tokio::spawn(async move {
            let mut client: Option<(String, tokio_postgres::Client)> = None;
            let mut n: i64 = 1;
            while !s.load(Ordering::SeqCst) {
                let want = u.lock().unwrap().clone();
                if client
                    .as_ref()
                    .is_none_or(|(at, c)| *at != want || c.is_closed())
                {
                    match ConnInfo::parse(&want).unwrap().connect().await {
                        Ok(c) => client = Some((want, c)),
                        Err(_) => {
                            r.fetch_add(1, Ordering::SeqCst);
                            // Pacing of the retry, not synchronisation.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let c = &client.as_ref().unwrap().1;
                let res = c
                    .execute(
                        "WITH i AS (INSERT INTO invoice (writer, n, note) VALUES (1, $1, 'load') \
                         RETURNING id) INSERT INTO item (invoice_id, amount) SELECT id, $1 FROM i",
                        &[&n],
                    )
                    .await;
                match res {
                    Ok(_) => {
                        k.lock().unwrap().insert(n);
                        n += 1;
                    }
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                    {
                        let exists = c
                            .query_one(
                                "SELECT EXISTS (SELECT 1 FROM invoice WHERE writer = 1 AND n = $1)",
                                &[&n],
                            )
                            .await
                            .map(|r| r.get::<_, bool>(0))
                            .unwrap_or(false);
                        if exists {
                            // Committed before the session was cut off: acknowledged now.
                            k.lock().unwrap().insert(n);
                            n += 1;
                        } else {
                            // Another row's id: the sequence is behind the keys. The
                            // next try draws a later id.
                            col.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(_) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        client = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Load {
            primary: url,
            stop,
            refused,
            collisions,
            acked,
            task,
        }
    }

    fn point_at(&self, primary: &PgCluster) {
        *self.primary.lock().unwrap() = primary.url_as("app", "einvoice");
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` further writes are acknowledged.
    async fn wait_writes(&self, more: usize) {
        let goal = self.acked() + more;
        wait_for("the load to write", || self.acked() >= goal).await;
    }

    async fn stop(self) -> (BTreeSet<i64>, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (
            acked,
            self.refused.load(Ordering::SeqCst),
            self.collisions.load(Ordering::SeqCst),
        )
    }
}

/// Runs `invsync --config CFG sync switchover ARGS` off the runtime's threads (the load goes on).
async fn switchover(cfg: &str, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> = ["--config", cfg, "sync", "switchover"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        invsync(&refs)
    })
    .await
    .unwrap()
}

fn report(out: &str, err: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
}

/// The switchover stage recorded on `c` for `pipeline`, if any.
fn stage(c: &PgCluster, pipeline: &str) -> Option<String> {
    try_dump(
        c,
        &format!("SELECT stage FROM invsync.switchover WHERE pipeline = '{pipeline}'"),
    )
    .filter(|s| !s.is_empty())
}

fn slot_exists(c: &PgCluster, pipeline: &str) -> bool {
    dump(
        c,
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
            invsync::cdc::names::slot(pipeline)
        ),
    ) == "1"
}

fn number(c: &PgCluster, query: &str) -> i64 {
    dump(c, query).parse().unwrap()
}

/// Every acknowledged write is on both clusters, they verify identical through `pipeline` (from
/// `primary` to `replica`), no insert hit another row's key, and the primary's sequences are at
/// or past their keys (a replica's move forward every `sequence_interval`, and at switchover).
fn check_nothing_lost(
    primary: &PgCluster,
    replica: &PgCluster,
    cfg: &str,
    pipeline: &str,
    acked: &BTreeSet<i64>,
    collisions: u64,
) {
    for c in [primary, replica] {
        let present: BTreeSet<i64> = dump(c, "SELECT n FROM invoice WHERE writer = 1 ORDER BY n")
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        let lost: Vec<_> = acked.difference(&present).collect();
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
        assert_eq!(
            number(
                c,
                "SELECT count(*) FROM invoice i JOIN item t ON t.invoice_id = i.id"
            ),
            number(c, "SELECT count(*) FROM invoice")
        );
    }
    for (seq, table) in [("invoice_id_seq", "invoice"), ("item_id_seq", "item")] {
        let last = number(primary, &format!("SELECT last_value FROM {seq}"));
        let max = number(primary, &format!("SELECT max(id) FROM {table}"));
        assert!(last >= max, "{seq} at {last} behind max(id) {max}");
    }
    assert_eq!(collisions, 0, "inserts collided with existing keys");
    let (code, out, err) = invsync(&[
        "--config",
        cfg,
        "verify",
        "db",
        "--pipeline",
        pipeline,
        "--settle",
        "0",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_and_back_loses_no_write() {
    let (a, b, _dir, cfg) = set_up();
    let cfg_s = cfg.to_str().unwrap();
    let config = load(&cfg);

    // The plan changes nothing.
    let (code, out, err) = invsync(&["--config", cfg_s, "sync", "switchover", "p", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("set up p_back from b to a without a copy"),
        "{out}"
    );
    assert!(stage(&a, "p").is_none() && app_may_write(&a, "invoice").await);

    // Carriers registered in the cloud stream the other way all along.
    let carriers = Running::start(&config, "carriers");
    let register = |n: usize| {
        b.psql(
            "einvoice",
            &format!("INSERT INTO carrier (code) SELECT '/C' || g FROM generate_series(1, {n}) g"),
        )
    };
    register(10);
    let writes = Load::start(&a);
    let run = Running::start(&config, "p");
    writes.wait_writes(100).await;
    // While `sync run` streams the pipeline (it does not give way, as an agent does), the
    // switchover refuses and changes nothing: its request ends rolled back.
    let (code, _, err) = switchover(cfg_s, &["p"]).await;
    assert_eq!(code, 1);
    // (Said by the wait for the slot, or, had `sync run` taken the slot only after that wait,
    // by the switchover's own stream, which then never gets it.)
    assert!(
        err.contains("did not start, nothing was changed") && err.contains("in use"),
        "{err}"
    );
    assert_eq!(stage(&a, "p").as_deref(), Some("rolled_back"));
    assert!(app_may_write(&a, "invoice").await);
    run.stop().await;
    writes.wait_writes(100).await;

    // Over to b while the application writes to a.
    let acked_before = writes.acked();
    let (code, out, err) = switchover(cfg_s, &["p", "--json"]).await;
    let written_meanwhile = writes.acked() - acked_before;
    assert_eq!(code, 0, "{err}");
    let r = report(&out, &err);
    assert_eq!(r["outcome"], "completed", "{r}");
    let pause = r["write_pause_ms"].as_u64().unwrap();
    assert!(pause > 0, "{r}");
    eprintln!("write pause a -> b: {pause} ms; steps {}", r["steps"]);
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "catch_up",
            "verify_before_pause",
            "pause",
            "drain",
            "sequences",
            "verify",
            "reverse",
            "retire",
            "release"
        ]
    );
    // The tables were compared whole before the pause; inside it, only the rows the
    // application changed since (each write: an invoice and its item), none of the others.
    let (whole, changed) = (
        r["rows_verified"].as_u64().unwrap(),
        r["changed_rows_verified"].as_u64().unwrap(),
    );
    assert!(whole >= 600, "{r}");
    assert!(
        changed > 0 && changed <= 2 * written_meanwhile as u64,
        "{changed} rows compared in the pause, {written_meanwhile} writes during the switchover: {r}"
    );
    // The application was held off a, and still is: a is now fed by b.
    assert!(writes.refused.load(Ordering::SeqCst) > 0);
    assert!(!app_may_write(&a, "invoice").await && app_may_write(&b, "invoice").await);
    assert!(!slot_exists(&a, "p") && slot_exists(&b, "p_back"));
    assert_eq!(stage(&a, "p").as_deref(), Some("done"));

    register(20);
    // The application moves to b; b streams back to a.
    writes.point_at(&b);
    let run = Running::start(&config, "p_back");
    writes.wait_writes(100).await;
    run.stop().await;

    // And back to a.
    let (code, out, err) = switchover(cfg_s, &["p_back", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let r = report(&out, &err);
    assert_eq!(r["outcome"], "completed", "{r}");
    eprintln!("write pause b -> a: {} ms", r["write_pause_ms"]);
    register(40);
    assert!(app_may_write(&a, "invoice").await && !app_may_write(&b, "invoice").await);
    writes.point_at(&a);
    let run = Running::start(&config, "p");
    writes.wait_writes(100).await;
    let (acked, _, collisions) = writes.stop().await;
    wait_same(&a, &b, "SELECT count(*), sum(n) FROM invoice").await;
    wait_same(&a, &b, "SELECT count(*), sum(amount) FROM item").await;
    run.stop().await;
    check_nothing_lost(&a, &b, cfg_s, "p", &acked, collisions);
    // The carriers went on streaming through both switchovers, each applied once.
    wait_same(&b, &a, "SELECT count(*), sum(id) FROM carrier").await;
    carriers.stop().await;
    assert_eq!(number(&a, "SELECT count(*) FROM carrier"), 70);
    let (code, out, err) = invsync(&[
        "--config",
        cfg_s,
        "verify",
        "db",
        "--pipeline",
        "carriers",
        "--settle",
        "0",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
}

/// [`set_up`], with the application writing to `a` and `p` having streamed its first writes
/// to `b` (then stopped).
async fn set_up_writing() -> (
    PgCluster,
    PgCluster,
    tempfile::TempDir,
    std::path::PathBuf,
    Load,
) {
    let (a, b, dir, cfg) = set_up();
    let writes = Load::start(&a);
    let run = Running::start(&load(&cfg), "p");
    writes.wait_writes(100).await;
    run.stop().await;
    (a, b, dir, cfg, writes)
}

/// How many publications a switchover made on `c` (for following writes there) are left.
fn switchover_publications(c: &PgCluster) -> i64 {
    number(
        c,
        "SELECT count(*) FROM pg_publication WHERE pubname LIKE '%switchover%'",
    )
}

/// Starts a switchover that halts once `stage` is recorded on `on`, and kills it there with
/// SIGKILL. The switchover's log is shown if it does not get there (a switchover on a machine
/// busy with other clusters can take a while: the wait is long).
async fn kill_at(cfg: &str, pipeline: &str, on: &PgCluster, stage_name: &str) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", cfg, "sync", "switchover", pipeline])
        .args(["--halt-after", stage_name])
        .env_remove("INVSYNC_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while stage(on, pipeline).as_deref() != Some(stage_name) {
        let exited = child.try_wait().unwrap().is_some();
        assert!(
            !exited && std::time::Instant::now() < deadline,
            "the switchover {} before stage {stage_name}:\n{}",
            if exited { "exited" } else { "did not get" },
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_switchover_is_finished_or_rolled_back_by_the_next_run() {
    let (a, b, _dir, cfg, writes) = set_up_writing().await;
    let cfg_s = cfg.to_str().unwrap();
    let config = load(&cfg);

    // A difference found while streaming stops the switchover before anything changes.
    b.psql(
        "einvoice",
        "INSERT INTO invoice (id, writer, n) VALUES (-1, 9, 1)",
    );
    let (code, _, err) = switchover(cfg_s, &["p"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "did not start, nothing was changed: a and b differ (public.invoice: 1 differing row(s))"
        ),
        "{err}"
    );
    assert_eq!(stage(&a, "p").as_deref(), Some("rolled_back"));
    assert!(
        app_may_write(&a, "invoice").await && !slot_exists(&b, "p_back") && slot_exists(&a, "p")
    );
    b.psql("einvoice", "DELETE FROM invoice WHERE id = -1");

    // A role the switchover does not pause keeps writing a row on a: the verification inside
    // the pause, which compares the rows changed since the one before it, finds the write b
    // never got, and the switchover rolls back and says why.
    let rogue = a.client("einvoice").await;
    let stop_rogue = Arc::new(AtomicBool::new(false));
    let rogue_task = {
        let stop = stop_rogue.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                rogue
                    .execute(
                        "UPDATE invoice SET note = clock_timestamp()::text WHERE id = 1",
                        &[],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let (code, _, err) = switchover(cfg_s, &["p"]).await;
    stop_rogue.store(true, Ordering::SeqCst);
    rogue_task.await.unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "rolled back at step `verify`: a and b differ (public.invoice: 1 differing row(s))"
        ),
        "{err}"
    );
    assert_eq!(stage(&a, "p").as_deref(), Some("rolled_back"));
    assert!(
        app_may_write(&a, "invoice").await && !slot_exists(&b, "p_back") && slot_exists(&a, "p")
    );
    let run = Running::start(&config, "p");
    writes.wait_writes(100).await;
    run.stop().await;

    // Something other than the pipeline writes a row on b after the comparison before the pause
    // (here as soon as the comparison's sessions on b have come and gone): the stretch read on
    // b, which leaves out the pipeline's own apply, names the row to the verification inside
    // the pause, and the switchover rolls back and says why.
    let watcher = b.client("einvoice").await;
    let comparing_on_b = || async {
        let n: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'invsync verify'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n > 0
    };
    let cfg_owned = cfg_s.to_string();
    let attempt = tokio::spawn(async move { switchover(&cfg_owned, &["p"]).await });
    while !comparing_on_b().await {
        assert!(
            !attempt.is_finished(),
            "the switchover ended before comparing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while comparing_on_b().await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    watcher
        .execute("UPDATE invoice SET note = 'written on b' WHERE id = 2", &[])
        .await
        .unwrap();
    let (code, _, err) = attempt.await.unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "rolled back at step `verify`: a and b differ (public.invoice: 1 differing row(s))"
        ),
        "{err}"
    );
    assert_eq!(stage(&a, "p").as_deref(), Some("rolled_back"));
    assert!(app_may_write(&a, "invoice").await && !slot_exists(&b, "p_back"));
    assert_eq!(switchover_publications(&b), 0);
    // Put b's row back as a has it (the pipeline streams a's later changes to it).
    let note = dump(
        &a,
        "SELECT coalesce(note, '<null>') FROM invoice WHERE id = 2",
    );
    b.psql(
        "einvoice",
        &format!(
            "UPDATE invoice SET note = {} WHERE id = 2",
            if note == "<null>" {
                "NULL".to_string()
            } else {
                format!("'{note}'")
            }
        ),
    );
    let run = Running::start(&config, "p");
    writes.wait_writes(100).await;
    run.stop().await;

    // Killed with the application paused: a stays paused (no write can land where b would not
    // see it), and the next run finishes from the record.
    kill_at(cfg_s, "p", &a, "paused").await;
    assert!(!app_may_write(&a, "invoice").await);
    let (code, out, err) = switchover(cfg_s, &["p", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let r = report(&out, &err);
    assert_eq!(
        (r["outcome"].as_str(), r["resumed_from"].as_str()),
        (Some("completed"), Some("paused")),
        "{r}"
    );
    assert!(r["write_pause_ms"].as_u64().unwrap() > 0);
    assert!(app_may_write(&b, "invoice").await && !slot_exists(&a, "p"));

    writes.point_at(&b);
    let run = Running::start(&config, "p_back");
    writes.wait_writes(100).await;
    run.stop().await;

    // Killed after the reverse pipeline (p, b's way back to a) was set up, before the commit:
    // --rollback undoes it, and b is the primary again.
    kill_at(cfg_s, "p_back", &b, "reverse_set_up").await;
    assert!(slot_exists(&a, "p") && !app_may_write(&b, "invoice").await);
    let (code, out, err) = switchover(cfg_s, &["p_back", "--rollback", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let r = report(&out, &err);
    assert_eq!(r["outcome"], "rolled_back", "{r}");
    assert_eq!(stage(&b, "p_back").as_deref(), Some("rolled_back"));
    assert!(!slot_exists(&a, "p") && slot_exists(&b, "p_back"));
    assert!(app_may_write(&b, "invoice").await && !app_may_write(&a, "invoice").await);
    // A second rollback finds nothing to undo.
    let (code, _, err) = switchover(cfg_s, &["p_back", "--rollback"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("nothing to roll back"), "{err}");

    let run = Running::start(&config, "p_back");
    writes.wait_writes(100).await;
    run.stop().await;

    // Killed past the point of no return: it cannot be rolled back, and a rerun finishes it.
    kill_at(cfg_s, "p_back", &b, "committed").await;
    let (code, _, err) = switchover(cfg_s, &["p_back", "--rollback"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot be rolled back"), "{err}");
    let (code, out, err) = switchover(cfg_s, &["p_back", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let r = report(&out, &err);
    assert_eq!(
        (r["outcome"].as_str(), r["resumed_from"].as_str()),
        (Some("completed"), Some("committed")),
        "{r}"
    );
    assert!(app_may_write(&a, "invoice").await && !app_may_write(&b, "invoice").await);
    assert!(!slot_exists(&b, "p_back") && slot_exists(&a, "p"));

    writes.point_at(&a);
    let run = Running::start(&config, "p");
    writes.wait_writes(100).await;
    let (acked, _, collisions) = writes.stop().await;
    wait_same(&a, &b, "SELECT count(*), sum(n) FROM invoice").await;
    wait_same(&a, &b, "SELECT count(*), sum(amount) FROM item").await;
    run.stop().await;
    check_nothing_lost(&a, &b, cfg_s, "p", &acked, collisions);
}

/// `kill -9` at each recorded step the test above leaves out: before the commit, `--rollback`
/// makes a the primary again and the pipeline streams on from where it stopped; after it
/// (`retired`), the next run finishes. No acknowledged write is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_any_other_step_a_switchover_rolls_back_or_finishes() {
    let (a, b, _dir, cfg, writes) = set_up_writing().await;
    let cfg_s = cfg.to_str().unwrap();
    let config = load(&cfg);
    for stage_name in [
        "requested",
        "started",
        "drained",
        "sequences_copied",
        "verified",
    ] {
        kill_at(cfg_s, "p", &a, stage_name).await;
        let (code, out, err) = switchover(cfg_s, &["p", "--rollback", "--json"]).await;
        assert_eq!(code, 0, "killed at {stage_name}: {err}");
        let r = report(&out, &err);
        assert_eq!(
            (r["outcome"].as_str(), r["resumed_from"].as_str()),
            (Some("rolled_back"), Some(stage_name)),
            "{r}"
        );
        assert!(
            app_may_write(&a, "invoice").await
                && slot_exists(&a, "p")
                && !slot_exists(&b, "p_back"),
            "killed at {stage_name}"
        );
        assert_eq!(switchover_publications(&b), 0, "killed at {stage_name}");
        let run = Running::start(&config, "p");
        writes.wait_writes(50).await;
        run.stop().await;
    }
    kill_at(cfg_s, "p", &a, "retired").await;
    let (code, out, err) = switchover(cfg_s, &["p", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let r = report(&out, &err);
    assert_eq!(
        (r["outcome"].as_str(), r["resumed_from"].as_str()),
        (Some("completed"), Some("retired")),
        "{r}"
    );
    writes.point_at(&b);
    let run = Running::start(&config, "p_back");
    writes.wait_writes(100).await;
    let (acked, _, collisions) = writes.stop().await;
    wait_same(&b, &a, "SELECT count(*), sum(n) FROM invoice").await;
    wait_same(&b, &a, "SELECT count(*), sum(amount) FROM item").await;
    run.stop().await;
    check_nothing_lost(&b, &a, cfg_s, "p_back", &acked, collisions);
}

/// The state of `pipeline` in an agent's `/status`, and what it waits for.
async fn agent_pipeline(port: u16, pipeline: &str) -> (String, String) {
    let status = agent_common::status(port).await;
    let p = status["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pipeline)
        .unwrap_or_else(|| panic!("no {pipeline} in {status}"))
        .clone();
    (
        p["state"].as_str().unwrap_or_default().to_string(),
        p["waiting_for"].as_str().unwrap_or_default().to_string(),
    )
}

/// An agent configured with a pipeline and its way back follows switchovers in both
/// directions while the application writes: it gives way when the switchover is requested
/// (the switchover no longer finds the slot in use), waits while it runs, then streams the
/// way back; the old direction waits as "not set up". Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gives_way_to_a_switchover_and_streams_the_way_back() {
    let (a, b, dir, cfg) = set_up();
    let cfg_s = cfg.to_str().unwrap();
    let port = support::free_port();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut agent = agent_common::start_agent(&cfg, &log);
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let writes = Load::start(&a);
    writes.wait_writes(100).await;
    support::wait_until(Duration::from_secs(60), "the agent to stream p", || async {
        agent_common::get(port, "/status").await.is_some()
            && agent_pipeline(port, "p").await.0 == "streaming"
    })
    .await;
    // The way back waits (once this agent holds its lease: standby until then).
    support::wait_until(Duration::from_secs(60), "p_back to wait", || async {
        agent_pipeline(port, "p_back").await.0 == "waiting"
    })
    .await;
    let (_, why) = agent_pipeline(port, "p_back").await;
    assert!(why.contains("not set up"), "{why}");

    let (code, out, err) = switchover(cfg_s, &["p", "--json"]).await;
    assert_eq!(code, 0, "{err}\n{}", agent_log());
    assert_eq!(report(&out, &err)["outcome"], "completed");
    assert!(
        agent_log().contains("pipeline_giving_way"),
        "{}",
        agent_log()
    );

    // The application moves to b; the agent streams b's writes back to a.
    writes.point_at(&b);
    writes.wait_writes(100).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while agent_pipeline(port, "p_back").await.0 != "streaming" {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}\n{}",
            agent_pipeline(port, "p_back").await,
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let on_b = number(&b, "SELECT max(id) FROM invoice");
    wait_for("a to receive b's writes", || {
        number(&a, "SELECT coalesce(max(id), 0) FROM invoice") >= on_b
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (state, why) = agent_pipeline(port, "p").await;
        if state == "waiting" && why.contains("not set up") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{state}: {why}\n{}",
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent_pipeline(port, "p_back").await.0, "streaming");

    // And back, the agent still running.
    let (code, _, err) = switchover(cfg_s, &["p_back"]).await;
    assert_eq!(code, 0, "{err}\n{}", agent_log());
    writes.point_at(&a);
    writes.wait_writes(100).await;
    let (acked, _, collisions) = writes.stop().await;
    wait_same(&a, &b, "SELECT count(*), sum(n) FROM invoice").await;
    wait_same(&a, &b, "SELECT count(*), sum(amount) FROM item").await;
    assert_eq!(agent_pipeline(port, "p").await.0, "streaming");
    support::send_signal(&agent, "TERM");
    let (code, _) = agent_common::exit_within(&mut agent, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{}", agent_log());
    check_nothing_lost(&a, &b, cfg_s, "p", &acked, collisions);
}
