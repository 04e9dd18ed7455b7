//! `invsync restore --until|--until-lsn`: a database restored as it was at a moment, from a
//! snapshot and the change archive, compared row for row with what the source held then.

mod backup_util;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backup_util::{identity, lsn, owner_config, repo_config, run, wait_archived, write_config};
use invsync::backup::repository::Repository;
use invsync::backup::{archive, snapshot};
use support::{finish, send_signal, PgCluster, S3Server};

const TABLES: [(&str, &str); 3] = [("inv", "id"), ("item", "inv_id, line"), ("big", "id")];

/// Every table's row count and a hash of its rows (all columns), by key.
fn state(pg: &PgCluster, db: &str) -> BTreeMap<&'static str, String> {
    TABLES
        .iter()
        .map(|(t, order)| {
            let exists = pg.psql(db, &format!("SELECT to_regclass('public.{t}') IS NOT NULL"));
            let v = if exists == "t" {
                pg.psql(
                    db,
                    &format!("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY {order})), '') FROM public.{t} t"),
                )
            } else {
                "absent".into()
            };
            (*t, v)
        })
        .collect()
}

/// The moment just after the last commit: (time, WAL position).
fn point(pg: &PgCluster) -> (String, String) {
    let row = pg.psql(
        "einvoice",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') || ' ' || pg_current_wal_lsn()",
    );
    let (t, l) = row.split_once(' ').unwrap();
    (t.to_string(), l.to_string())
}

/// `archive run` closing a segment every `seconds` (or 1 MiB), once its slot exists.
fn archiver(pg: &PgCluster, cfg: &Path, seconds: u32) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", cfg.to_str().unwrap(), "archive", "run", "src"])
        .args(["--tables", "public.*", "--segment-mib", "1"])
        .args(["--segment-seconds", &seconds.to_string()])
        .env_remove("INVSYNC_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run invsync archive run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("einvoice", "SELECT count(*) FROM pg_replication_slots") != "1" {
        assert!(Instant::now() < deadline, "the archiver made no slot");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// `restore --until...` into a fresh database `name`; returns (exit code, stdout, stderr).
fn restore(pg: &PgCluster, cfg: &Path, name: &str, until: &[&str]) -> (i32, String, String) {
    pg.psql("postgres", &format!("CREATE DATABASE {name}"));
    let url = pg.url(name);
    let mut args = vec!["restore", "--to-db", url.as_str()];
    args.extend_from_slice(until);
    run(cfg, &args)
}

fn restored(pg: &PgCluster, cfg: &Path, name: &str, until: &[&str]) -> String {
    let (code, out, err) = restore(pg, cfg, name, until);
    assert_eq!(code, 0, "restore {until:?}: {out}{err}");
    out
}

fn refused(pg: &PgCluster, cfg: &Path, name: &str, until: &[&str]) -> String {
    let (code, out, err) = restore(pg, cfg, name, until);
    assert_ne!(code, 0, "restore {until:?} should fail: {out}{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    let tables = pg.psql(
        name,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
    );
    assert_eq!(tables, "0", "a refused restore wrote to {name}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_a_moment_holds_exactly_the_transactions_committed_by_then() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let (cfg, recipient) = owner_config(dir.path(), &[("src", pg.url("einvoice"))], &url);
    backup_util::ok(&cfg, &["repo", "init"]);
    pg.psql(
        "einvoice",
        "CREATE TABLE inv (id serial PRIMARY KEY, no text NOT NULL, amount numeric(12,2));
         CREATE TABLE item (inv_id int, line int, qty int, PRIMARY KEY (inv_id, line));
         CREATE TABLE big (id int PRIMARY KEY, payload text);
         INSERT INTO inv (no, amount) SELECT 'AB' || lpad(g::text, 8, '0'), g FROM generate_series(1, 50) g;
         INSERT INTO item SELECT i, l, l FROM generate_series(1, 50) i, generate_series(1, 3) l;",
    );

    // Bad input before anything exists: no archive, a time that does not parse.
    let e = refused(&pg, &cfg, "r_noarchive", &["--until", "latest"]);
    assert!(e.contains("no change archive"), "{e}");
    let e = refused(&pg, &cfg, "r_badtime", &["--until", "yesterday noon"]);
    assert!(e.contains("is not a time"), "{e}");

    let arch = archiver(&pg, &cfg, 1);
    let early = point(&pg);
    backup_util::ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);

    // T1: inserts, updates, deletes.
    pg.psql(
        "einvoice",
        "BEGIN;
         INSERT INTO inv (no, amount) SELECT 'CD' || lpad(g::text, 8, '0'), g FROM generate_series(1, 20) g;
         UPDATE inv SET amount = amount * 2 WHERE id % 5 = 0;
         DELETE FROM item WHERE inv_id % 7 = 0;
         COMMIT;",
    );
    let p1 = point(&pg);
    let s1 = state(&pg, "einvoice");
    wait_archived(&cfg, &p1.1);

    // T2..: TRUNCATE, a key change, a column added, a transaction larger than a segment.
    pg.psql("einvoice", "TRUNCATE item");
    pg.psql(
        "einvoice",
        "INSERT INTO item SELECT i, 1, i FROM generate_series(1, 30) i",
    );
    pg.psql(
        "einvoice",
        "UPDATE inv SET id = id + 1000, no = 'K' || no WHERE id IN (3, 4)",
    );
    pg.psql("einvoice", "ALTER TABLE inv ADD COLUMN note text");
    pg.psql(
        "einvoice",
        "UPDATE inv SET note = 'n' || id WHERE id % 3 = 0",
    );
    pg.psql(
        "einvoice",
        "INSERT INTO big SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 30000) g",
    );
    let p2 = point(&pg);
    let s2 = state(&pg, "einvoice");
    wait_archived(&cfg, &p2.1);

    backup_util::ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    pg.psql("einvoice", "DELETE FROM big WHERE id % 2 = 0");
    pg.psql(
        "einvoice",
        "UPDATE item SET qty = qty + 1 WHERE inv_id < 10",
    );
    let s3_before_x = state(&pg, "einvoice");
    // X: one transaction whose end LSN the archive tells.
    let xid = pg.psql(
        "einvoice",
        "BEGIN; INSERT INTO inv (no, amount) VALUES ('XX00000001', 1); SELECT txid_current() % 4294967296; COMMIT;",
    );
    let s3 = state(&pg, "einvoice");
    pg.psql(
        "einvoice",
        "INSERT INTO inv (no, amount) VALUES ('YY00000001', 2)",
    );
    let after_y = point(&pg);
    wait_archived(&cfg, &after_y.1);
    send_signal(&arch, "INT");
    let (code, err) = finish(arch).await;
    assert_eq!(code, 0, "archive run: {err}");

    let repo = Repository::open(&repo_config(
        &url,
        &dir.path().join("owner.key"),
        &recipient,
    ))
    .await
    .unwrap();
    let txns =
        archive::read_transactions(&repo, &archive::list_segments(&repo).await.unwrap()[0].1.db)
            .await
            .unwrap();
    // Segments record the database system, as snapshots' cuts do.
    let snaps = snapshot::list(&repo).await.unwrap();
    let system = snaps[0]
        .1
        .cut
        .as_ref()
        .expect("cut recorded")
        .system
        .clone();
    for (_, m) in archive::list_segments(&repo).await.unwrap() {
        assert_eq!(m.system.as_deref(), Some(system.as_str()), "{m:?}");
    }
    let x = txns
        .iter()
        .find(|t| t.xid.to_string() == xid.trim())
        .expect("transaction X archived");
    let x_end = x.end_lsn.to_string();
    assert!(
        txns.iter().any(|t| t.messages.len() >= 30_000),
        "the big transaction is archived whole"
    );

    // Times between known transactions: exactly what had committed.
    restored(&pg, &cfg, "r1", &["--until", &p1.0]);
    assert_eq!(state(&pg, "r1"), s1, "restored to after T1");
    let out = restored(&pg, &cfg, "r2", &["--until", &p2.0]);
    assert!(out.contains("replayed"), "{out}");
    assert_eq!(
        state(&pg, "r2"),
        s2,
        "restored to after the big transaction"
    );
    // Sequences end at or past the rows as of the target.
    let next: i64 = pg
        .psql("r2", "SELECT nextval('inv_id_seq')")
        .parse()
        .unwrap();
    let max: i64 = pg.psql("r2", "SELECT max(id) FROM inv").parse().unwrap();
    assert!(next > max, "sequence at {next}, rows up to {max}");
    // No trace a later `sync setup` would read as a pipeline's position.
    assert_eq!(
        pg.psql(
            "r2",
            "SELECT (SELECT count(*) FROM pg_replication_origin) + (SELECT count(*) FROM pg_namespace WHERE nspname = 'invsync')"
        ),
        "0"
    );

    // An LSN: the end of X includes X; exclusive leaves it out.
    restored(&pg, &cfg, "r3", &["--until-lsn", &x_end]);
    assert_eq!(state(&pg, "r3"), s3, "restored to X's end");
    restored(&pg, &cfg, "r4", &["--until-lsn", &x_end, "--exclusive"]);
    assert_eq!(state(&pg, "r4"), s3_before_x, "restored to just before X");
    let out = restored(&pg, &cfg, "r5", &["--until", "latest", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        lsn(v["restored_to"]["lsn"].as_str().unwrap()),
        txns.last().unwrap().end_lsn.0
    );

    // Outside the window: before the first snapshot, after the last archived commit.
    let e = refused(&pg, &cfg, "r6", &["--until", &early.0]);
    assert!(
        e.contains("outside the recoverable window") && e.contains("from LSN"),
        "{e}"
    );
    let e = refused(&pg, &cfg, "r7", &["--until", "2999-01-01 00:00:00"]);
    assert!(e.contains("outside the recoverable window"), "{e}");
    let beyond = format!("{:X}/0", (lsn(&after_y.1) >> 32) + 1);
    let e = refused(&pg, &cfg, "r8", &["--until-lsn", &beyond]);
    assert!(e.contains("outside the recoverable window"), "{e}");

    // A missing segment (the one holding the TRUNCATE, after T1): a target past it fails, one
    // before it still restores (by LSN: a time after T1's commit could hide commits of the
    // missing segment, so the window's end in time is its last archived commit).
    let p1_lsn = lsn(&p1.1);
    let mut name = None;
    for (n, m) in archive::list_segments(&repo).await.unwrap() {
        let t = archive::read_segment(&repo, &m).await.unwrap();
        if !t.is_empty()
            && t.iter()
                .all(|t| t.end_lsn.0 > p1_lsn && t.end_lsn.0 <= lsn(&p2.1))
        {
            name = Some(n);
            break;
        }
    }
    let name = name.unwrap_or_else(|| {
        panic!(
            "no segment after T1 ({}) before {}: {:?}",
            p1.1,
            p2.1,
            txns.iter()
                .map(|t| (t.end_lsn.to_string(), t.messages.len()))
                .collect::<Vec<_>>()
        )
    });
    std::fs::remove_file(dir.path().join("repo/archive/segments").join(&name)).unwrap();
    let e = refused(&pg, &cfg, "r9", &["--until", &p2.0]);
    assert!(e.contains("outside the recoverable window"), "{e}");
    restored(&pg, &cfg, "r10", &["--until-lsn", &p1.1]);
    assert_eq!(state(&pg, "r10"), s1, "restored before the gap");
    let e = refused(&pg, &cfg, "r11", &["--until", &p1.0]);
    assert!(e.contains("outside the recoverable window"), "{e}");
}

/// A segment describes each table once, in the first of its transactions that touches it: when
/// the snapshot already holds that transaction, the replay still needs its description for the
/// table's later transactions in the same segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_cut_inside_a_segment_replays_the_rest_of_it() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let (cfg, _) = owner_config(dir.path(), &[("src", pg.url("einvoice"))], &url);
    backup_util::ok(&cfg, &["repo", "init"]);
    pg.psql(
        "einvoice",
        "CREATE TABLE inv (id serial PRIMARY KEY, no text NOT NULL, amount numeric(12,2));
         CREATE TABLE item (inv_id int, line int, qty int, PRIMARY KEY (inv_id, line));",
    );
    // Before the archive: no restore from this snapshot can go forward.
    backup_util::ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    // One segment for the whole test: it closes when the archive stops.
    let arch = archiver(&pg, &cfg, 3600);
    pg.psql(
        "einvoice",
        "INSERT INTO inv (no, amount) SELECT 'AB' || g, g FROM generate_series(1, 20) g;
         INSERT INTO item SELECT i, 1, i FROM generate_series(1, 20) i;",
    );
    backup_util::ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    pg.psql(
        "einvoice",
        "UPDATE inv SET amount = amount + 1 WHERE id % 2 = 0;
         DELETE FROM item WHERE inv_id > 15;
         INSERT INTO inv (no, amount) VALUES ('CD1', 1);",
    );
    let expected = state(&pg, "einvoice");
    send_signal(&arch, "TERM");
    let (code, err) = finish(arch).await;
    assert_eq!(code, 0, "archive run: {err}");

    let out = restored(&pg, &cfg, "r1", &["--until", "latest", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replay"]["transactions"], 1, "{out}");
    assert_eq!(state(&pg, "r1"), expected, "restored to the end");

    // `snapshots --json` tells how far each snapshot reaches with the archive.
    let (code, out, err) = run(&cfg, &["snapshots", "--json"]);
    assert_eq!(code, 0, "{err}");
    let snaps: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut snaps = snaps.as_array().unwrap().clone();
    snaps.sort_by_key(|s| s["time"].as_str().unwrap().to_string());
    assert!(snaps[0].get("recoverable_to").is_none(), "{out}");
    let reach = &snaps[1]["recoverable_to"];
    assert_eq!(reach["time"], v["restored_to"]["time"], "{out}");
    assert!(
        lsn(reach["lsn"].as_str().unwrap()) >= lsn(v["restored_to"]["lsn"].as_str().unwrap()),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_restore_reads_an_s3_repository() {
    let s3 = S3Server::start();
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = identity(dir.path(), "k");
    let cfg = write_config(
        dir.path(),
        "c.toml",
        &[("src", pg.url("einvoice"))],
        &s3.url("pitr"),
        &format!(
            "recipients = [\"{recipient}\"]\nidentity_file = \"{}\"\noptions = {}",
            key.display(),
            s3.options_toml()
        ),
    );
    backup_util::ok(&cfg, &["repo", "init"]);
    pg.psql(
        "einvoice",
        "CREATE TABLE inv (id serial PRIMARY KEY, no text NOT NULL, amount numeric(12,2));
         CREATE TABLE item (inv_id int, line int, qty int, PRIMARY KEY (inv_id, line));
         CREATE TABLE big (id int PRIMARY KEY, payload text);
         INSERT INTO inv (no, amount) SELECT 'AB' || lpad(g::text, 8, '0'), g FROM generate_series(1, 20) g;",
    );
    let arch = archiver(&pg, &cfg, 1);
    backup_util::ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    pg.psql(
        "einvoice",
        "UPDATE inv SET amount = 0 WHERE id < 5; DELETE FROM inv WHERE id = 9",
    );
    pg.psql(
        "einvoice",
        "INSERT INTO item SELECT i, 1, i FROM generate_series(1, 20) i",
    );
    let then = point(&pg);
    let before = state(&pg, "einvoice");
    pg.psql("einvoice", "TRUNCATE inv, item");
    let after = point(&pg);
    wait_archived(&cfg, &after.1);
    send_signal(&arch, "INT");
    let (code, err) = finish(arch).await;
    assert_eq!(code, 0, "archive run: {err}");

    restored(&pg, &cfg, "r1", &["--until", &then.0]);
    assert_eq!(state(&pg, "r1"), before);
    restored(
        &pg,
        &cfg,
        "r2",
        &["--until", "latest", "--tables", "public.inv"],
    );
    assert_eq!(
        pg.psql("r2", "SELECT count(*) FROM inv"),
        "0",
        "the TRUNCATE replayed"
    );
    assert_eq!(
        pg.psql("r2", "SELECT to_regclass('public.item') IS NULL"),
        "t",
        "--tables"
    );
}
