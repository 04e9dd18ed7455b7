//! `invsync drill`: a standby restored from the change archive while the source is under load,
//! verified against the live source, with RPO and RTO measured; a restored row removed on
//! purpose fails the drill and is named; the drill history detects an edited or removed entry;
//! the agent runs scheduled drills.

mod agent_common;
mod backup_util;
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backup_util::{owner_config, run, wait_archived};
use support::{finish, send_signal, PgCluster};

const SEGMENT_SECONDS: f64 = 2.0;

fn archiver(cfg: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", cfg.to_str().unwrap(), "archive", "run", "src"])
        .args(["--tables", "public.*", "--segment-seconds", "2"])
        .env_remove("INVSYNC_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run invsync archive run")
}

/// Objects in the standby's schemas other than the system's.
fn tables_in(pg: &PgCluster, db: &str) -> String {
    pg.psql(
        db,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
    )
}

fn history(cfg: &Path) -> (i32, String) {
    let (code, out, err) = run(cfg, &["drill", "history"]);
    (code, format!("{out}{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_under_load_passes_a_removed_row_fails_it_and_the_history_is_sealed() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    let (cfg, _) = owner_config(dir.path(), &[("src", pg.url("einvoice"))], &url);
    backup_util::ok(&cfg, &["repo", "init"]);
    let gen = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(["fill", "--url", &pg.url("einvoice"), "--invoices", "2000"])
        .env_remove("EINVOICE_URL")
        .output()
        .unwrap();
    assert!(gen.status.success(), "{gen:?}");
    for db in ["standby", "standby2", "empty"] {
        pg.psql("postgres", &format!("CREATE DATABASE {db}"));
    }

    // Bad input: a repository without an archive; nothing is written to the standby.
    let (code, _, err) = run(&cfg, &["drill", "--to-db", &pg.url("empty")]);
    assert_ne!(code, 0);
    assert!(err.contains("no change archive"), "{err}");
    assert_eq!(tables_in(&pg, "empty"), "0");

    let arch = archiver(&cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("einvoice", "SELECT count(*) FROM pg_replication_slots") != "1" {
        assert!(Instant::now() < deadline, "the archiver made no slot");
        std::thread::sleep(Duration::from_millis(100));
    }
    backup_util::ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    let mut load = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(["load", "--url", &pg.url("einvoice"), "--rate", "200"])
        .args(["--duration", "25"])
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The load runs and the archive carries it past the snapshot before the drill starts.
    let before = pg.psql("einvoice", "SELECT pg_current_wal_lsn()");
    wait_archived(&cfg, &before);

    let reports = dir.path().join("reports");
    let (code, out, err) = run(
        &cfg,
        &[
            "drill",
            "--to-db",
            &pg.url("standby"),
            "--json",
            "--report",
            reports.to_str().unwrap(),
        ],
    );
    assert!(
        load.try_wait().unwrap().is_none(),
        "the load ended before the drill did"
    );
    assert_eq!(code, 0, "the drill under load fails: {out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["version"], 1);
    assert_eq!(r["passed"], true);
    let rpo = r["rpo"]["seconds"].as_f64().unwrap();
    assert!(
        (0.0..=SEGMENT_SECONDS + 5.0).contains(&rpo),
        "RPO {rpo} s is more than one segment interval and a few seconds: {out}"
    );
    assert!(r["rpo"]["bytes"].as_u64().unwrap() > 0, "{out}");
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0);
    assert!(r["restore"]["rows"].as_u64().unwrap() > 2000, "{out}");
    assert!(r["verify"]["rows_compared"].as_u64().is_some());
    // The source kept changing during the drill: those rows differ and are explained.
    assert!(
        r["verify"]["explained"].as_u64().unwrap() > 0,
        "no difference was explained though the load ran: {out}"
    );
    assert_eq!(r["verify"]["unexplained"], 0);
    let written: Vec<String> = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(written.iter().any(|n| n.ends_with(".json")), "{written:?}");
    assert!(written.iter().any(|n| n.ends_with(".md")), "{written:?}");

    // Bad input: the standby now holds tables; without --replace it is refused untouched.
    let count = pg.psql("standby", "SELECT count(*) FROM invoice");
    let (code, _, err) = run(&cfg, &["drill", "--to-db", &pg.url("standby")]);
    assert_ne!(code, 0, "a non-empty standby was accepted");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("--replace"), "{err}");
    assert_eq!(pg.psql("standby", "SELECT count(*) FROM invoice"), count);

    assert!(load.wait().unwrap().success(), "einvoice-gen load failed");
    // A quiet source: a drill to its current point, then a restored row removed.
    let at = pg.psql("einvoice", "SELECT pg_current_wal_lsn()");
    wait_archived(&cfg, &at);
    let (code, out, err) = run(
        &cfg,
        &[
            "drill",
            "--to-db",
            &pg.url("standby2"),
            "--until-lsn",
            &at,
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let restored = r["rpo"]["restored_lsn"].as_str().unwrap().to_string();
    let gone = pg.psql(
        "standby2",
        "DELETE FROM invoice_item WHERE ctid = (SELECT min(ctid) FROM invoice_item) \
         RETURNING invoice_number || ', ' || seq",
    );
    let (code, out, err) = run(
        &cfg,
        &[
            "drill",
            "--to-db",
            &pg.url("standby2"),
            "--no-restore",
            "--until-lsn",
            &restored,
        ],
    );
    assert_eq!(code, 1, "a drill with a removed row passed: {out}{err}");
    assert!(out.contains("FAILED"), "{out}");
    assert!(
        out.contains(&format!("(invoice_number, seq)=({gone})")) && out.contains("missing"),
        "the removed row {gone} is not named: {out}"
    );

    send_signal(&arch, "TERM");
    let (code, err) = finish(arch).await;
    assert_eq!(code, 0, "the archiver: {err}");

    // The history holds the three drills that ran (the refused one wrote nothing), chained.
    let (code, text) = history(&cfg);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("3 drill(s); chain intact"), "{text}");
    let (_, out, _) = run(&cfg, &["drill", "history", "--json"]);
    let h: serde_json::Value = serde_json::from_str(&out).unwrap();
    let entries = h["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    // The middle entry (number 2): a change there must break the chain.
    let middle = entries.iter().find(|e| e[1]["seq"] == 2).unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    let entry = repo_dir.join("drills").join(&middle);
    // An edited entry is detected.
    let original = std::fs::read(&entry).unwrap();
    let mut edited = original.clone();
    let mid = edited.len() / 2;
    edited[mid] ^= 1;
    std::fs::write(&entry, &edited).unwrap();
    let (code, text) = history(&cfg);
    assert_eq!(code, 1, "an edited entry went unnoticed: {text}");
    assert!(text.contains("changed after it was written"), "{text}");
    std::fs::write(&entry, &original).unwrap();
    assert_eq!(history(&cfg).0, 0);
    // A removed entry is detected.
    std::fs::remove_file(&entry).unwrap();
    let (code, text) = history(&cfg);
    assert_eq!(code, 1, "a removed entry went unnoticed: {text}");
    assert!(
        text.contains("missing") || text.contains("predecessor"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_scheduled_drills_into_a_dedicated_standby() {
    let pg = PgCluster::start();
    support::einvoice_gen(&["fill", "--url", &pg.url("einvoice"), "--invoices", "300"]);
    pg.psql("postgres", "CREATE DATABASE standby");
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "owner");
    let cfg = dir.path().join("invsync.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[databases.src]
url = "{src}"
[databases.standby]
url = "{standby}"
[repositories.r]
url = "file://{repo}"
recipients = ["{recipient}"]
identity_file = "{key}"

[archives.arc]
db = "src"
tables = ["public.*"]
segment_seconds = 1

[agent]
listen = "127.0.0.1:{port}"
shutdown_timeout = 20

[[schedules]]
name = "drill"
cron = "*/5 * * * * *"
job = "drill"
source = "src"
target = "standby"
"#,
            src = pg.url("einvoice"),
            standby = pg.url("standby"),
            repo = dir.path().join("repo").display(),
            key = key.display(),
            port = support::free_port(),
        ),
    )
    .unwrap();
    backup_util::ok(&cfg, &["repo", "init"]);
    let log = dir.path().join("agent.log");
    let mut agent = agent_common::start_agent(&cfg, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("einvoice", "SELECT count(*) FROM pg_replication_slots") != "1" {
        assert!(Instant::now() < deadline, "the agent made no archive slot");
        std::thread::sleep(Duration::from_millis(100));
    }
    backup_util::ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    // Two passing drills: the second replaces the standby's tables the first restored.
    support::wait_until(
        Duration::from_secs(120),
        "two scheduled drills pass",
        || async {
            let (_, out, _) = run(&cfg, &["drill", "history", "--json"]);
            serde_json::from_str::<serde_json::Value>(&out)
                .ok()
                .and_then(|h| {
                    h["entries"].as_array().map(|e| {
                        e.iter()
                            .filter(|e| e[1]["report"]["passed"] == true)
                            .count()
                    })
                })
                .is_some_and(|n| n >= 2)
        },
    )
    .await;
    send_signal(&agent, "TERM");
    let (code, _) = agent_common::exit_within(&mut agent, Duration::from_secs(25)).await;
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&log).unwrap());
    let (code, text) = history(&cfg);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        pg.psql("standby", "SELECT count(*) FROM invoice"),
        pg.psql("einvoice", "SELECT count(*) FROM invoice")
    );
}
