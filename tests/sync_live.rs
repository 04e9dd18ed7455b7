//! Pipelines that change while they stream, between real clusters with `einvoice-gen load`
//! running: a table joins a streaming pipeline (copied from a snapshot, then streamed from
//! exactly that snapshot's position), a second target joins while the pipeline streams (the
//! first target's lag measured before and during its copy), a table leaves, a target leaves the
//! configuration of the running pipeline and stops receiving changes, and a target that is down
//! past the pipeline's retained-WAL limit is cut loose and later copied back while streaming.
//!
//! Exact counters: `tick_old` (streaming from the start) and `tick_new` (joining live) each
//! hold one row whose `n` the test raises by one per source transaction. On every target an
//! `ENABLE ALWAYS` trigger (it fires in the apply session too) records each applied update
//! whose `n` does not move by exactly one: a change applied twice, or one lost, shows there.

mod support;
mod sync_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use support::{einvoice_gen, invsync, PgCluster};
use sync_common::*;

const EINVOICE: [&str; 4] = [
    "public.invoice",
    "public.invoice_item",
    "public.allowance",
    "public.carrier",
];

/// The tick tables, and on a target the trigger that records every update that does not move
/// `n` by exactly one (in `tick_anomaly`) and counts the updates (in `tick_applied`).
fn create_ticks(cluster: &PgCluster, target: bool) {
    cluster.psql(
        "einvoice",
        "CREATE TABLE tick_old (id int PRIMARY KEY, n bigint NOT NULL);
         CREATE TABLE tick_new (id int PRIMARY KEY, n bigint NOT NULL);",
    );
    if target {
        cluster.psql(
            "einvoice",
            "CREATE TABLE tick_anomaly (tab text, old_n bigint, new_n bigint);
             CREATE TABLE tick_applied (tab text PRIMARY KEY, updates bigint NOT NULL);
             CREATE FUNCTION tick_check() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.n <> OLD.n + 1 THEN
                     INSERT INTO tick_anomaly VALUES (TG_TABLE_NAME, OLD.n, NEW.n);
                 END IF;
                 INSERT INTO tick_applied VALUES (TG_TABLE_NAME, 1)
                     ON CONFLICT (tab) DO UPDATE SET updates = tick_applied.updates + 1;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER tick_old_check BEFORE UPDATE ON tick_old FOR EACH ROW EXECUTE FUNCTION tick_check();
             ALTER TABLE tick_old ENABLE ALWAYS TRIGGER tick_old_check;
             CREATE TRIGGER tick_new_check BEFORE UPDATE ON tick_new FOR EACH ROW EXECUTE FUNCTION tick_check();
             ALTER TABLE tick_new ENABLE ALWAYS TRIGGER tick_new_check;",
        );
    } else {
        cluster.psql(
            "einvoice",
            "INSERT INTO tick_old VALUES (1, 0); INSERT INTO tick_new VALUES (1, 0);",
        );
    }
}

/// Raises both ticks by one per source transaction until stopped; returns how many it did.
struct Ticker {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    async fn start(src: &PgCluster) -> Ticker {
        let client = src.client("einvoice").await;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicI64::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                client
                    .batch_execute(
                        "BEGIN; UPDATE tick_old SET n = n + 1; UPDATE tick_new SET n = n + 1; COMMIT",
                    )
                    .await
                    .unwrap();
                d.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        Ticker { stop, done, task }
    }

    /// Ticks so far (at least `n` are waited for, so the stream is busy around each step).
    async fn at_least(&self, n: i64) {
        wait_for("the ticker to tick", || {
            self.done.load(Ordering::Relaxed) >= n
        })
        .await;
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.done.load(Ordering::Relaxed)
    }
}

/// `einvoice-gen load` on the source, in the background.
fn start_load(src: &PgCluster, secs: u32, seed: u32, rate: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(["load", "--url", &src.url("einvoice")])
        .args(["--rate", &rate.to_string()])
        .args(["--duration", &secs.to_string(), "--seed", &seed.to_string()])
        .args(["--connections", "2"])
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start einvoice-gen load")
}

fn finish_load(load: Child) {
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "einvoice-gen load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the configuration: databases `a` (source), `b`, `c`; pipeline `p` from `a` to
/// `targets` over `tables`, with `extra` lines in its section (the file's last).
fn configure(
    dir: &Path,
    clusters: [&PgCluster; 3],
    targets: &[&str],
    tables: &[&str],
    extra: &str,
) -> PathBuf {
    let databases: Vec<(&str, String)> = ["a", "b", "c"]
        .into_iter()
        .zip(clusters.map(|c| c.url("einvoice")))
        .collect();
    let path = write_config(dir, &databases, &[("p", "a", targets, tables)]);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{}\n{extra}\n", text.trim_end())).unwrap();
    path
}

fn cli(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    invsync(&all)
}

fn setup(cfg: &Path, extra: &[&str]) -> String {
    let mut args = vec!["sync", "setup", "p"];
    args.extend_from_slice(extra);
    let (code, out, err) = cli(cfg, &args);
    assert_eq!(code, 0, "setup: {out}{err}");
    out
}

fn status(cfg: &Path) -> serde_json::Value {
    let (_, out, err) = cli(cfg, &["sync", "status", "p", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"))[0]
        .clone()
}

/// `verify db` of `tables` between `a` and `target`: exit 0, every table identical.
fn verify(cfg: &Path, target: &str, tables: &[&str]) {
    let list = tables.join(",");
    let (code, out, err) = cli(
        cfg,
        &[
            "verify", "db", "--source", "a", "--target", target, "--tables", &list,
        ],
    );
    assert_eq!(code, 0, "verify db a -> {target}: {out}{err}");
}

/// No tick update on `target` moved `n` by other than one, and `tab` saw exactly `updates`.
fn ticks_exact(target: &PgCluster, tab: &str, updates: i64) {
    assert_eq!(
        dump(
            target,
            "SELECT tab, old_n, new_n FROM tick_anomaly ORDER BY 1, 2"
        ),
        "",
        "a tick change was applied twice or lost"
    );
    assert_eq!(
        dump(
            target,
            &format!("SELECT COALESCE(max(updates), 0) FROM tick_applied WHERE tab = '{tab}'")
        ),
        updates.to_string(),
        "updates of {tab} applied"
    );
}

/// The tick value a target's copy of `tab` held: its `n` less the updates applied since.
fn joined_at(target: &PgCluster, tab: &str) -> i64 {
    dump(target, &format!("SELECT n FROM {tab}"))
        .parse::<i64>()
        .unwrap()
        - dump(
            target,
            &format!("SELECT COALESCE(max(updates), 0) FROM tick_applied WHERE tab = '{tab}'"),
        )
        .parse::<i64>()
        .unwrap()
}

/// Samples how many ticks `target` is behind the source, until stopped; returns the most.
struct Lag {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<i64>,
}

impl Lag {
    async fn start(src: &PgCluster, target: &PgCluster) -> Lag {
        let (s, t) = (
            src.client("einvoice").await,
            target.client("einvoice").await,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut most = 0;
            while !stopped.load(Ordering::Relaxed) {
                let n = |r: tokio_postgres::Row| r.get::<_, i64>(0);
                let at_source = n(s.query_one("SELECT n FROM tick_old", &[]).await.unwrap());
                let at_target = n(t.query_one("SELECT n FROM tick_old", &[]).await.unwrap());
                most = most.max(at_source - at_target);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            most
        });
        Lag { stop, task }
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

fn sum_query(table: &str) -> String {
    format!("SELECT count(*), sum(hashtext(t::text)) FROM {table} t")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_and_a_target_join_a_streaming_pipeline_and_a_table_leaves() {
    let src = PgCluster::start();
    let b = PgCluster::start();
    let c = PgCluster::start();
    einvoice_gen(&["fill", "--url", &src.url("einvoice"), "--invoices", "300"]);
    create_ticks(&src, false);
    create_ticks(&b, true);
    create_ticks(&c, true);
    let dir = tempfile::tempdir().unwrap();
    let first = ["public.invoice", "public.invoice_item", "public.tick_old"];
    let cfg = configure(dir.path(), [&src, &b, &c], &["b"], &first, "");
    setup(&cfg, &[]);

    // A table (and two of einvoice's) join while the pipeline streams under load.
    let run = Running::start(&load(&cfg), "p");
    let ticker = Ticker::start(&src).await;
    let load_a = start_load(&src, 6, 7, 400);
    ticker.at_least(100).await;
    let all: Vec<&str> = EINVOICE
        .iter()
        .copied()
        .chain(["public.tick_old", "public.tick_new"])
        .collect();
    configure(dir.path(), [&src, &b, &c], &["b"], &all, "");
    let out = setup(&cfg, &[]);
    assert!(
        out.contains("tables joined: public.allowance, public.carrier, public.tick_new"),
        "{out}"
    );
    let phases = status(&cfg)["targets"][0]["tables"].clone();
    assert_eq!(phases.as_array().unwrap().len(), 6, "{phases}");
    assert!(
        phases
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["phase"] != "copying"),
        "{phases}"
    );
    // A second setup copies nothing again.
    assert!(setup(&cfg, &[]).contains("already set up"));
    ticker.at_least(300).await;
    finish_load(load_a);
    let ticks = ticker.stop().await;
    wait_same(&src, &b, "SELECT n FROM tick_new").await;
    wait_same(&src, &b, "SELECT n FROM tick_old").await;
    run.stop().await;
    verify(&cfg, "b", &all);
    ticks_exact(&b, "tick_old", ticks);
    // tick_new joined at its copy's position: it saw only the updates after it, each once.
    let tick_new_at = joined_at(&b, "tick_new");
    assert!(
        tick_new_at > 0 && tick_new_at < ticks,
        "joined at {tick_new_at} of {ticks}"
    );
    ticks_exact(&b, "tick_new", ticks - tick_new_at);
    assert_eq!(dump(&b, "SELECT n FROM tick_new"), ticks.to_string());

    // A second target joins while the pipeline streams under load: it is copied from its own
    // snapshot, then streamed from that snapshot's position, and b is not held back meanwhile.
    let mut run = Running::start(&load(&cfg), "p");
    let ticker = Ticker::start(&src).await;
    let load_b = start_load(&src, 12, 8, 400);
    let normal = Lag::start(&src, &b).await;
    ticker.at_least(300).await;
    let normal = normal.stop().await;
    configure(dir.path(), [&src, &b, &c], &["b", "c"], &all, "");
    let (code, _, err) = cli(&cfg, &["sync", "setup", "p", "--no-copy"]);
    assert_ne!(code, 0, "a joining target needs its copy");
    assert!(err.contains("--no-copy"), "{err}");
    assert_eq!(
        dump(&c, "SELECT to_regclass('public.invoice') IS NULL"),
        "t"
    );
    let during = Lag::start(&src, &b).await;
    let setup_cfg = cfg.clone();
    let out = tokio::task::spawn_blocking(move || setup(&setup_cfg, &[]))
        .await
        .unwrap();
    assert!(out.contains("targets copied: c"), "{out}");
    let now: i64 = dump(&src, "SELECT n FROM tick_old").parse().unwrap();
    run.wait_for("c to stream", || {
        dump(&c, "SELECT n FROM tick_old").parse::<i64>().unwrap() >= now
    })
    .await;
    let during = during.stop().await;
    eprintln!("lag of b in ticks: {normal} before, {during} while c joined");
    assert!(
        during <= 2 * normal + 50,
        "b fell behind while c joined: {during} ticks, normally at most {normal}"
    );
    finish_load(load_b);
    let more = ticker.stop().await;
    for t in [&b, &c] {
        wait_same(&src, t, "SELECT n FROM tick_old").await;
        wait_same(&src, t, &sum_query("invoice_item")).await;
    }
    run.stop().await;
    verify(&cfg, "b", &all);
    verify(&cfg, "c", &all);
    ticks_exact(&b, "tick_old", ticks + more);
    let c_joined_at = joined_at(&c, "tick_old");
    assert!(
        c_joined_at > ticks && c_joined_at < ticks + more,
        "c joined at {c_joined_at} of {}",
        ticks + more
    );
    ticks_exact(&c, "tick_old", ticks + more - c_joined_at);

    // A table leaves: its changes stop reaching the targets, the others keep streaming.
    let kept: Vec<&str> = all
        .iter()
        .copied()
        .filter(|t| *t != "public.tick_new")
        .collect();
    configure(dir.path(), [&src, &b, &c], &["b", "c"], &kept, "");
    let run = Running::start(&load(&cfg), "p");
    let out: serde_json::Value = serde_json::from_str(&setup(&cfg, &["--json"])).unwrap();
    assert_eq!(out["outcome"], "changed", "{out}");
    assert_eq!(
        out["removed_tables"],
        serde_json::json!(["public.tick_new"]),
        "{out}"
    );
    assert_eq!(out["dropped"], false, "{out}");
    let before = dump(&b, "SELECT n FROM tick_new");
    let ticker = Ticker::start(&src).await;
    ticker.at_least(50).await;
    let ticked = ticker.stop().await;
    for t in [&b, &c] {
        // Changes arrive in commit order: once tick_old has the last tick, tick_new would too.
        wait_same(&src, t, "SELECT n FROM tick_old").await;
        assert_eq!(dump(t, "SELECT n FROM tick_new"), before, "tick_new left");
    }
    ticks_exact(&b, "tick_old", ticks + more + ticked);
    run.stop().await;
    let phases = status(&cfg)["targets"][0]["tables"].clone();
    assert!(
        !phases.to_string().contains("tick_new"),
        "bookkeeping of a table that left: {phases}"
    );
    let published = dump(
        &src,
        "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'tick_new'",
    );
    assert_eq!(published, "0");

    // A target leaves the configuration while the pipeline streams: the running pipeline stops
    // streaming to it without a restart, and b goes on.
    let mut run = Running::start(&load(&cfg), "p");
    let ticker = Ticker::start(&src).await;
    ticker.at_least(30).await;
    let now: i64 = dump(&src, "SELECT n FROM tick_old").parse().unwrap();
    run.wait_for("c to stream", || {
        dump(&c, "SELECT n FROM tick_old").parse::<i64>().unwrap() >= now
    })
    .await;
    configure(dir.path(), [&src, &b, &c], &["b"], &kept, "");
    let session = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}'",
        invsync::cdc::names::origin("p", "c")
    );
    wait_for("the running pipeline to let c go", || {
        dump(&c, &session) == "0"
    })
    .await;
    let left_at = dump(&c, "SELECT n FROM tick_old");
    ticker.at_least(200).await;
    let last = ticker.stop().await;
    wait_same(&src, &b, "SELECT n FROM tick_old").await;
    assert_eq!(dump(&c, "SELECT n FROM tick_old"), left_at, "c left");
    run.stop().await;
    ticks_exact(&b, "tick_old", ticks + more + ticked + last);
    let out: serde_json::Value = serde_json::from_str(&setup(&cfg, &["--json"])).unwrap();
    assert_eq!(out["removed_targets"], serde_json::json!(["c"]), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_past_the_wal_limit_is_cut_loose_and_copied_back() {
    let src = PgCluster::start();
    let b = PgCluster::start();
    let c = PgCluster::start();
    einvoice_gen(&["fill", "--url", &src.url("einvoice"), "--invoices", "200"]);
    create_ticks(&src, false);
    create_ticks(&b, true);
    create_ticks(&c, true);
    let dir = tempfile::tempdir().unwrap();
    let tables: Vec<&str> = EINVOICE
        .iter()
        .copied()
        .chain(["public.tick_old"])
        .collect();
    let cfg = configure(
        dir.path(),
        [&src, &b, &c],
        &["b", "c"],
        &tables,
        "max_retained_wal = \"1MB\"",
    );
    setup(&cfg, &[]);

    let mut run = Running::start(&load(&cfg), "p");
    let ticker = Ticker::start(&src).await;
    ticker.at_least(20).await;
    let now: i64 = dump(&src, "SELECT n FROM tick_old").parse().unwrap();
    run.wait_for("c to stream", || {
        dump(&c, "SELECT n FROM tick_old").parse::<i64>().unwrap() >= now
    })
    .await;
    c.stop();
    let load_a = start_load(&src, 8, 3, 1500);
    wait_until_cut(&cfg).await;
    // The slot no longer waits for c: it is confirmed past what c holds, while b streams.
    let cut_lsn = status(&cfg)["targets"][1]["cut_loose"]["lsn"]
        .as_str()
        .unwrap()
        .to_string();
    finish_load(load_a);
    let ticks = ticker.stop().await;
    wait_same(&src, &b, "SELECT n FROM tick_old").await;
    wait_same(&src, &b, &sum_query("invoice_item")).await;
    wait_for("the slot to be confirmed past the cut target", || {
        confirmed_a_mb_past(&src, &cut_lsn)
    })
    .await;
    // Retained WAL stops growing: once a checkpoint logs the running transactions, the slot's
    // restart point follows.
    src.psql("einvoice", "CHECKPOINT");
    wait_for("the slot to release the WAL the cut target held", || {
        dump(
            &src,
            &format!(
                "SELECT restart_lsn > '{cut_lsn}'::pg_lsn + 1024 * 1024 \
                 FROM pg_replication_slots WHERE slot_type = 'logical' AND NOT temporary"
            ),
        ) == "t"
    })
    .await;
    run.stop().await;
    ticks_exact(&b, "tick_old", ticks);

    // Status says so, and the exit status fails, even with c reachable again.
    c.start_again();
    let (code, out, _) = cli(&cfg, &["sync", "status", "p"]);
    assert_ne!(code, 0);
    assert!(out.contains("CUT LOOSE"), "{out}");
    // A run skips c rather than streaming it across the gap.
    let run = Running::start(&load(&cfg), "p");
    let ticker = Ticker::start(&src).await;
    ticker.at_least(20).await;
    let t2 = ticker.stop().await;
    wait_same(&src, &b, "SELECT n FROM tick_old").await;
    run.stop().await;
    assert_ne!(
        dump(&c, "SELECT n FROM tick_old"),
        dump(&src, "SELECT n FROM tick_old")
    );

    // A copy that stalls (setup's snapshot waits behind a transaction left open on the source)
    // while the load writes past max_retained_wal: the running pipeline stops holding the slot
    // for it, so the source's WAL is released, and setup, once it gets on, fails saying to run
    // it again (that copy is never marked streaming).
    c.psql("einvoice", "TRUNCATE tick_anomaly, tick_applied");
    src.psql("einvoice", "CREATE TABLE stall (x int)");
    let run = Running::start(&load(&cfg), "p");
    let blocker = src.client("einvoice").await;
    blocker
        .batch_execute("BEGIN; INSERT INTO stall VALUES (1)")
        .await
        .unwrap();
    let before = dump(&src, "SELECT pg_current_wal_lsn()");
    let setup_cfg = cfg.clone();
    let stalled = tokio::task::spawn_blocking(move || cli(&setup_cfg, &["sync", "setup", "p"]));
    let load_s = start_load(&src, 8, 5, 1500);
    wait_for("the pipeline to release its hold for c's copy", || {
        try_dump(
            &c,
            "SELECT applied_lsn = 'FFFFFFFF/FFFFFFFF' FROM invsync.pipeline WHERE pipeline = 'p'",
        )
        .as_deref()
            == Some("t")
    })
    .await;
    wait_for("the slot to move past the released hold", || {
        confirmed_a_mb_past(&src, &before)
    })
    .await;
    finish_load(load_s);
    blocker.batch_execute("COMMIT").await.unwrap();
    let (code, _, err) = stalled.await.unwrap();
    assert_ne!(code, 0, "{err}");
    let error: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        error.len() == 1
            && error[0].contains("stopped holding its slot")
            && error[0].contains("run `invsync sync setup p` again"),
        "{err}"
    );
    run.stop().await;

    // Setup copies it again while the pipeline streams under load; then it streams and ends
    // identical.
    let run = Running::start(&load(&cfg), "p");
    let ticker = Ticker::start(&src).await;
    let load_b = start_load(&src, 6, 4, 400);
    ticker.at_least(50).await;
    let setup_cfg = cfg.clone();
    let out = tokio::task::spawn_blocking(move || setup(&setup_cfg, &[]))
        .await
        .unwrap();
    assert!(out.contains("targets copied: c"), "{out}");
    assert!(status(&cfg)["targets"][1]["cut_loose"].is_null());
    ticker.at_least(150).await;
    finish_load(load_b);
    let t3 = ticker.stop().await;
    for t in [&b, &c] {
        wait_same(&src, t, "SELECT n FROM tick_old").await;
        wait_same(&src, t, &sum_query("invoice_item")).await;
    }
    run.stop().await;
    verify(&cfg, "b", &tables);
    verify(&cfg, "c", &tables);
    ticks_exact(&b, "tick_old", ticks + t2 + t3);
    let copied_at = joined_at(&c, "tick_old");
    assert!(
        copied_at > ticks + t2 && copied_at < ticks + t2 + t3,
        "c copied at {copied_at}"
    );
    ticks_exact(&c, "tick_old", ticks + t2 + t3 - copied_at);
}

/// The pipeline's slot on `src` is confirmed more than 1 MB past `lsn`.
fn confirmed_a_mb_past(src: &PgCluster, lsn: &str) -> bool {
    dump(
        src,
        &format!(
            "SELECT confirmed_flush_lsn > '{lsn}'::pg_lsn + 1024 * 1024 \
             FROM pg_replication_slots WHERE slot_type = 'logical' AND NOT temporary"
        ),
    ) == "t"
}

async fn wait_until_cut(cfg: &Path) {
    wait_for("target c to be cut loose", || {
        !status(cfg)["targets"][1]["cut_loose"].is_null()
    })
    .await;
}
