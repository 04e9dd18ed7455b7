//! Two `invsync agent` processes sharing scheduled jobs and databases, against real clusters:
//! each scheduled run happens exactly once across both (one snapshot per due time), and with
//! one database stopped the agents keep running the other database's pipeline and backups.
//! Also one agent's start and stop: `/readyz` waits until the lease database has answered, and
//! a job running at SIGTERM finishes within the shutdown bound and is recorded.

mod agent_common;
mod backup_util;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_common::*;
use support::config_file::ConfigFile;
use support::{einvoice_gen, free_port, invsync, send_signal, wait_until, PgCluster};

/// Every how many seconds the two backup schedules fall due.
const EVERY: i64 = 4;

struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Agent {
    fn start(cfg: &Path, dir: &Path, name: &str) -> Agent {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let child = start_agent_with(cfg, &log, &["--listen", &format!("127.0.0.1:{port}")]);
        Agent { child, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        Scrape::take(self.port).await.get(name, labels)
    }

    async fn successes(&self, schedule: &str) -> f64 {
        self.metric(
            "invsync_job_runs_total",
            &[
                ("schedule", schedule),
                ("job", "backup"),
                ("result", "success"),
            ],
        )
        .await
    }

    async fn stop(mut self) {
        send_signal(&self.child, "TERM");
        let (code, _) = exit_within(&mut self.child, Duration::from_secs(25)).await;
        assert_eq!(code, Some(0), "{}", self.log());
    }
}

/// The snapshots in the repository of `cfg`, per database, by the due time they stand for
/// (their start, down to the schedules' grid).
fn snapshots_by_due(cfg: &Path) -> BTreeMap<String, BTreeMap<i64, usize>> {
    let (code, out, err) = invsync(&["--config", cfg.to_str().unwrap(), "snapshots", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut by: BTreeMap<String, BTreeMap<i64, usize>> = BTreeMap::new();
    for s in list {
        let time: chrono::DateTime<chrono::Utc> = s["time"].as_str().unwrap().parse().unwrap();
        let due = time.timestamp().div_euclid(EVERY) * EVERY;
        // `NAME (URL)`: by the configured name.
        let db = s["source"].as_str().unwrap().split(' ').next().unwrap();
        *by.entry(db.to_string())
            .or_default()
            .entry(due)
            .or_default() += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_run_each_job_once_and_keep_working_when_one_database_stops() {
    let a = PgCluster::start();
    let b = PgCluster::start();
    let c = PgCluster::start();
    einvoice_gen(&[
        "fill",
        "--url",
        &a.url("einvoice"),
        "--invoices",
        "100",
        "--seed",
        "11",
    ]);
    c.psql(
        "einvoice",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); \
         INSERT INTO ledger SELECT g, 'n' || g FROM generate_series(1, 100) g",
    );
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "owner");
    let text = ConfigFile::new()
        .database("a", &a.url("einvoice"))
        .database("b", &b.url("einvoice"))
        .database("c", &c.url("einvoice"))
        .pipeline("p", "a", &["b"], &["public.*"])
        .repository(
            "r",
            &format!("file://{}", dir.path().join("repo").display()),
            &backup_util::owner_keys(&recipient, &key),
        )
        .toml(&format!(
            r#"
[agent]
shutdown_timeout = 20
lease_duration = 6
renew_interval = 1
renew_deadline = 4

[[schedules]]
name = "backup-a"
cron = "*/{EVERY} * * * * *"
job = "backup"
db = "a"

[[schedules]]
name = "backup-c"
cron = "*/{EVERY} * * * * *"
job = "backup"
db = "c"
tables = ["public.ledger"]
"#
        ));
    // One configuration in two directories: each agent keeps its own state file.
    let cfgs = ["one", "two"].map(|n| {
        let d = dir.path().join(n);
        std::fs::create_dir(&d).unwrap();
        text.write(&d.join("invsync.toml"))
    });
    let c0 = cfgs[0].to_str().unwrap();
    for args in [
        &["repo", "init", "--repo", "r"][..],
        &["sync", "setup", "p"][..],
    ] {
        let (code, _, err) = invsync(&[&["--config", c0][..], args].concat());
        assert_eq!(code, 0, "{err}");
    }
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1} s: {what}", t0.elapsed().as_secs_f64());
    let agents = [
        Agent::start(&cfgs[0], dir.path(), "one"),
        Agent::start(&cfgs[1], dir.path(), "two"),
    ];
    let total = |schedule: &'static str| {
        let agents = &agents;
        async move {
            let mut sum = 0.0;
            for a in agents {
                sum += a.successes(schedule).await;
            }
            sum
        }
    };
    wait_until(
        Duration::from_secs(90),
        "three backups of each database",
        || async {
            matches!(get(agents[0].port, "/metrics").await, Some((200, _)))
                && matches!(get(agents[1].port, "/metrics").await, Some((200, _)))
                && total("backup-a").await >= 3.0
                && total("backup-c").await >= 3.0
        },
    )
    .await;

    phase("three backups of each database");
    // Each due time has one snapshot per database, and as many as both agents' successful
    // runs; the agent without a schedule's lease skipped its runs as a standby.
    let runs_a = total("backup-a").await;
    let runs_c = total("backup-c").await;
    let by = snapshots_by_due(&cfgs[0]);
    for (db, runs) in [("a", runs_a), ("c", runs_c)] {
        let dues = &by[db];
        assert!(dues.values().all(|n| *n == 1), "{db}: {dues:?}");
        // A run may have stored its snapshot between the two reads above.
        let count = dues.len() as f64;
        assert!(
            count == runs || count == runs + 1.0,
            "{db}: {count} snapshots, {runs} runs"
        );
    }
    for schedule in ["backup-a", "backup-c"] {
        for a in &agents {
            let failed = a
                .metric(
                    "invsync_job_runs_total",
                    &[
                        ("schedule", schedule),
                        ("job", "backup"),
                        ("result", "failure"),
                    ],
                )
                .await;
            assert_eq!(failed, 0.0, "{schedule}: {}", a.log());
        }
        let mut standby = 0.0;
        for a in &agents {
            standby += a
                .metric(
                    "invsync_job_skipped_total",
                    &[("schedule", schedule), ("reason", "standby")],
                )
                .await;
        }
        assert!(standby >= 1.0, "{schedule}: the standby skipped no run");
    }

    // Database c stops: its schedule's lease lapses on both agents; the pipeline from a and
    // a's backups go on while a load writes.
    c.stop();
    phase("database c stopped");
    let lease_c = [("lease", "schedule/backup-c")];
    wait_until(
        Duration::from_secs(30),
        "no agent holds the lease of c's backup",
        || async {
            agents[0].metric("invsync_lease_held", &lease_c).await == 0.0
                && agents[1].metric("invsync_lease_held", &lease_c).await == 0.0
        },
    )
    .await;
    phase("the lease of c's backup lapsed");
    let c_runs = total("backup-c").await;
    let a_runs = total("backup-a").await;
    let pt = [("pipeline", "p"), ("target", "b")];
    let applied = |i: usize| agents[i].metric("invsync_pipeline_applied_transactions_total", &pt);
    let applied_before = applied(0).await + applied(1).await;
    let mut load = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(["load", "--url", &a.url("einvoice"), "--rate", "100"])
        .args(["--duration", "10"])
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(60),
        "a's pipeline and backups go on",
        || async {
            applied(0).await + applied(1).await > applied_before
                && total("backup-a").await >= a_runs + 2.0
        },
    )
    .await;
    phase("a's pipeline and backups went on");
    let load_status = tokio::task::spawn_blocking(move || load.wait().unwrap())
        .await
        .unwrap();
    assert!(load_status.success());
    assert_eq!(
        total("backup-c").await,
        c_runs,
        "no backup of a stopped database"
    );
    for agent in &agents {
        let (code, body) = get(agent.port, "/healthz").await.unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // The target ends with the source's rows (`verify db` is proven in agent_ha; here the
    // lease renewals in a keep its WAL moving, which makes verify's settling slow).
    let digest = |pg: &PgCluster| {
        pg.psql(
            "einvoice",
            "SELECT (SELECT count(*) || ':' || sum(hashtext(t::text)) FROM invoice t) || '/' || \
                    (SELECT count(*) || ':' || sum(hashtext(t::text)) FROM invoice_item t)",
        )
    };
    wait_until(
        Duration::from_secs(60),
        "the target to match the source",
        || async { digest(&a) == digest(&b) },
    )
    .await;
    phase("the target matches the source");
    let dues = &snapshots_by_due(&cfgs[0])["a"];
    assert!(dues.values().all(|n| *n == 1), "a: {dues:?}");
    let [one, two] = agents;
    one.stop().await;
    two.stop().await;
    phase("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_lease_database_and_a_job_at_shutdown_finishes() {
    let a = PgCluster::start();
    let b = PgCluster::start();
    for pg in [&a, &b] {
        pg.psql(
            "einvoice",
            "CREATE TABLE ledger (id int PRIMARY KEY, note text); \
             INSERT INTO ledger SELECT g, 'n' || g FROM generate_series(1, 100) g",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = ConfigFile::new()
        .database("a", &a.url("einvoice"))
        .database("b", &b.url("einvoice"))
        .toml(&format!(
            r#"
[agent]
listen = "127.0.0.1:{port}"
shutdown_timeout = 30
lease_db = "b"

[[schedules]]
name = "compare"
cron = "*/2 * * * * *"
job = "verify"
source = "a"
target = "b"
"#
        ))
        .write(&dir.path().join("invsync.toml"));
    let log = dir.path().join("agent.log");
    let agent_log = || std::fs::read_to_string(&log).unwrap();

    // The lease database is down at start: alive, not ready, until it answers.
    b.stop();
    let mut agent = start_agent(&cfg, &log);
    wait_until(Duration::from_secs(30), "/healthz", || async {
        matches!(get(port, "/healthz").await, Some((200, _)))
    })
    .await;
    let (code, body) = get(port, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("lease schedule/compare is not known yet: database b has not answered"),
        "{body}"
    );
    b.start_again();
    wait_until(Duration::from_secs(30), "/readyz 200", || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await;

    // A verify held up by a lock on b's table is running when SIGTERM comes; it finishes once
    // the lock goes, within the bound, and its run is recorded.
    let blocker = b.client("einvoice").await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the verify to wait on the lock",
        || async {
            b.psql(
                "einvoice",
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND application_name = 'invsync verify'",
            )
            .trim()
                != "0"
        },
    )
    .await;
    let finished_before = agent_log().matches("job_finished").count();
    send_signal(&agent, "TERM");
    wait_until(
        Duration::from_secs(10),
        "the agent to let the job finish",
        || async { agent_log().contains("job_finishing") },
    )
    .await;
    // Still running after its stop began: nothing else holds the process.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.try_wait().unwrap().is_none(), "{}", agent_log());
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let (code, took) = exit_within(&mut agent, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", agent_log());
    let log_text = agent_log();
    assert!(
        log_text.matches("job_finished").count() > finished_before,
        "{log_text}"
    );
    assert!(!log_text.contains("job_abandoned"), "{log_text}");
    eprintln!("stopped {took:?} after the lock was released");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("agent-state.json")).unwrap(),
    )
    .unwrap();
    let last = &state["schedules"]["compare"]["last_run"];
    assert_eq!(last["result"], "success", "{state}");
}
