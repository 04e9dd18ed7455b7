//! The agent: the long-running process that runs every pipeline and every scheduled job around
//! the peak calendar, and reports on them over HTTP.
//!
//! Its pure core reads no clock and does no I/O:
//! - [`schedule`]: when each schedule falls due, the decision for a run (start, defer to the
//!   end of a blackout window, skip), missed runs after downtime, and the state that keeps a
//!   job from overlapping itself;
//! - [`calendar`]: when the blackout windows are open and which databases they cover;
//! - [`local_time`]: the daylight-saving rules shared by both;
//! - [`plan`]: the report of `invsync agent --check`, the next runs of every schedule.
//!
//! Around it, the process ([`run`]):
//! - [`supervisor`]: the loop that runs a pipeline or an archive under its lease and restarts
//!   it with backoff;
//! - [`pipelines`]: each pipeline's task and the poller of lag;
//! - [`archives`]: each change archive's task, run like a pipeline, and the poller of its lag
//!   and recovery point;
//! - [`scheduler`]: each schedule's task, which runs its [`jobs`] and retries failed ones;
//! - [`state`]: each schedule's last run, kept across restarts;
//! - [`status`], [`metrics`] and [`endpoint`]: what `/status`, `/readyz` and `/metrics` show.
//!
//! And what lets two agents share a deployment: [`lease`], which agent runs each pipeline and
//! job (a lease row in PostgreSQL with an epoch that fences writes), and the take-over of a
//! pipeline from a holder that lost its lease; [`leases`], the keeper of every lease of the
//! configuration. Pipelines and jobs run only while their lease is held, with its fence.
//!
//! Every task is owned by [`run`]'s `JoinSet` and watches one shutdown channel; after the
//! signal, pipelines commit their batches with their progress, running jobs get the rest of
//! the bound to finish (and are abandoned after it), then the
//! leases are released (their keepers live in a second `JoinSet` with their own signal), and
//! `run` returns within `[agent] shutdown_timeout` whatever a task does. Every instant is a
//! `DateTime<Utc>`; wall-clock times exist only in the configuration and in rendered reports.

pub mod archives;
pub mod calendar;
pub mod endpoint;
pub mod jobs;
pub mod lease;
pub mod leases;
pub mod local_time;
pub mod metrics;
pub mod pipelines;
pub mod plan;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod status;
pub mod supervisor;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::backup::BackupError;
use crate::config::{Config, JobSpec};
use crate::sync::SyncError;
use crate::verify::VerifyError;
use calendar::Calendar;
use metrics::{BackupLabels, Metrics};
use state::StateStore;
use status::Board;

/// Everything that can stop the agent from starting, or fail one of its jobs.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}: {reason}; stop the process using it, or choose another address with --listen or [agent] listen")]
    Listen { addr: SocketAddr, reason: String },
    #[error("agent state file {path}: {reason}")]
    State { path: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Recovery(#[from] crate::recovery::RecoveryError),
}

/// What every task of the agent reports into.
pub struct Shared {
    pub board: Board,
    pub metrics: Metrics,
}

/// Options of `invsync agent` beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Overrides `[agent] listen`.
    pub listen: Option<SocketAddr>,
}

/// Runs the agent until `shutdown` completes, then stops every task within
/// `[agent] shutdown_timeout`. Fails only at start (the endpoint's address, the state file).
///
/// Pipelines, the poller and the endpoint run on the runtime's worker threads; schedules (whose
/// jobs hold values that stay on one thread) run as local tasks on the caller's thread.
pub async fn run(
    config: Config,
    options: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    tokio::task::LocalSet::new()
        .run_until(run_local(config, options, shutdown))
        .await
}

async fn run_local(
    config: Config,
    options: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let addr = options.listen.unwrap_or(config.agent.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::Listen {
            addr,
            reason: e.to_string(),
        })?;
    // The port chosen when `:0` was asked for.
    let bound = listener.local_addr().unwrap_or(addr);
    let store = Arc::new(StateStore::open(&config)?);
    let config = Arc::new(config);
    let calendar = Arc::new(Calendar::new(config.blackouts.clone()));
    let shared = Arc::new(Shared {
        board: Board::new(&config),
        metrics: Metrics::new(&config),
    });
    let (stop_tx, stop) = watch::channel(false);
    // The leases outlive the work: they are released only after it stopped.
    let (release_tx, release) = watch::channel(false);
    let mut keepers = JoinSet::new();
    let holder = lease::holder_id();
    let leases = leases::start(&config, &holder, &shared, &mut keepers, &release)?;
    let mut tasks = JoinSet::new();
    tasks.spawn(endpoint::serve(listener, shared.clone(), stop.clone()));
    for name in config.pipelines.keys() {
        tasks.spawn(pipelines::supervise(
            config.clone(),
            name.clone(),
            shared.clone(),
            leases.pipeline(name),
            stop.clone(),
        ));
    }
    if !config.pipelines.is_empty() {
        tasks.spawn(pipelines::poll(
            config.clone(),
            shared.clone(),
            stop.clone(),
        ));
    }
    for name in config.archives.keys() {
        tasks.spawn_local(archives::supervise(
            config.clone(),
            name.clone(),
            shared.clone(),
            leases.archive(name),
            stop.clone(),
        ));
    }
    if !config.archives.is_empty() {
        tasks.spawn(archives::poll(
            config.clone(),
            shared.clone(),
            pipelines::POLL,
            stop.clone(),
        ));
    }
    tasks.spawn(scheduler::watch_windows(
        calendar.clone(),
        shared.clone(),
        stop.clone(),
    ));
    tasks.spawn_local(newest_backups(config.clone(), shared.clone(), stop.clone()));
    for s in &config.schedules {
        let task = scheduler::Scheduler::new(
            s.clone(),
            config.clone(),
            calendar.clone(),
            shared.clone(),
            store.clone(),
        );
        tasks.spawn_local(task.run(leases.schedule(&s.name), stop.clone()));
    }
    tracing::info!(
        event = "agent_started",
        listen = %bound,
        holder = %holder,
        pipelines = config.pipelines.len(),
        schedules = config.schedules.len(),
        archives = config.archives.len(),
        state_file = %store.path().display(),
    );

    tokio::select! {
        _ = shutdown => {}
        // Every task ended by itself (none should): nothing is left to run.
        _ = join_all(&mut tasks) => {}
    }
    let limit = config.agent.shutdown_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    tracing::info!(
        event = "agent_stopping",
        timeout_s = limit.as_secs(),
        "finishing pipeline batches; running jobs may finish within the bound"
    );
    let _ = stop_tx.send(true);
    if tokio::time::timeout_at(deadline, join_all(&mut tasks))
        .await
        .is_err()
    {
        tracing::warn!(
            event = "agent_stop_timeout",
            tasks = tasks.len(),
            "tasks still running at the shutdown timeout are cancelled"
        );
        tasks.shutdown().await;
    }
    // The work has stopped: release its leases so a standby takes over at once.
    let _ = release_tx.send(true);
    if tokio::time::timeout_at(deadline, join_all(&mut keepers))
        .await
        .is_err()
    {
        tracing::warn!(
            event = "agent_stop_timeout",
            tasks = keepers.len(),
            "leases not released by the shutdown timeout expire by themselves"
        );
        keepers.shutdown().await;
    }
    tracing::info!(event = "agent_stopped");
    Ok(())
}

/// Waits for every task, logging any that panicked.
async fn join_all(tasks: &mut JoinSet<()>) {
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            if e.is_panic() {
                tracing::error!(event = "task_panicked", error = %e);
            }
        }
    }
}

/// Sets `invsync_backup_last_success_timestamp_seconds` from the newest snapshot of each
/// database in each repository that a backup schedule writes to, once at start.
async fn newest_backups(config: Arc<Config>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut repos: Vec<&str> = config
        .schedules
        .iter()
        .filter_map(|s| match &s.job {
            JobSpec::Backup { repo, .. } => Some(repo.as_str()),
            _ => None,
        })
        .collect();
    repos.sort();
    repos.dedup();
    for name in repos {
        let read = async {
            let cfg = config.repository(Some(name)).map_err(AgentError::Config)?;
            let repo = crate::backup::repository::Repository::open(cfg).await?;
            Ok::<_, AgentError>(crate::backup::snapshot::list(&repo).await?)
        };
        let snapshots = tokio::select! {
            r = read => r,
            _ = stop.changed() => return,
        };
        match snapshots {
            Ok(list) => {
                for (_, snap) in list {
                    let Some(db) = snap.source else { continue };
                    let gauge = shared
                        .metrics
                        .backup_last_success
                        .get_or_create(&BackupLabels {
                            repo: name.to_string(),
                            db,
                        });
                    let t = snap.time.timestamp_millis() as f64 / 1000.0;
                    if t > gauge.get() {
                        gauge.set(t);
                    }
                }
            }
            Err(e) => tracing::warn!(
                event = "repository_unreadable",
                repo = name,
                error = %e,
                "cannot read the newest backups"
            ),
        }
    }
}
