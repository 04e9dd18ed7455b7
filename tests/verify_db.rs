//! `invsync verify db` against real clusters: identical tables pass; every missing, extra and
//! changed row is found with its kind and columns; repair SQL makes a second run pass; values
//! compare exactly whatever the servers' settings; every kind of key works; many differences
//! are counted exactly and listed in key order, whatever the two databases' collations; bad
//! input is reported while other tables are still verified; changes in flight are re-checked
//! instead of reported; and under pgbench through an invsync pipeline, even far behind, every
//! row is decided exactly against the source's change stream.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::config_file::ConfigFile;
use support::{invsync, wait_until, PgCluster};

/// Runs `verify db --json` between two clusters with extra args; returns (exit code, report).
fn verify(src: &PgCluster, dst: &PgCluster, extra: &[&str]) -> (i32, Value) {
    let source = src.url("einvoice");
    let target = dst.url("einvoice");
    let mut args = vec![
        "verify", "db", "--source", &source, "--target", &target, "--json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = invsync(&args);
    let report =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: stdout {out} stderr {err}"));
    (code, report)
}

fn table<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

/// The differences of a table as (key text in key order, kind, columns), sorted.
fn diffs(t: &Value, key_cols: &[&str]) -> Vec<(String, String, Vec<String>)> {
    let mut out: Vec<_> = t["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let key: Vec<&str> = key_cols
                .iter()
                .map(|k| d["key"][k].as_str().unwrap())
                .collect();
            let cols = d["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            (key.join(","), d["kind"].as_str().unwrap().to_string(), cols)
        })
        .collect();
    out.sort();
    out
}

fn both(src: &PgCluster, dst: &PgCluster, sql: &str) {
    src.psql("einvoice", sql);
    dst.psql("einvoice", sql);
}

/// Runs a (possibly long) SQL script on a cluster.
fn apply(cluster: &PgCluster, sql: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        cluster
            .client("einvoice")
            .await
            .batch_execute(sql)
            .await
            .unwrap()
    });
}

fn d(key: &str, kind: &str, cols: &[&str]) -> (String, String, Vec<String>) {
    (
        key.into(),
        kind.into(),
        cols.iter().map(|c| c.to_string()).collect(),
    )
}

/// Writes a configuration into `dir` with pipeline `name` from `src` (`maindc`) to `dst`
/// (`cloud`) over `tables`; returns its path.
fn pipeline_config(
    dir: &std::path::Path,
    src: &PgCluster,
    dst: &PgCluster,
    name: &str,
    tables: &[&str],
) -> String {
    let path = ConfigFile::new()
        .database("maindc", &src.url("einvoice"))
        .database("cloud", &dst.url("einvoice"))
        .pipeline(name, "maindc", &["cloud"], tables)
        .write(&dir.join("invsync.toml"));
    path.to_str().unwrap().to_string()
}

/// Waits (up to 60 s) until `count_sql` on `cluster` returns more than `more_than`.
async fn wait_for_count(cluster: &PgCluster, what: &str, count_sql: &str, more_than: i64) {
    let client = cluster.client("einvoice").await;
    wait_until(Duration::from_secs(60), what, || async {
        client
            .query_one(count_sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0) > more_than)
            .unwrap_or(false)
    })
    .await;
}

#[test]
fn finds_every_difference_and_repair_sql_fixes_them() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    // 30k rows: 64 key hash buckets, of which the differing ones are compared row by row.
    both(
        &src,
        &dst,
        "CREATE TABLE invoice (invoice_number text PRIMARY KEY, seller char(8) NOT NULL, \
           amount numeric(12,2), note text, issued timestamptz, \
           total numeric GENERATED ALWAYS AS (amount * 1.05) STORED); \
         INSERT INTO invoice (invoice_number, seller, amount, note, issued) \
           SELECT 'AB' || lpad(i::text, 8, '0'), lpad((i % 997)::text, 8, '0'), i / 100.0, \
                  CASE WHEN i % 7 = 0 THEN NULL ELSE 'n' || i END, \
                  timestamptz '2024-01-01 00:00+08' + i * interval '1 minute' \
           FROM generate_series(1, 30000) i; ANALYZE invoice",
    );
    let (code, report) = verify(&src, &dst, &[]);
    assert_eq!(code, 0, "{report}");
    let t = table(&report, "public.invoice");
    assert_eq!(t["status"], "identical");
    assert_eq!(t["source_rows"], 30000);
    // Identical: done after one checksum scan of its key hash buckets, no row compared.
    assert_eq!(t["buckets_checked"], 64, "{t}");
    assert_eq!(t["rows_compared"], 0, "{t}");
    assert!(t["differences"].as_array().unwrap().is_empty());

    dst.psql(
        "einvoice",
        "DELETE FROM invoice WHERE invoice_number IN ('AB00000001', 'AB00015000', 'AB00030000'); \
         INSERT INTO invoice (invoice_number, seller, amount) VALUES ('AB00015000x', '1', 1), ('ZZ', '2', 2); \
         UPDATE invoice SET amount = amount + 1 WHERE invoice_number = 'AB00000500'; \
         UPDATE invoice SET note = NULL, seller = '99999999' WHERE invoice_number = 'AB00022222'; \
         UPDATE invoice SET issued = issued + interval '1 microsecond' WHERE invoice_number = 'AB00029999'",
    );
    let repair = tempfile::tempdir().unwrap();
    let repair_file = repair.path().join("repair.sql");
    let (code, report) = verify(&src, &dst, &["--repair-sql", repair_file.to_str().unwrap()]);
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.invoice");
    assert_eq!(t["status"], "different");
    assert_eq!(t["target_rows"], 29999);
    // Only the rows of the few differing buckets were compared.
    assert!(t["rows_compared"].as_u64().unwrap() < 5000, "{t}");
    assert_eq!(
        diffs(t, &["invoice_number"]),
        vec![
            d("AB00000001", "missing", &[]),
            d("AB00000500", "changed", &["amount", "total"]),
            d("AB00015000", "missing", &[]),
            d("AB00015000x", "extra", &[]),
            d("AB00022222", "changed", &["seller", "note"]),
            d("AB00029999", "changed", &["issued"]),
            d("AB00030000", "missing", &[]),
            d("ZZ", "extra", &[]),
        ]
    );
    // Changed values are shown as text, NULL as null.
    let note = t["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["key"]["invoice_number"] == "AB00022222")
        .unwrap();
    assert_eq!(note["changes"][1]["source"], "n22222");
    assert_eq!(note["changes"][1]["target"], Value::Null);
    assert_eq!(t["in_flight"], 0);

    // The repair SQL, run on the target, makes it match.
    let sql = std::fs::read_to_string(&repair_file).unwrap();
    assert!(
        sql.contains("DELETE FROM") && sql.contains("UPDATE") && sql.contains("INSERT INTO"),
        "{sql}"
    );
    assert!(
        !sql.contains("\"total\" ="),
        "generated columns are never written: {sql}"
    );
    apply(&dst, &sql);
    let (code, report) = verify(&src, &dst, &[]);
    assert_eq!(code, 0, "{report}");

    // Human output names each row and kind.
    dst.psql(
        "einvoice",
        "DELETE FROM invoice WHERE invoice_number = 'AB00000002'",
    );
    let (code, out, _) = invsync(&[
        "verify",
        "db",
        "--source",
        &src.url("einvoice"),
        "--target",
        &dst.url("einvoice"),
        "--where",
        "invoice_number < 'AB00000010'",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("missing on target") && out.contains("AB00000002"),
        "{out}"
    );
    assert!(out.contains("1 different (1 rows)"), "{out}");

    // A changed value of megabytes is cut in the human report (length and hash shown, two
    // values differing only at the end told apart) and whole in --json.
    apply(
        &dst,
        "INSERT INTO invoice (invoice_number, seller) VALUES ('AB00000002', '1')",
    );
    both(
        &src,
        &dst,
        "UPDATE invoice SET note = repeat('x', 3000000) WHERE invoice_number = 'AB00000003'",
    );
    dst.psql(
        "einvoice",
        "UPDATE invoice SET note = repeat('x', 2999999) || 'y' WHERE invoice_number = 'AB00000003'",
    );
    let where_ = "invoice_number = 'AB00000003'";
    let (code, out, _) = invsync(&[
        "verify",
        "db",
        "--source",
        &src.url("einvoice"),
        "--target",
        &dst.url("einvoice"),
        "--where",
        where_,
    ]);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("AB00000003"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.len() < 600, "{}", &line[..600.min(line.len())]);
    let hash = |v: &str| blake3::hash(v.as_bytes()).to_hex()[..12].to_string();
    let before = "x".repeat(3_000_000);
    let after = format!("{}y", "x".repeat(2_999_999));
    assert!(
        line.contains(&format!("(3000000 bytes, blake3 {})", hash(&before)))
            && line.contains(&format!("(3000000 bytes, blake3 {})", hash(&after))),
        "{line}"
    );
    let (_, report) = verify(&src, &dst, &["--where", where_]);
    let t = table(&report, "public.invoice");
    assert_eq!(
        t["differences"][0]["changes"][0]["target"]
            .as_str()
            .map(str::len),
        Some(3_000_000),
        "{t}"
    );
}

#[test]
fn values_compare_exactly_whatever_the_server_settings() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    // The target's sessions default to other output settings; equal values must still match.
    dst.psql(
        "einvoice",
        "ALTER DATABASE einvoice SET timezone TO 'Asia/Taipei'; \
         ALTER DATABASE einvoice SET datestyle TO 'SQL, DMY'; \
         ALTER DATABASE einvoice SET extra_float_digits TO -3; \
         ALTER DATABASE einvoice SET intervalstyle TO 'iso_8601'; \
         ALTER DATABASE einvoice SET bytea_output TO 'escape'",
    );
    both(
        &src,
        &dst,
        "CREATE TABLE t (id int PRIMARY KEY, n numeric, j jsonb, a int[], s text[], \
           ts timestamptz, f float8, b bytea, iv interval, d date, note text); \
         INSERT INTO t SELECT i, 1.0, '{\"a\": [1, 2], \"b\": 1.0}', '{1,2}', '{x,NULL,\"\"}', \
           '2024-03-01 12:00:00.123456+00', 0.1, '\\x00ff', '1 day 02:03:04', '2024-02-29', '' \
           FROM generate_series(1, 10) i",
    );
    let (code, report) = verify(&src, &dst, &[]);
    assert_eq!(code, 0, "{report}");

    dst.psql(
        "einvoice",
        "UPDATE t SET n = 1.00 WHERE id = 1; \
         UPDATE t SET j = '{\"a\": [1, 2], \"b\": 1}' WHERE id = 2; \
         UPDATE t SET a = '{2,1}' WHERE id = 3; \
         UPDATE t SET s = '{x,\"\",\"\"}' WHERE id = 4; \
         UPDATE t SET ts = ts + interval '1 microsecond' WHERE id = 5; \
         UPDATE t SET f = 0.1 + 1e-17 WHERE id = 6; \
         UPDATE t SET note = NULL WHERE id = 7; \
         UPDATE t SET iv = interval '26:03:04' WHERE id = 8; \
         UPDATE t SET b = '\\x00fe' WHERE id = 9",
    );
    let (code, report) = verify(&src, &dst, &[]);
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.t");
    // 0.1 + 1e-17 is the same float8 as 0.1: not a difference.
    assert_eq!(
        diffs(t, &["id"]),
        vec![
            d("1", "changed", &["n"]),
            d("2", "changed", &["j"]),
            d("3", "changed", &["a"]),
            d("4", "changed", &["s"]),
            d("5", "changed", &["ts"]),
            d("7", "changed", &["note"]),
            d("8", "changed", &["iv"]),
            d("9", "changed", &["b"]),
        ]
    );
    let change = |id: &str| {
        t["differences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["key"]["id"] == id)
            .unwrap()["changes"][0]
            .clone()
    };
    let n = change("1");
    assert_eq!(
        (n["source"].as_str(), n["target"].as_str()),
        (Some("1.0"), Some("1.00"))
    );
    let note = change("7");
    assert_eq!(
        (note["source"].as_str(), &note["target"]),
        (Some(""), &Value::Null)
    );

    // A key equal on both sides but written with another scale is a changed row, not a
    // missing one and an extra one.
    src.psql("einvoice", "CREATE TABLE by_numeric (k numeric PRIMARY KEY, v int); INSERT INTO by_numeric VALUES (1.0, 1), (2, 2)");
    dst.psql("einvoice", "CREATE TABLE by_numeric (k numeric PRIMARY KEY, v int); INSERT INTO by_numeric VALUES (1.00, 1), (2, 2)");
    let (code, report) = verify(&src, &dst, &["--tables", "public.by_numeric"]);
    assert_eq!(code, 1, "{report}");
    let found = diffs(table(&report, "public.by_numeric"), &["k"]);
    assert_eq!(found, vec![d("1.0", "changed", &["k"])], "{report}");
    // The same among many rows, some of them also streamed with a tenth of the table
    // differing: each such key is one changed row, whichever buckets its spellings fall in.
    src.psql(
        "einvoice",
        "CREATE TABLE by_amount (k numeric PRIMARY KEY, v int); \
         INSERT INTO by_amount SELECT i / 10.0, i FROM generate_series(1, 60000) i; ANALYZE by_amount",
    );
    dst.psql(
        "einvoice",
        "CREATE TABLE by_amount (k numeric PRIMARY KEY, v int); \
         INSERT INTO by_amount SELECT CASE WHEN i % 1000 = 7 THEN round(i / 10.0, 3) ELSE i / 10.0 END, \
           CASE WHEN i % 10 = 1 THEN -i ELSE i END FROM generate_series(1, 60000) i; ANALYZE by_amount",
    );
    let (code, report) = verify(&src, &dst, &["--tables", "public.by_amount"]);
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.by_amount");
    assert_eq!(t["differences_found"], 6060, "{t}");
    assert_eq!(t["missing"], 0, "{t}");
    assert_eq!(t["extra"], 0, "{t}");
    let respelled = t["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["columns"] == serde_json::json!(["k"]))
        .count();
    assert_eq!(respelled, 60, "{t}");

    // A float that really differs is found too.
    dst.psql(
        "einvoice",
        "UPDATE t SET f = 0.30000000000000004 WHERE id = 10",
    );
    let (_, report) = verify(&src, &dst, &["--tables", "public.t", "--where", "id = 10"]);
    assert_eq!(
        diffs(table(&report, "public.t"), &["id"]),
        vec![d("10", "changed", &["f"])]
    );
}

#[test]
fn every_kind_of_key_and_many_differences() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    both(
        &src,
        &dst,
        "CREATE TABLE by_uuid (id uuid PRIMARY KEY, v int); \
         INSERT INTO by_uuid SELECT md5(i::text)::uuid, i FROM generate_series(1, 20000) i; \
         CREATE TABLE carrier (carrier_type text, carrier_id text, owner int, PRIMARY KEY (carrier_type, carrier_id)); \
         INSERT INTO carrier SELECT t, '/' || upper(substr(md5(i::text), 1, 7)), i \
           FROM generate_series(1, 6000) i, unnest(array['3J0002', 'CQ0001', 'EJ0113']) t; \
         CREATE TABLE gapped (id bigint PRIMARY KEY, v text); \
         INSERT INTO gapped SELECT i * 1000000000000, 'v' || i FROM generate_series(-3000, 3000) i; \
         INSERT INTO gapped VALUES (9223372036854775807, 'max'), (-9223372036854775808, 'min'); \
         CREATE TABLE skewed (id int PRIMARY KEY, v int); \
         INSERT INTO skewed SELECT i, i FROM generate_series(1, 20000) i; \
         INSERT INTO skewed SELECT 1000000000 + i, i FROM generate_series(1, 10) i; \
         CREATE TABLE by_day (day date PRIMARY KEY, v int); \
         INSERT INTO by_day SELECT date '2000-01-01' + i, i FROM generate_series(1, 9000) i; \
         CREATE TABLE big (id int PRIMARY KEY, v int); \
         INSERT INTO big SELECT i, i FROM generate_series(1, 250000) i; \
         ANALYZE; \
         CREATE TABLE unanalyzed (id int PRIMARY KEY, v int) WITH (autovacuum_enabled = off); \
         INSERT INTO unanalyzed SELECT i, i FROM generate_series(1, 100000) i",
    );
    dst.psql(
        "einvoice",
        "DELETE FROM by_uuid WHERE id = md5('777')::uuid; UPDATE by_uuid SET v = -v WHERE v IN (5, 19999); \
         INSERT INTO by_uuid VALUES ('00000000-0000-0000-0000-000000000000', 0); \
         UPDATE carrier SET owner = 0 WHERE carrier_type = 'CQ0001' AND owner = 42; \
         DELETE FROM carrier WHERE carrier_type = 'EJ0113' AND owner = 6000; \
         INSERT INTO carrier VALUES ('3J0002', '/ZZZZZZZ', 1); \
         UPDATE gapped SET v = 'x' WHERE id IN (9223372036854775807, -3000000000000000); \
         DELETE FROM gapped WHERE id = 0; \
         UPDATE skewed SET v = 0 WHERE id = 1000000005; \
         UPDATE skewed SET v = -v WHERE id % 10 = 0; \
         UPDATE big SET v = 0 WHERE id IN (1, 123457, 250000); \
         UPDATE by_day SET v = 0 WHERE day = '2010-06-15'; DELETE FROM by_day WHERE day = '2001-01-01'; \
         UPDATE unanalyzed SET v = -v WHERE id % 10 = 3",
    );
    let repair = tempfile::tempdir().unwrap();
    let repair_file = repair.path().join("repair.sql");
    let (code, report) = verify(&src, &dst, &["--repair-sql", repair_file.to_str().unwrap()]);
    assert_eq!(code, 1, "{report}");
    let u5 = src.psql("einvoice", "SELECT md5('5')::uuid");
    let u19999 = src.psql("einvoice", "SELECT md5('19999')::uuid");
    let u777 = src.psql("einvoice", "SELECT md5('777')::uuid");
    let mut want = vec![
        d("00000000-0000-0000-0000-000000000000", "extra", &[]),
        d(&u5, "changed", &["v"]),
        d(&u19999, "changed", &["v"]),
        d(&u777, "missing", &[]),
    ];
    want.sort();
    assert_eq!(diffs(table(&report, "public.by_uuid"), &["id"]), want);

    let c42 = src.psql(
        "einvoice",
        "SELECT carrier_id FROM carrier WHERE carrier_type = 'CQ0001' AND owner = 42",
    );
    let c6000 = src.psql(
        "einvoice",
        "SELECT carrier_id FROM carrier WHERE carrier_type = 'EJ0113' AND owner = 6000",
    );
    let mut want = vec![
        d("3J0002,/ZZZZZZZ", "extra", &[]),
        d(&format!("CQ0001,{c42}"), "changed", &["owner"]),
        d(&format!("EJ0113,{c6000}"), "missing", &[]),
    ];
    want.sort();
    assert_eq!(
        diffs(
            table(&report, "public.carrier"),
            &["carrier_type", "carrier_id"]
        ),
        want
    );

    assert_eq!(
        diffs(table(&report, "public.gapped"), &["id"]),
        vec![
            d("-3000000000000000", "changed", &["v"]),
            d("0", "missing", &[]),
            d("9223372036854775807", "changed", &["v"]),
        ]
    );

    // 10% of a table differs: every row found, every bucket differs, and its rows are compared
    // in one slice.
    let skewed = table(&report, "public.skewed");
    let found = diffs(skewed, &["id"]);
    // id % 10 = 0 among 1..20000 and 1000000001..1000000010, and 1000000005.
    assert_eq!(found.len(), 2002, "{}", found.len());
    assert!(found
        .iter()
        .all(|(_, kind, cols)| kind == "changed" && cols == &["v"]));
    assert!(found.iter().any(|(k, _, _)| k == "1000000005"));
    assert_eq!(skewed["rows_compared"], 20010, "{skewed}");

    // A key type without a hash of its own here (date) is bucketed by its text.
    assert_eq!(
        diffs(table(&report, "public.by_day"), &["day"]),
        vec![
            d("2001-01-01", "missing", &[]),
            d("2010-06-15", "changed", &["v"]),
        ]
    );

    // A big table: the few rows are found by comparing only their buckets' rows.
    let big = table(&report, "public.big");
    assert_eq!(
        diffs(big, &["id"]),
        vec![
            d("1", "changed", &["v"]),
            d("123457", "changed", &["v"]),
            d("250000", "changed", &["v"])
        ]
    );
    assert_eq!(big["buckets_checked"], 256, "{big}");
    assert!(big["rows_compared"].as_u64().unwrap() < 5000, "{big}");
    // Without statistics the table gets the fewest buckets; they all differ, and too many rows
    // for one slice, so the rows are streamed in key ranges cut at exact boundaries.
    let unanalyzed = table(&report, "public.unanalyzed");
    assert_eq!(diffs(unanalyzed, &["id"]).len(), 10000);
    assert_eq!(unanalyzed["buckets_checked"], 64, "{unanalyzed}");
    assert_eq!(unanalyzed["rows_compared"], 100000, "{unanalyzed}");

    // People see composite keys in key order, as PostgreSQL writes them.
    let (code, out, _) = invsync(&[
        "verify",
        "db",
        "--source",
        &src.url("einvoice"),
        "--target",
        &dst.url("einvoice"),
        "--tables",
        "public.carrier",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("extra on target    (carrier_type, carrier_id)=(3J0002, /ZZZZZZZ)"),
        "{out}"
    );

    apply(&dst, &std::fs::read_to_string(&repair_file).unwrap());
    let (code, report) = verify(&src, &dst, &[]);
    assert_eq!(code, 0, "{report}");
}

/// A big integer-keyed table with a tenth of its rows changed: the differing rows are streamed
/// in key ranges cut at keys sampled in the key's own order (not the order of its text, where
/// 100000 < 99999), so every row is compared once and the differences come out in key order.
#[test]
fn many_differences_in_a_big_table_stream_in_numeric_key_order() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    both(
        &src,
        &dst,
        "CREATE TABLE counted (id int PRIMARY KEY, v int); \
         INSERT INTO counted SELECT i, i FROM generate_series(1, 250000) i; \
         ANALYZE",
    );
    dst.psql("einvoice", "UPDATE counted SET v = -v WHERE id % 10 = 7");
    let (code, report) = verify(&src, &dst, &[]);
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.counted");
    assert_eq!(t["differences_found"], 25000);
    assert_eq!(t["changed"], 25000);
    assert_eq!(t["rows_compared"], 250000);
    let listed: Vec<u32> = t["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"]["id"].as_str().unwrap().parse().unwrap())
        .collect();
    let want: Vec<u32> = (1..=250000u32)
        .filter(|i| i % 10 == 7)
        .take(listed.len())
        .collect();
    assert_eq!(listed.len(), 10000);
    assert_eq!(listed, want, "listed in key order");
}

/// About 9% of a table differs: the counts by kind are exact though only the first rows are
/// listed; the listed rows come in key order, rows only on the target merged in among the
/// others; differences are re-checked in batches while the walk goes on; and the repair SQL,
/// written as differences are found, covers every one of them.
#[test]
fn many_differences_counted_exactly_listed_in_key_order_and_all_repaired() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    both(
        &src,
        &dst,
        "CREATE TABLE item (invoice_number text, seq int, amount numeric(12, 2), \
           PRIMARY KEY (invoice_number, seq)); \
         INSERT INTO item SELECT 'AB' || lpad(i::text, 8, '0'), s, i * s / 100.0 \
           FROM generate_series(1, 20000) i, generate_series(1, 3) s; \
         ANALYZE",
    );
    // Changed: seq 2 of every 5th invoice; missing: seq 3 of every 25th; extra: a seq 4 for
    // every 40th.
    dst.psql(
        "einvoice",
        "UPDATE item SET amount = -amount WHERE seq = 2 AND substr(invoice_number, 3)::int % 5 = 0; \
         DELETE FROM item WHERE seq = 3 AND substr(invoice_number, 3)::int % 25 = 0; \
         INSERT INTO item SELECT 'AB' || lpad(i::text, 8, '0'), 4, 1 \
           FROM generate_series(40, 20000, 40) i",
    );
    let mut want: Vec<(u32, u32, &str)> = Vec::new();
    for i in 1..=20000u32 {
        if i % 5 == 0 {
            want.push((i, 2, "changed"));
        }
        if i % 25 == 0 {
            want.push((i, 3, "missing"));
        }
        if i % 40 == 0 {
            want.push((i, 4, "extra"));
        }
    }
    let repair = tempfile::tempdir().unwrap();
    let repair_file = repair.path().join("repair.sql");
    let (code, report) = verify(
        &src,
        &dst,
        &[
            "--max-listed",
            "1000",
            "--repair-sql",
            repair_file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.item");
    assert_eq!(t["differences_found"], 5300, "{}", t["differences_found"]);
    assert_eq!(t["changed"], 4000);
    assert_eq!(t["missing"], 800);
    assert_eq!(t["extra"], 500);
    let listed: Vec<(u32, u32, &str)> = t["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let number = d["key"]["invoice_number"].as_str().unwrap();
            (
                number[2..].parse().unwrap(),
                d["key"]["seq"].as_str().unwrap().parse().unwrap(),
                d["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed.len(), 1000);
    assert_eq!(listed, want[..1000], "listed in key order");

    let sql = std::fs::read_to_string(&repair_file).unwrap();
    assert_eq!(sql.matches("\nUPDATE ").count(), 4000);
    assert_eq!(sql.matches("\nINSERT ").count(), 800);
    assert_eq!(sql.matches("\nDELETE ").count(), 500);
    apply(&dst, &sql);
    let (code, report) = verify(&src, &dst, &[]);
    assert_eq!(code, 0, "{report}");
}

/// A source database in the `C` collation against a target whose default collation is ICU
/// `en-US`, with text keys that the two order differently (case, accents, punctuation): the
/// differing rows are streamed in key ranges, and each is counted once, exactly.
#[test]
fn text_keys_compare_exactly_across_collations() {
    let cluster = PgCluster::start();
    let icu = cluster.psql(
        "postgres",
        "SELECT count(*) FROM pg_collation WHERE collprovider = 'i' AND collname = 'en-US-x-icu'",
    );
    assert_eq!(icu.trim(), "1", "this PostgreSQL has no ICU collations");
    cluster.psql(
        "postgres",
        "CREATE DATABASE bytes TEMPLATE template0 LOCALE 'C'",
    );
    cluster.psql(
        "postgres",
        "CREATE DATABASE words TEMPLATE template0 LOCALE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'",
    );
    // 60k keys: a prefix that C and en-US sort apart (case, accents, punctuation), a mixed-case
    // hash, and the number, which keeps them unique. Enough rows in differing buckets for
    // them to be streamed in eight key ranges.
    let ddl = "CREATE TABLE account (code text PRIMARY KEY, balance int NOT NULL); \
         INSERT INTO account SELECT (ARRAY['', 'a', 'B', 'é', 'É', '_', '.', 'z', 'Z', '-', 'Ω', ' '])[i % 12 + 1] \
           || CASE WHEN i % 3 = 0 THEN upper(substr(md5(i::text), 1, 6)) ELSE substr(md5(i::text), 1, 6) END \
           || '-' || i, i FROM generate_series(1, 60000) i; ANALYZE";
    cluster.psql("bytes", ddl);
    cluster.psql("words", ddl);
    cluster.psql(
        "words",
        "UPDATE account SET balance = -balance WHERE balance % 20 = 0; \
         DELETE FROM account WHERE balance % 1000 = 1; \
         INSERT INTO account SELECT 'Extra é.' || i || CASE WHEN i % 2 = 0 THEN 'x' ELSE 'X' END, i \
           FROM generate_series(1, 40) i",
    );
    let want = |sql: &str| -> Vec<String> {
        let mut keys: Vec<String> = cluster
            .psql("words", sql)
            .lines()
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    };
    let changed = want("SELECT code FROM account WHERE balance < 0");
    let extra = want("SELECT code FROM account WHERE code LIKE 'Extra%'");
    let missing = {
        let mut keys: Vec<String> = cluster
            .psql("bytes", "SELECT code FROM account WHERE balance % 1000 = 1")
            .lines()
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    };
    assert_eq!((changed.len(), missing.len(), extra.len()), (3000, 60, 40));

    let (source, target) = (cluster.url("bytes"), cluster.url("words"));
    for (from, to) in [(&source, &target), (&target, &source)] {
        let (code, out, err) =
            invsync(&["verify", "db", "--source", from, "--target", to, "--json"]);
        let report: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
        assert_eq!(code, 1, "{report}");
        let t = table(&report, "public.account");
        let (missing, extra) = if from == &source {
            (&missing, &extra)
        } else {
            (&extra, &missing)
        };
        assert_eq!(
            (
                &t["differences_found"],
                &t["changed"],
                &t["missing"],
                &t["extra"]
            ),
            (
                &Value::from(3100),
                &Value::from(3000),
                &Value::from(missing.len()),
                &Value::from(extra.len())
            ),
            "{}",
            t["differences_found"]
        );
        let listed = |kind: &str| -> Vec<String> {
            let mut keys: Vec<String> = t["differences"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"] == kind)
                .map(|d| d["key"]["code"].as_str().unwrap().to_string())
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(listed("changed"), changed);
        assert_eq!(&listed("missing"), missing);
        assert_eq!(&listed("extra"), extra);
    }
}

#[test]
fn bad_input_is_reported_and_other_tables_still_verified() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    both(
        &src,
        &dst,
        "CREATE TABLE good (id int PRIMARY KEY, v text); INSERT INTO good VALUES (1, 'a'), (2, 'b'); \
         CREATE TABLE drifted (id int PRIMARY KEY, v text); INSERT INTO drifted VALUES (1, 'a'); \
         CREATE TABLE nokey (id int, v text); \
         CREATE TABLE other (id int PRIMARY KEY, v int); INSERT INTO other VALUES (1, 1)",
    );
    src.psql("einvoice", "CREATE TABLE only_source (id int PRIMARY KEY)");
    src.psql(
        "einvoice",
        "CREATE TABLE retyped (id int PRIMARY KEY, amount integer)",
    );
    dst.psql(
        "einvoice",
        "CREATE TABLE retyped (id int PRIMARY KEY, amount bigint)",
    );
    dst.psql("einvoice", "CREATE TABLE only_target (id int PRIMARY KEY)");
    // The same columns in another order are the same table.
    src.psql(
        "einvoice",
        "CREATE TABLE reordered (id int PRIMARY KEY, a text, b int); INSERT INTO reordered VALUES (1, 'x', 2)",
    );
    dst.psql(
        "einvoice",
        "CREATE TABLE reordered (b int, id int PRIMARY KEY, a text); INSERT INTO reordered VALUES (2, 1, 'x')",
    );
    dst.psql("einvoice", "UPDATE drifted SET v = 'z'");
    let (code, report) = verify(&src, &dst, &["--tables", "public.*,public.no_such_table"]);
    assert_eq!(code, 2, "{report}");
    assert_eq!(table(&report, "public.good")["status"], "identical");
    assert_eq!(table(&report, "public.other")["status"], "identical");
    assert_eq!(table(&report, "public.reordered")["status"], "identical");
    assert_eq!(
        diffs(table(&report, "public.drifted"), &["id"]),
        vec![d("1", "changed", &["v"])]
    );
    let error = |name: &str| {
        let t = table(&report, name);
        assert_eq!(t["status"], "error", "{t}");
        t["error"].as_str().unwrap().to_string()
    };
    let e = error("public.nokey");
    assert!(
        e.contains("no primary key") && e.contains("ADD PRIMARY KEY"),
        "{e}"
    );
    let e = error("public.only_source");
    assert!(e.contains("does not exist on the target"), "{e}");
    let e = error("public.retyped");
    assert!(
        e.contains("amount is integer on the source but bigint on the target"),
        "{e}"
    );
    let e = error("public.only_target");
    assert!(e.contains("does not exist on the source"), "{e}");
    let e = error("public.no_such_table");
    assert!(e.contains("does not exist"), "{e}");

    // An unreachable database is exit 2 with a one-line error naming it, password hidden.
    let bad = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/einvoice",
        support::free_port()
    );
    let (code, out, err) = invsync(&[
        "verify",
        "db",
        "--source",
        &bad,
        "--target",
        &dst.url("einvoice"),
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("cannot connect") && err.contains("***") && !err.contains("hunter2"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_flight_are_rechecked_not_reported() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    both(
        &src,
        &dst,
        "CREATE TABLE invoice (id int PRIMARY KEY, status text); \
         INSERT INTO invoice SELECT i, 'issued' FROM generate_series(1, 1000) i",
    );
    // The source moves ahead; the target will get the same changes a little later, as from a
    // pipeline. One row is also changed by hand on the target: that one is really different.
    src.psql(
        "einvoice",
        "UPDATE invoice SET status = 'voided' WHERE id = 10; DELETE FROM invoice WHERE id = 20; \
         INSERT INTO invoice VALUES (5000, 'issued')",
    );
    dst.psql(
        "einvoice",
        "UPDATE invoice SET status = 'tampered' WHERE id = 30",
    );
    let (source, target) = (src.url("einvoice"), dst.url("einvoice"));
    let run = tokio::task::spawn_blocking(move || {
        invsync(&[
            "verify", "db", "--source", &source, "--target", &target, "--json", "--settle", "10",
        ])
    });
    // Once verify has read the table inside its snapshots, apply the changes on the target.
    let client = dst.client("einvoice").await;
    wait_until(
        Duration::from_secs(60),
        "verify to read the table",
        || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'invsync verify' \
                 AND query LIKE '%\"public\".\"invoice\"%'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        },
    )
    .await;
    dst.psql(
        "einvoice",
        "UPDATE invoice SET status = 'voided' WHERE id = 10; DELETE FROM invoice WHERE id = 20; \
         INSERT INTO invoice VALUES (5000, 'issued')",
    );
    let (code, out, err) = run.await.unwrap();
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.invoice");
    assert_eq!(diffs(t, &["id"]), vec![d("30", "changed", &["status"])]);
    assert_eq!(t["in_flight"], 3, "{t}");
}

/// A live pipeline (here PostgreSQL's own logical replication, standing in for invsync sync)
/// streams a steady write load into the target while `verify db --pipeline` runs: nothing in
/// flight is reported, and a row changed by hand on the target is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pipeline_reports_no_false_positives() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    both(
        &src,
        &dst,
        "CREATE TABLE invoice (id int PRIMARY KEY, amount numeric(12,2), status text); \
         INSERT INTO invoice SELECT i, i, 'issued' FROM generate_series(1, 5000) i",
    );
    src.psql("einvoice", "CREATE PUBLICATION live FOR TABLE invoice");
    dst.psql(
        "einvoice",
        &format!(
            "CREATE SUBSCRIPTION live CONNECTION 'host=127.0.0.1 port={} dbname=einvoice user=postgres' \
             PUBLICATION live WITH (copy_data = false)",
            src.port
        ),
    );
    wait_for_count(
        &src,
        "the subscription's slot to be streaming",
        "SELECT count(*) FROM pg_replication_slots WHERE active",
        0,
    )
    .await;
    // Rows 1..=10 are left alone by the load; row 7 is changed by hand on the target.
    dst.psql(
        "einvoice",
        "UPDATE invoice SET status = 'by hand' WHERE id = 7",
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let client = src.client("einvoice").await;
        tokio::spawn(async move {
            let mut n: i32 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = 11 + (n * 7919) % 4990;
                client
                    .batch_execute(&format!(
                        "UPDATE invoice SET amount = amount + 1, status = 'paid' WHERE id = {id}; \
                         INSERT INTO invoice VALUES ({}, 1, 'issued'); \
                         DELETE FROM invoice WHERE id = {}",
                        100000 + n,
                        100000 + n - 3
                    ))
                    .await
                    .unwrap();
            }
            n
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let config = pipeline_config(dir.path(), &src, &dst, "live", &["public.invoice"]);
    let run = |config: String| {
        tokio::task::spawn_blocking(move || {
            invsync(&[
                "--config",
                &config,
                "verify",
                "db",
                "--pipeline",
                "live",
                "--json",
            ])
        })
    };
    let (code, out, err) = run(config.clone()).await.unwrap();
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.invoice");
    assert_eq!(t["target"], "cloud");
    assert_eq!(diffs(t, &["id"]), vec![d("7", "changed", &["status"])]);

    // Under the same load, with the hand-made change undone, the copies verify as identical.
    dst.psql(
        "einvoice",
        "UPDATE invoice SET status = 'issued' WHERE id = 7",
    );
    let (code, out, _) = run(config).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = load.await.unwrap();
    assert!(writes > 10, "the load ran ({writes} transactions)");
    assert_eq!(code, 0, "{out}");
}

/// A source initialised by `pgbench -i` (history given a key), a pipeline `bench` over its
/// four tables set up with the real binary, and the commands to drive them.
struct Bench {
    src: PgCluster,
    dst: PgCluster,
    pgbench: std::path::PathBuf,
    config: String,
    _dir: tempfile::TempDir,
}

const BENCH_TABLES: [&str; 4] = [
    "public.pgbench_accounts",
    "public.pgbench_branches",
    "public.pgbench_tellers",
    "public.pgbench_history",
];

impl Bench {
    fn setup() -> Bench {
        let src = PgCluster::start();
        let dst = PgCluster::start();
        let bindir = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config");
        let pgbench =
            std::path::Path::new(String::from_utf8_lossy(&bindir.stdout).trim()).join("pgbench");
        let dir = tempfile::tempdir().unwrap();
        let config = pipeline_config(dir.path(), &src, &dst, "bench", &BENCH_TABLES);
        let bench = Bench {
            src,
            dst,
            pgbench,
            config,
            _dir: dir,
        };
        let init = bench.pgbench(&["-i", "-s", "1", "-q"]).output().unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        bench.src.psql(
            "einvoice",
            "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY",
        );
        let (code, _, err) = invsync(&["--config", &bench.config, "sync", "setup", "bench"]);
        assert_eq!(code, 0, "{err}");
        bench
    }

    fn pgbench(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(&self.pgbench);
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.src.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .arg("einvoice")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        c
    }

    /// `pgbench -c 4` for `seconds`.
    fn load(&self, seconds: u32) -> std::process::Child {
        self.pgbench(&["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string()])
            .spawn()
            .unwrap()
    }

    /// `sync run bench`, stopped with [`support::send_signal`] and [`support::finish`].
    fn pipeline(&self) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
            .args(["--config", &self.config, "sync", "run", "bench"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `verify db --pipeline bench --settle SETTLE --json`, run while the caller goes on.
    fn verify(&self, settle: u32) -> tokio::task::JoinHandle<(i32, String, String)> {
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || {
            invsync(&[
                "--config",
                &config,
                "verify",
                "db",
                "--pipeline",
                "bench",
                "--settle",
                &settle.to_string(),
                "--json",
            ])
        })
    }
}

/// The report of a verify run, each table decided exactly (against the source's stream) and
/// none undecided.
fn exact_report(code_out_err: (i32, String, String), code: i32) -> Value {
    let (got, out, err) = code_out_err;
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    for name in BENCH_TABLES {
        let t = table(&report, name);
        assert_eq!(t["undecided"], 0, "{name} has undecided rows: {t}");
    }
    assert_eq!(got, code, "{report}");
    for name in BENCH_TABLES {
        let t = table(&report, name);
        assert_eq!(
            t["exact"], true,
            "{name} was not compared exactly: {t}\n{err}"
        );
    }
    report
}

/// `pgbench` (4 clients) writes through an invsync pipeline run by the real binary while
/// `verify db --pipeline` runs: its tellers and branches, rewritten many times a second, are
/// proven to lag (the source's changes between its cut and the target's position replayed),
/// so the run exits 0 with no row undecided; and a history row changed by hand on the target
/// behind the pipeline's back is then named, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_rows_under_pgbench_are_proven_to_lag_and_a_real_difference_is_named() {
    let bench = Bench::setup();
    let pipeline = bench.pipeline();
    let mut load = bench.load(90);
    wait_for_count(
        &bench.dst,
        "pgbench's history to reach the target",
        "SELECT count(*) FROM pgbench_history",
        100,
    )
    .await;

    let identical = exact_report(bench.verify(2).await.unwrap(), 0);
    let tellers = table(&identical, "public.pgbench_tellers");
    assert_eq!(tellers["status"], "identical", "{tellers}");

    // Changed on the target behind the pipeline's back: pgbench never touches a history
    // row again, so that difference is real.
    bench.dst.psql(
        "einvoice",
        "UPDATE pgbench_history SET delta = delta + 1 WHERE hid = 1",
    );
    let different = exact_report(bench.verify(2).await.unwrap(), 1);

    let still_loading = load.try_wait().unwrap().is_none();
    let _ = load.kill();
    let _ = load.wait();
    // The source idle: no commit moves the target's recorded position past a new cut, but
    // the pipeline confirms its slot past the cut, which proves the target holds everything
    // before it: still exact, within a settle window of 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = exact_report(bench.verify(2).await.unwrap(), 1);
    assert_eq!(
        table(&idle, "public.pgbench_history")["differences_found"],
        1,
        "{idle}"
    );
    support::send_signal(&pipeline, "TERM");
    let (code, err) = support::finish(pipeline).await;
    assert_eq!(code, 0, "{err}");
    assert!(still_loading, "pgbench ended before verify did");
    for name in &BENCH_TABLES[..3] {
        let t = table(&different, name);
        assert_eq!(t["differences_found"], 0, "{t}");
        assert_eq!(t["status"], "identical", "{t}");
    }
    let history = table(&different, "public.pgbench_history");
    assert_eq!(
        diffs(history, &["hid"]),
        vec![d("1", "changed", &["delta"])],
        "{history}"
    );
    let lagging: u64 = BENCH_TABLES
        .iter()
        .map(|n| table(&identical, n)["in_flight"].as_u64().unwrap())
        .sum();
    eprintln!("rows proven to lag under load: {lagging}");
}

/// The pipeline is stopped while pgbench goes on, so its target falls far behind; verify
/// waits for the restarted pipeline to apply past its cut, then replays everything in
/// between: every table exact, the hot rows proven to lag, nothing undecided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_far_behind_its_pipeline_still_verifies_exactly() {
    let bench = Bench::setup();
    let pipeline = bench.pipeline();
    let mut load = bench.load(90);
    wait_for_count(
        &bench.dst,
        "pgbench's history to reach the target",
        "SELECT count(*) FROM pgbench_history",
        100,
    )
    .await;
    support::send_signal(&pipeline, "TERM");
    let (code, err) = support::finish(pipeline).await;
    assert_eq!(code, 0, "{err}");
    let behind: i64 = bench
        .dst
        .psql("einvoice", "SELECT count(*) FROM pgbench_history")
        .trim()
        .parse()
        .unwrap();
    wait_for_count(
        &bench.src,
        "the source to move far ahead of the stopped pipeline",
        "SELECT count(*) FROM pgbench_history",
        behind + 2000,
    )
    .await;

    let run = bench.verify(120);
    // Verify has cut the source and waits for the target; the pipeline comes back.
    wait_for_count(
        &bench.src,
        "verify to cut the source",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'invsync_bench_verify%'",
        0,
    )
    .await;
    let pipeline = bench.pipeline();
    let report = exact_report(run.await.unwrap(), 0);

    let still_loading = load.try_wait().unwrap().is_none();
    let _ = load.kill();
    let _ = load.wait();
    support::send_signal(&pipeline, "TERM");
    let (code, err) = support::finish(pipeline).await;
    assert_eq!(code, 0, "{err}");
    assert!(still_loading, "pgbench ended before verify did");
    let tellers = table(&report, "public.pgbench_tellers");
    assert!(
        tellers["in_flight"].as_u64().unwrap() > 0,
        "the tellers differed at the cut and were proven to lag: {tellers}"
    );
    // The temporary slots went with their sessions; the pipeline's own is still there.
    let client = bench.src.client("einvoice").await;
    wait_until(Duration::from_secs(30), "the temporary slots to go", || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'invsync_bench_verify%'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 0)
    })
    .await;
    let slots = bench.src.psql(
        "einvoice",
        "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots",
    );
    assert_eq!(slots.trim(), "invsync_bench", "{slots}");
}

/// A source role without REPLICATION cannot cut the source with a temporary slot: verify says
/// so in one line, re-checks differing rows instead, and still finds the row changed by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replication_verify_falls_back_to_rechecking_and_says_so() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE invoice (id int PRIMARY KEY, status text); \
         INSERT INTO invoice SELECT i, 'issued' FROM generate_series(1, 100) i; \
         CREATE ROLE reader LOGIN; GRANT SELECT ON invoice TO reader",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = pipeline_config(dir.path(), &src, &dst, "p", &["public.invoice"]);
    let (code, _, err) = invsync(&["--config", &config, "sync", "setup", "p"]);
    assert_eq!(code, 0, "{err}");
    let pipeline = std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", &config, "sync", "run", "p"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    src.psql(
        "einvoice",
        "UPDATE invoice SET status = 'paid' WHERE id = 5",
    );
    wait_for_count(
        &dst,
        "the update to reach the target",
        "SELECT count(*) FROM invoice WHERE status = 'paid'",
        0,
    )
    .await;
    dst.psql(
        "einvoice",
        "UPDATE invoice SET status = 'by hand' WHERE id = 9",
    );

    let reader_dir = tempfile::tempdir().unwrap();
    let reader_config = reader_dir.path().join("invsync.toml");
    std::fs::write(
        &reader_config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&src.url("einvoice"), &src.url_as("reader", "einvoice")),
    )
    .unwrap();
    let reader_config = reader_config.to_str().unwrap().to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        invsync(&[
            "--config",
            &reader_config,
            "verify",
            "db",
            "--pipeline",
            "p",
            "--settle",
            "2",
            "--json",
        ])
    })
    .await
    .unwrap();
    support::send_signal(&pipeline, "TERM");
    let (stopped, pipeline_err) = support::finish(pipeline).await;
    assert_eq!(stopped, 0, "{pipeline_err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(code, 1, "{report}");
    let t = table(&report, "public.invoice");
    assert_eq!(t["exact"], false, "{t}");
    assert_eq!(diffs(t, &["id"]), vec![d("9", "changed", &["status"])]);
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("re-checking differing rows until they settle instead"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(said[0].contains("cannot cut the source"), "{err}");
}

/// Running totals keyed by `character(n)` (whose text cast drops the padding the change
/// stream sends) and rewritten in a loop through an invsync pipeline: every total is proven to
/// lag, and the one changed on the target by hand is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_totals_with_padded_keys_are_decided_exactly() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE seller_total (seller character(10) PRIMARY KEY, total bigint, note text); \
         INSERT INTO seller_total SELECT lpad(i::text, 8, '0'), 0, repeat('x', 5000) \
         FROM generate_series(1, 20) i",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = pipeline_config(dir.path(), &src, &dst, "totals", &["public.seller_total"]);
    let (code, _, err) = invsync(&["--config", &config, "sync", "setup", "totals"]);
    assert_eq!(code, 0, "{err}");
    let pipeline = std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", &config, "sync", "run", "totals"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let client = src.client("einvoice").await;
        tokio::spawn(async move {
            let mut n: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                // Sellers 1..=18 only (19 and 20 are left alone); the note is TOASTed and
                // unchanged, so the stream does not send it.
                client
                    .batch_execute(&format!(
                        "UPDATE seller_total SET total = total + {n} WHERE seller = lpad('{}', 8, '0')",
                        1 + n % 18
                    ))
                    .await
                    .unwrap();
            }
            n
        })
    };
    wait_for_count(
        &dst,
        "the totals to reach the target",
        "SELECT count(*) FROM seller_total WHERE total > 0",
        17,
    )
    .await;
    let verify = |config: String| {
        tokio::task::spawn_blocking(move || {
            invsync(&[
                "--config",
                &config,
                "verify",
                "db",
                "--pipeline",
                "totals",
                "--settle",
                "2",
                "--json",
            ])
        })
    };
    let (code, out, err) = verify(config.clone()).await.unwrap();
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let t = table(&report, "public.seller_total");
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        (t["exact"].clone(), t["undecided"].clone()),
        (true.into(), 0.into()),
        "{t}"
    );

    dst.psql(
        "einvoice",
        "UPDATE seller_total SET total = -1 WHERE seller = '00000019'",
    );
    let (code, out, err) = verify(config).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = load.await.unwrap();
    support::send_signal(&pipeline, "TERM");
    let (stopped, pipeline_err) = support::finish(pipeline).await;
    assert_eq!(stopped, 0, "{pipeline_err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let t = table(&report, "public.seller_total");
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        diffs(t, &["seller"]),
        vec![d("00000019", "changed", &["total"])]
    );
    assert_eq!(
        (t["exact"].clone(), t["undecided"].clone()),
        (true.into(), 0.into()),
        "{t}"
    );
    assert!(writes > 100, "the totals kept moving ({writes} updates)");
}
