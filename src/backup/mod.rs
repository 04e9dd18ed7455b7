//! Backups: encrypted, compressed, deduplicated snapshots of table data and configuration
//! trees in object storage.

pub mod store;

/// Everything that can go wrong in the backup area.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("repository {repo}: {message}")]
    Store { repo: String, message: String },
}
