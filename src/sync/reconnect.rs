//! When a running pipeline starts its stream again after a session ended.
//!
//! A session that ended on its own (the configuration lists other targets, a target's copy
//! began or finished, a change waited for a table's copy) starts again at once. One that
//! failed with a transient error waits a backoff that doubles up to 30 s (back to 0.5 s after a
//! session that ran a minute). A slot still held by another walsender (one of ours that has
//! not let go yet, or a process that just died) is looked at again every 250 ms, and reported
//! as in use once it has been held [`SLOT_BUSY_GRACE`] in a row: each such wait is counted on
//! its own, so a pipeline that restarts often is never stopped by the waits of earlier
//! restarts.

use std::time::{Duration, Instant};

/// How long the slot may stay held by another walsender before `run` reports it as in use.
const SLOT_BUSY_GRACE: Duration = Duration::from_secs(5);
const SLOT_BUSY_POLL: Duration = Duration::from_millis(250);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A session that ran this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What to do before the next session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    After(Duration),
    /// The slot stayed in use past the grace: report it.
    GiveUp,
}

/// The state carried from one session's end to the next start.
#[derive(Debug)]
pub(super) struct Reconnect {
    backoff: Duration,
    busy_since: Option<Instant>,
}

impl Reconnect {
    pub(super) fn new() -> Reconnect {
        Reconnect {
            backoff: FIRST_BACKOFF,
            busy_since: None,
        }
    }

    /// The session ended on its own, holding the slot until then.
    pub(super) fn ended(&mut self) {
        self.backoff = FIRST_BACKOFF;
        self.busy_since = None;
    }

    /// The slot was held by another walsender when the session started, at `now`.
    pub(super) fn slot_busy(&mut self, now: Instant) -> Next {
        let since = *self.busy_since.get_or_insert(now);
        if now.duration_since(since) > SLOT_BUSY_GRACE {
            Next::GiveUp
        } else {
            Next::After(SLOT_BUSY_POLL)
        }
    }

    /// The session failed with a transient error after running `ran`.
    pub(super) fn failed(&mut self, ran: Duration) -> Next {
        self.busy_since = None;
        if ran > HEALTHY_RUN {
            self.backoff = FIRST_BACKOFF;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Next::After(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wait_for_a_busy_slot_gets_its_own_grace() {
        let mut r = Reconnect::new();
        let t0 = Instant::now();
        assert_eq!(r.slot_busy(t0), Next::After(SLOT_BUSY_POLL));
        assert_eq!(
            r.slot_busy(t0 + Duration::from_secs(1)),
            Next::After(SLOT_BUSY_POLL)
        );
        // The session then ran, and ended to take a new target in: the slot it let go of is
        // a moment later still held by its walsender.
        r.ended();
        let later = t0 + Duration::from_secs(20);
        assert_eq!(r.slot_busy(later), Next::After(SLOT_BUSY_POLL));
        assert_eq!(
            r.slot_busy(later + Duration::from_secs(3)),
            Next::After(SLOT_BUSY_POLL)
        );
        assert_eq!(
            r.slot_busy(later + SLOT_BUSY_GRACE + Duration::from_millis(1)),
            Next::GiveUp
        );
    }

    #[test]
    fn failures_back_off_doubling_and_a_long_run_or_an_own_end_resets_it() {
        let mut r = Reconnect::new();
        let short = Duration::from_secs(1);
        let waits: Vec<Next> = (0..8).map(|_| r.failed(short)).collect();
        let ms = |n| Next::After(Duration::from_millis(n));
        assert_eq!(
            waits,
            [
                ms(500),
                ms(1_000),
                ms(2_000),
                ms(4_000),
                ms(8_000),
                ms(16_000),
                ms(30_000),
                ms(30_000)
            ]
        );
        assert_eq!(r.failed(Duration::from_secs(61)), ms(500));
        r.failed(short);
        r.ended();
        assert_eq!(r.failed(short), ms(500));
    }
}
