//! Incremental backups: a second backup takes unchanged key-range segments over from the
//! first without reading them, and its restore still equals the source at its cut exactly,
//! whatever happened in between (updates, inserts, deletes, key changes, TRUNCATE, VACUUM
//! FREEZE, enum relabelling) or during it (a concurrent writer).

mod backup_util;
mod support;

use std::path::Path;

use backup_util::{fingerprint, ok, restore_setup};
use support::PgCluster;

/// A repository and a config naming `src` (database `einvoice`) and `dst` (`restored`).
/// Backs up `public.*`; returns the summary.
fn backup(cfg: &Path) -> serde_json::Value {
    let out = ok(
        cfg,
        &["backup", "--db", "src", "--tables", "public.*", "--json"],
    );
    serde_json::from_str(&out).unwrap()
}

fn segments(summary: &serde_json::Value) -> (u64, u64) {
    (
        summary["stats"]["segments_reused"].as_u64().unwrap(),
        summary["stats"]["segments_read"].as_u64().unwrap(),
    )
}

/// Restores `snapshot` into `restored` (replacing) and compares every table with `expected_db`.
fn assert_restores_to(
    pg: &PgCluster,
    cfg: &Path,
    snapshot: &str,
    expected_db: &str,
    tables: &[(&str, &str)],
) {
    ok(cfg, &["restore", snapshot, "--to-db", "dst", "--replace"]);
    for (t, order) in tables {
        assert_eq!(
            fingerprint(pg, expected_db, t, order),
            fingerprint(pg, "restored", t, order),
            "table {t} of snapshot {snapshot}"
        );
    }
}

/// `inv`: 300 000 rows (several segments); `tags`: composite text key; `nopk`: no key;
/// `moods`: an enum column. Analyzed, so a first backup cuts tables from a sample.
fn make_tables(pg: &PgCluster) {
    pg.psql(
        "einvoice",
        "CREATE TABLE inv (id bigint PRIMARY KEY, status text, amount numeric(12,2), note text);
         INSERT INTO inv SELECT g, 'issued', g % 1000 / 7.0, CASE WHEN g % 9 = 0 THEN NULL ELSE 'n' || g END
           FROM generate_series(1, 300000) g;
         CREATE TABLE tags (kind text, name text, v int, PRIMARY KEY (kind, name));
         INSERT INTO tags SELECT 'k' || (g % 3), 'n' || g, g FROM generate_series(1, 500) g;
         CREATE TABLE nopk (a int, b text);
         INSERT INTO nopk SELECT g, 'x' || g FROM generate_series(1, 50) g;
         CREATE TYPE mood AS ENUM ('ok', 'sad');
         CREATE TABLE moods (id int PRIMARY KEY, m mood);
         INSERT INTO moods SELECT g, CASE WHEN g % 2 = 0 THEN 'ok'::mood ELSE 'sad' END FROM generate_series(1, 100) g;
         ANALYZE;",
    );
}

const TABLES: &[(&str, &str)] = &[
    ("inv", "id"),
    ("tags", "kind, name"),
    ("nopk", "a, b"),
    ("moods", "id"),
];

#[test]
fn second_backup_reuses_unchanged_segments_and_restores_exactly() {
    let pg = PgCluster::start();
    make_tables(&pg);
    let dir = tempfile::tempdir().unwrap();
    let cfg = restore_setup(&pg, dir.path());

    let first = backup(&cfg);
    // inv is cut into segments of about 65 536 rows; the three small tables are one each.
    assert_eq!(segments(&first), (0, 5 + 3), "{first}");

    // Updates and inserts at the recent end, deletes and a key change at the start, a table
    // emptied and refilled with the very same rows, and a table left alone. The first
    // backup's bounds come from a block sample and move by thousands of keys between runs;
    // keys 1..=11 lie in the first segment whatever the sample, and keys above 299 000 in the
    // last. The last segment (about 60 000 rows, a fifth of inv) grows by 110 001 rows to
    // between 150 000 and 190 000 whatever the sample: past twice the segment size, so it is
    // cut, into exactly three pieces of at most 65 536 rows.
    pg.psql(
        "einvoice",
        "UPDATE inv SET status = 'voided' WHERE id > 299000;
         INSERT INTO inv SELECT g, 'issued', 1, 'new' FROM generate_series(300001, 410000) g;
         DELETE FROM inv WHERE id BETWEEN 1 AND 10;
         UPDATE inv SET id = 500000 WHERE id = 11;
         TRUNCATE tags;
         INSERT INTO tags SELECT 'k' || (g % 3), 'n' || g, g FROM generate_series(1, 500) g;",
    );
    let second = backup(&cfg);
    // Read again: inv's first segment, its last (cut into three), and tags; the rest is
    // reused.
    let (reused, read) = segments(&second);
    assert_eq!((reused, read), (3 + 2, 1 + 3 + 1), "{second}");
    assert!(
        second["stats"]["bytes_read"].as_u64().unwrap()
            < first["stats"]["bytes_read"].as_u64().unwrap(),
        "unchanged data is not read again: {second}"
    );
    assert_eq!(second["rows"], 300_000 + 110_000 - 10 + 500 + 50 + 100);
    assert_restores_to(
        &pg,
        &cfg,
        &second["snapshot"].as_str().unwrap()[..8],
        "einvoice",
        TABLES,
    );

    // Relabelling an enum value rewrites no tuple but changes their text: that table is read
    // again, and only it.
    for db in ["einvoice", "restored"] {
        pg.psql(db, "ALTER TYPE mood RENAME VALUE 'ok' TO 'fine'");
    }
    let third = backup(&cfg);
    assert_eq!(
        segments(&third),
        (reused + read - 1, 1),
        "only moods is read again: {third}"
    );
    assert_restores_to(&pg, &cfg, "latest", "einvoice", TABLES);

    // The layout is what restore and verify read: the repository checks clean, and the
    // first snapshot still restores as it was taken.
    ok(&cfg, &["verify", "repo"]);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["snapshots", "--json"])).unwrap();
    let inv_rows = |i: usize| {
        listed[i]["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == "public.inv")
            .unwrap()["rows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((inv_rows(0), inv_rows(1)), (300_000, 409_990));

    // The chunks of reused segments were stored by the first backup; the newest snapshot
    // references them itself, so forgetting the others and pruning keeps them.
    ok(&cfg, &["forget", "--keep-last", "1", "--prune"]);
    ok(&cfg, &["verify", "repo"]);
    assert_restores_to(&pg, &cfg, "latest", "einvoice", TABLES);
}

#[test]
fn rows_frozen_after_the_parent_cut_are_not_taken_for_old_ones() {
    let pg = PgCluster::start();
    make_tables(&pg);
    let dir = tempfile::tempdir().unwrap();
    let cfg = restore_setup(&pg, dir.path());
    backup(&cfg);

    // Within the first segment, as many rows deleted as inserted (its row count is
    // unchanged), then everything frozen: the new rows' xmin must still mark them as new.
    pg.psql(
        "einvoice",
        "DELETE FROM inv WHERE id BETWEEN 100 AND 104;
         INSERT INTO inv SELECT g, 'late', 2, 'frozen' FROM generate_series(100, 104) g;",
    );
    pg.psql("einvoice", "VACUUM (FREEZE) inv");
    let frozen = pg.psql(
        "einvoice",
        "SELECT (SELECT relfrozenxid::text::bigint FROM pg_class WHERE oid = 'inv'::regclass)
              > (SELECT max(xmin::text::bigint) FROM inv WHERE status = 'late')",
    );
    assert_eq!(frozen, "t", "VACUUM FREEZE froze the new rows");
    let second = backup(&cfg);
    assert_eq!(
        segments(&second),
        (4 + 3, 1),
        "only the first segment is read: {second}"
    );
    assert_restores_to(&pg, &cfg, "latest", "einvoice", TABLES);
    let restored_late = pg.psql("restored", "SELECT count(*) FROM inv WHERE status = 'late'");
    assert_eq!(restored_late, "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backup_during_writes_is_the_state_at_its_cut() {
    let pg = PgCluster::start();
    make_tables(&pg);
    // Each step is deterministic in its number, so the state after steps 1..=k can be rebuilt
    // elsewhere; `progress` says which steps a snapshot holds.
    let step = "CREATE TABLE progress (last int); INSERT INTO progress VALUES (0);
         CREATE FUNCTION step(k int) RETURNS void LANGUAGE sql AS $$
           UPDATE inv SET note = coalesce(note, '') || '.' || k WHERE id = (k * 7919) % 300000 + 1;
           DELETE FROM inv WHERE id = (k * 104729) % 300000 + 1;
           INSERT INTO inv VALUES (1000000 + k, 'new', k, 'step');
           UPDATE progress SET last = k;
         $$;";
    pg.psql("einvoice", step);
    pg.psql("postgres", "CREATE DATABASE expected TEMPLATE einvoice");
    let dir = tempfile::tempdir().unwrap();
    let cfg = restore_setup(&pg, dir.path());
    {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || backup(&cfg))
            .await
            .unwrap();
    }
    pg.psql("einvoice", "SELECT step(k) FROM generate_series(1, 20) k");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = pg.client("einvoice").await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut k = 20;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                client
                    .batch_execute(&format!("SELECT step({k})"))
                    .await
                    .unwrap();
            }
            k
        })
    };
    // The backup starts once the writer is under way, so its cut lands amid the steps.
    let watch = pg.client("einvoice").await;
    support::wait_until(
        std::time::Duration::from_secs(60),
        "the writer to pass step 25",
        || async {
            watch
                .query_one("SELECT last FROM progress", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
                > 25
        },
    )
    .await;
    let second = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || backup(&cfg))
            .await
            .unwrap()
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    // Steps 1..=20 alone change rows all over inv (no gap of 20 000 keys without one, and a
    // segment spans about 60 000), so all five of its segments are read, and progress; tags,
    // nopk and moods, which no step touches, are reused.
    assert_eq!(segments(&second), (3, 5 + 1), "{second}");

    ok(&cfg, &["restore", "latest", "--to-db", "dst", "--replace"]);
    let k: i32 = pg
        .psql("restored", "SELECT last FROM progress")
        .parse()
        .unwrap();
    // Where the cut lands among the steps depends on timing; what is fixed is that it lies
    // inside the writer's run: after step 25 (waited for) and before its last step (the
    // backup reads 300 000 rows after its cut while the writer goes on).
    assert!(
        k > 25 && k < written,
        "the cut holds steps 1..={k} of {written}: the writer did not run during the backup"
    );
    pg.psql(
        "expected",
        &format!("SELECT step(k) FROM generate_series(1, {k}) k"),
    );
    for (t, order) in TABLES.iter().chain(&[("progress", "last")]) {
        assert_eq!(
            fingerprint(&pg, "expected", t, order),
            fingerprint(&pg, "restored", t, order),
            "table {t} at step {k}"
        );
    }
}

#[test]
fn a_table_swapped_in_by_rename_is_read_again() {
    let pg = PgCluster::start();
    // Same keys and row counts, different contents: only the relation's identity tells them
    // apart, since all their rows predate the first backup.
    pg.psql(
        "einvoice",
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 1000) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 1000) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = restore_setup(&pg, dir.path());
    backup(&cfg);
    pg.psql(
        "einvoice",
        "ALTER TABLE a RENAME TO t; ALTER TABLE b RENAME TO a; ALTER TABLE t RENAME TO b",
    );
    let second = backup(&cfg);
    assert_eq!(segments(&second), (0, 2), "{second}");
    assert_restores_to(&pg, &cfg, "latest", "einvoice", &[("a", "id"), ("b", "id")]);

    // A table's parent is the newest snapshot holding it, not merely the newest one.
    ok(&cfg, &["backup", "--db", "src", "--tables", "public.a"]);
    let third = backup(&cfg);
    assert_eq!(segments(&third), (2, 0), "{third}");
}

/// The tables of `summary` read whole although a parent holds them, with the reasons.
fn reread(summary: &serde_json::Value) -> Vec<(String, String)> {
    summary["reread"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["table"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_changed_collation_version_forces_a_reread() {
    let pg = PgCluster::start();
    // Text keys under an ICU collation and under the database's own, and an integer key.
    pg.psql(
        "einvoice",
        r#"CREATE TABLE sellers (name text COLLATE "en-US-x-icu" PRIMARY KEY, v int);
         INSERT INTO sellers SELECT CASE WHEN g % 2 = 0 THEN 'a' ELSE 'B' END || g, g FROM generate_series(1, 1000) g;
         CREATE TABLE buyers (name text PRIMARY KEY, v int);
         INSERT INTO buyers SELECT 'b' || g, g FROM generate_series(1, 1000) g;
         CREATE TABLE items (id int PRIMARY KEY, v int);
         INSERT INTO items SELECT g, g FROM generate_series(1, 1000) g;"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = restore_setup(&pg, dir.path());
    let first = backup(&cfg);
    assert_eq!(segments(&first), (0, 3), "{first}");
    let second = backup(&cfg);
    assert_eq!(segments(&second), (3, 0), "{second}");
    assert_eq!(reread(&second), vec![]);

    // What an ICU upgrade leaves in the catalog: another version recorded for the collation.
    pg.psql(
        "einvoice",
        "UPDATE pg_collation SET collversion = '1.0' WHERE collname = 'en-US-x-icu'",
    );
    let third = backup(&cfg);
    assert_eq!(segments(&third), (2, 1), "{third}");
    let why = reread(&third);
    assert_eq!(why.len(), 1, "{third}");
    assert_eq!(why[0].0, "public.sellers");
    assert!(
        why[0].1.contains("key column name") && why[0].1.contains("version 1.0 recorded"),
        "{}",
        why[0].1
    );
    // The new snapshot recorded the new version: nothing to read again.
    assert_eq!(segments(&backup(&cfg)), (3, 0));

    // The database's own collation (libc here) gets another version: its text key is read again.
    pg.psql(
        "postgres",
        "UPDATE pg_database SET datcollversion = '9.99' WHERE datname = 'einvoice'",
    );
    let fifth = backup(&cfg);
    assert_eq!(segments(&fifth), (2, 1), "{fifth}");
    let why = reread(&fifth);
    assert_eq!(why.len(), 1, "{fifth}");
    assert_eq!(why[0].0, "public.buyers");
    // Compared in one byte order: the restored column's collation is not what is tested here.
    assert_restores_to(
        &pg,
        &cfg,
        "latest",
        "einvoice",
        &[
            ("sellers", r#"name COLLATE "C""#),
            ("buyers", "name"),
            ("items", "id"),
        ],
    );
}
