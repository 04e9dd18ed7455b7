//! Helpers shared by the sync integration tests: configuration files, running a pipeline in
//! the test process, and comparing tables between clusters.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use invsync::config::Config;
use invsync::pg::Fence;
use tokio::sync::watch;

use crate::support::config_file::ConfigFile;
use crate::support::{invsync, wait_until, PgCluster};

/// A pipeline for [`write_config`]: (name, source, targets, tables).
pub type PipelineSpec<'a> = (&'a str, &'a str, &'a [&'a str], &'a [&'a str]);

/// Writes `invsync.toml` into `dir` with these databases and pipelines; returns its path.
pub fn write_config(
    dir: &Path,
    databases: &[(&str, String)],
    pipelines: &[PipelineSpec],
) -> PathBuf {
    let mut file = ConfigFile::new();
    for (name, url) in databases {
        file = file.database(name, url);
    }
    for (name, source, targets, tables) in pipelines {
        file = file.pipeline(name, source, targets, tables);
    }
    file.write(&dir.join("invsync.toml"))
}

/// Writes a configuration with pipeline `p` from `src` (database `a`) to `dst` (database `b`)
/// over `tables` and runs `sync setup p`; returns the configuration (in the returned directory).
pub fn set_up_pipeline(
    src: &PgCluster,
    dst: &PgCluster,
    tables: &[&str],
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &[("a", src.url("einvoice")), ("b", dst.url("einvoice"))],
        &[("p", "a", &["b"], tables)],
    );
    let (code, _, err) = invsync(&["--config", cfg.to_str().unwrap(), "sync", "setup", "p"]);
    assert_eq!(code, 0, "{err}");
    (dir, cfg)
}

pub fn load(path: &Path) -> Config {
    Config::load(path).unwrap()
}

/// A pipeline running in this process; `stop` ends it the way SIGTERM does.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), invsync::sync::SyncError>>,
}

impl Running {
    pub fn start(config: &Config, pipeline: &str) -> Running {
        Running::start_fenced(config, pipeline, None)
    }

    /// Runs the pipeline as an agent holding `fence` would.
    pub fn start_fenced(config: &Config, pipeline: &str, fence: Option<Fence>) -> Running {
        let (stop, rx) = watch::channel(false);
        let config = config.clone();
        let pipeline = pipeline.to_string();
        let task = tokio::spawn(async move {
            invsync::sync::run(&config, &pipeline, rx, fence.as_ref()).await
        });
        Running { stop, task }
    }

    /// Waits for the pipeline to end by itself (an error that needs a person).
    pub async fn finished(self) -> Result<(), invsync::sync::SyncError> {
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("run ends within 60 s")
            .expect("run task")
    }

    /// Waits (as [`wait_for`]) until `f` holds; fails with the pipeline's own error if it
    /// ends first.
    pub async fn wait_for(&mut self, what: &str, mut f: impl FnMut() -> bool) {
        let task = &self.task;
        wait_for(what, || task.is_finished() || f()).await;
        if self.task.is_finished() {
            let ended = (&mut self.task).await;
            panic!("the pipeline ended while waiting for {what}: {ended:?}");
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let r = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("run stops within 30 s")
            .expect("run task");
        r.expect("run ends cleanly");
    }
}

/// The rows of `query` (which should ORDER BY the key) as text.
pub fn dump(cluster: &PgCluster, query: &str) -> String {
    cluster.psql("einvoice", query)
}

/// Like [`dump`], but `None` when the query fails (say, a column the pipeline has yet to add).
pub fn try_dump(cluster: &PgCluster, query: &str) -> Option<String> {
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "einvoice",
        ])
        .args(["-c", query])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// Waits until `query` returns the same text on both clusters.
pub async fn wait_same(source: &PgCluster, target: &PgCluster, query: &str) {
    let mut last = (String::new(), String::new());
    let ok = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let a = dump(source, query);
            let b = try_dump(target, query);
            if b.as_deref() == Some(a.as_str()) {
                return;
            }
            last = (a, b.unwrap_or_else(|| "(query failed)".into()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if ok.is_err() {
        let (a, b) = last;
        panic!(
            "target did not match source for {query}\nsource: {}\ntarget: {}",
            &a[..a.len().min(2000)],
            &b[..b.len().min(2000)]
        );
    }
}

/// The applied LSN recorded on a target for `pipeline`.
pub fn applied_lsn(target: &PgCluster, pipeline: &str) -> String {
    target.psql(
        "einvoice",
        &format!("SELECT applied_lsn FROM invsync.pipeline WHERE pipeline = '{pipeline}'"),
    )
}

pub async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    wait_until(Duration::from_secs(60), what, || {
        let r = f();
        async move { r }
    })
    .await
}

/// Whether a new session of role `app` on `pg` may write `table` (false: read-only, as a
/// switchover leaves the old primary).
pub async fn app_may_write(pg: &PgCluster, table: &str) -> bool {
    let app = invsync::pg::ConnInfo::parse(&pg.url_as("app", "einvoice"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let probe = format!("UPDATE {table} SET id = id WHERE false");
    match app.execute(probe.as_str(), &[]).await {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
                "{e}"
            );
            false
        }
    }
}
