//! recovery: what combines the areas. Point-in-time restore ([`point_in_time`]) restores a
//! snapshot (backup) and replays the change archive through sync's apply engine.
//!
//! Invariant: every check that can refuse a request (its input, the recoverable window, the
//! archive's origin) runs before anything is written to the target database.

pub mod point_in_time;

use crate::backup::BackupError;
use crate::pg::PgError;
use crate::sync::SyncError;

/// Everything that can stop a recovery command. One line each, naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Pg(#[from] PgError),
    /// Bad input (a target that does not parse, an unknown database).
    #[error("{0}")]
    Invalid(String),
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
}
