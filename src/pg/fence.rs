//! A fencing token: the epoch of the lease under which a writer works.
//!
//! An agent runs a pipeline or a job only while it holds that work's lease (kept by the agent,
//! above every area that checks a fence); each change of holder raises the lease's epoch. The places where a
//! write becomes durable (a pipeline batch's commit on a target, a snapshot's manifest in a
//! repository) remember the highest epoch that has written there and refuse a lower one, so a
//! holder that was paused or cut off, and wakes after a newer holder started, cannot write.
//!
//! The fence lives here, below sync and backup, because both check it; what a fence is checked
//! against is theirs to keep (`invsync.pipeline.fence_epoch` on a target, `fences/` in a
//! repository). Work started without a fence (the command line) is not checked and does not
//! raise the recorded epoch.

use std::fmt;

/// The lease a writer holds and the epoch it holds it with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The lease's name, e.g. `pipeline/orders` or `schedule/nightly-backup`.
    pub lease: String,
    /// The lease's epoch when this writer acquired it; higher is newer.
    pub epoch: i64,
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lease {} epoch {}", self.lease, self.epoch)
    }
}
