//! Two `invsync agent` processes with the same configuration against real clusters: exactly
//! one runs the pipeline while the other stands by (ready); after a kill -9 of the active one
//! the standby takes over within 30 s and the target ends identical to the source while a load
//! writes; a holder paused (SIGSTOP) past its lease wakes to find a newer holder, commits
//! nothing and steps down. (That every metric the alert rules and the dashboard use is in a
//! live agent's `/metrics` is checked in `agent_process`, whose agent has run its jobs.)

mod agent_common;
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_common::*;
use support::config_file::ConfigFile;
use support::{einvoice_gen, free_port, invsync, send_signal, wait_until, PgCluster};

const LEASE: [(&str, &str); 1] = [("lease", "pipeline/p")];
const PT: [(&str, &str); 2] = [("pipeline", "p"), ("target", "b")];

/// A source filled with invoices, a target, and one configuration (short leases) written into
/// two directories, one per agent (each keeps its state file beside its configuration, as two
/// machines would).
struct Site {
    src: PgCluster,
    dst: PgCluster,
    dir: tempfile::TempDir,
    configs: [PathBuf; 2],
}

impl Site {
    fn start() -> Site {
        let src = PgCluster::start();
        let dst = PgCluster::start();
        einvoice_gen(&[
            "fill",
            "--url",
            &src.url("einvoice"),
            "--invoices",
            "200",
            "--seed",
            "5",
        ]);
        let dir = tempfile::tempdir().unwrap();
        let text = ConfigFile::new()
            .database("a", &src.url("einvoice"))
            .database("b", &dst.url("einvoice"))
            .pipeline("p", "a", &["b"], &["public.*"])
            .toml(
                r#"
[agent]
shutdown_timeout = 20
lease_duration = 6
renew_interval = 1
renew_deadline = 4
"#,
            );
        let configs = ["one", "two"].map(|name| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            text.write(&d.join("invsync.toml"))
        });
        let (code, _, err) = invsync(&[
            "--config",
            configs[0].to_str().unwrap(),
            "sync",
            "setup",
            "p",
        ]);
        assert_eq!(code, 0, "{err}");
        Site {
            src,
            dst,
            dir,
            configs,
        }
    }

    /// Starts agent `i` (0 or 1) on a port of its own; returns it with its port and log.
    fn agent(&self, i: usize) -> Agent {
        let port = free_port();
        let log = self.dir.path().join(format!("agent{i}.log"));
        let listen = format!("127.0.0.1:{port}");
        let child = start_agent_with(&self.configs[i], &log, &["--listen", &listen]);
        Agent { child, port, log }
    }

    /// `einvoice-gen load` on the source for `seconds`.
    fn load(&self, seconds: u32) -> Child {
        Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
            .args(["load", "--url", &self.src.url("einvoice"), "--rate", "200"])
            .args(["--duration", &seconds.to_string()])
            .env_remove("EINVOICE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The epoch recorded by the last fenced batch on the target.
    fn target_epoch(&self) -> String {
        self.dst.psql(
            "einvoice",
            "SELECT fence_epoch FROM invsync.pipeline WHERE pipeline = 'p'",
        )
    }

    /// `invsync verify db` of the pipeline: the target holds exactly the source's rows.
    fn verify(&self) {
        let (code, out, err) = invsync(&[
            "--config",
            self.configs[0].to_str().unwrap(),
            "verify",
            "db",
            "--pipeline",
            "p",
            "--settle",
            "60",
        ]);
        assert_eq!(code, 0, "verify db: {out}{err}");
    }
}

struct Agent {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Agent {
    async fn scrape(&self) -> Scrape {
        Scrape::take(self.port).await
    }

    async fn holds(&self) -> bool {
        match get(self.port, "/metrics").await {
            Some((200, _)) => self.scrape().await.get("invsync_lease_held", &LEASE) == 1.0,
            _ => false,
        }
    }

    async fn applied(&self) -> f64 {
        self.scrape()
            .await
            .get("invsync_pipeline_applied_transactions_total", &PT)
    }

    async fn pipeline_state(&self) -> String {
        status(self.port).await["pipelines"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    async fn ready(&self) -> bool {
        matches!(get(self.port, "/readyz").await, Some((200, _)))
    }

    /// SIGTERM: exit 0.
    async fn stop(mut self) {
        send_signal(&self.child, "TERM");
        let (code, _) = exit_within(&mut self.child, Duration::from_secs(25)).await;
        assert_eq!(code, Some(0), "{}", self.log());
    }
}

/// Waits until exactly one of `agents` holds the pipeline's lease and streams; returns its index.
async fn one_active(agents: &[&Agent]) -> usize {
    wait_until(Duration::from_secs(60), "one agent streaming", || async {
        for a in agents {
            if a.holds().await && a.pipeline_state().await == "streaming" {
                return true;
            }
        }
        false
    })
    .await;
    let mut holders = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        if a.holds().await {
            holders.push(i);
        }
    }
    assert_eq!(
        holders.len(),
        1,
        "exactly one agent holds the lease: {holders:?}"
    );
    holders[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_run_the_pipeline_once_and_the_standby_takes_over_after_kill_9() {
    let site = Site::start();
    let agents = [site.agent(0), site.agent(1)];
    let active = one_active(&[&agents[0], &agents[1]]).await;
    let standby = 1 - active;
    let (a, s) = (&agents[active], &agents[standby]);

    // The standby is healthy and ready, stands by, and applies nothing while the load writes.
    let mut load = site.load(30);
    let before = a.applied().await;
    wait_until(
        Duration::from_secs(30),
        "the active agent applies",
        || async { a.applied().await > before },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.pipeline_state().await, "standby");
    assert!(s.ready().await, "a standby is ready");
    assert!(a.ready().await, "the active agent is ready");
    let ss = s.scrape().await;
    assert_eq!(ss.get("invsync_lease_held", &LEASE), 0.0);
    assert_eq!(
        ss.get("invsync_pipeline_applied_transactions_total", &PT),
        0.0
    );
    let epoch = a.scrape().await.get("invsync_lease_epoch", &LEASE);
    assert!(epoch >= 1.0);
    // The standby sees the holder's epoch; /status names the holder.
    assert_eq!(ss.get("invsync_lease_epoch", &LEASE), epoch);
    let st = status(s.port).await;
    let lease = st["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lease"] == "pipeline/p")
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(lease["held"], false, "{lease}");
    assert_eq!(lease["database"], "a", "{lease}");
    assert!(
        lease["holder"].as_str().is_some_and(|h| !h.is_empty()),
        "{lease}"
    );
    assert_eq!(site.target_epoch(), format!("{epoch}"));

    // kill -9 the active agent: the standby takes over within 30 s, while the load writes.
    let mut agents = agents.map(Some);
    let mut killed = agents[active].take().unwrap();
    send_signal(&killed.child, "KILL");
    let t = Instant::now();
    killed.child.wait().unwrap();
    let s = agents[standby].take().unwrap();
    wait_until(
        Duration::from_secs(30),
        "the standby takes over",
        || async { s.holds().await && s.pipeline_state().await == "streaming" },
    )
    .await;
    let took = t.elapsed();
    let applied = s.applied().await;
    wait_until(
        Duration::from_secs(30),
        "the new holder applies",
        || async { s.applied().await > applied },
    )
    .await;
    let new_epoch = s.scrape().await.get("invsync_lease_epoch", &LEASE);
    assert!(new_epoch > epoch, "{new_epoch} > {epoch}");
    let load_status = tokio::task::spawn_blocking(move || load.wait().unwrap())
        .await
        .unwrap();
    assert!(load_status.success());
    site.verify();
    assert_eq!(site.target_epoch(), format!("{new_epoch}"));
    eprintln!("take-over after kill -9: {took:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_wakes_fenced_commits_nothing_and_steps_down() {
    let site = Site::start();
    let mut first = site.agent(0);
    assert_eq!(one_active(&[&first]).await, 0);
    let second = site.agent(1);
    wait_until(
        Duration::from_secs(30),
        "the second agent stands by",
        || async {
            matches!(get(second.port, "/status").await, Some((200, _)))
                && second.pipeline_state().await == "standby"
        },
    )
    .await;

    // The first agent is caught up and idle when it is paused, so what it has applied is known.
    let (code, out, err) = invsync(&[
        "--config",
        site.configs[0].to_str().unwrap(),
        "verify",
        "db",
        "--pipeline",
        "p",
        "--settle",
        "60",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let applied_before = first.applied().await;
    let old_epoch = first.scrape().await.get("invsync_lease_epoch", &LEASE);
    send_signal(&first.child, "STOP");
    let paused = Instant::now();
    let mut load = site.load(20);

    // The second agent takes over once the lease expired, and applies the load.
    wait_until(
        Duration::from_secs(30),
        "the second agent takes over",
        || async { second.holds().await && second.pipeline_state().await == "streaming" },
    )
    .await;
    let new_epoch = second.scrape().await.get("invsync_lease_epoch", &LEASE);
    assert!(new_epoch > old_epoch);
    wait_until(
        Duration::from_secs(30),
        "the new holder applies",
        || async { second.applied().await > 0.0 },
    )
    .await;
    eprintln!("take-over from a paused holder: {:?}", paused.elapsed());
    let log_len = first.log().len();

    // The first agent wakes while the load still writes: it commits nothing and steps down.
    send_signal(&first.child, "CONT");
    wait_until(
        Duration::from_secs(30),
        "the woken agent steps down",
        || async { first.pipeline_state().await == "standby" && !first.holds().await },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(first.applied().await, applied_before, "{}", first.log());
        assert!(!first.holds().await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let woken = first.log()[log_len..].to_string();
    assert!(woken.contains("lease lost"), "{woken}");
    assert!(
        woken.contains("pipeline_stepped_down") || woken.contains("fenced"),
        "{woken}"
    );
    assert!(!woken.contains("pipeline_streaming"), "{woken}");
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "the woken agent keeps running"
    );
    assert!(first.ready().await, "the woken agent is a ready standby");
    assert_eq!(second.scrape().await.get("invsync_lease_held", &LEASE), 1.0);

    let load_status = tokio::task::spawn_blocking(move || load.wait().unwrap())
        .await
        .unwrap();
    assert!(load_status.success());
    site.verify();
    assert_eq!(site.target_epoch(), format!("{new_epoch}"));
    first.stop().await;
    second.stop().await;
}
