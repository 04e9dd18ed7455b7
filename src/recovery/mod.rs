//! recovery: what combines the areas to move or bring back a primary. Point-in-time restore
//! ([`point_in_time`]) restores a snapshot (backup) and replays the change archive through
//! sync's apply engine; [`switchover`] turns a pipeline's direction around with nothing lost
//! (sync, with verify's proof).
//!
//! Invariant: every check that can refuse a request (its input, the recoverable window, the
//! archive's origin, the reverse pipeline) runs before anything is written.

pub mod drill;
pub mod point_in_time;
pub mod switchover;

use crate::backup::BackupError;
use crate::cdc::CdcError;
use crate::pg::PgError;
use crate::sync::SyncError;
use crate::verify::VerifyError;

/// Everything that can stop a recovery command. One line each, naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Bad input (a target that does not parse, an unknown database or pipeline, a pipeline
    /// that cannot be switched over as configured).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Cdc(#[from] CdcError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("repository {repo} holds no change archive{of}; run `invsync archive run DB` beside the backups, or restore a snapshot without --until")]
    NoArchive { repo: String, of: String },
    #[error("{target} is outside the recoverable window of {db}: {windows}; nothing was restored")]
    OutsideWindow {
        target: String,
        db: String,
        /// Every window, `from .. to` with LSNs and times.
        windows: String,
    },
    #[error("replaying the change archive into {target} after restoring snapshot {snapshot}: {source}; the database holds the snapshot and only part of the archive: fix the cause and restore again with --replace")]
    Replay {
        target: String,
        snapshot: String,
        #[source]
        source: Box<SyncError>,
    },
    #[error("the change archive of {db} comes from database system {archive}, but snapshot {snapshot} from system {snapshot_system}: they are different databases (a server rebuilt at the same address?); archive the database the snapshots come from, nothing was restored")]
    ForeignArchive {
        db: String,
        archive: String,
        snapshot: String,
        snapshot_system: String,
    },
    /// A step failed before the switchover's commit point; everything it changed is undone.
    #[error("switchover of {pipeline} rolled back at step `{step}`: {reason}; {primary} is the primary again and its application roles may write; fix the cause and run `invsync sync switchover {pipeline}` again (start `invsync sync run {pipeline}` meanwhile)")]
    RolledBack {
        pipeline: String,
        step: &'static str,
        reason: String,
        primary: String,
    },
    /// A step failed and so did undoing it; the durable record keeps what is left to undo.
    #[error("switchover of {pipeline} failed at step `{step}`: {reason}; undoing it failed too: {rollback}; once the cause is fixed run `invsync sync switchover {pipeline} --rollback` (or without --rollback to finish it)")]
    RollbackFailed {
        pipeline: String,
        step: &'static str,
        reason: String,
        rollback: String,
    },
}
