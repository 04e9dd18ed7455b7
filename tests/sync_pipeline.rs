//! Pipelines between real clusters: initial copy consistent with the slot, streaming in commit
//! order with whole transactions, every kind of change, types, TOAST, TRUNCATE, schema drift,
//! idle slots, and refusals of bad input.

mod support;
mod sync_common;

use std::time::Duration;

use support::{invsync, PgCluster};
use sync_common::*;

const ACCOUNTS: &str = "SELECT id, balance, note FROM account ORDER BY id";
const ITEMS: &str = "SELECT id, account_id, payload, created FROM item ORDER BY id";

fn create_bank(c: &PgCluster) {
    c.psql(
        "einvoice",
        "CREATE TABLE account (id int PRIMARY KEY, balance numeric NOT NULL, note text);
         CREATE TABLE item (id bigserial PRIMARY KEY, account_id int, payload text,
                            created timestamptz NOT NULL DEFAULT now());
         INSERT INTO account SELECT g, 100, 'n' || g FROM generate_series(1, 50) g;
         INSERT INTO item (account_id, payload) SELECT g % 50 + 1, md5(g::text) FROM generate_series(1, 3000) g;",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_then_streams_whole_transactions_in_commit_order() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    create_bank(&src);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &[("dc", src.url("einvoice")), ("cloud", dst.url("einvoice"))],
        &[(
            "dc_to_cloud",
            "dc",
            &["cloud"],
            &["public.account", "public.item"],
        )],
    );
    let cfg_s = cfg.to_str().unwrap();

    // Rows committed while setup runs are either in the copy or in the stream, never both.
    let writer_src = src.url("einvoice");
    let during = std::thread::spawn(move || {
        let out = std::process::Command::new("psql")
            .args([&writer_src, "-X", "-q", "-c"])
            .arg("INSERT INTO item (account_id, payload) SELECT 1, 'during-' || g FROM generate_series(1, 500) g")
            .output()
            .unwrap();
        assert!(out.status.success());
    });
    let (code, out, err) = invsync(&["--config", cfg_s, "sync", "setup", "dc_to_cloud", "--json"]);
    during.join().unwrap();
    assert_eq!(code, 0, "setup failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outcome"], "set_up");
    let copied: u64 = v["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["rows"].as_u64().unwrap())
        .sum();
    // The writer's 500 rows are one transaction: wholly in the copy's snapshot or not at all.
    assert!(copied == 3050 || copied == 3550, "copied {copied} rows");
    // Nothing streams before `sync run`: the target holds exactly what the copy reported.
    let on_target: u64 = dump(
        &dst,
        "SELECT (SELECT count(*) FROM account) + (SELECT count(*) FROM item)",
    )
    .parse()
    .unwrap();
    assert_eq!(on_target, copied);
    assert!(v["copied"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["binary"] == true));

    // Setting up again is safe and says so.
    let (code, out, _) = invsync(&["--config", cfg_s, "sync", "setup", "dc_to_cloud"]);
    assert_eq!(code, 0);
    assert!(out.contains("already set up"), "{out}");
    // ...and a changed table list is applied: the new table joins, then leaves again.
    src.psql(
        "einvoice",
        "CREATE TABLE extra (id int PRIMARY KEY); INSERT INTO extra VALUES (1), (2)",
    );
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = write_config(
        dir2.path(),
        &[("dc", src.url("einvoice")), ("cloud", dst.url("einvoice"))],
        &[(
            "dc_to_cloud",
            "dc",
            &["cloud"],
            &["public.account", "public.item", "public.extra"],
        )],
    );
    let (code, out, err) = invsync(&[
        "--config",
        cfg2.to_str().unwrap(),
        "sync",
        "setup",
        "dc_to_cloud",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tables joined: public.extra"), "{out}");
    assert_eq!(dump(&dst, "SELECT id FROM extra ORDER BY id"), "1\n2");
    let (code, out, err) = invsync(&["--config", cfg_s, "sync", "setup", "dc_to_cloud", "--drop"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tables left: public.extra (dropped on the targets)"),
        "{out}"
    );
    assert_eq!(
        dump(&dst, "SELECT to_regclass('public.extra') IS NULL"),
        "t"
    );

    let config = load(&cfg);
    let run = Running::start(&config, "dc_to_cloud");

    // Transfers keep the total at 5000; a reader on the target must never see another total.
    let reader_url = dst.url("einvoice");
    let stop_reader = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_r = stop_reader.clone();
    let reader = tokio::spawn(async move {
        let client = invsync::pg::ConnInfo::parse(&reader_url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut seen = 0u32;
        while !stop_r.load(std::sync::atomic::Ordering::Relaxed) {
            let total: String = client
                .query_one("SELECT sum(balance)::text FROM account", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(total, "5000", "a transfer was half-visible on the target");
            seen += 1;
        }
        seen
    });
    for i in 0..200 {
        let from = i % 50 + 1;
        let to = (i * 7) % 50 + 1;
        src.psql(
            "einvoice",
            &format!(
                "BEGIN; UPDATE account SET balance = balance - 3 WHERE id = {from};
                 INSERT INTO item (account_id, payload) VALUES ({from}, 'transfer {i}');
                 UPDATE account SET balance = balance + 3, note = 'got {i}' WHERE id = {to}; COMMIT;"
            ),
        );
    }
    // Deletes, a primary key change, an update of many rows, and NULLs; then, in one
    // transaction, a row updated twice and a key moved twice (1->2->3 must end at 3, as in order).
    src.psql(
        "einvoice",
        "BEGIN; UPDATE item SET payload = 'first' WHERE id = 11; UPDATE item SET payload = 'last' WHERE id = 11;
         UPDATE item SET id = 200001 WHERE id = 12; UPDATE item SET id = 200002 WHERE id = 200001;
         DELETE FROM item WHERE id = 13; DELETE FROM item WHERE id = 14; COMMIT;
         DELETE FROM item WHERE id % 10 = 0;
         UPDATE item SET id = id + 100000 WHERE id BETWEEN 1 AND 5;
         UPDATE item SET payload = NULL WHERE id % 7 = 0;
         BEGIN; INSERT INTO account VALUES (51, 0, NULL); DELETE FROM account WHERE id = 51; COMMIT;",
    );
    wait_same(&src, &dst, ACCOUNTS).await;
    wait_same(&src, &dst, ITEMS).await;
    stop_reader.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);

    // Progress is recorded on the target; status reports it with the slot.
    let lsn = applied_lsn(&dst, "dc_to_cloud");
    assert!(lsn.contains('/') && lsn != "0/0", "applied lsn {lsn}");
    let (code, out, err) = invsync(&["--config", cfg_s, "sync", "status", "dc_to_cloud", "--json"]);
    assert_eq!(code, 0, "{out} {err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s[0]["slot_state"]["active"], true);
    let t = &s[0]["targets"][0];
    assert_eq!(t["state"], "streaming");
    assert_eq!(t["tables"].as_array().unwrap().len(), 2);
    assert!(t["applied_lsn"].as_str().unwrap().contains('/'));

    let (code, out, _) = invsync(&["--config", cfg_s, "sync", "status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("target cloud: streaming") && out.contains("public.item"),
        "{out}"
    );

    run.stop().await;
    // After a clean stop the slot is released. (How far it is confirmed is the subject of
    // `sync_faults`: with a target down, the slot stays at that target's position; when nothing
    // is pending it may move past the last applied commit to the keepalive's WAL end, so it is
    // not bounded by `applied_lsn` here.)
    assert_eq!(
        src.psql(
            "einvoice",
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'invsync_dc_to_cloud'"
        ),
        "f"
    );

    // Teardown drops slot and publication, keeps target data.
    let (code, _, _) = invsync(&["--config", cfg_s, "sync", "teardown", "dc_to_cloud"]);
    assert_ne!(code, 0, "teardown without --yes must not drop anything");
    // A walsender still holding the slot for a moment (as one does after `sync run` or the
    // agent exits) is waited for rather than refused: here a pg_recvlogical lets go after 1 s.
    let mut holder = std::process::Command::new(support::pg_bin("pg_recvlogical"))
        .args([
            "-d",
            &src.url("einvoice"),
            "--slot",
            "invsync_dc_to_cloud",
            "--start",
        ])
        .args(["-f", "/dev/null", "-o", "proto_version=1"])
        .args(["-o", "publication_names=invsync_dc_to_cloud"])
        .spawn()
        .unwrap();
    let slot_active =
        "SELECT active FROM pg_replication_slots WHERE slot_name = 'invsync_dc_to_cloud'";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while src.psql("einvoice", slot_active) != "t" {
        assert!(
            std::time::Instant::now() < deadline,
            "pg_recvlogical did not take the slot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        holder.kill().unwrap();
        holder.wait().unwrap();
    });
    let (code, out, err) = invsync(&[
        "--config",
        cfg_s,
        "sync",
        "teardown",
        "dc_to_cloud",
        "--yes",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    release.join().unwrap();
    assert_eq!(
        src.psql("einvoice", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(
        src.psql("einvoice", "SELECT count(*) FROM pg_publication"),
        "0"
    );
    assert_eq!(
        dst.psql("einvoice", "SELECT count(*) FROM invsync.pipeline"),
        "0"
    );
    assert_eq!(dump(&dst, ACCOUNTS), dump(&src, ACCOUNTS));
    let _ = Duration::ZERO;
}

const KINDS: &str = "SELECT k::text FROM kinds k ORDER BY id";
const DOCS: &str = "SELECT id, small, md5(big), extra FROM doc ORDER BY id";

/// Rows of every built-in kind of value, written before setup (copied) and after (streamed).
fn insert_kinds(c: &PgCluster, base: i32) {
    c.psql(
        "einvoice",
        &format!(
            "INSERT INTO kinds (id, n, n2, f, r, t, b, j, jb, ai, at, d, tm, tmtz, ts, tstz, iv, u, ip, net, m, e, dom, comp, ea, bo, c, vc) VALUES
             ({a}, 'NaN', 12345678901234567890.0123456789, 0.1, 1.5e-30, E'Taiwan 台灣 發票 😀 e\\u0301 ''quoted'' back\\\\slash\\ttab',
              '\\x00ff10'::bytea, '{{\"k\":  [1, 2.50, null]}}', '{{\"b\": 1, \"a\": \"é\"}}',
              '{{1,NULL,3}}', '{{\"a,b\",NULL,\"q\\\"x\",\"\"}}', '2026-11-28', '23:59:59.999999', '12:00:00+08', '1999-12-31 23:59:59.123456',
              '2026-01-25 10:00:00+08', '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
              '192.168.1.10/24', '10.0.0.0/8', 1234567.89, 'happy', 7, ROW(1, 'x,y'), '{{sad,ok}}', true, 'ab', 'abcde'),
             ({b}, '-123456789012345678901234567890.123456789012345678901234567890', 0, '-0', 'Infinity', '', '\\x'::bytea, 'null', '[]',
              '{{}}', '{{}}', 'infinity', '00:00', '00:00:00-03:30', '-infinity', '4713-01-01 00:00:00+00 BC', '-1 days -00:00:01',
              '00000000-0000-0000-0000-000000000000', '::1', '2001:db8::/32', -0.01, 'sad', 1, ROW(NULL, NULL), '{{}}', false, 'x', ''),
             ({c}, NULL, NULL, 'NaN', '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
            a = base,
            b = base + 1,
            c = base + 2
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_toast_truncate_and_schema_drift() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE TYPE pair AS (a int, b text);
         CREATE TABLE kinds (id int PRIMARY KEY, n numeric, n2 numeric(40,10), f float8, r real, t text, b bytea,
             j json, jb jsonb, ai int[], at text[], d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz,
             iv interval, u uuid, ip inet, net cidr, m money, e mood, dom posint, comp pair, ea mood[], bo boolean,
             c char(3), vc varchar(5), g int GENERATED ALWAYS AS (id * 2) STORED);
         CREATE TABLE loose (v text, n int); ALTER TABLE loose REPLICA IDENTITY FULL;
         INSERT INTO loose VALUES ('a', 1), ('a', 1), ('b', NULL);
         CREATE TABLE part (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE part_2026 PARTITION OF part FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         INSERT INTO part VALUES (1, '2026-05-01');
         CREATE TABLE doc (id int PRIMARY KEY, small int NOT NULL, big text);
         ALTER TABLE doc ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO doc SELECT g, 0, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 400) i)
             FROM generate_series(1, 20) g;",
    );
    insert_kinds(&src, 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &[("a", src.url("einvoice")), ("b", dst.url("einvoice"))],
        &[(
            "p",
            "a",
            &["b"],
            &["public.kinds", "public.doc", "public.loose", "public.part"],
        )],
    );
    let (code, out, err) = invsync(&[
        "--config",
        cfg.to_str().unwrap(),
        "sync",
        "setup",
        "p",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // User types make the copy use text; the enum, domain and composite were created on the target.
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["copied"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["binary"] == false));
    let docs_before = dump(&src, "SELECT id, small, md5(big) FROM doc ORDER BY id");
    assert_eq!(
        docs_before,
        dump(&dst, "SELECT id, small, md5(big) FROM doc ORDER BY id")
    );

    let run = Running::start(&load(&cfg), "p");
    insert_kinds(&src, 10);
    // Applied first, so the update below reaches the target as an UPDATE (sending every
    // column's value, each cast to its type) rather than folding into the insert.
    wait_same(&src, &dst, KINDS).await;
    src.psql(
        "einvoice",
        "UPDATE kinds SET t = t || '!', n = n + 1 WHERE id = 10",
    );
    wait_same(&src, &dst, KINDS).await;
    // Generated columns are computed by the target.
    assert_eq!(dump(&dst, "SELECT g FROM kinds WHERE id = 11"), "22");

    // REPLICA IDENTITY FULL without a key: one of two equal rows changes, NULLs match.
    src.psql(
        "einvoice",
        "UPDATE loose SET n = 2 WHERE ctid = (SELECT min(ctid) FROM loose WHERE v = 'a');
         UPDATE loose SET v = 'c' WHERE v = 'b'; DELETE FROM loose WHERE n = 2;
         INSERT INTO loose VALUES ('d', 4)",
    );
    wait_same(&src, &dst, "SELECT v, n FROM loose ORDER BY 1, 2").await;
    // A partitioned table streams under its own name.
    src.psql(
        "einvoice",
        "INSERT INTO part VALUES (2, '2026-06-01'); UPDATE part SET id = 3 WHERE id = 1",
    );
    wait_same(&src, &dst, "SELECT * FROM part ORDER BY 1").await;

    // An update that leaves the TOASTed column alone leaves it alone on the target.
    src.psql(
        "einvoice",
        "UPDATE doc SET small = small + 1 WHERE id <= 10",
    );
    wait_same(
        &src,
        &dst,
        "SELECT id, small, md5(big) FROM doc ORDER BY id",
    )
    .await;
    assert_eq!(
        dump(
            &dst,
            "SELECT count(*) FROM doc WHERE big IS NULL OR length(big) <> 12800"
        ),
        "0"
    );

    // A column added on the source is added on the target, its default filling existing rows.
    src.psql(
        "einvoice",
        "ALTER TABLE doc ADD COLUMN extra text DEFAULT 'x';
         UPDATE doc SET extra = 'y', small = 5 WHERE id = 3;
         INSERT INTO doc VALUES (100, 1, 'short', 'z');",
    );
    wait_same(&src, &dst, DOCS).await;

    // TRUNCATE replicates, and rows written after it too.
    src.psql(
        "einvoice",
        "TRUNCATE kinds; INSERT INTO kinds (id, t) VALUES (500, 'after truncate')",
    );
    wait_same(&src, &dst, KINDS).await;

    // A column whose type the target lacks stops the pipeline with the table and the DDL.
    src.psql(
        "einvoice",
        "CREATE TYPE color AS ENUM ('red'); ALTER TABLE doc ADD COLUMN paint color;
         INSERT INTO doc (id, small, paint) VALUES (101, 1, 'red');",
    );
    let err = run
        .finished()
        .await
        .expect_err("drift with an unknown type must stop the pipeline");
    let msg = err.to_string();
    assert!(
        // The type is named with its schema, so the DDL means the same on any search_path.
        msg.contains("public.doc")
            && msg.contains("ADD COLUMN IF NOT EXISTS \"paint\" public.color"),
        "{msg}"
    );
    // Nothing of the failed transaction is on the target.
    assert_eq!(dump(&dst, "SELECT count(*) FROM doc WHERE id = 101"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_is_confirmed_to_the_keepalive_wal_end() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY, v text);",
    );
    let (_dir, cfg) = set_up_pipeline(&src, &dst, &["public.published"]);
    let run = Running::start(&load(&cfg), "p");
    // Busy only with a table outside the publication.
    src.psql(
        "einvoice",
        "INSERT INTO other SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
    );
    let target_lsn = src.psql("einvoice", "SELECT pg_current_wal_lsn()");
    wait_for("the slot to be confirmed past unpublished WAL", || {
        src.psql(
            "einvoice",
            &format!(
                "SELECT confirmed_flush_lsn >= '{target_lsn}' FROM pg_replication_slots WHERE slot_name = 'invsync_p'"
            ),
        ) == "t"
    })
    .await;
    // Published changes still flow afterwards.
    src.psql("einvoice", "INSERT INTO published VALUES (1), (2)");
    wait_same(&src, &dst, "SELECT id FROM published ORDER BY id").await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_input_is_refused_with_the_fix() {
    let src = PgCluster::start();
    let replica_level = PgCluster::start_with(support::ClusterOptions {
        wal_level: "replica",
        extra_conf: Vec::new(),
    });
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE loose (v text);
         CREATE ROLE app LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO app;",
    );
    replica_level.psql("einvoice", "CREATE TABLE keyed (id int PRIMARY KEY)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &[
            ("a", src.url("einvoice")),
            ("app", src.url_as("app", "einvoice")),
            ("r", replica_level.url("einvoice")),
            ("b", dst.url("einvoice")),
        ],
        &[
            ("no_key", "a", &["b"], &["public.keyed", "public.loose"]),
            ("missing", "a", &["b"], &["public.nope"]),
            ("no_role", "app", &["b"], &["public.keyed"]),
            ("no_logical", "r", &["b"], &["public.keyed"]),
            ("ok", "a", &["b"], &["public.keyed"]),
        ],
    );
    let cfg = cfg.to_str().unwrap();
    let fails = |args: &[&str], expect: &[&str]| {
        let mut full = vec!["--config", cfg, "sync"];
        full.extend_from_slice(args);
        let (code, out, err) = invsync(&full);
        assert_ne!(code, 0, "{args:?} succeeded: {out}");
        for e in expect {
            assert!(err.contains(e), "{args:?}: `{e}` not in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    };
    fails(
        &["setup", "no_key"],
        &["public.loose", "REPLICA IDENTITY FULL", "primary key"],
    );
    fails(&["setup", "missing"], &["public.nope", "does not exist"]);
    fails(&["setup", "no_role"], &["ALTER ROLE app REPLICATION"]);
    fails(&["setup", "no_logical"], &["wal_level", "logical"]);
    fails(
        &["setup", "nosuch"],
        &["unknown pipeline `nosuch`", "no_key"],
    );
    fails(&["run", "ok"], &["not set up", "invsync sync setup ok"]);
    // Nothing was left behind by the refused setups.
    assert_eq!(
        src.psql("einvoice", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(
        src.psql("einvoice", "SELECT count(*) FROM pg_publication"),
        "0"
    );

    // A second `run` of a running pipeline is refused, naming the slot.
    let (code, _, err) = invsync(&["--config", cfg, "sync", "setup", "ok"]);
    assert_eq!(code, 0, "{err}");
    let running = Running::start(&load(std::path::Path::new(cfg)), "ok");
    wait_for("the slot to be active", || {
        src.psql(
            "einvoice",
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'invsync_ok'",
        ) == "t"
    })
    .await;
    fails(&["run", "ok"], &["invsync_ok", "in use by another process"]);
    running.stop().await;

    // A target added to a set-up pipeline is copied, and the slot the first target needs stays.
    dst.psql("postgres", "CREATE DATABASE einvoice2");
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = write_config(
        dir2.path(),
        &[
            ("a", src.url("einvoice")),
            ("b", dst.url("einvoice")),
            ("b2", dst.url("einvoice2")),
        ],
        &[("ok", "a", &["b", "b2"], &["public.keyed"])],
    );
    let (code, out, err) = invsync(&["--config", cfg2.to_str().unwrap(), "sync", "setup", "ok"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("targets copied: b2"), "{out}");
    assert_eq!(
        dst.psql("einvoice2", "SELECT count(*) FROM keyed"),
        src.psql("einvoice", "SELECT count(*) FROM keyed")
    );
    assert_eq!(
        src.psql(
            "einvoice",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'invsync_ok'"
        ),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_changes_of_a_batch_end_as_in_source_order() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE acct (id int PRIMARY KEY, email text, note text, big text);
         ALTER TABLE acct ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO acct SELECT g, 'a' || g, 'n', CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 400) END
             FROM generate_series(1, 100) g;
         CREATE TABLE person (id int PRIMARY KEY, email text UNIQUE);
         INSERT INTO person VALUES (1, 'p'), (2, 'r');",
    );
    // Setup creates tables with their primary key only; this target also has the second index.
    dst.psql(
        "einvoice",
        "CREATE TABLE person (id int PRIMARY KEY, email text UNIQUE)",
    );
    let (_dir, cfg) = set_up_pipeline(&src, &dst, &["public.acct", "public.person"]);
    let run = Running::start(&load(&cfg), "p");
    // One source transaction that exercises every fold of a window: updates of inserted and of
    // existing rows (some with an unchanged TOAST value), inserts deleted again, deletes and
    // inserts of one key, key changes of existing rows (those with an unchanged TOAST value go
    // in source order) and of inserted rows, updates after key changes.
    src.psql(
        "einvoice",
        "BEGIN;
         INSERT INTO acct SELECT g, 'b' || g, 'new', NULL FROM generate_series(101, 150) g;
         UPDATE acct SET note = 'u1' WHERE id BETWEEN 90 AND 120;
         DELETE FROM acct WHERE id BETWEEN 140 AND 145;
         DELETE FROM acct WHERE id BETWEEN 1 AND 5;
         INSERT INTO acct SELECT g, 'again' || g, 'back', NULL FROM generate_series(3, 4) g;
         UPDATE acct SET id = id + 1000 WHERE id BETWEEN 20 AND 30;
         UPDATE acct SET id = id + 1000 WHERE id BETWEEN 146 AND 148;
         UPDATE acct SET email = 'e' || id WHERE id > 1000;
         COMMIT;",
    );
    let acct = "SELECT id, email, note, md5(big) FROM acct ORDER BY id";
    wait_same(&src, &dst, acct).await;
    // The target did the net changes (in source order it would have counted 152 inserts and
    // 11 deletes): the 100 copied rows, 101-150 less the 6 deleted again (44), 3 and 4 deleted
    // and inserted again, 21-29 moved as whole rows (9 deletes and inserts); 20 and 30 keep an
    // unchanged TOAST value, so each of their key changes is applied in source order, ending the
    // window before it, and 146-148 moved in the next window (3 deletes and inserts). Deletes:
    // 1-5, 21-29, 146-148.
    wait_for("the target's statistics of acct", || {
        dump(
            &dst,
            "SELECT n_tup_ins || ' ' || n_tup_del FROM pg_stat_user_tables WHERE relname = 'acct'",
        ) == "158 17"
    })
    .await;

    // Many small transactions in one batch: the same keys deleted, inserted and updated again.
    let mut sql = String::new();
    for i in 0..20 {
        sql.push_str(&format!(
            "BEGIN; DELETE FROM acct WHERE id = 60; INSERT INTO acct VALUES (60, 'x{i}', 'again', NULL);
             UPDATE acct SET note = 'loop {i}' WHERE id IN (50, 1050, 101); COMMIT;"
        ));
    }
    src.psql("einvoice", &sql);
    // A table with a second unique index keeps source order: the swap of two emails only works
    // in that order.
    src.psql(
        "einvoice",
        "BEGIN; UPDATE person SET email = 'tmp' WHERE id = 1; UPDATE person SET email = 'p' WHERE id = 2;
         UPDATE person SET email = 'r' WHERE id = 1; COMMIT;",
    );
    wait_same(&src, &dst, acct).await;
    wait_same(&src, &dst, "SELECT id, email FROM person ORDER BY id").await;
    run.stop().await;
}
