//! Helpers shared by the agent's process tests: starting `invsync agent`, reading its
//! endpoint, and parsing `/metrics` with a Prometheus text parser.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `invsync agent` on `cfg`, its log in `log`.
pub fn start_agent(cfg: &Path, log: &Path) -> Child {
    start_agent_with(cfg, log, &[])
}

/// Starts `invsync agent` on `cfg` with more arguments (`--listen ...`), its log in `log`.
pub fn start_agent_with(cfg: &Path, log: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", cfg.to_str().unwrap(), "agent"])
        .args(args)
        .env_remove("INVSYNC_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start invsync agent")
}

/// Waits up to `bound` for `child` to exit; returns its exit code and how long it took.
pub async fn exit_within(child: &mut Child, bound: Duration) -> (Option<i32>, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), start.elapsed());
        }
        assert!(
            start.elapsed() < bound,
            "the agent did not exit within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.ok()?))
}

pub async fn status(port: u16) -> serde_json::Value {
    let (code, body) = get(port, "/status").await.expect("GET /status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

pub fn schedule<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("schedule {name} in {status}"))
}

/// `/metrics` parsed by a Prometheus text parser: value by metric name and labels.
pub struct Scrape(HashMap<(String, Vec<(String, String)>), f64>);

impl Scrape {
    pub async fn take(port: u16) -> Scrape {
        let (code, body) = get(port, "/metrics").await.expect("GET /metrics");
        assert_eq!(code, 200);
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("parse /metrics");
        let mut out = HashMap::new();
        for s in parsed.samples {
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("unexpected sample {other:?}"),
            };
            out.insert((s.metric, labels), v);
        }
        Scrape(out)
    }

    /// The value of `name` with exactly `labels`; fails when the series is absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        *self
            .0
            .get(&(name.to_string(), want.clone()))
            .unwrap_or_else(|| {
                let names: Vec<_> = self.0.keys().filter(|k| k.0 == name).collect();
                panic!("no series {name} {want:?}; have {names:?}")
            })
    }
}

impl Scrape {
    /// Every metric name with a sample (counters with their `_total`).
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.0.keys().map(|(name, _)| name.clone()).collect()
    }
}

/// The `invsync_*` names in `text`.
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("invsync_"))
        .map(str::to_string)
        .collect()
}

/// The metric names `deploy/prometheus/alerts.yml` uses, and those of the queries of
/// `deploy/grafana/invsync.json`'s panels.
pub fn deploy_metric_names() -> (
    std::collections::BTreeSet<String>,
    std::collections::BTreeSet<String>,
) {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let rules = std::fs::read_to_string(deploy.join("prometheus/alerts.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/invsync.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("every target has a query"));
        }
    }
    (metric_names(&rules), metric_names(&exprs.join("\n")))
}
