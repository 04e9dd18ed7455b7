//! The agent's change archive and a real Prometheus server: `invsync agent` runs a pipeline and
//! an `[archives.NAME]` entry while `einvoice-gen load` writes; Prometheus (Debian's
//! `prometheus` binary, on loopback, scraping every second) stores the agent's series, and its
//! HTTP query API returns the pipeline's lag and the archive's lag and recovery point age. The
//! agent's pollers reuse their sessions: polls open no new session on the source.
//! After SIGTERM the archive's open segment is stored: `archive status` shows an unbroken
//! window ending at the source's position after the load.

mod agent_common;
mod backup_util;
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_common::*;
use invsync::pg::Lsn;
use support::config_file::ConfigFile;
use support::{einvoice_gen, free_port, invsync, send_signal, wait_until, PgCluster};

/// A Prometheus server scraping one agent every second, its data in a temporary directory;
/// killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, agent_port: u16) -> Prometheus {
        let port = free_port();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: invsync-agent\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{agent_port}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run the prometheus server ({e}); install it: bash -c 'source scripts/lib.sh; ensure_prometheus'"
                )
            });
        Prometheus { child, port }
    }

    /// The samples of an instant `query`, as (labels, value).
    async fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let url = url::Url::parse_with_params(
            &format!("http://127.0.0.1:{}/api/v1/query", self.port),
            [("query", query)],
        )
        .unwrap();
        let Ok(r) = reqwest::get(url).await else {
            return Vec::new();
        };
        let Ok(text) = r.text().await else {
            return Vec::new();
        };
        let Ok(body) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Vec::new();
        };
        body["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let v = s["value"][1].as_str().unwrap_or("NaN").parse().unwrap();
                (s["metric"].clone(), v)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_archives_and_prometheus_scrapes_its_lag_series() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    einvoice_gen(&[
        "fill",
        "--url",
        &src.url("einvoice"),
        "--invoices",
        "200",
        "--seed",
        "7",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "owner");
    let port = free_port();
    let cfg = ConfigFile::new()
        .database("a", &src.url("einvoice"))
        .database("b", &dst.url("einvoice"))
        .pipeline("p", "a", &["b"], &["public.*"])
        .repository(
            "r",
            &format!("file://{}", dir.path().join("repo").display()),
            &backup_util::owner_keys(&recipient, &key),
        )
        .toml(&format!(
            r#"
[archives.arc]
db = "a"
segment_seconds = 1

[agent]
listen = "127.0.0.1:{port}"
shutdown_timeout = 20
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
    let prometheus = Prometheus::start(dir.path(), port);
    let agent_log = || std::fs::read_to_string(&log).unwrap();

    wait_until(Duration::from_secs(60), "the archive streams", || async {
        matches!(get(port, "/status").await, Some((200, _)))
            && status(port).await["archives"][0]["state"] == "streaming"
    })
    .await;
    let mut load = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(["load", "--url", &src.url("einvoice"), "--rate", "200"])
        .args(["--duration", "8"])
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let al = [("archive", "arc")];
    wait_until(
        Duration::from_secs(60),
        "segments with transactions are stored",
        || async {
            let s = Scrape::take(port).await;
            s.get("invsync_archive_transactions_total", &al) > 0.0
                && s.get("invsync_archive_segments_total", &al) >= 2.0
        },
    )
    .await;

    // Prometheus has scraped the agent: its query API returns the lag series.
    for (query, label, value) in [
        ("invsync_pipeline_lag_bytes", "pipeline", "p"),
        ("invsync_pipeline_lag_seconds", "target", "b"),
        ("invsync_archive_lag_bytes", "archive", "arc"),
        (
            "invsync_archive_recovery_point_age_seconds",
            "archive",
            "arc",
        ),
    ] {
        wait_until(
            Duration::from_secs(60),
            &format!("Prometheus to return {query}"),
            || async {
                prometheus.query(query).await.iter().any(|(labels, v)| {
                    labels[label] == value
                        && labels["job"] == "invsync-agent"
                        && labels["instance"] == format!("127.0.0.1:{port}")
                        && v.is_finite()
                })
            },
        )
        .await;
    }
    // The agent's pollers (the pipeline's status every 2 s, the archive's WAL position) and its
    // lease keepers keep their sessions: four polls open no new session on the source.
    let sessions = || -> i64 {
        src.psql(
            "einvoice",
            "SELECT sessions FROM pg_stat_database WHERE datname = 'einvoice'",
        )
        .trim()
        .parse()
        .unwrap()
    };
    let polled = || async { status(port).await["pipelines"][0]["polled"].to_string() };
    let before = sessions();
    for _ in 0..4 {
        let last = polled().await;
        wait_until(Duration::from_secs(30), "the next poll", || async {
            polled().await != last
        })
        .await;
    }
    let opened = sessions() - before;
    // The two readings' own sessions may be counted.
    assert!(
        opened <= 2,
        "{opened} sessions opened on the source over four polls"
    );

    // A stored segment every second: the recovery point is never far behind.
    let age = Scrape::take(port)
        .await
        .get("invsync_archive_recovery_point_age_seconds", &al);
    assert!((0.0..30.0).contains(&age), "recovery point age {age}");
    let up = prometheus
        .query("max by (archive) (invsync_archive_up)")
        .await;
    assert!(
        up.iter().any(|(l, v)| l["archive"] == "arc" && *v == 1.0),
        "{up:?}"
    );

    let load_status = tokio::task::spawn_blocking(move || load.wait().unwrap())
        .await
        .unwrap();
    assert!(load_status.success());
    // The archive catches up with where the source stood after the load (its end follows the
    // stream's keepalives), then SIGTERM stops the agent cleanly.
    let source_end: Lsn = src
        .psql("einvoice", "SELECT pg_current_wal_lsn()")
        .trim()
        .parse()
        .unwrap();
    wait_until(
        Duration::from_secs(60),
        "the archive reaches the source's position",
        || async {
            status(port).await["archives"][0]["archived_lsn"]
                .as_str()
                .and_then(|l| l.parse::<Lsn>().ok())
                .is_some_and(|l| l >= source_end)
        },
    )
    .await;
    send_signal(&agent, "TERM");
    let (code, _) = exit_within(&mut agent, Duration::from_secs(25)).await;
    assert_eq!(code, Some(0), "{}", agent_log());
    assert!(agent_log().contains("archive_streaming"), "{}", agent_log());

    // The repository holds one unbroken chain reaching that position.
    let (code, out, err) = invsync(&["--config", c, "archive", "status", "--json"]);
    assert_eq!(code, 0, "archive status: {out}{err}");
    let dbs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let a = dbs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["db"].as_str().is_some_and(|db| db.starts_with("a (")))
        .unwrap_or_else(|| panic!("{dbs}"));
    assert_eq!(a["gaps"], serde_json::json!([]), "{a}");
    assert!(a["transactions"].as_u64().unwrap() > 0, "{a}");
    let end: Lsn = a["latest"]["lsn"].as_str().unwrap().parse().unwrap();
    assert!(
        end >= source_end,
        "archived to {end}, source at {source_end}"
    );
}
