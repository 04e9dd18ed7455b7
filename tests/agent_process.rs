//! The agent as operators run it: the real `invsync agent` process against real clusters. It
//! replicates while `einvoice-gen load` writes, runs its scheduled backup and verify (and
//! retries a backup into an unreachable repository without disturbing the pipeline), keeps a
//! change archive streaming, serves
//! `/status`, `/readyz` and Prometheus `/metrics`, and stops cleanly on SIGTERM with nothing
//! lost. Bad start-up input is one line and a non-zero exit.

mod agent_common;
mod backup_util;
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use agent_common::*;
use support::config_file::ConfigFile;
use support::{einvoice_gen, free_port, invsync, send_signal, wait_until, PgCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_replicates_runs_jobs_reports_and_stops_cleanly() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    einvoice_gen(&[
        "fill",
        "--url",
        &src.url("einvoice"),
        "--invoices",
        "300",
        "--seed",
        "3",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "owner");
    let port = free_port();
    let keys = backup_util::owner_keys(&recipient, &key);
    let cfg = ConfigFile::new()
        .database("a", &src.url("einvoice"))
        .database("b", &dst.url("einvoice"))
        .pipeline("p", "a", &["b"], &["public.*"])
        .repository(
            "r",
            &format!("file://{}", dir.path().join("repo").display()),
            &keys,
        )
        .repository(
            "gone",
            &format!("file://{}", dir.path().join("no/such/repo").display()),
            &keys,
        )
        .toml(&format!(
            r#"
[archives.arc]
db = "a"
repo = "r"
segment_seconds = 1

[agent]
listen = "127.0.0.1:{port}"
shutdown_timeout = 20

[[blackouts]]
name = "past-migration"
start = "2020-01-01 20:00"
end = "2020-01-02 06:00"

[[schedules]]
name = "backup-a"
cron = "*/5 * * * * *"
job = "backup"
repo = "r"
db = "a"

[[schedules]]
name = "verify-p"
cron = "*/7 * * * * *"
job = "verify"
pipeline = "p"

[[schedules]]
name = "backup-gone"
cron = "0 0 0 1 1 *"
missed = "skip"
job = "backup"
repo = "gone"
db = "a"

[[schedules]]
name = "backup-gone-often"
cron = "*/3 * * * * *"
job = "backup"
repo = "gone"
db = "a"
"#
        ))
        .write(&dir.path().join("invsync.toml"));
    let c = cfg.to_str().unwrap();
    let (code, _, err) = invsync(&["--config", c, "repo", "init", "--repo", "r"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = invsync(&["--config", c, "sync", "setup", "p"]);
    assert_eq!(code, 0, "{err}");

    let log = dir.path().join("agent.log");
    let mut agent = start_agent(&cfg, &log);
    let mut load = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(["load", "--url", &src.url("einvoice"), "--rate", "300"])
        .args(["--duration", "25"])
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    wait_until(Duration::from_secs(60), "/readyz 200", || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    assert_eq!(get(port, "/healthz").await.unwrap().0, 200);
    let first = Scrape::take(port).await;

    // The scheduled backup and verify run; the failing backup is retried and counted.
    wait_until(
        Duration::from_secs(120),
        "backup and verify runs",
        || async {
            let s = status(port).await;
            schedule(&s, "backup-a")["last_run"]["result"] == "success"
                && schedule(&s, "verify-p")["last_run"]["result"] == "success"
                && schedule(&s, "backup-gone-often")["consecutive_failures"]
                    .as_u64()
                    .is_some_and(|n| n >= 2)
        },
    )
    .await;
    let s = status(port).await;
    let backup = &schedule(&s, "backup-a")["last_run"];
    assert!(
        backup["report"]["snapshot"]
            .as_str()
            .is_some_and(|id| id.len() > 8),
        "{backup}"
    );
    assert_eq!(backup["report"]["job"], "backup", "{backup}");
    let gone = &schedule(&s, "backup-gone-often")["last_run"];
    assert_eq!(gone["result"], "failure", "{gone}");
    assert!(
        gone["error"]
            .as_str()
            .is_some_and(|e| e.contains("no/such/repo")),
        "{gone}"
    );
    assert!(schedule(&s, "backup-gone")["next_run"].is_string(), "{s}");
    assert_eq!(s["pipelines"][0]["state"], "streaming", "{s}");
    assert_eq!(s["pipelines"][0]["targets"][0]["up"], true, "{s}");

    // The change archive streams and stores segments; its lag and recovery point are known.
    // (And a backup has succeeded since the first scrape, taken when the agent became ready.)
    let al = [("archive", "arc")];
    let backups = |s: &Scrape| {
        s.get(
            "invsync_job_runs_total",
            &[
                ("schedule", "backup-a"),
                ("job", "backup"),
                ("result", "success"),
            ],
        )
    };
    wait_until(Duration::from_secs(60), "the archive's figures", || async {
        let now = Scrape::take(port).await;
        let names = now.names();
        names.contains("invsync_archive_lag_bytes")
            && names.contains("invsync_archive_recovery_point_age_seconds")
            && backups(&now) > backups(&first)
    })
    .await;
    let later = Scrape::take(port).await;
    assert_eq!(later.get("invsync_archive_up", &al), 1.0);
    assert!(later.get("invsync_archive_segments_total", &al) >= 1.0);
    assert!(later.get("invsync_archive_lag_bytes", &al) >= 0.0);
    let p = [("pipeline", "p")];
    let pt = [("pipeline", "p"), ("target", "b")];
    assert_eq!(
        later.get(
            "invsync_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(later.get("invsync_pipeline_up", &p), 1.0);
    assert_eq!(later.get("invsync_pipeline_target_up", &pt), 1.0);
    assert!(later.get("invsync_pipeline_lag_seconds", &pt) >= 0.0);
    assert!(later.get("invsync_pipeline_lag_bytes", &pt) >= 0.0);
    assert!(later.get("invsync_pipeline_slot_retained_wal_bytes", &p) > 0.0);
    assert_eq!(later.get("invsync_pipeline_restarts_total", &p), 0.0);
    // The load's transactions are applied and counted, and the counters move.
    let applied = |s: &Scrape| s.get("invsync_pipeline_applied_transactions_total", &pt);
    assert!(
        applied(&later) > applied(&first),
        "applied transactions did not move"
    );
    let runs = |s: &Scrape, schedule: &str, job: &str, result: &str| {
        s.get(
            "invsync_job_runs_total",
            &[("schedule", schedule), ("job", job), ("result", result)],
        )
    };
    assert!(runs(&later, "backup-a", "backup", "success") >= 1.0);
    assert!(runs(&later, "verify-p", "verify", "success") >= 1.0);
    assert!(runs(&later, "backup-gone-often", "backup", "failure") >= 2.0);
    assert_eq!(runs(&later, "backup-gone", "backup", "failure"), 0.0);
    assert!(
        runs(&first, "backup-a", "backup", "success")
            < runs(&later, "backup-a", "backup", "success")
    );
    let sa = [("schedule", "backup-a")];
    assert!(later.get("invsync_job_read_bytes_total", &sa) > 0.0);
    assert!(later.get("invsync_job_stored_bytes_total", &sa) > 0.0);
    assert!(later.get("invsync_job_last_start_timestamp_seconds", &sa) > 1.6e9);
    assert!(later.get("invsync_job_last_success_timestamp_seconds", &sa) > 1.6e9);
    assert!(later.get("invsync_job_last_duration_seconds", &sa) > 0.0);
    assert!(
        later.get(
            "invsync_backup_last_success_timestamp_seconds",
            &[("repo", "r"), ("db", "a")]
        ) > 1.6e9
    );
    assert_eq!(
        later.get("invsync_verify_differences", &[("schedule", "verify-p")]),
        0.0
    );
    for reason in ["overlap", "blackout", "missed"] {
        later.get(
            "invsync_job_skipped_total",
            &[("schedule", "backup-a"), ("reason", reason)],
        );
    }
    later.get("invsync_job_deferred_total", &sa);
    later.get("invsync_job_running", &sa);
    assert_eq!(
        later.get("invsync_blackout_active", &[("window", "past-migration")]),
        0.0
    );
    let lease = [("lease", "pipeline/p")];
    assert_eq!(later.get("invsync_lease_held", &lease), 1.0);
    assert!(later.get("invsync_lease_epoch", &lease) >= 1.0);
    // Every metric the alert rules and the dashboard use is in this live agent's /metrics.
    let live = later.names();
    let (rules, dashboard) = deploy_metric_names();
    for (what, used) in [("alerts.yml", rules), ("invsync.json", dashboard)] {
        let missing: Vec<_> = used.difference(&live).collect();
        assert!(
            missing.is_empty(),
            "{what} uses metrics absent from /metrics: {missing:?}"
        );
    }

    // A stopped target makes the agent unready, and ready again once it is back.
    dst.stop();
    wait_until(Duration::from_secs(60), "/readyz 503", || async {
        matches!(get(port, "/readyz").await, Some((503, body)) if body.contains("target b of pipeline p"))
    })
    .await;
    assert_eq!(
        Scrape::take(port)
            .await
            .get("invsync_pipeline_target_up", &pt),
        0.0
    );
    dst.start_again();
    wait_until(Duration::from_secs(90), "/readyz 200 again", || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await;

    let load_status = tokio::task::spawn_blocking(move || load.wait().unwrap())
        .await
        .unwrap();
    assert!(load_status.success());

    // SIGTERM: exit 0 within the configured bound.
    send_signal(&agent, "TERM");
    let (code, took) = exit_within(&mut agent, Duration::from_secs(25)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{text}");
    assert!(took < Duration::from_secs(20), "stopping took {took:?}");
    assert!(text.contains("agent_stopped"), "{text}");
    assert!(!text.contains("hunter2"));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("agent-state.json")).unwrap(),
    )
    .unwrap();
    assert!(
        state["schedules"]["backup-a"]["handled_until"].is_string(),
        "{state}"
    );
    assert_eq!(
        state["schedules"]["backup-a"]["last_run"]["result"], "success",
        "{state}"
    );

    // After a restart the agent catches up, and the target holds exactly the source's rows.
    let mut agent = start_agent(&cfg, &log);
    wait_until(
        Duration::from_secs(60),
        "/readyz 200 after restart",
        || async { matches!(get(port, "/readyz").await, Some((200, _))) },
    )
    .await;
    // The last run survives the restart in /status.
    let s = status(port).await;
    assert!(
        schedule(&s, "backup-a")["last_run"]["result"].is_string(),
        "{s}"
    );
    let (code, out, err) = invsync(&[
        "--config",
        c,
        "verify",
        "db",
        "--pipeline",
        "p",
        "--settle",
        "60",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    send_signal(&agent, "TERM");
    let (code, _) = exit_within(&mut agent, Duration::from_secs(25)).await;
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&log).unwrap());
}

#[test]
fn bad_listen_addresses_are_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("invsync.toml");
    std::fs::write(
        &cfg,
        "[databases.a]\nurl = \"postgres://invsync:hunter2@127.0.0.1:1/x\"\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();

    let (code, out, err) = invsync(&["--config", c, "agent", "--listen", "localhost"]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("--listen: `localhost` is not an address and port"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = invsync(&["--config", c, "agent", "--listen", &addr]);
    assert_ne!(code, 0);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn runs_missed_while_down_run_once_or_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("invsync.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[repositories.r]
url = "file://{repo}"
passphrase = "correct horse"
[agent]
listen = "127.0.0.1:{port}"
state_dir = "state"
[[schedules]]
name = "catch-up"
cron = "0 * * * * *"
job = "prune"
repo = "r"
missed = "run-once"
[[schedules]]
name = "no-catch-up"
cron = "0 * * * * *"
job = "prune"
repo = "r"
missed = "skip"
"#,
            repo = dir.path().join("repo").display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (code, _, err) = invsync(&["--config", c, "repo", "init", "--repo", "r"]);
    assert_eq!(code, 0, "{err}");
    // The agent last dealt with both schedules ten and a half minutes ago.
    let then = (chrono::Utc::now() - chrono::Duration::seconds(630)).to_rfc3339();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/agent-state.json"),
        format!(
            r#"{{"schedules": {{"catch-up": {{"handled_until": "{then}"}},
                "no-catch-up": {{"handled_until": "{then}"}}}}}}"#
        ),
    )
    .unwrap();

    let log = dir.path().join("agent.log");
    let mut agent = start_agent(&cfg, &log);
    wait_until(Duration::from_secs(30), "the catch-up run", || async {
        match get(port, "/status").await {
            Some((200, body)) => {
                let s: serde_json::Value = serde_json::from_str(&body).unwrap();
                schedule(&s, "catch-up")["last_run"]["result"] == "success"
            }
            _ => false,
        }
    })
    .await;
    let scrape = Scrape::take(port).await;
    let missed = |s: &str| {
        scrape.get(
            "invsync_job_skipped_total",
            &[("schedule", s), ("reason", "missed")],
        )
    };
    // Ten or eleven runs fell due while it was down: one runs, the other schedule counts them.
    assert!(missed("no-catch-up") >= 10.0, "{}", missed("no-catch-up"));
    assert_eq!(missed("catch-up"), 0.0);
    send_signal(&agent, "TERM");
    let (code, _) = exit_within(&mut agent, Duration::from_secs(30)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("catch_up=true"), "{text}");
    assert!(!text.contains("correct horse"), "{text}");
}
