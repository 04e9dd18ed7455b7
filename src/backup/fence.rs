//! Fences in a repository: how a backup run under an agent's lease refuses to publish a
//! snapshot once a newer holder of that lease has started.
//!
//! A holder of lease `L` with epoch `E` records itself by creating
//! `fences/<lease id>/<E, 20 digits>` (lease id: 16 hex digits of the lease name's blake3 hash;
//! body: lease name, epoch, host, pid, time; encrypted) create-only, so an epoch's object is
//! written once and never changed; listing `fences/<lease id>/` gives every epoch that has
//! started there, and the highest is the current holder's. [`raise`] writes the caller's
//! epoch and then refuses if a higher one is listed; [`check`] only refuses. A backup with a
//! fence raises at its start (before it reads anything) and checks again after its packs and
//! index are written and right before the snapshot manifest, so a backup whose epoch was
//! overtaken while it ran writes no manifest ([`BackupError::Fenced`]). Its packs are left
//! unreferenced, as after any interrupted backup, for a later prune.
//!
//! Stores list what was written before (S3, GCS, Azure and file systems give read-after-write
//! listings), so a newer fence created before the check is seen by it.
//!
//! What this does not close, stated plainly:
//! - the time between the check and the manifest's write (one store request, unless the process
//!   is paused exactly there): a newer holder's fence created in it is not seen, and the older
//!   backup's snapshot is published. It is a complete, valid snapshot taken before the newer
//!   holder's: one snapshot too many, nothing lost or damaged;
//! - a newer holder that has not written its fence in this repository yet. A backup writes it
//!   when it starts; an agent should also [`raise`] when it takes a backup schedule's lease
//!   over, so that a stale holder is fenced while the new one waits for its next run. If the
//!   repository is unreachable then, the window stays open until the new holder's next backup.
//!
//! The objects are a few hundred bytes each, one per change of holder; they are not snapshots'
//! data, so prune and check leave them alone.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::lock::hostname;
use super::repository::Repository;
use super::BackupError;
use crate::pg::Fence;

pub const KIND_FENCE: u8 = b'F';
/// The directory of fence objects.
pub const DIR: &str = "fences";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FenceBody {
    lease: String,
    epoch: i64,
    host: String,
    pid: u32,
    time: DateTime<Utc>,
}

/// The directory holding `lease`'s epochs.
fn lease_dir(lease: &str) -> String {
    format!("{DIR}/{}", &blake3::hash(lease.as_bytes()).to_hex()[..16])
}

/// Records `fence`'s epoch in the repository (once per epoch: a second call with the same one
/// keeps the first object), then fails with [`BackupError::Fenced`] if a newer epoch of the
/// same lease is recorded.
pub async fn raise(repo: &Repository, fence: &Fence) -> Result<(), BackupError> {
    let body = repo.seal(
        KIND_FENCE,
        &FenceBody {
            lease: fence.lease.clone(),
            epoch: fence.epoch,
            host: hostname(),
            pid: std::process::id(),
            time: Utc::now(),
        },
    )?;
    let name = format!("{}/{:020}", lease_dir(&fence.lease), fence.epoch.max(0));
    match repo.put_create(&name, body).await {
        Ok(()) | Err(BackupError::Exists { .. }) => {}
        Err(e) => return Err(e),
    }
    check(repo, fence).await
}

/// Fails with [`BackupError::Fenced`] if an epoch of `fence`'s lease newer than its own is
/// recorded in the repository.
pub async fn check(repo: &Repository, fence: &Fence) -> Result<(), BackupError> {
    match newest(repo, &fence.lease).await? {
        Some(newer) if newer > fence.epoch => Err(BackupError::Fenced {
            repo: repo.name.clone(),
            lease: fence.lease.clone(),
            epoch: fence.epoch,
            newer,
        }),
        _ => Ok(()),
    }
}

/// The highest epoch of `lease` recorded in the repository.
pub async fn newest(repo: &Repository, lease: &str) -> Result<Option<i64>, BackupError> {
    Ok(repo
        .list_names(&lease_dir(lease))
        .await?
        .iter()
        .filter_map(|n| n.parse::<i64>().ok())
        .max())
}
