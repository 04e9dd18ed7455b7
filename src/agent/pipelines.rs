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
use crate::config::Config;
use crate::pg::{Fence, Sessions};
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

impl Work for Pipeline {
    type Error = SyncError;

    fn set_state(&self, state: PipelineState) {
        self.shared.board.pipeline(&self.name, |p| p.state = state);
    }

    /// Ends the previous holder's sessions, then streams with the lease's fence, so a batch
    /// from an older term can never commit after this one started.
    async fn term(
        &self,
        fence: &Fence,
        lease: &mut watch::Receiver<LeaseStatus>,
        stop: &watch::Receiver<bool>,
    ) -> Term<SyncError> {
        let (config, pipeline) = (&*self.config, self.name.as_str());
        let watcher = Watcher {
            pipeline,
            shared: &self.shared,
            streaming: AtomicBool::new(false),
        };
        let work = async {
            match lease::take_over_pipeline(config, pipeline).await {
                Ok(_) => {}
                Err(e) if e.is_transient() => {
                    // The sync run below meets the same outage and is retried with backoff.
                    tracing::warn!(pipeline, error = %e, "cannot end the previous holder's sessions")
                }
                Err(e) => return Term::Failed(SyncError::Config(e.to_string())),
            }
            match sync::run_observed(config, pipeline, stop.clone(), Some(fence), &watcher).await {
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
