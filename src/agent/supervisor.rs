//! The restart loop that pipelines and change archives share: long-running work that runs only
//! while this agent holds its lease, is dropped at once when the lease is lost (before the lease
//! can have expired: the keeper's renew deadline is shorter than the lease), and is restarted
//! with capped exponential backoff when it fails, until the shutdown.
//!
//! What reaches the loop is a failure a person may have to fix (a schema drift, a missing slot,
//! an unreachable repository); it is retried anyway, since the person may fix it while the agent
//! runs, and it is shown in the log, `/status` and the work's restart counter meanwhile.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;

use super::lease::{self, LeaseStatus};
use super::status::PipelineState;
use crate::pg::Fence;

/// The first wait before restarting failed work; it doubles with each failure...
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// ...up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Work that ran this long before failing starts its backoff over.
pub const HEALTHY_RUN: Duration = Duration::from_secs(120);

/// How one term of work under its lease ended.
pub enum Term<E> {
    /// The shutdown: the work stored or committed what it had and stopped.
    Stopped,
    /// The lease was lost (or its keeper ended): the work was dropped at once.
    LeaseLost,
    /// The work gave way on purpose (it stored or committed what it had): it starts its next
    /// term at once, without backoff, and waits there for its turn.
    Yielded,
    Failed(E),
}

/// Long-running work the loop restarts: what it runs in one term, and how it shows and logs
/// what happens to it (each kind with its own event and field names).
pub trait Work {
    type Error: std::fmt::Display;

    /// Shows `state` in `/status` (and the metrics that follow it).
    fn set_state(&self, state: PipelineState);

    /// Runs one term under `fence`: ends what an earlier holder may have left open, then works
    /// until `stop` (a clean stop), a failure, or the loss of the lease (`lease`), on which it
    /// returns at once without waiting for what it was writing.
    fn term(
        &self,
        fence: &Fence,
        lease: &mut watch::Receiver<LeaseStatus>,
        stop: &watch::Receiver<bool>,
    ) -> impl Future<Output = Term<Self::Error>>;

    /// Counts, shows and logs a failed term; it restarts after `backoff`.
    fn failed(&self, error: &Self::Error, backoff: Duration);

    /// Logs the restart after a failure.
    fn restarting(&self);

    /// Logs the clean stop at the shutdown.
    fn stopped(&self);

    /// The lease of the term run under `fence` is gone: logs it, drops what only the holder
    /// shows.
    fn stepped_down(&self, fence: &Fence);
}

/// Runs `work` until `stop`, while this agent holds its lease (`lease`), restarting it after
/// failures.
pub async fn supervise<W: Work>(
    work: W,
    mut lease: watch::Receiver<LeaseStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        work.set_state(PipelineState::Standby);
        let fence = tokio::select! {
            f = lease::until_held(&mut lease) => f,
            _ = stop.changed() => None,
        };
        let Some(fence) = fence else {
            work.set_state(PipelineState::Stopped);
            return;
        };
        work.set_state(PipelineState::Starting);
        let started = Instant::now();
        let error = match work.term(&fence, &mut lease, &stop).await {
            Term::Stopped => {
                work.set_state(PipelineState::Stopped);
                work.stopped();
                return;
            }
            Term::LeaseLost => {
                work.stepped_down(&fence);
                continue;
            }
            Term::Yielded => continue,
            Term::Failed(e) => e,
        };
        if started.elapsed() > HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        work.failed(&error, backoff);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = lease::until_lost(&mut lease) => {
                work.stepped_down(&fence);
                continue;
            }
            _ = stop.changed() => {
                work.set_state(PipelineState::Stopped);
                return;
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        work.restarting();
    }
}

/// When work failing now with `backoff` restarts.
pub fn retry_at(backoff: Duration) -> chrono::DateTime<Utc> {
    Utc::now() + backoff
}
