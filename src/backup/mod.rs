//! Backups: encrypted, compressed, deduplicated snapshots of table data and configuration
//! trees in object storage.
//!
//! The repository format is described in [`repository`]. A backup ([`session`]) cuts table
//! data ([`dump`]) and configuration trees ([`tree`]) into content-defined chunks
//! ([`chunker`]), stores each new chunk once as an encrypted blob inside a pack ([`pack`]),
//! records where blobs live in index objects ([`index`]) and writes the snapshot manifest
//! ([`snapshot`]) last, so a snapshot is visible only once everything it references exists.
//! [`restore`] reads them back; [`retention`] forgets snapshots and [`prune`] removes data no
//! snapshot references, coordinating with running backups and readers (restores, checks)
//! through [`lock`]; [`archive`] stores a database's change stream as segments that chain
//! onto its snapshots; [`check`] proves a repository whole (`invsync verify repo`). A backup run
//! under an agent's lease publishes nothing once a newer holder started ([`fence`]).

pub mod archive;
pub mod check;
pub mod chunker;
pub mod crypto;
pub mod dump;
pub mod fence;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod lock;
pub mod pack;
pub mod prune;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod segment;
pub mod session;
pub mod snapshot;
pub mod store;
pub mod tree;

use crate::pg::PgError;

/// Everything that can go wrong in the backup area. Each message names the object or
/// repository and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("repository {repo}: {message}")]
    Store { repo: String, message: String },
    #[error("repository {repo} already exists; choose another URL or use the existing one")]
    Exists { repo: String },
    #[error("repository {repo} is not initialised (no `config` object); run `invsync repo init`")]
    NotInitialised { repo: String },
    #[error("repository {repo}: {message}")]
    Key { repo: String, message: String },
    #[error("repository {repo}: {action} needs to read the repository, but this host is configured as write-only (recipients only); set identity_file or passphrase")]
    WriteOnly { repo: String, action: String },
    #[error("object {object} is damaged: {reason}; run `invsync verify repo`")]
    Corrupt { object: String, reason: String },
    /// The store failed or refused a request (after its own retries): weather or access,
    /// never damage. The object_store error, with its kind, is the source.
    #[error("repository {repo}: could not {action}; check the store's endpoint, the network and the credentials, then try again")]
    Unreachable {
        repo: String,
        action: String,
        #[source]
        source: object_store::Error,
    },
    /// An object located when the job started was gone when it was read: removed while the
    /// job ran, not damaged in place.
    #[error("object {object} was there when this job started and is gone now (removed while it ran, e.g. by a prune of an older invsync or by hand); run the job again, and `invsync verify repo` if it stays missing")]
    Vanished { object: String },
    /// The job was stopped by a signal; what it had written was discarded.
    #[error("{0}")]
    Interrupted(String),
    #[error(transparent)]
    Db(#[from] PgError),
    /// The source's change stream (archive).
    #[error(transparent)]
    Stream(#[from] crate::cdc::CdcError),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("repository {repo}: {message}")]
    Locked { repo: String, message: String },
    #[error("repository {repo}: fenced: this backup runs under lease {lease} with epoch {epoch}, but epoch {newer} has started since (another agent runs this job now); no snapshot was written")]
    Fenced {
        repo: String,
        lease: String,
        epoch: i64,
        newer: i64,
    },
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error("{0}")]
    Invalid(String),
}

impl BackupError {
    pub(crate) fn io(path: impl std::fmt::Display, e: std::io::Error) -> Self {
        BackupError::Io {
            path: path.to_string(),
            message: e.to_string(),
        }
    }

    /// True when trying again later may help (a store or database that was unreachable, a
    /// lock held by a running job); false for damage and misconfiguration.
    pub fn is_transient(&self) -> bool {
        match self {
            BackupError::Store { .. } | BackupError::Locked { .. } => true,
            BackupError::Unreachable { source, .. } => !matches!(
                source,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
            ),
            BackupError::Vanished { .. } => true,
            BackupError::Db(e) => e.is_transient(),
            BackupError::Stream(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Crash-test hook: when the environment variable `INVSYNC_FAILPOINT` equals `name`, the
/// process aborts here, as a power cut or `kill -9` would. Tests use it to prove that an
/// interrupted backup or prune leaves a valid repository; it costs one env lookup per call.
pub(crate) fn failpoint(name: &str) {
    if std::env::var_os("INVSYNC_FAILPOINT").is_some_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::BackupError;

    fn unreachable(source: object_store::Error) -> BackupError {
        BackupError::Unreachable {
            repo: "r".into(),
            action: "read data/ab/cd".into(),
            source,
        }
    }

    #[test]
    fn a_denied_request_is_not_worth_retrying_a_failed_one_is() {
        let denied = unreachable(object_store::Error::PermissionDenied {
            path: "data/ab/cd".into(),
            source: "403 Forbidden".into(),
        });
        assert!(!denied.is_transient());
        let failed = unreachable(object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        });
        assert!(failed.is_transient());
        assert!(
            failed.to_string().contains("could not read data/ab/cd")
                && !failed.to_string().contains("damaged"),
            "{failed}"
        );
        // The store's error, with its kind, stays reachable as the source.
        let source = std::error::Error::source(&failed).unwrap();
        assert!(
            source.to_string().contains("connection refused"),
            "{source}"
        );
    }
}
