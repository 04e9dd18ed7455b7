//! Faults: `sync run` killed with SIGKILL mid-stream and stopped with SIGTERM, a target down
//! for a while, and two pipelines in opposite directions.

mod support;
mod sync_common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{finish, invsync, send_signal, ClusterOptions, PgCluster};
use sync_common::*;

fn spawn_run(cfg: &std::path::Path, pipeline: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", cfg.to_str().unwrap(), "sync", "run", pipeline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

const LEDGER: &str = "SELECT id, amount, memo FROM ledger ORDER BY id";
const COUNTER: &str = "SELECT n FROM counter";
/// The journal has no key (REPLICA IDENTITY FULL): a transaction applied twice leaves two equal
/// rows there instead of failing on a key or rewriting the same row image, so this reads
/// `rows|distinct rows` and any double apply shows as a difference between the two.
const JOURNAL: &str = "SELECT count(*), count(DISTINCT (tx, note)) FROM journal";
const LEDGER_DDL: &str =
    "CREATE TABLE ledger (id bigint PRIMARY KEY, amount numeric NOT NULL, memo text);
     CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL);
     INSERT INTO counter VALUES (1, 0);
     CREATE TABLE journal (tx bigint NOT NULL, note text NOT NULL);
     ALTER TABLE journal REPLICA IDENTITY FULL;";

/// Creates the ledger tables on `src` and sets up pipeline `p` from `src` to `dst`; returns the
/// configuration (in the returned directory).
fn ledger_pipeline(src: &PgCluster, dst: &PgCluster) -> (tempfile::TempDir, std::path::PathBuf) {
    src.psql("einvoice", LEDGER_DDL);
    set_up_pipeline(
        src,
        dst,
        &["public.ledger", "public.counter", "public.journal"],
    )
}

/// One source transaction of the ledger workload: a ledger row, a journal row, and the counter
/// bumped.
fn ledger_txn(i: i64) -> String {
    format!(
        "BEGIN; INSERT INTO ledger VALUES ({i}, {i}.5, 'row {i}'); \
         INSERT INTO journal VALUES ({i}, 'row {i}'); UPDATE counter SET n = n + 1; COMMIT;"
    )
}

/// Writes ledger rows `ids`, one source transaction each.
async fn write_ledger(client: &tokio_postgres::Client, ids: std::ops::Range<i64>) {
    for i in ids {
        client.batch_execute(&ledger_txn(i)).await.unwrap();
    }
}

/// `(n_tup_ins, n_tup_upd)` of `table` on `cluster` since its statistics were last reset (a
/// crash resets them).
fn row_stats(cluster: &PgCluster, table: &str) -> (i64, i64) {
    let line = cluster.psql(
        "einvoice",
        &format!("SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables WHERE relname = '{table}'"),
    );
    let (ins, upd) = line.split_once('|').unwrap();
    (ins.parse().unwrap(), upd.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_loses_and_repeats_nothing() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    let (_dir, cfg) = ledger_pipeline(&src, &dst);

    // A writer of small transactions, each inserting one row and bumping the counter, plus
    // some large ones, runs across the kill and the restart.
    let writer_conn = src.conn("einvoice");
    let writer = tokio::spawn(async move {
        let client = writer_conn.connect().await.unwrap();
        for i in 0..1500i64 {
            if i % 500 == 250 {
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO ledger SELECT {b} + g, g, 'bulk' FROM generate_series(1, 20000) g;
                         UPDATE counter SET n = n + 1; COMMIT;",
                        b = 1_000_000 * (i + 1)
                    ))
                    .await
                    .unwrap();
            }
            client.batch_execute(&ledger_txn(i)).await.unwrap();
        }
    });

    let mut child = spawn_run(&cfg, "p");
    wait_for("some rows on the target", || {
        dump(&dst, "SELECT count(*) FROM ledger")
            .parse::<i64>()
            .unwrap_or(0)
            > 200
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = dump(&dst, "SELECT count(*) FROM ledger");

    let child = spawn_run(&cfg, "p");
    writer.await.unwrap();
    wait_same(&src, &dst, COUNTER).await;
    wait_same(&src, &dst, LEDGER).await;
    assert_eq!(dump(&dst, COUNTER), "1503");
    assert_eq!(dump(&dst, JOURNAL), "1500|1500");
    assert!(
        at_kill.parse::<i64>().unwrap() < 61500,
        "the kill came too late to prove anything"
    );

    // SIGTERM: finish the batch, record progress, exit 0, release the slot.
    src.psql("einvoice", "INSERT INTO ledger VALUES (-1, 1, 'last')");
    wait_same(&src, &dst, LEDGER).await;
    let exit = terminate(child).await;
    assert!(exit.0, "run did not exit 0 on SIGTERM: {}", exit.1);
    assert!(exit.1.contains("stop requested"), "{}", exit.1);
    wait_for("the slot to be released", || {
        src.psql(
            "einvoice",
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'invsync_p'",
        ) == "f"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_crash_loses_only_unconfirmed_commits_which_are_applied_again() {
    let src = PgCluster::start();
    // A WAL writer that wakes rarely keeps the target's asynchronous commits in memory for
    // seconds, so a crash loses them: the slot must not have been confirmed past them.
    let dst = PgCluster::start_with(ClusterOptions {
        extra_conf: vec!["wal_writer_delay = 10s".into()],
        ..ClusterOptions::default()
    });
    let (_dir, cfg) = ledger_pipeline(&src, &dst);
    let run = Running::start(&load(&cfg), "p");
    let writer = src.client("einvoice").await;

    // A crash right after the rows became visible on the target: what it loses comes again.
    // The crash also resets the target's statistics, so the rows inserted there afterwards are
    // the ones applied again. A probe (an UPDATE that changes nothing) follows on the same apply
    // session: once its update shows, so do the inserts applied before it. Commits the WAL
    // writer had reached survive, so a crash may lose nothing: try up to three times.
    let mut written = 0;
    let mut reapplied = 0;
    for _ in 0..3 {
        write_ledger(&writer, written..written + 200).await;
        written += 200;
        wait_same(&src, &dst, COUNTER).await;
        dst.crash();
        dst.start_again();
        writer
            .batch_execute("UPDATE counter SET n = n")
            .await
            .unwrap();
        wait_for("the probe to reach the target's statistics", || {
            row_stats(&dst, "counter").1 > 0
        })
        .await;
        reapplied = row_stats(&dst, "ledger").0;
        if reapplied > 0 {
            break;
        }
    }
    assert!(
        reapplied > 0,
        "three target crashes lost no commit: the re-apply path never ran"
    );
    wait_same(&src, &dst, LEDGER).await;
    wait_same(&src, &dst, COUNTER).await;
    assert_eq!(dump(&dst, JOURNAL), format!("{written}|{written}"));

    // A crash once the slot is confirmed past everything written: the target must hold it all.
    let wal_end = src.psql("einvoice", "SELECT pg_current_wal_lsn()");
    wait_for("the slot to be confirmed past the writes", || {
        src.psql(
            "einvoice",
            &format!("SELECT confirmed_flush_lsn >= '{wal_end}' FROM pg_replication_slots WHERE slot_name = 'invsync_p'"),
        ) == "t"
    })
    .await;
    dst.crash();
    dst.start_again();
    assert_eq!(
        dump(&dst, COUNTER),
        written.to_string(),
        "the target lost commits the slot was confirmed for"
    );
    write_ledger(&writer, written..written + 100).await;
    written += 100;
    wait_same(&src, &dst, LEDGER).await;
    wait_same(&src, &dst, COUNTER).await;
    assert_eq!(dump(&dst, COUNTER), written.to_string());
    assert_eq!(
        dump(&dst, "SELECT count(*) FROM ledger"),
        written.to_string()
    );
    assert_eq!(dump(&dst, JOURNAL), format!("{written}|{written}"));
    run.stop().await;
}

/// Sends SIGTERM to `child` and returns whether it exited 0, with its standard error.
async fn terminate(child: Child) -> (bool, String) {
    send_signal(&child, "TERM");
    let (code, err) = finish(child).await;
    (code == 0, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_and_deletes_of_rows_missing_on_the_target_are_counted_and_reported() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    let (_dir, cfg) = ledger_pipeline(&src, &dst);
    let writer = src.client("einvoice").await;
    write_ledger(&writer, 0..10).await;
    let child = spawn_run(&cfg, "p");
    wait_same(&src, &dst, LEDGER).await;
    // Someone deleted rows on the target: the source's changes to them find nothing.
    dst.psql("einvoice", "DELETE FROM ledger WHERE id IN (1, 2, 3, 4)");
    src.psql(
        "einvoice",
        "BEGIN; UPDATE ledger SET memo = 'changed' WHERE id IN (1, 2); DELETE FROM ledger WHERE id = 3; COMMIT;
         UPDATE ledger SET memo = 'later' WHERE id = 4;",
    );
    // The pipeline goes on with the rows that are there.
    write_ledger(&writer, 10..12).await;
    wait_same(&src, &dst, COUNTER).await;
    wait_same(
        &src,
        &dst,
        "SELECT id, memo FROM ledger WHERE id >= 10 ORDER BY id",
    )
    .await;
    let (ok, err) = terminate(child).await;
    assert!(ok, "run did not exit 0 on SIGTERM: {err}");
    assert!(
        err.contains("rows to update or delete were not on the target (4 in this session)")
            && err.contains("invsync verify db"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_a_while_catches_up_while_the_other_keeps_applying() {
    let src = PgCluster::start();
    let t1 = PgCluster::start();
    let t2 = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE carrier (carrier_type text, carrier_id text, owner text, PRIMARY KEY (carrier_type, carrier_id))",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &[
            ("dc", src.url("einvoice")),
            ("t1", t1.url("einvoice")),
            ("t2", t2.url("einvoice")),
        ],
        &[("p", "dc", &["t1", "t2"], &["public.carrier"])],
    );
    let (code, _, err) = invsync(&["--config", cfg.to_str().unwrap(), "sync", "setup", "p"]);
    assert_eq!(code, 0, "{err}");
    let q = "SELECT carrier_type, carrier_id, owner FROM carrier ORDER BY 1, 2";
    let run = Running::start(&load(&cfg), "p");
    src.psql(
        "einvoice",
        "INSERT INTO carrier SELECT '3J0002', '/AB' || g, 'o' || g FROM generate_series(1, 100) g",
    );
    wait_same(&src, &t2, q).await;
    let t2_at_stop = applied_lsn(&t2, "p");

    t2.stop();
    for i in 0..20 {
        src.psql(
            "einvoice",
            &format!(
                "INSERT INTO carrier VALUES ('3J0002', '/X{i}', 'new'); UPDATE carrier SET owner = owner || '+' WHERE carrier_id = '/AB{}';
                 DELETE FROM carrier WHERE carrier_id = '/AB{}'",
                i + 1,
                i + 50
            ),
        );
    }
    // The other target keeps applying while t2 is down, and the slot holds what t2 misses.
    wait_same(&src, &t1, q).await;
    let t1_applied = applied_lsn(&t1, "p");
    assert_eq!(
        src.psql(
            "einvoice",
            &format!("SELECT '{t1_applied}'::pg_lsn > '{t2_at_stop}'::pg_lsn")
        ),
        "t",
        "t1 applied nothing while t2 was down"
    );
    // The run reports its position every 500 ms: watch the slot over several reports. A lower
    // bound that ignored the down target would move it up to t1's position within this time
    // (as it does below once t2 is back).
    let watch_until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < watch_until {
        let confirmed = src.psql(
            "einvoice",
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'invsync_p'",
        );
        assert_eq!(
            src.psql(
                "einvoice",
                &format!("SELECT '{confirmed}'::pg_lsn <= '{t2_at_stop}'::pg_lsn")
            ),
            "t",
            "slot confirmed {confirmed} although t2 is down at {t2_at_stop} (t1 at {t1_applied})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    t2.start_again();
    wait_same(&src, &t2, q).await;
    wait_same(&src, &t1, q).await;
    // Once both hold everything, the slot moves on.
    let now = src.psql("einvoice", "SELECT pg_current_wal_lsn()");
    wait_for("the slot to be confirmed again", || {
        src.psql(
            "einvoice",
            &format!("SELECT confirmed_flush_lsn >= '{now}' FROM pg_replication_slots WHERE slot_name = 'invsync_p'"),
        ) == "t"
    })
    .await;
    run.stop().await;
    assert_eq!(dump(&t1, q), dump(&t2, q));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_in_opposite_directions_do_not_echo() {
    let dc = PgCluster::start();
    let cloud = PgCluster::start();
    for c in [&dc, &cloud] {
        c.psql(
            "einvoice",
            "CREATE TABLE carrier (carrier_id text PRIMARY KEY, owner text, hits int NOT NULL DEFAULT 0);
             CREATE TABLE invoice (invoice_number text PRIMARY KEY, amount numeric);
             -- Counts every UPDATE of a carrier on this side, the apply session's too: an
             -- update sent back and forth would count more than once.
             CREATE TABLE carrier_updates (n int NOT NULL);
             INSERT INTO carrier_updates VALUES (0);
             CREATE FUNCTION count_update() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN UPDATE carrier_updates SET n = n + 1; RETURN NULL; END$$;
             CREATE TRIGGER count_update AFTER UPDATE ON carrier
               FOR EACH ROW EXECUTE FUNCTION count_update();
             ALTER TABLE carrier ENABLE ALWAYS TRIGGER count_update;",
        );
    }
    cloud.psql("einvoice", "INSERT INTO carrier VALUES ('/PRE', 'p', 0)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &[("dc", dc.url("einvoice")), ("cloud", cloud.url("einvoice"))],
        &[
            (
                "down",
                "dc",
                &["cloud"],
                &["public.invoice", "public.carrier"],
            ),
            ("up", "cloud", &["dc"], &["public.carrier"]),
        ],
    );
    let c = cfg.to_str().unwrap();
    // The cloud already holds its carriers: `down` starts without a copy and runs...
    let (code, _, err) = invsync(&["--config", c, "sync", "setup", "down", "--no-copy"]);
    assert_eq!(code, 0, "{err}");
    let config = load(&cfg);
    let down = Running::start(&config, "down");
    // ...while `up` copies them into the data center; the copy carries an origin, so `down`
    // does not send the rows back (which would collide with the cloud's own rows).
    let (code, _, err) = invsync(&["--config", c, "sync", "setup", "up"]);
    assert_eq!(code, 0, "{err}");
    let up = Running::start(&config, "up");
    dc.psql("einvoice", "INSERT INTO invoice VALUES ('AB00000001', 10)");

    cloud.psql("einvoice", "INSERT INTO carrier VALUES ('/CLOUD1', 'c', 0)");
    dc.psql(
        "einvoice",
        "INSERT INTO carrier VALUES ('/DC1', 'd', 0); INSERT INTO invoice VALUES ('AB00000002', 20)",
    );
    let q = "SELECT carrier_id, owner, hits FROM carrier ORDER BY 1";
    wait_same(&dc, &cloud, q).await;
    // Relative updates on both sides: an echo would apply one twice or loop.
    dc.psql(
        "einvoice",
        "UPDATE carrier SET hits = hits + 1 WHERE carrier_id = '/CLOUD1'",
    );
    wait_same(&dc, &cloud, q).await;
    cloud.psql(
        "einvoice",
        "UPDATE carrier SET hits = hits + 10 WHERE carrier_id = '/DC1'",
    );
    wait_same(&dc, &cloud, q).await;
    wait_same(&dc, &cloud, "SELECT * FROM invoice ORDER BY 1").await;

    // Both slots go quiet: nothing bounces back and forth.
    for (cluster, slot) in [(&dc, "invsync_down"), (&cloud, "invsync_up")] {
        let now = cluster.psql("einvoice", "SELECT pg_current_wal_lsn()");
        wait_for("the slot to settle", || {
            cluster.psql(
                "einvoice",
                &format!("SELECT confirmed_flush_lsn >= '{now}' FROM pg_replication_slots WHERE slot_name = '{slot}'"),
            ) == "t"
        })
        .await;
    }
    // Rows behind the updates in both directions: once they arrive, so would any echo.
    dc.psql("einvoice", "INSERT INTO invoice VALUES ('AB00000003', 30)");
    wait_same(&dc, &cloud, "SELECT * FROM invoice ORDER BY 1").await;
    cloud.psql("einvoice", "INSERT INTO carrier VALUES ('/CLOUD2', 'c', 0)");
    wait_same(&dc, &cloud, q).await;
    let expected = "/CLOUD1|c|1\n/CLOUD2|c|0\n/DC1|d|10\n/PRE|p|0";
    assert_eq!(dump(&dc, q), expected);
    assert_eq!(dump(&cloud, q), expected);
    // Each side saw its own update and the other's, once.
    for side in [&dc, &cloud] {
        assert_eq!(dump(side, "SELECT n FROM carrier_updates"), "2");
    }
    down.stop().await;
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_killed_mid_copy_is_redone_by_the_next_setup() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    let ddl = "CREATE TABLE invoice (invoice_number text PRIMARY KEY, amount numeric);
               CREATE TABLE invoice_item (invoice_number text, seq int, name text, PRIMARY KEY (invoice_number, seq));";
    src.psql("einvoice", ddl);
    dst.psql("einvoice", ddl);
    src.psql(
        "einvoice",
        "INSERT INTO invoice SELECT 'AB' || lpad(g::text, 8, '0'), g FROM generate_series(1, 5000) g;
         INSERT INTO invoice_item SELECT 'AB' || lpad(g::text, 8, '0'), s, 'item' FROM generate_series(1, 5000) g, generate_series(1, 3) s;",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &[("a", src.url("einvoice")), ("b", dst.url("einvoice"))],
        &[("p", "a", &["b"], &["public.invoice", "public.invoice_item"])],
    );
    // Hold up the copy into invoice_item so setup is surely mid-copy when it is killed.
    let blocker = dst.client("einvoice").await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE invoice_item IN SHARE MODE")
        .await
        .unwrap();
    let mut setup = Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "sync",
            "setup",
            "p",
            "--no-create",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("invoice to be copied", || {
        dump(&dst, "SELECT count(*) FROM invoice") == "5000"
    })
    .await;
    setup.kill().unwrap();
    setup.wait().unwrap();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(dump(&dst, "SELECT state FROM invsync.pipeline"), "copying");

    // Rows written after the killed setup's snapshot must not be lost either.
    src.psql("einvoice", "INSERT INTO invoice VALUES ('ZZ00000001', 1)");
    let (code, out, err) = invsync(&[
        "--config",
        cfg.to_str().unwrap(),
        "sync",
        "setup",
        "p",
        "--no-create",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("interrupted setup"), "{out}");
    let run = Running::start(&load(&cfg), "p");
    src.psql(
        "einvoice",
        "INSERT INTO invoice_item VALUES ('ZZ00000001', 1, 'late')",
    );
    wait_same(&src, &dst, "SELECT * FROM invoice ORDER BY 1").await;
    wait_same(&src, &dst, "SELECT * FROM invoice_item ORDER BY 1, 2").await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_when_the_source_restarts() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE allowance (id int PRIMARY KEY, amount numeric)",
    );
    let (_dir, cfg) = set_up_pipeline(&src, &dst, &["public.allowance"]);
    let run = Running::start(&load(&cfg), "p");
    src.psql("einvoice", "INSERT INTO allowance VALUES (1, 1)");
    let q = "SELECT * FROM allowance ORDER BY 1";
    wait_same(&src, &dst, q).await;
    src.stop();
    src.start_again();
    src.psql(
        "einvoice",
        "INSERT INTO allowance VALUES (2, 2); UPDATE allowance SET amount = 9 WHERE id = 1",
    );
    wait_same(&src, &dst, q).await;
    dst.stop();
    src.psql("einvoice", "INSERT INTO allowance VALUES (3, 3)");
    dst.start_again();
    wait_same(&src, &dst, q).await;
    run.stop().await;
}
