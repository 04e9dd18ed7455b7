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
    assert!(copied >= 3050, "copied {copied} rows");
    assert!(v["copied"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["binary"] == true));

    // Setting up again is safe and says so.
    let (code, out, _) = invsync(&["--config", cfg_s, "sync", "setup", "dc_to_cloud"]);
    assert_eq!(code, 0);
    assert!(out.contains("already set up"), "{out}");

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
    // Deletes, a primary key change, an update of many rows, and NULLs.
    src.psql(
        "einvoice",
        "DELETE FROM item WHERE id % 10 = 0;
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

    run.stop().await;
    // After a clean stop the slot is released and confirmed no further than the target holds.
    let confirmed = src.psql(
        "einvoice",
        &format!(
            "SELECT active, confirmed_flush_lsn <= (SELECT '{}'::pg_lsn) OR confirmed_flush_lsn IS NULL \
             FROM pg_replication_slots WHERE slot_name = 'invsync_dc_to_cloud'",
            applied_lsn(&dst, "dc_to_cloud")
        ),
    );
    assert!(confirmed.starts_with("f|"), "slot state {confirmed}");

    // Teardown drops slot and publication, keeps target data.
    let (code, _, _) = invsync(&["--config", cfg_s, "sync", "teardown", "dc_to_cloud"]);
    assert_ne!(code, 0, "teardown without --yes must not drop anything");
    let (code, out, err) = invsync(&[
        "--config",
        cfg_s,
        "sync",
        "teardown",
        "dc_to_cloud",
        "--yes",
    ]);
    assert_eq!(code, 0, "{out}{err}");
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
