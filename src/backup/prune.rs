//! Prune: removes packs no snapshot references, and compacts the index.
//!
//! Crash safety comes from the order of writes: (1) the compacted index objects are written,
//! (2) the index objects they replace are deleted, (3) unreferenced packs are deleted. A crash
//! after (1) leaves duplicate index entries (harmless); after (2) it leaves unindexed,
//! unreferenced packs, which the next prune deletes. No snapshot ever references a blob
//! whose index entry or pack was removed, because only packs without a referenced blob go.
//! Packs that hold some referenced blobs are kept whole (no repacking in this version).
//!
//! Running backups and readers (see `lock`): prune holds an exclusive prune lock. If backups,
//! restores or checks were running when it took the lock, it works in *shared* mode: a running
//! backup may reference any blob the index listed when it started, and the packs it is
//! writing; a running restore reads packs it located when it started, possibly of a snapshot
//! forgotten since. So prune then keeps every indexed pack, does not touch the index, and
//! deletes only unindexed packs older than the oldest running job's start (minus a margin for
//! clock skew between hosts and the store): leftovers of backups that died. Everything else
//! waits for a prune with no job beside it.
//!
//! Under an agent's lease ([`prune_fenced`]), prune checks the repository's fence (see
//! `fence`) before each step that deletes (archive segments, the index rewrite, packs), so a
//! holder paused past its lease deletes nothing once a newer holder has started. The lock alone
//! would not do: a holder paused past [`STALE_AFTER`](super::lock::STALE_AFTER) loses its lock to the
//! next prune, and its own deletions decided on an older listing would then run beside it.

use std::collections::{HashMap, HashSet};

use chrono::Duration;
use serde::Serialize;

use super::crypto::BlobId;
use super::index::{IndexFile, KIND_INDEX};
use super::lock::{Lock, LockKind};
use super::pack::{pack_path, PackEntry};
use super::repository::Repository;
use super::snapshot;
use super::{archive, failpoint, fence, BackupError};
use crate::pg::Fence;

/// Allowance for clocks of backup hosts and the store disagreeing.
const CLOCK_MARGIN_MINUTES: i64 = 10;

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub snapshots: usize,
    pub packs: usize,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    /// Unreferenced packs kept because backups or readers were running.
    pub packs_deferred: usize,
    pub index_objects_replaced: usize,
    /// Backups that were running (prune worked in shared mode).
    pub running_backups: usize,
    /// Restores and repository checks that were running (prune worked in shared mode).
    pub running_readers: usize,
    /// Archive segments that end before their database's oldest snapshot (see `archive`).
    pub segments_deleted: usize,
    pub dry_run: bool,
}

pub async fn prune(repo: &Repository, dry_run: bool) -> Result<PruneReport, BackupError> {
    prune_fenced(repo, dry_run, None).await
}

/// [`prune`] under a lease's `fence`: fails with [`BackupError::Fenced`] before any deletion
/// once a newer epoch of the lease is recorded in the repository.
pub async fn prune_fenced(
    repo: &Repository,
    dry_run: bool,
    fence: Option<&Fence>,
) -> Result<PruneReport, BackupError> {
    repo.master("prune")?;
    let lock = Lock::acquire(repo, LockKind::Prune).await?;
    let result = run(repo, &lock, dry_run, fence).await;
    lock.release(repo).await;
    result
}

/// Fails if `fence` was overtaken; called right before each deleting step.
async fn still_fenced(repo: &Repository, fence: Option<&Fence>) -> Result<(), BackupError> {
    match fence {
        Some(f) => fence::check(repo, f).await,
        None => Ok(()),
    }
}

async fn run(
    repo: &Repository,
    lock: &Lock,
    dry_run: bool,
    fence: Option<&Fence>,
) -> Result<PruneReport, BackupError> {
    let mut report = PruneReport {
        dry_run,
        ..Default::default()
    };
    // Every other live lock is a backup's or a reader's (`Lock::acquire` refuses beside
    // another prune); both hold off deletion of indexed packs the same way.
    // Archives write no packs and read no index: they hold off only the deletion of archive
    // segment data (see `archive_prune`).
    let oldest_backup = lock
        .others
        .iter()
        .filter(|o| o.kind != LockKind::Archive)
        .map(|o| o.started)
        .min();
    let oldest_job = lock.others.iter().map(|o| o.started).min();
    report.running_backups = lock
        .others
        .iter()
        .filter(|o| o.kind == LockKind::Backup)
        .count();
    report.running_readers = lock
        .others
        .iter()
        .filter(|o| o.kind == LockKind::Read)
        .count();

    // What the snapshots reference. An unreadable snapshot stops prune: its blobs are unknown.
    let snaps = snapshot::list(repo).await?;
    report.snapshots = snaps.len();
    let referenced: HashSet<BlobId> = snaps.iter().flat_map(|(_, s)| s.blobs().copied()).collect();
    archive_prune(repo, &snaps, &mut report, oldest_job, lock, fence).await?;
    drop(snaps);

    // The index, whole: an unreadable index object stops prune, since its packs would look
    // unindexed and be deleted.
    let index_names = repo.list_names("index").await?;
    let mut indexed: HashMap<String, (PackEntry, Option<String>)> = HashMap::new();
    for name in &index_names {
        let file: IndexFile = repo
            .read_object(KIND_INDEX, &format!("index/{name}"))
            .await?;
        for p in file.packs {
            indexed
                .entry(p.id.clone())
                .or_insert((p, file.id_key.clone()));
        }
    }
    let stored = repo.list("data").await?;
    report.packs = stored.len();
    let mut delete: Vec<(String, u64)> = Vec::new();
    for (rel, meta) in &stored {
        let id = rel.rsplit('/').next().unwrap_or(rel).to_string();
        match indexed.get(&id) {
            Some((p, _)) => {
                if p.blobs.iter().any(|b| referenced.contains(&b.id)) {
                    continue;
                }
                if oldest_backup.is_some() {
                    report.packs_deferred += 1;
                } else {
                    delete.push((id, meta.size));
                }
            }
            None => {
                let old_enough = oldest_backup.is_none_or(|t| {
                    meta.last_modified < t - Duration::minutes(CLOCK_MARGIN_MINUTES)
                });
                if old_enough {
                    delete.push((id, meta.size));
                } else {
                    report.packs_deferred += 1;
                }
            }
        }
    }
    report.packs_deleted = delete.len();
    report.bytes_deleted = delete.iter().map(|(_, s)| *s).sum();
    if dry_run {
        return Ok(report);
    }
    let doomed: HashSet<&str> = delete.iter().map(|(id, _)| id.as_str()).collect();
    let rewrite = oldest_backup.is_none()
        && (index_names.len() > 1 || indexed.keys().any(|id| doomed.contains(id.as_str())));
    still_fenced(repo, fence).await?;
    if rewrite {
        // Group surviving packs by id key (write-only sessions have their own).
        let mut groups: HashMap<Option<String>, Vec<PackEntry>> = HashMap::new();
        let stored_ids: HashSet<&str> = stored
            .iter()
            .map(|(rel, _)| rel.rsplit('/').next().unwrap_or(rel))
            .collect();
        for (id, (p, key)) in indexed {
            // An entry for a pack that is gone stays only while a snapshot needs it, so that
            // verify keeps reporting the damage.
            let gone_unused = !stored_ids.contains(id.as_str())
                && !p.blobs.iter().any(|b| referenced.contains(&b.id));
            if !doomed.contains(id.as_str()) && !gone_unused {
                groups.entry(key).or_default().push(p);
            }
        }
        for (id_key, mut packs) in groups {
            packs.sort_by(|a, b| a.id.cmp(&b.id));
            for chunk in packs.chunks(super::index::PACKS_PER_INDEX * 4) {
                let file = IndexFile {
                    version: 1,
                    session: None,
                    id_key: id_key.clone(),
                    packs: chunk.to_vec(),
                };
                repo.write_object(KIND_INDEX, "index", &file).await?;
            }
        }
        failpoint("prune-after-index");
        for name in &index_names {
            repo.delete(&format!("index/{name}")).await?;
        }
        report.index_objects_replaced = index_names.len();
    }
    failpoint("prune-before-packs");
    if rewrite {
        still_fenced(repo, fence).await?;
    }
    for (id, _) in &delete {
        repo.delete(&pack_path(id)).await?;
    }
    Ok(report)
}

/// Deletes the archive segments no kept snapshot needs to reach forward (manifest first, then
/// its data, so a listed segment's data always exists), and segment data no manifest names that
/// is older than every running job (left by an archiver that died between the two writes).
/// While a restore or check runs, nothing of the archive is deleted.
async fn archive_prune(
    repo: &Repository,
    snaps: &[(String, snapshot::Snapshot)],
    report: &mut PruneReport,
    oldest_job: Option<chrono::DateTime<chrono::Utc>>,
    lock: &Lock,
    fence: Option<&Fence>,
) -> Result<(), BackupError> {
    if lock.others.iter().any(|o| o.kind == LockKind::Read) {
        return Ok(());
    }
    let segments = archive::list_segments(repo).await?;
    let doomed = archive::forgettable(&segments, snaps);
    report.segments_deleted = doomed.len();
    if report.dry_run {
        return Ok(());
    }
    still_fenced(repo, fence).await?;
    for (name, m) in &doomed {
        repo.delete(&format!("{}/{name}", archive::SEGMENTS_DIR))
            .await?;
        repo.delete(&format!("{}/{}", archive::DATA_DIR, m.data))
            .await?;
    }
    let named: HashSet<&str> = segments.iter().map(|(_, m)| m.data.as_str()).collect();
    for (name, meta) in repo.list(archive::DATA_DIR).await? {
        let old_enough = oldest_job
            .is_none_or(|t| meta.last_modified < t - Duration::minutes(CLOCK_MARGIN_MINUTES));
        if !named.contains(name.as_str()) && old_enough {
            repo.delete(&format!("{}/{name}", archive::DATA_DIR))
                .await?;
        }
    }
    Ok(())
}
