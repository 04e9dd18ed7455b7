//! The running side of a schedule: one task per `[[schedules]]` entry drives the pure
//! [`ScheduleState`] with the real clock, starts its job, and records what happened in the
//! log, the metrics, `/status` and the state file.
//!
//! - The job runs inside the schedule's task (no task of its own), so the schedule keeps
//!   ticking while it runs: a run falling due meanwhile is skipped as an overlap.
//! - A failed run is tried again after a backoff (doubling from [`FIRST_RETRY`] up to
//!   [`MAX_RETRY`]) unless the next run falls due first; a retry is a run like any other for
//!   the metrics, and the peak calendar is asked again before it starts.
//! - A run starts only while this agent holds the schedule's lease; on a standby the run is
//!   skipped (counted with reason `standby`), as the holder runs it. A running job is dropped
//!   as soon as the lease is lost; the fence it carries refuses what it might still write.
//!   At start the first tick waits (up to `renew_deadline`) until the lease's holder is known,
//!   so a missed run due at start is not skipped only because the keeper has not asked yet.
//! - At shutdown a running job is given the rest of `[agent] shutdown_timeout` (less
//!   [`RELEASE_RESERVE`], kept for releasing the leases) to finish, and its result is recorded
//!   as any other; one still running then is abandoned (dropped): every job is safe to stop at
//!   any point (a backup's snapshot is written last, a prune's deletions are of unreferenced
//!   data), and its next run starts over.
//! - A run deferred by a blackout window is kept in the state file with the schedule's
//!   `handled_until`, so an agent restarted inside the window still runs it when it closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::calendar::Calendar;
use super::jobs::{self, JobReport};
use super::lease::{self, LeaseStatus};
use super::metrics::{BackupLabels, Metrics, RunLabels, SkipLabels};
use super::schedule::{self, Decision, Event, ScheduleState, SkipReason};
use super::state::StateStore;
use super::status::{Deferral, RunRecord, RunResult};
use super::{AgentError, Shared};
use crate::config::{Config, ScheduleConfig};
use crate::pg::Fence;

/// The first wait before trying a failed job again; it doubles with each failure...
pub const FIRST_RETRY: Duration = Duration::from_secs(2);
/// ...up to this.
pub const MAX_RETRY: Duration = Duration::from_secs(300);
/// The part of the shutdown bound a running job does not get: the leases are released after
/// the work stopped, within the same bound.
pub const RELEASE_RESERVE: Duration = Duration::from_secs(2);

/// A running job. Not `Send`: the repository's keys and verify's callbacks live on one
/// thread, so schedules run as local tasks (see `agent::run`).
type Running = Pin<Box<dyn Future<Output = Result<JobReport, AgentError>>>>;

/// One schedule's task.
pub struct Scheduler {
    config: Arc<Config>,
    calendar: Arc<Calendar>,
    shared: Arc<Shared>,
    store: Arc<StateStore>,
    state: ScheduleState,
    /// After a failure: when to try again, and the wait after the next failure.
    retry: Option<DateTime<Utc>>,
    backoff: Duration,
    failures: u32,
    /// The windows that deferred the waiting run.
    deferred_by: Vec<String>,
}

impl Scheduler {
    /// The schedule's state when the agent starts now, from what the state file recorded.
    pub fn new(
        schedule: ScheduleConfig,
        config: Arc<Config>,
        calendar: Arc<Calendar>,
        shared: Arc<Shared>,
        store: Arc<StateStore>,
    ) -> Scheduler {
        let record = store.get(&schedule.name);
        if let Some(run) = &record.last_run {
            shared.board.schedule(&schedule.name, |v| {
                v.last_run = Some(run.clone());
                v.last_success = record.last_success;
            });
        }
        if let Some(t) = record.last_success {
            shared
                .metrics
                .job_last_success
                .get_or_create(&Metrics::schedule(&schedule.name))
                .set(t.timestamp_millis() as f64 / 1000.0);
        }
        let state = ScheduleState::resume(schedule, record.handled_until, Utc::now())
            .with_deferred(record.deferred);
        Scheduler {
            config,
            calendar,
            shared,
            store,
            state,
            retry: None,
            backoff: FIRST_RETRY,
            failures: 0,
            deferred_by: record.deferred_by,
        }
    }

    fn name(&self) -> &str {
        &self.state.schedule().name
    }

    /// Runs the schedule until `stop`, starting its job only while this agent holds the
    /// schedule's lease (`lease`).
    pub async fn run(
        mut self,
        mut lease: watch::Receiver<LeaseStatus>,
        mut stop: watch::Receiver<bool>,
    ) {
        // The first tick may start a missed run: first learn who holds the lease (this agent
        // or another), unless its database does not answer within the renew deadline.
        let known = lease.wait_for(|s| s.known);
        let bound = self.config.agent.lease.renew_deadline;
        tokio::select! {
            _ = tokio::time::timeout(bound, known) => {}
            _ = stop.changed() => return,
        }
        let mut job: Option<(Running, DateTime<Utc>)> = None;
        loop {
            let now = Utc::now();
            for event in self.state.tick(now, &self.calendar) {
                if let Event::Start { due, catch_up } = event {
                    let Some(fence) = lease.borrow().fence() else {
                        self.state.finished();
                        self.standby(due);
                        continue;
                    };
                    tracing::info!(
                        event = "job_started",
                        schedule = self.name(),
                        job = self.state.schedule().job.kind(),
                        due = %due,
                        catch_up,
                    );
                    self.retry = None;
                    job = Some((self.start(now, fence), now));
                } else {
                    self.note(event);
                }
            }
            if job.is_none() && self.retry.is_some_and(|t| t <= now) {
                self.retry = None;
                let fence = lease.borrow().fence();
                match (
                    schedule::decide(self.state.schedule(), &self.calendar, now),
                    fence,
                ) {
                    (Decision::Run | Decision::RunInWindow { .. }, Some(fence)) => {
                        tracing::info!(
                            event = "job_started",
                            schedule = self.name(),
                            job = self.state.schedule().job.kind(),
                            retry = self.failures,
                        );
                        self.state.start_retry(now);
                        job = Some((self.start(now, fence), now));
                    }
                    (_, None) => tracing::info!(
                        event = "job_retry_dropped",
                        schedule = self.name(),
                        "another agent holds the schedule's lease; it runs the job"
                    ),
                    _ => tracing::info!(
                        event = "job_retry_dropped",
                        schedule = self.name(),
                        "a blackout window is open; the next run tries again"
                    ),
                }
            }
            self.record_handled();
            self.show(now);
            let wake = [self.state.next_wake(), self.retry]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                _ = stop.changed() => {
                    if let Some((running, started)) = job.take() {
                        self.finish_at_shutdown(running, started, &mut lease).await;
                    }
                    return;
                }
                _ = lease::until_lost(&mut lease), if job.is_some() => {
                    job = None;
                    self.state.finished();
                    self.set_running(false);
                    tracing::warn!(
                        event = "job_abandoned",
                        schedule = self.name(),
                        "the schedule's lease is no longer held: the running job is stopped; its fence refuses what it might still write"
                    );
                }
                result = finish(&mut job), if job.is_some() => {
                    let started = job.take().map(|(_, s)| s).unwrap_or(now);
                    self.finished(started, result);
                }
                _ = sleep_until(wake) => {}
            }
        }
    }

    /// Lets the job running at shutdown finish within the bound (see the module
    /// documentation), recording its result; abandons it after, or when the lease is lost.
    async fn finish_at_shutdown(
        &mut self,
        running: Running,
        started: DateTime<Utc>,
        lease: &mut watch::Receiver<LeaseStatus>,
    ) {
        let bound = self
            .config
            .agent
            .shutdown_timeout
            .saturating_sub(RELEASE_RESERVE);
        tracing::info!(
            event = "job_finishing",
            schedule = self.name(),
            bound_s = bound.as_secs_f64(),
            "shutting down: the running job may finish within the shutdown bound"
        );
        let why = tokio::select! {
            result = running => {
                self.finished(started, result);
                return;
            }
            _ = lease::until_lost(lease) => "the schedule's lease is no longer held",
            _ = tokio::time::sleep(bound) => "the job did not finish within the shutdown bound",
        };
        self.state.finished();
        self.set_running(false);
        tracing::warn!(
            event = "job_abandoned",
            schedule = self.name(),
            reason = why,
            "shutting down: the running job is stopped; its next run starts over"
        );
    }

    /// Counts a run not started because another agent holds the schedule's lease.
    fn standby(&self, due: DateTime<Utc>) {
        self.shared
            .metrics
            .job_skipped
            .get_or_create(&SkipLabels {
                schedule: self.name().to_string(),
                reason: "standby".to_string(),
            })
            .inc();
        tracing::info!(
            event = "job_skipped",
            schedule = self.name(),
            due = %due,
            reason = "standby",
            count = 1,
            detail = "another agent holds the schedule's lease",
        );
    }

    fn start(&self, now: DateTime<Utc>, fence: Fence) -> Running {
        self.set_running(true);
        self.shared
            .metrics
            .job_last_start
            .get_or_create(&Metrics::schedule(self.name()))
            .set(now.timestamp_millis() as f64 / 1000.0);
        let config = self.config.clone();
        let job = self.state.schedule().job.clone();
        // Epoch 0: a lease with nowhere to live (see `leases`), nothing to fence.
        let fence = (fence.epoch > 0).then_some(fence);
        Box::pin(async move { jobs::run(&config, &job, fence.as_ref()).await })
    }

    fn set_running(&self, running: bool) {
        self.shared
            .metrics
            .job_running
            .get_or_create(&Metrics::schedule(self.name()))
            .set(running.into());
    }

    /// Records a run that ended at `now`.
    fn finished(&mut self, started: DateTime<Utc>, result: Result<JobReport, AgentError>) {
        let now = Utc::now();
        self.state.finished();
        self.set_running(false);
        let m = &self.shared.metrics;
        let labels = Metrics::schedule(self.name());
        let kind = self.state.schedule().job.kind();
        let duration = (now - started).num_milliseconds().max(0) as f64 / 1000.0;
        m.job_last_duration.get_or_create(&labels).set(duration);
        let (error, report) = match result {
            Ok(report) => {
                self.account(&report);
                (report.problem(), serde_json::to_value(&report).ok())
            }
            Err(e) => (Some(e.to_string()), None),
        };
        let result = if error.is_none() {
            RunResult::Success
        } else {
            RunResult::Failure
        };
        m.job_runs
            .get_or_create(&RunLabels {
                schedule: self.name().to_string(),
                job: kind.to_string(),
                result: result.label().to_string(),
            })
            .inc();
        match &error {
            None => {
                m.job_last_success
                    .get_or_create(&labels)
                    .set(now.timestamp_millis() as f64 / 1000.0);
                tracing::info!(
                    event = "job_finished",
                    schedule = self.name(),
                    job = kind,
                    result = "success",
                    duration_s = duration,
                );
                self.failures = 0;
                self.backoff = FIRST_RETRY;
                self.retry = None;
            }
            Some(e) => {
                self.failures += 1;
                let retry_at = now + self.backoff;
                let next_due = schedule::runs_after(self.state.schedule(), now).next();
                self.retry = (next_due.is_none_or(|n| retry_at < n)).then_some(retry_at);
                tracing::error!(
                    event = "job_finished",
                    schedule = self.name(),
                    job = kind,
                    result = "failure",
                    duration_s = duration,
                    error = %e,
                    failures = self.failures,
                    retry_at = self.retry.map(|t| t.to_rfc3339()),
                );
                self.backoff = (self.backoff * 2).min(MAX_RETRY);
            }
        }
        let record = RunRecord {
            started,
            finished: now,
            result,
            error,
            report,
        };
        let success = (result == RunResult::Success).then_some(now);
        let failures = self.failures;
        let retry = self.retry;
        self.shared.board.schedule(self.name(), |v| {
            v.last_run = Some(record.clone());
            if success.is_some() {
                v.last_success = success;
            }
            v.consecutive_failures = failures;
            v.retry_at = retry;
        });
        let saved = RunRecord {
            report: None,
            ..record
        };
        if let Err(e) = self.store.update(self.name(), |r| {
            r.last_run = Some(saved);
            if success.is_some() {
                r.last_success = success;
            }
        }) {
            tracing::error!(event = "state_not_saved", schedule = self.name(), error = %e);
        }
    }

    /// The job's own figures: bytes of a backup, differences of a verify.
    fn account(&self, report: &JobReport) {
        let m = &self.shared.metrics;
        let labels = Metrics::schedule(self.name());
        match report {
            JobReport::Backup { repo, db, summary } => {
                m.job_read_bytes
                    .get_or_create(&labels)
                    .inc_by(summary.stats.bytes_read);
                m.job_stored_bytes
                    .get_or_create(&labels)
                    .inc_by(summary.stats.bytes_stored);
                if let Some(db) = db {
                    m.backup_last_success
                        .get_or_create(&BackupLabels {
                            repo: repo.clone(),
                            db: db.clone(),
                        })
                        .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                }
            }
            JobReport::VerifyDb(r) => {
                m.verify_differences
                    .get_or_create(&labels)
                    .set(r.differences() as i64);
            }
            _ => {}
        }
    }

    /// Logs and counts a deferral or a skip.
    fn note(&mut self, event: Event) {
        let m = &self.shared.metrics;
        let name = self.name().to_string();
        let skipped = |reason: &str, n: u64| {
            m.job_skipped
                .get_or_create(&SkipLabels {
                    schedule: name.clone(),
                    reason: reason.to_string(),
                })
                .inc_by(n);
        };
        match event {
            Event::Start { .. } => {}
            Event::Deferred {
                due,
                until,
                windows,
            } => {
                m.job_deferred
                    .get_or_create(&Metrics::schedule(&name))
                    .inc();
                tracing::info!(
                    event = "job_deferred",
                    schedule = %name,
                    due = %due,
                    until = %until,
                    windows = %windows.join(","),
                );
                self.deferred_by = windows;
            }
            Event::Skipped { due, reason } => {
                let (label, n, detail) = match &reason {
                    SkipReason::Overlap => ("overlap", 1, "the job was still running".to_string()),
                    SkipReason::Blackout { windows } => {
                        ("blackout", 1, format!("blackout {}", windows.join(",")))
                    }
                    SkipReason::AlreadyDeferred => {
                        ("blackout", 1, "a deferred run waits already".to_string())
                    }
                    SkipReason::Missed { count } => {
                        ("missed", *count, format!("{count} run(s) missed"))
                    }
                };
                skipped(label, n);
                tracing::info!(
                    event = "job_skipped",
                    schedule = %name,
                    due = %due,
                    reason = label,
                    count = n,
                    detail = %detail,
                );
            }
        }
    }

    /// Writes `handled_until` and the deferred run when they changed.
    fn record_handled(&self) {
        let handled = self.state.handled_until();
        let deferred = self.state.deferred();
        let name = self.name();
        let recorded = self.store.get(name);
        if recorded.handled_until == Some(handled) && recorded.deferred == deferred {
            return;
        }
        let windows = deferred
            .map(|_| self.deferred_by.clone())
            .unwrap_or_default();
        if let Err(e) = self.store.update(name, |r| {
            r.handled_until = Some(handled);
            r.deferred = deferred;
            r.deferred_by = windows;
        }) {
            tracing::error!(event = "state_not_saved", schedule = name, error = %e);
        }
    }

    /// Copies the schedule's state into `/status`.
    fn show(&self, now: DateTime<Utc>) {
        let s = self.state.schedule();
        let next_run = schedule::runs_after(s, now).next();
        let deferred = self.state.deferred().map(|d| Deferral {
            due: d.due,
            until: d.until,
            windows: self.deferred_by.clone(),
        });
        let counters = self.state.counters().clone();
        let running_since = self.state.running_since();
        let retry = self.retry;
        self.shared.board.schedule(&s.name, |v| {
            v.next_run = next_run;
            v.deferred = deferred;
            v.counters = counters;
            v.running_since = running_since;
            v.retry_at = retry;
        });
    }
}

/// Keeps `invsync_blackout_active` and the status's open windows current until `stop`.
pub async fn watch_windows(
    calendar: Arc<Calendar>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let now = Utc::now();
        let open = calendar.open_at(now);
        let mut active: Vec<String> = open.iter().map(|o| o.window.clone()).collect();
        active.sort();
        active.dedup();
        for w in calendar.windows() {
            shared
                .metrics
                .blackout_active
                .get_or_create(&super::metrics::WindowLabels {
                    window: w.name.clone(),
                })
                .set(active.contains(&w.name).into());
        }
        shared.board.set_windows_active(active);
        // Windows open and close on whole minutes: a second's delay at most.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The running job's result; never, when none runs.
async fn finish(job: &mut Option<(Running, DateTime<Utc>)>) -> Result<JobReport, AgentError> {
    match job {
        Some((running, _)) => running.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<DateTime<Utc>>) {
    match at {
        Some(at) => {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            // Wakes no earlier than `at`: the schedule treats a run as due once now >= it.
            tokio::time::sleep(wait + Duration::from_millis(5)).await
        }
        None => std::future::pending().await,
    }
}
