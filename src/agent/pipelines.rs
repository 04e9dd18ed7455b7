//! The agent's pipelines: each runs `sync::run_observed` (the code of `invsync sync run`) in a
//! task that restarts it with capped exponential backoff when it fails (the loop of
//! `supervisor`, shared with the change archives), and one poller reads
//! every pipeline's slot and targets (`sync::status_in`, the code of `invsync sync status`) for
//! lag, retained WAL and reachability, through one session per database kept open between
//! polls.
//!
//! `sync::run` already reconnects after transient failures on its own; what reaches this
//! supervisor is a failure a person may have to fix (a schema drift, a missing slot). It is
//! retried anyway, since the person may fix it while the agent runs, and it is shown in the
//! log, `/status` and `invsync_pipeline_restarts_total` meanwhile. One pipeline's failure never
//! touches another's task.
//!
//! A pipeline runs only while this agent holds its lease (see `leases`): it waits on standby,
//! and when the lease is acquired it ends the previous holder's sessions
//! ([`lease::take_over_pipeline`]) and streams with the lease's fence, so a batch from an older
//! term can never commit after this one started. When the lease is lost the run is dropped at
//! once, which is before the lease can have expired (the keeper's renew deadline is shorter
//! than the lease), and the pipeline goes back to standby.
//!
//! A pipeline gives way to a switchover: before each term and every [`POLL`] while it streams,
//! its source is read for a switchover of it under way (`invsync.switchover`, which
//! `sync switchover` writes at `requested` before it needs the slot); the run then stops
//! cleanly (its batches committed) and the pipeline waits, as it does while its slot does not
//! exist when it is one of a pair that switch over into each other (the way back before a
//! switchover, the old direction after it), and while a switchover of the other one of the
//! pair is under way (which sets this one up, and tears it down again if it rolls back). So
//! an agent configured with a pipeline and its way back follows switchovers in either
//! direction. A waiting pipeline counts as ready.
//!
//! Lag in seconds is the status command's figure: 0 when the target holds everything the
//! source has, else now minus the commit time of the last transaction the target applied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use super::lease::{self, LeaseStatus};
use super::metrics::{Metrics, TABLE_PHASES};
use super::status::PipelineState;
use super::supervisor::{self, Term, Work};
use super::Shared;
use crate::cdc::{names, slot};
use crate::config::Config;
use crate::pg::{ConnInfo, Fence, Sessions};
use crate::recovery::switchover;
use crate::sync::{self, Observer, SyncError};

/// How often the slots and targets are read.
pub const POLL: Duration = Duration::from_secs(2);

/// Counts what `sync::run` reports into the metrics and the status.
struct Watcher<'a> {
    pipeline: &'a str,
    shared: &'a Shared,
    streaming: AtomicBool,
}

impl Observer for Watcher<'_> {
    fn streaming(&self, up: bool) {
        if self.streaming.swap(up, Ordering::Relaxed) == up {
            return;
        }
        self.shared
            .metrics
            .pipeline_up
            .get_or_create(&Metrics::pipeline(self.pipeline))
            .set(up.into());
        self.shared.board.pipeline(self.pipeline, |p| {
            if up {
                p.state = PipelineState::Streaming;
                p.last_error = None;
                p.retry_at = None;
                p.waiting_for = None;
            } else if p.state == PipelineState::Streaming {
                p.state = PipelineState::Starting;
            }
        });
        if up {
            tracing::info!(event = "pipeline_streaming", pipeline = self.pipeline);
        }
    }

    fn applied(&self, target: &str) {
        self.shared
            .metrics
            .applied_transactions
            .get_or_create(&Metrics::target(self.pipeline, target))
            .inc();
    }
}

/// One pipeline as the restart loop (`supervisor`) runs it.
struct Pipeline {
    config: Arc<Config>,
    name: String,
    shared: Arc<Shared>,
}

impl Pipeline {
    /// Shows (and logs, once per reason) why the pipeline does not stream.
    fn waiting(&self, why: &str) {
        let mut changed = false;
        self.shared.board.pipeline(&self.name, |p| {
            p.state = PipelineState::Waiting;
            changed = p.waiting_for.as_deref() != Some(why);
            p.waiting_for = Some(why.to_string());
        });
        if changed {
            tracing::info!(event = "pipeline_waiting", pipeline = %self.name, "{why}");
        }
    }
}

/// A pipeline's database as the gate reads it: its name in the configuration and where it is.
struct Database {
    name: String,
    conn: ConnInfo,
}

impl Database {
    fn of(config: &Config, name: &str) -> Result<Database, String> {
        Ok(Database {
            name: name.to_string(),
            conn: config.database(name)?.conn.clone(),
        })
    }
}

/// Whether a pipeline may stream now: read on its source (a switchover of it, its slot) and,
/// when it is the way back of another pipeline, on that one's source (a switchover of that
/// one sets this one up, and may tear it down again until it commits). Sessions stay open
/// between reads.
struct Gate {
    pipeline: String,
    source: Database,
    /// The pipeline this one is the way back of, and its source.
    forward: Option<(String, Database)>,
    sessions: Sessions,
}

impl Gate {
    fn new(config: &Config, pipeline: &str) -> Result<Gate, String> {
        let source = Database::of(config, &config.pipeline(pipeline)?.source)?;
        let forward = match switchover::way_back_of(config, pipeline) {
            Some(f) => {
                let db = Database::of(config, &config.pipeline(&f)?.source)?;
                Some((f, db))
            }
            None => None,
        };
        Ok(Gate {
            pipeline: pipeline.to_string(),
            source,
            forward,
            sessions: Sessions::new(),
        })
    }

    /// The stage of a switchover of `pipeline` under way on `db`, if any.
    async fn switchover(
        sessions: &mut Sessions,
        db: &Database,
        pipeline: &str,
    ) -> Result<Option<switchover::Stage>, SyncError> {
        let client = sessions.client(&db.name, &db.conn).await?;
        let stage = switchover::under_way(client, &db.conn, pipeline).await;
        if stage.is_err() {
            sessions.forget(&db.name);
        }
        Ok(stage?)
    }

    /// Why the pipeline must not start streaming now (see the module documentation), or None.
    /// A failure to read is an error, never a go-ahead: streaming in the middle of a
    /// switchover would take its slot.
    async fn before_start(&mut self) -> Result<Option<String>, SyncError> {
        if let Some(why) = self.while_streaming().await? {
            return Ok(Some(why));
        }
        let Some((forward, db)) = &self.forward else {
            // Not part of a switchover pair: a missing slot is the run's failure to report.
            return Ok(None);
        };
        if let Some(stage) = Gate::switchover(&mut self.sessions, db, forward).await? {
            return Ok(Some(format!(
                "a switchover of {forward}, whose way back this is, is under way (stage `{stage}`)"
            )));
        }
        let (p, db) = (&self.pipeline, &self.source);
        let client = self.sessions.client(&db.name, &db.conn).await?;
        let slot_name = names::slot(p);
        let state = slot::state(client, &db.conn, &slot_name).await;
        if state.is_err() {
            self.sessions.forget(&db.name);
        }
        Ok(state?.is_none().then(|| {
            format!(
                "{p} is not set up on its source (no slot {slot_name}); it streams once `invsync sync setup {p}` or a switchover sets it up"
            )
        }))
    }

    /// Why the pipeline must stop streaming now: a switchover of it under way.
    async fn while_streaming(&mut self) -> Result<Option<String>, SyncError> {
        let p = &self.pipeline;
        Ok(Gate::switchover(&mut self.sessions, &self.source, p)
            .await?
            .map(|stage| {
                format!("a switchover of {p} is under way on its source (stage `{stage}`)")
            }))
    }
}

impl Work for Pipeline {
    type Error = SyncError;

    fn set_state(&self, state: PipelineState) {
        self.shared.board.pipeline(&self.name, |p| p.state = state);
    }

    /// Waits while the pipeline is not to stream (see the module documentation), ends the
    /// previous holder's sessions, then streams with the lease's fence, so a batch from an
    /// older term can never commit after this one started, until a switchover of it is
    /// requested (then it yields).
    async fn term(
        &self,
        fence: &Fence,
        lease: &mut watch::Receiver<LeaseStatus>,
        stop: &watch::Receiver<bool>,
    ) -> Term<SyncError> {
        let (config, pipeline) = (&*self.config, self.name.as_str());
        let mut gate = match Gate::new(config, pipeline) {
            Ok(g) => g,
            Err(e) => return Term::Failed(SyncError::Config(e)),
        };
        let watcher = Watcher {
            pipeline,
            shared: &self.shared,
            streaming: AtomicBool::new(false),
        };
        let work = async {
            let mut stop = stop.clone();
            loop {
                let why = match gate.before_start().await {
                    Ok(Some(why)) => why,
                    Ok(None) => break,
                    Err(e) => return Term::Failed(e),
                };
                self.waiting(&why);
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = stop.changed() => return Term::Stopped,
                }
            }
            match lease::take_over_pipeline(config, pipeline).await {
                Ok(_) => {}
                Err(e) if e.is_transient() => {
                    // The sync run below meets the same outage and is retried with backoff.
                    tracing::warn!(pipeline, error = %e, "cannot end the previous holder's sessions")
                }
                Err(e) => return Term::Failed(SyncError::Config(e.to_string())),
            }
            // The run stops on the shutdown, or when a switchover of the pipeline is requested.
            let (end, run_stop) = watch::channel(false);
            let gave_way = AtomicBool::new(false);
            let run = sync::run_observed(config, pipeline, run_stop, Some(fence), &watcher);
            let watch_requests = async {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = stop.changed() => break,
                    }
                    // A failed read is left to the run, which meets the same source.
                    if let Ok(Some(why)) = gate.while_streaming().await {
                        tracing::warn!(
                            event = "pipeline_giving_way",
                            pipeline,
                            "{why}: stopping the stream"
                        );
                        gave_way.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                let _ = end.send(true);
                std::future::pending::<()>().await
            };
            let result = tokio::select! {
                r = run => r,
                _ = watch_requests => unreachable!("pending"),
            };
            match result {
                Ok(()) if gave_way.load(Ordering::Relaxed) => Term::Yielded,
                Ok(()) => Term::Stopped,
                Err(e) => Term::Failed(e),
            }
        };
        let term = tokio::select! {
            t = work => t,
            _ = lease::until_lost(lease) => Term::LeaseLost,
        };
        watcher.streaming(false);
        term
    }

    fn failed(&self, error: &SyncError, backoff: Duration) {
        let retry_at = supervisor::retry_at(backoff);
        self.shared
            .metrics
            .pipeline_restarts
            .get_or_create(&Metrics::pipeline(&self.name))
            .inc();
        self.shared.board.pipeline(&self.name, |p| {
            p.state = PipelineState::Retrying;
            p.restarts += 1;
            p.last_error = Some(error.to_string());
            p.retry_at = Some(retry_at);
        });
        tracing::error!(
            event = "pipeline_failed",
            pipeline = %self.name,
            error = %error,
            retry_in_ms = backoff.as_millis() as u64,
        );
    }

    fn restarting(&self) {
        tracing::info!(event = "pipeline_restarting", pipeline = %self.name);
    }

    fn stopped(&self) {
        tracing::info!(event = "pipeline_stopped", pipeline = %self.name);
    }

    fn stepped_down(&self, fence: &Fence) {
        tracing::warn!(
            event = "pipeline_stepped_down",
            pipeline = %self.name,
            epoch = fence.epoch,
            "the pipeline's lease is no longer held: stopped at once; standing by"
        );
    }
}

/// Runs `pipeline` until `stop`, while this agent holds its lease (`lease`), restarting it
/// after failures.
pub async fn supervise(
    config: Arc<Config>,
    pipeline: String,
    shared: Arc<Shared>,
    lease: watch::Receiver<LeaseStatus>,
    stop: watch::Receiver<bool>,
) {
    let work = Pipeline {
        config,
        name: pipeline,
        shared,
    };
    supervisor::supervise(work, lease, stop).await
}

/// Reads every pipeline's slot and targets each [`POLL`] until `stop`, through sessions kept
/// open from one poll to the next (one per database, made again after a failed read).
pub async fn poll(config: Arc<Config>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut sessions = Sessions::new();
    loop {
        for name in config.pipelines.keys() {
            let read = tokio::select! {
                r = sync::status_in(&config, Some(name), &mut sessions) => r,
                _ = stop.changed() => return,
            };
            match read {
                Ok(all) => {
                    for p in &all {
                        record(&shared, p);
                    }
                }
                Err(e) => {
                    tracing::warn!(pipeline = %name, error = %e, "cannot read the pipeline's status")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
    }
}

fn record(shared: &Shared, p: &sync::PipelineStatus) {
    let m = &shared.metrics;
    let retained = p.slot_state.as_ref().map(|s| s.retained_bytes);
    if let Some(r) = retained {
        m.slot_retained_wal_bytes
            .get_or_create(&Metrics::pipeline(&p.pipeline))
            .set(r);
    }
    for t in &p.targets {
        let labels = Metrics::target(&p.pipeline, &t.target);
        let up = t.error.is_none() && t.state.is_some();
        m.target_up.get_or_create(&labels).set(up.into());
        if let Some(b) = t.lag_bytes {
            m.lag_bytes.get_or_create(&labels).set(b);
        }
        if let Some(s) = t.lag_seconds {
            m.lag_seconds.get_or_create(&labels).set(s);
        }
        m.target_cut_loose
            .get_or_create(&labels)
            .set(t.cut_loose.is_some().into());
        if t.error.is_none() || t.cut_loose.is_some() {
            m.missing_rows.get_or_create(&labels).set(t.missing_rows);
            for phase in TABLE_PHASES {
                let n = t
                    .tables
                    .iter()
                    .filter(|table| table.phase.replace(' ', "_") == phase)
                    .count();
                m.tables
                    .get_or_create(&Metrics::table_phase(&p.pipeline, &t.target, phase))
                    .set(n as i64);
            }
        }
    }
    let applied = |target: &str| {
        m.applied_transactions
            .get_or_create(&Metrics::target(&p.pipeline, target))
            .get()
    };
    shared.board.pipeline(&p.pipeline, |view| {
        view.slot_retained_wal_bytes = retained;
        view.polled = Some(Utc::now());
        for tv in &mut view.targets {
            let Some(t) = p.targets.iter().find(|t| t.target == tv.name) else {
                continue;
            };
            tv.up = t.error.is_none() && t.state.is_some();
            tv.applied_lsn = t.applied_lsn;
            tv.lag_bytes = t.lag_bytes;
            tv.lag_seconds = t.lag_seconds;
            tv.applied_transactions = applied(&t.target);
            tv.error = match (&t.error, &t.state) {
                (Some(e), _) => Some(e.clone()),
                (None, None) => Some("not set up".into()),
                (None, Some(_)) => None,
            };
        }
        if view.state != PipelineState::Streaming {
            if let Some(e) = &p.source_error {
                view.last_error.get_or_insert_with(|| e.clone());
            }
        }
    });
}
