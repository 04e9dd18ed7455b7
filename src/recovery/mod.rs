//! recovery: what combines sync, verify and backup to move or bring back a primary:
//! [`switchover`] (a pipeline's direction turned around with nothing lost).

pub mod switchover;

use crate::cdc::CdcError;
use crate::pg::PgError;
use crate::sync::SyncError;
use crate::verify::VerifyError;

/// Everything that can stop a recovery command. One line each, naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Cdc(#[from] CdcError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
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
