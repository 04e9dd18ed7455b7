//! Index objects: which pack holds each blob.
//!
//! A backup writes one index object per [`PACKS_PER_INDEX`] packs (and one at its end), after
//! the packs it lists are stored; prune replaces several index objects by one compacted one,
//! writing the new one before deleting the old, so a crash leaves duplicates (harmless: the
//! same pack listed twice) and never a stored pack that a snapshot needs without an entry.
//!
//! Memory: the index is never loaded into one structure by default. [`Locator::load`] streams
//! the index objects one at a time and keeps only the entries for the blobs asked for (a
//! restore keeps one snapshot's blobs); deduplication keeps a set of blob ids only
//! (32 bytes per blob: about 128 MB per TB of stored data at the 256 KiB average chunk).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::crypto::{BlobId, IdKey};
use super::pack::{BlobEntry, PackEntry};
use super::repository::Repository;
use super::BackupError;

pub const KIND_INDEX: u8 = b'I';
/// An index object is written after this many packs, bounding both its size and how much a
/// crashed backup leaves unindexed.
pub const PACKS_PER_INDEX: usize = 256;

/// One index object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexFile {
    pub version: u32,
    /// The backup session that wrote it (`None` once prune compacted it).
    pub session: Option<String>,
    /// The id key of its blobs when it is not the repository's (write-only sessions).
    pub id_key: Option<String>,
    pub packs: Vec<PackEntry>,
}

/// A pack a located blob lives in.
#[derive(Debug)]
pub struct PackRef {
    pub id: String,
    pub size: u64,
    pub wrapped_key: Vec<u8>,
    pub id_key: Option<IdKey>,
}

/// Where one blob is.
#[derive(Debug, Clone)]
pub struct Location {
    pub pack: Arc<PackRef>,
    pub blob: BlobEntry,
}

/// Blob locations for a chosen set of blobs.
#[derive(Default)]
pub struct Locator {
    pub blobs: HashMap<BlobId, Location>,
    /// Index objects that could not be read, with the reason.
    pub unreadable: Vec<(String, String)>,
}

impl Locator {
    /// Reads every index object, keeping the locations of `wanted` (all blobs with `None`).
    /// An unreadable index object is recorded, not fatal: callers decide (restore then reports
    /// the blobs it cannot find, verify names the object).
    pub async fn load(
        repo: &Repository,
        wanted: Option<&HashSet<BlobId>>,
    ) -> Result<Locator, BackupError> {
        let mut loc = Locator::default();
        for name in repo.list_names("index").await? {
            let file: IndexFile = match repo.read_object(KIND_INDEX, &format!("index/{name}")).await
            {
                Ok(f) => f,
                Err(BackupError::Corrupt { reason, .. }) => {
                    loc.unreadable.push((format!("index/{name}"), reason));
                    continue;
                }
                Err(e) => return Err(e),
            };
            loc.add(&file, wanted)?;
        }
        Ok(loc)
    }

    /// Adds the locations `file` lists (of `wanted` only, when given).
    pub(crate) fn add(
        &mut self,
        file: &IndexFile,
        wanted: Option<&HashSet<BlobId>>,
    ) -> Result<(), BackupError> {
        let id_key = match &file.id_key {
            Some(h) => Some(IdKey::from_hex(h).map_err(BackupError::Invalid)?),
            None => None,
        };
        for p in &file.packs {
            let mut pack: Option<Arc<PackRef>> = None;
            for b in &p.blobs {
                if wanted.is_some_and(|w| !w.contains(&b.id)) || self.blobs.contains_key(&b.id) {
                    continue;
                }
                let pack = match &pack {
                    Some(p) => p.clone(),
                    None => {
                        let r = Arc::new(PackRef {
                            id: p.id.clone(),
                            size: p.size,
                            wrapped_key: hex::decode(&p.key)
                                .map_err(|e| BackupError::Invalid(format!("wrapped key: {e}")))?,
                            id_key: id_key.clone(),
                        });
                        pack = Some(r.clone());
                        r
                    }
                };
                self.blobs.insert(
                    b.id,
                    Location {
                        pack,
                        blob: b.clone(),
                    },
                );
            }
        }
        Ok(())
    }
}

/// Every blob id the index knows, for deduplication.
pub async fn known_blobs(repo: &Repository) -> Result<HashSet<BlobId>, BackupError> {
    let mut set = HashSet::new();
    for name in repo.list_names("index").await? {
        // A damaged index object only costs deduplication here; its blobs are stored again.
        if let Ok(file) = repo
            .read_object::<IndexFile>(KIND_INDEX, &format!("index/{name}"))
            .await
        {
            for p in &file.packs {
                set.extend(p.blobs.iter().map(|b| b.id));
            }
        }
    }
    Ok(set)
}
