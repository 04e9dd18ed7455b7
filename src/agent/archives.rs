//! The agent's change archives: each `[archives.NAME]` runs `backup::archive::run_observed`
//! (the code of `invsync archive run`) under its lease, restarted with backoff when it fails by
//! the loop pipelines use (`supervisor`); one poller reads each archived database's WAL position for the lag.
//!
//! Invariants:
//! - An archive streams only while this agent holds its lease (`archive/NAME`, in the archived
//!   database or `[agent] lease_db`). A new holder first ends the walsender an old holder may
//!   still stream from the archive's slot ([`archive::take_over`]). When the lease is lost the
//!   run is dropped at once: its open segment is not stored, its slot not confirmed past it, and
//!   the next holder resumes from there.
//! - No epoch fence is needed: a segment a stale holder stores after a newer holder started
//!   only overlaps the newer one's, which readers accept (they drop every transaction whose end
//!   they have read), and only the holder streaming from the slot confirms it.
//! - At shutdown the open segment is stored and the slot confirmed before the run returns.
//!
//! The *recovery point* is the newest instant up to which the archive holds everything the
//! database wrote: the moment the newest stored segment was sealed, or a poll that found the
//! database's WAL position no further than the archive's end. Its age
//! (`invsync_archive_recovery_point_age_seconds`) is what a point-in-time restore would lose
//! now; `invsync_archive_lag_bytes` is the WAL written since the archive's end. Both exist only
//! on the agent running the archive.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::lease::{self, LeaseStatus};
use super::metrics::Metrics;
use super::status::{ArchiveView, PipelineState};
use super::supervisor::{self, Term, Work};
use super::{AgentError, Shared};
use crate::backup::archive::{self, ArchiveObserver, ArchiveOptions, ClosingRule, SegmentManifest};
use crate::backup::repository::Repository;
use crate::backup::session::DatabaseSource;
use crate::backup::BackupError;
use crate::config::Config;
use crate::pg::{Fence, Lsn, Sessions};

/// Turns what a run reports into the metrics and `/status`.
struct Watcher<'a> {
    archive: &'a str,
    shared: &'a Shared,
}

impl ArchiveObserver for Watcher<'_> {
    fn streaming(&self, slot: &str, start: Lsn) {
        let m = &self.shared.metrics.archive;
        m.up.get_or_create(&Metrics::archive(self.archive)).set(1);
        self.shared.board.archive(self.archive, |a| {
            a.state = PipelineState::Streaming;
            a.slot = Some(slot.to_string());
            a.archived_lsn = Some(a.archived_lsn.unwrap_or_default().max(start));
            a.last_error = None;
            a.retry_at = None;
        });
        tracing::info!(event = "archive_streaming", archive = self.archive, slot, start = %start);
    }

    fn stored(&self, segment: &SegmentManifest) {
        let m = &self.shared.metrics.archive;
        let labels = Metrics::archive(self.archive);
        m.segments.get_or_create(&labels).inc();
        m.transactions
            .get_or_create(&labels)
            .inc_by(segment.transactions);
        self.shared.board.archive(self.archive, |a| {
            a.archived_lsn = Some(segment.end);
            a.segments += 1;
            a.recovery_point = a.recovery_point.max(Some(segment.written));
        });
    }
}

/// One archive as the restart loop (`supervisor`) runs it.
struct Archive {
    config: Arc<Config>,
    name: String,
    shared: Arc<Shared>,
}

impl Archive {
    /// The archive's repository and options, as `invsync archive run` builds them.
    fn options(&self) -> Result<(String, ArchiveOptions), AgentError> {
        let (config, name) = (&*self.config, &self.name);
        let a = config
            .archives
            .get(name)
            .ok_or_else(|| AgentError::Config(format!("no archive named `{name}`")))?;
        let source = DatabaseSource::select(config, Some(&a.db), &a.tables, false, 1)?
            .ok_or_else(|| AgentError::Config(format!("archive {name}: no database to archive")))?;
        Ok((
            a.repo.clone(),
            ArchiveOptions {
                label: source.label,
                conn: source.conn,
                tables: source.tables,
                closing: ClosingRule {
                    max_age: a.segment_age,
                    max_bytes: a.segment_bytes,
                },
            },
        ))
    }

    /// Ends an old holder's walsender, then archives until `stop` (the open segment stored).
    async fn run(&self, stop: &watch::Receiver<bool>) -> Result<(), AgentError> {
        let (name, shared) = (self.name.as_str(), &*self.shared);
        let (repo_name, opts) = self.options()?;
        let cfg = self
            .config
            .repository(Some(&repo_name))
            .map_err(AgentError::Config)?;
        let repo = Repository::open(cfg).await?;
        if shared
            .board
            .archive_view(name)
            .and_then(|a| a.recovery_point)
            .is_none()
        {
            // The newest segment stored by anyone, so that the age is right from the start.
            let newest = newest_segment(&repo, &opts).await?;
            shared.board.archive(name, |a| a.recovery_point = newest);
        }
        match archive::take_over(&repo, &opts).await {
            Ok(Some(pid)) => {
                tracing::info!(archive = name, pid, "ended the previous holder's walsender")
            }
            Ok(None) => {}
            // The run below meets the same outage and is retried with backoff.
            Err(e) => {
                tracing::warn!(archive = name, error = %e, "cannot end the previous holder's walsender")
            }
        }
        let watcher = Watcher {
            archive: name,
            shared,
        };
        archive::run_observed(&repo, &opts, &mut stop.clone(), &watcher).await?;
        Ok(())
    }
}

impl Work for Archive {
    type Error = AgentError;

    fn set_state(&self, state: PipelineState) {
        self.shared.board.archive(&self.name, |a| a.state = state);
    }

    async fn term(
        &self,
        _fence: &Fence,
        lease: &mut watch::Receiver<LeaseStatus>,
        stop: &watch::Receiver<bool>,
    ) -> Term<AgentError> {
        let term = tokio::select! {
            r = self.run(stop) => match r {
                Ok(()) => Term::Stopped,
                Err(e) => Term::Failed(e),
            },
            _ = lease::until_lost(lease) => Term::LeaseLost,
        };
        self.shared
            .metrics
            .archive
            .up
            .get_or_create(&Metrics::archive(&self.name))
            .set(0);
        term
    }

    fn failed(&self, error: &AgentError, backoff: Duration) {
        let retry_at = supervisor::retry_at(backoff);
        self.shared
            .metrics
            .archive
            .restarts
            .get_or_create(&Metrics::archive(&self.name))
            .inc();
        self.shared.board.archive(&self.name, |a| {
            a.state = PipelineState::Retrying;
            a.restarts += 1;
            a.last_error = Some(error.to_string());
            a.retry_at = Some(retry_at);
        });
        tracing::error!(
            event = "archive_failed",
            archive = %self.name,
            error = %error,
            retry_in_ms = backoff.as_millis() as u64,
        );
    }

    fn restarting(&self) {
        tracing::info!(event = "archive_restarting", archive = %self.name);
    }

    fn stopped(&self) {
        tracing::info!(event = "archive_stopped", archive = %self.name);
    }

    /// The archive's figures belong to the new holder now.
    fn stepped_down(&self, fence: &Fence) {
        let labels = Metrics::archive(&self.name);
        let m = &self.shared.metrics.archive;
        m.lag_bytes.remove(&labels);
        m.recovery_point_age.remove(&labels);
        self.shared.board.archive(&self.name, |a| {
            a.lag_bytes = None;
            a.recovery_point_age_seconds = None;
        });
        tracing::warn!(
            event = "archive_stepped_down",
            archive = %self.name,
            epoch = fence.epoch,
            "the archive's lease is no longer held: stopped at once; standing by"
        );
    }
}

/// Runs archive `name` until `stop`, while this agent holds its lease, restarting it after
/// failures. A local task: the repository's keys stay on one thread.
pub async fn supervise(
    config: Arc<Config>,
    name: String,
    shared: Arc<Shared>,
    lease: watch::Receiver<LeaseStatus>,
    stop: watch::Receiver<bool>,
) {
    let work = Archive {
        config,
        name,
        shared,
    };
    supervisor::supervise(work, lease, stop).await
}

async fn newest_segment(
    repo: &Repository,
    opts: &ArchiveOptions,
) -> Result<Option<DateTime<Utc>>, BackupError> {
    let db = crate::backup::session::source_label(&opts.label, &opts.conn);
    Ok(archive::list_segments(repo)
        .await?
        .into_iter()
        .filter(|(_, m)| m.db == db)
        .map(|(_, m)| m.written)
        .max())
}

/// Reads each running archive's database WAL position every `every` until `stop`, for the lag
/// and the recovery point's age, through one session per database kept open.
pub async fn poll(
    config: Arc<Config>,
    shared: Arc<Shared>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut sessions = Sessions::new();
    loop {
        for (name, a) in &config.archives {
            let Some(view) = shared.board.archive_view(name) else {
                continue;
            };
            if view.state != PipelineState::Streaming {
                continue;
            }
            let read = async {
                let conn = &config.database(&a.db).map_err(AgentError::Config)?.conn;
                let client = sessions
                    .client(&a.db, conn)
                    .await
                    .map_err(BackupError::from)?;
                let row = client
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .map_err(|e| {
                        BackupError::from(crate::pg::PgError::query(
                            "reading the WAL position",
                            conn,
                            e,
                        ))
                    })?;
                Ok::<Lsn, AgentError>(row.get::<_, String>(0).parse().unwrap_or_default())
            };
            let current = tokio::select! {
                r = read => r,
                _ = stop.changed() => return,
            };
            match current {
                Ok(current) => record(&shared, name, current),
                Err(e) => {
                    sessions.forget(&a.db);
                    tracing::warn!(archive = %name, error = %e, "cannot read the archived database's WAL position")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The lag and recovery point's age of archive `name`, the database being at `current`.
fn record(shared: &Shared, name: &str, current: Lsn) {
    let now = Utc::now();
    let mut figures = None;
    shared.board.archive(name, |a| {
        let Some(end) = a.archived_lsn else { return };
        let lag = current.0.saturating_sub(end.0) as i64;
        if lag == 0 {
            a.recovery_point = Some(now);
        }
        let age = a
            .recovery_point
            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
        a.lag_bytes = Some(lag);
        a.recovery_point_age_seconds = age;
        figures = Some((lag, age));
    });
    let Some((lag, age)) = figures else { return };
    let labels = Metrics::archive(name);
    let m = &shared.metrics.archive;
    m.lag_bytes.get_or_create(&labels).set(lag);
    if let Some(age) = age {
        m.recovery_point_age.get_or_create(&labels).set(age);
    }
}

/// The `/status` entry of each configured archive.
pub fn views(config: &Config) -> Vec<ArchiveView> {
    config
        .archives
        .values()
        .map(|a| ArchiveView {
            name: a.name.clone(),
            db: a.db.clone(),
            repo: a.repo.clone(),
            state: PipelineState::Starting,
            restarts: 0,
            last_error: None,
            retry_at: None,
            slot: None,
            archived_lsn: None,
            segments: 0,
            lag_bytes: None,
            recovery_point: None,
            recovery_point_age_seconds: None,
        })
        .collect()
}
