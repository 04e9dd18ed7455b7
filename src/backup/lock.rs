//! Locks: how prune stays out of the way of running backups and readers.
//!
//! A backup, a reader (a restore, a repository check) or a prune announces itself by creating
//! `locks/<kind>-<start ms>-<uuid>` (kind `backup`, `read`, `prune` or `archive`; body: host, pid, start;
//! encrypted) and deletes it when done; while it runs, the lock is rewritten every [`REFRESH`]
//! so its modification time stays recent. A lock is *live* unless it has not been refreshed
//! for [`STALE_AFTER`], or it was taken on this host by a process that no longer exists (a
//! killed backup).
//!
//! The protocol, given the stores' read-after-write listing:
//! - each job creates its lock first and lists the others second, so of two jobs that start
//!   together at least one sees the other;
//! - a backup or reader that sees a live prune lock waits for it to go before it reads the
//!   index;
//! - a prune that sees another live prune lock gives up (prunes are exclusive);
//! - a prune that sees live backup or read locks runs, but in *shared* mode (see `prune`): it
//!   keeps every indexed pack (a running backup may deduplicate against any of them, a reader
//!   may be reading any of them, even of a snapshot forgotten since it started) and deletes
//!   only unindexed packs older than the oldest running job's start (leftovers of crashed
//!   backups; a running backup only references indexed blobs and packs it wrote itself, a
//!   reader only reads indexed packs).
//!
//! An archive (`archive run`, which may run for weeks) holds an `archive` lock: a prune beside
//! it works as if alone, except that it keeps archive segment data newer than the archive's
//! start (a segment's data is written before its manifest).
//!
//! Jobs started after a prune took its lock wait, so a prune never races a job it did not see.
//! (Prunes of invsync versions without `read` locks ignore them; run prune from this version.)
//!
//! A backup whose lock could not be refreshed for half of [`STALE_AFTER`] (store unreachable,
//! process suspended) may have been taken for dead: it then writes neither index nor snapshot
//! ([`Lock::held`]), so it can never publish a snapshot whose packs a prune deleted. A reader
//! in that case may find a pack gone; it reports that as a pack that vanished while it read,
//! never as damage.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::repository::Repository;
use super::BackupError;

pub const KIND_LOCK: u8 = b'L';
/// How often a holder rewrites its lock.
pub const REFRESH: Duration = Duration::from_secs(5 * 60);
/// A lock not rewritten for this long belongs to a job that died on another host.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Backup,
    /// A restore or a repository check: reads packs, writes nothing.
    Read,
    Prune,
    /// A change archive (`archive run`): writes only archive segments, so prune keeps only
    /// the segment data it may be writing, and otherwise works as if it were not there.
    Archive,
}

impl LockKind {
    fn as_str(self) -> &'static str {
        match self {
            LockKind::Backup => "backup",
            LockKind::Read => "read",
            LockKind::Prune => "prune",
            LockKind::Archive => "archive",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockBody {
    host: String,
    pid: u32,
    started: DateTime<Utc>,
}

/// Another job's live lock.
#[derive(Debug, Clone)]
pub struct OtherLock {
    pub kind: LockKind,
    pub started: DateTime<Utc>,
    /// `host pid N`, when this host could read the lock.
    pub holder: Option<String>,
}

/// A held lock; release it with [`Lock::release`]. If dropped instead (a crash, a cancelled
/// future), the refresher stops and the lock goes stale.
pub struct Lock {
    name: String,
    refresher: Option<JoinHandle<()>>,
    /// (time of the last successful refresh, longest time between two of them).
    longest_gap: Arc<Mutex<(Instant, Duration)>>,
    /// Live locks of other jobs seen when this one was taken.
    pub others: Vec<OtherLock>,
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(r) = &self.refresher {
            r.abort();
        }
    }
}

/// This machine's name, for lock bodies and snapshots.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Lock {
    /// Takes a lock of `kind`; see the module documentation for what each kind waits for.
    pub async fn acquire(repo: &Repository, kind: LockKind) -> Result<Lock, BackupError> {
        let started = Utc::now();
        let name = format!(
            "locks/{}-{}-{}",
            kind.as_str(),
            started.timestamp_millis(),
            uuid::Uuid::new_v4().simple()
        );
        let body = repo.seal(
            KIND_LOCK,
            &LockBody {
                host: hostname(),
                pid: std::process::id(),
                started,
            },
        )?;
        repo.put_create(&name, body.clone()).await?;
        let longest_gap = Arc::new(Mutex::new((Instant::now(), Duration::ZERO)));
        let refresher = {
            let store = repo.location.store.clone();
            let path = repo.path(&name);
            let gap = longest_gap.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    // A failed refresh is retried at the next tick; the lock only goes stale
                    // after several misses, and `held` reports long gaps to the holder.
                    let put = object_store::ObjectStoreExt::put(
                        store.as_ref(),
                        &path,
                        body.clone().into(),
                    )
                    .await;
                    if put.is_ok() {
                        if let Ok(mut g) = gap.lock() {
                            g.1 = g.1.max(g.0.elapsed());
                            g.0 = Instant::now();
                        }
                    }
                }
            })
        };
        let mut lock = Lock {
            name,
            refresher: Some(refresher),
            longest_gap,
            others: Vec::new(),
        };
        loop {
            let others = match live_locks(repo, &lock.name).await {
                Ok(o) => o,
                Err(e) => {
                    lock.release(repo).await;
                    return Err(e);
                }
            };
            let prunes: Vec<&OtherLock> = others
                .iter()
                .filter(|o| o.kind == LockKind::Prune)
                .collect();
            match (kind, prunes.first()) {
                (LockKind::Prune, Some(p)) => {
                    let msg =
                        format!(
                        "another prune is running (started {}{}); try again when it has finished",
                        p.started.format("%Y-%m-%d %H:%M:%S UTC"),
                        p.holder.as_ref().map(|h| format!(" by {h}")).unwrap_or_default()
                    );
                    lock.release(repo).await;
                    return Err(BackupError::Locked {
                        repo: repo.name.clone(),
                        message: msg,
                    });
                }
                (LockKind::Backup | LockKind::Read | LockKind::Archive, Some(_)) => {
                    tracing::info!(repo = %repo.name, "a prune is running; waiting for it to finish");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                (_, None) => {
                    lock.others = others;
                    return Ok(lock);
                }
            }
        }
    }

    /// Whether the lock has been kept fresh all along. A lock left unrefreshed for
    /// [`STALE_AFTER`] may have been judged dead by a prune, which may then have deleted this
    /// job's unindexed packs; a backup checks this before writing its index and snapshot, with
    /// half that time as the limit so the check stays well ahead of any prune's judgement.
    pub fn held(&self) -> bool {
        match self.longest_gap.lock() {
            Ok(g) => g.1.max(g.0.elapsed()) < STALE_AFTER / 2,
            Err(_) => false,
        }
    }

    /// Deletes the lock. Errors are logged only: a leftover lock goes stale by itself.
    pub async fn release(mut self, repo: &Repository) {
        // Wait for the refresher to stop, so no refresh can recreate the lock after the delete.
        if let Some(r) = self.refresher.take() {
            r.abort();
            let _ = r.await;
        }
        if let Err(e) = repo.delete(&self.name).await {
            tracing::warn!(lock = %self.name, "cannot delete lock: {e}");
        }
    }
}

/// Live locks other than `own`.
async fn live_locks(repo: &Repository, own: &str) -> Result<Vec<OtherLock>, BackupError> {
    let now = Utc::now();
    let mut out = Vec::new();
    for (name, meta) in repo.list("locks").await? {
        let full = format!("locks/{name}");
        if full == own {
            continue;
        }
        let mut parts = name.splitn(3, '-');
        let kind = match parts.next() {
            Some("backup") => LockKind::Backup,
            Some("read") => LockKind::Read,
            Some("prune") => LockKind::Prune,
            Some("archive") => LockKind::Archive,
            _ => continue,
        };
        let Some(started) = parts
            .next()
            .and_then(|ms| ms.parse::<i64>().ok())
            .and_then(DateTime::<Utc>::from_timestamp_millis)
        else {
            continue;
        };
        let age = (now - meta.last_modified).to_std().unwrap_or_default();
        if age > STALE_AFTER {
            continue;
        }
        let mut holder = None;
        if repo.keys.master.is_some() {
            if let Ok(body) = repo.read_object::<LockBody>(KIND_LOCK, &full).await {
                if body.host == hostname() && !pid_alive(body.pid) {
                    continue;
                }
                holder = Some(format!("{} pid {}", body.host, body.pid));
            }
        }
        out.push(OtherLock {
            kind,
            started,
            holder,
        });
    }
    Ok(out)
}
