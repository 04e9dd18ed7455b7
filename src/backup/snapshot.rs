//! Snapshot manifests: what one backup holds. A manifest is the last object a backup writes,
//! so a listed snapshot always refers to stored data; a backup that stops early leaves none.
//!
//! Size: each table and file lists its chunk ids inline (about 70 bytes of JSON per chunk
//! before compression, so some 0.3 MB per GB of table data at the 256 KiB average chunk).
//! Very large databases (many TB) would want these lists stored as blobs themselves, as
//! restic's tree blobs are; format version 1 does not do that.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::crypto::BlobId;
use super::dump::TableSchema;
use super::repository::Repository;
use super::segment::{CutPoint, Segments};
use super::tree::TreeSnapshot;
use super::BackupError;
use crate::pg::Lsn;

pub const KIND_SNAPSHOT: u8 = b'S';

/// One snapshot manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// The backup session that wrote it; its index objects carry the same id.
    pub session: String,
    pub time: DateTime<Utc>,
    pub host: String,
    pub tags: Vec<String>,
    /// The database it was taken from (configured name and URL without password).
    pub source: Option<String>,
    /// The WAL position of the consistent cut (see `dump`).
    pub lsn: Option<Lsn>,
    /// Where the cut lies in the source's transaction history: what the next backup of the
    /// same database needs to reuse this one's segments (see `segment`). Absent in snapshots
    /// of older invsync versions and of servers before PostgreSQL 13.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutPoint>,
    pub tables: Vec<TableSnapshot>,
    pub trees: Vec<TreeSnapshot>,
    pub stats: SnapshotStats,
    /// The id key of this snapshot's blobs when it is not the repository's (set by
    /// write-only hosts, which cannot read the repository's).
    pub id_key: Option<String>,
}

/// A snapshot as `invsync snapshots --json` lists it: its facts without its chunk lists.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSummary {
    pub config_paths: Vec<String>,
    pub host: String,
    pub id: String,
    pub lsn: Option<Lsn>,
    pub source: Option<String>,
    pub stats: SnapshotStats,
    pub tables: Vec<TableSummary>,
    pub tags: Vec<String>,
    pub time: DateTime<Utc>,
    /// With a change archive: the newest point a restore from this snapshot can reach
    /// (`restore --until` up to it); absent when no unbroken archive covers its cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recoverable_to: Option<super::archive::Point>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableSummary {
    /// Bytes of COPY text.
    pub bytes: u64,
    pub rows: u64,
    pub table: String,
}

impl SnapshotSummary {
    pub fn new(id: &str, s: &Snapshot) -> SnapshotSummary {
        SnapshotSummary {
            config_paths: s.trees.iter().map(|t| t.root.clone()).collect(),
            host: s.host.clone(),
            id: id.to_string(),
            lsn: s.lsn,
            source: s.source.clone(),
            stats: s.stats.clone(),
            tables: s
                .tables
                .iter()
                .map(|t| TableSummary {
                    bytes: t.bytes,
                    rows: t.rows,
                    table: t.schema.name.to_string(),
                })
                .collect(),
            tags: s.tags.clone(),
            time: s.time,
            recoverable_to: None,
        }
    }
}

/// One table's data as of the cut.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableSnapshot {
    /// The table's definition; since the table model was added it holds the whole
    /// `pg::schema::TableModel` (types, partitions, foreign keys, triggers, policies, grants),
    /// absent in snapshots of older versions, which restore from the other fields.
    pub schema: TableSchema,
    pub rows: u64,
    /// Bytes of COPY text.
    pub bytes: u64,
    pub chunks: Vec<BlobId>,
    /// The same data as key-range segments (absent in snapshots of older invsync versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Segments>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotStats {
    /// Bytes read from the database and the trees.
    pub bytes_read: u64,
    /// Plaintext bytes of the blobs that were not in the repository yet.
    pub bytes_new: u64,
    /// Bytes written to the store (packs and index).
    pub bytes_stored: u64,
    pub blobs_new: u64,
    pub duration_ms: u64,
    /// Table segments whose chunk lists were taken over from the previous snapshot of the
    /// same database without reading their rows.
    #[serde(default)]
    pub segments_reused: u64,
    /// Table segments read from the database.
    #[serde(default)]
    pub segments_read: u64,
}

impl Snapshot {
    /// Every blob the snapshot references.
    pub fn blobs(&self) -> impl Iterator<Item = &BlobId> {
        self.tables.iter().flat_map(|t| t.chunks.iter()).chain(
            self.trees
                .iter()
                .flat_map(|t| t.entries.iter().flat_map(|e| e.chunks.iter())),
        )
    }
}

/// The first 8 characters of a snapshot id, as people see it.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Writes a manifest; returns the snapshot id.
pub async fn save(repo: &Repository, snap: &Snapshot) -> Result<String, BackupError> {
    repo.write_object(KIND_SNAPSHOT, "snapshots", snap).await
}

/// Every snapshot, oldest first. One that cannot be read is an error naming it.
pub async fn list(repo: &Repository) -> Result<Vec<(String, Snapshot)>, BackupError> {
    repo.master("listing snapshots")?;
    let mut out = Vec::new();
    for name in repo.list_names("snapshots").await? {
        let snap: Snapshot = repo
            .read_object(KIND_SNAPSHOT, &format!("snapshots/{name}"))
            .await?;
        out.push((name, snap));
    }
    out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
    Ok(out)
}

/// The snapshot named by `latest`, a full id, or a unique id prefix.
pub async fn find(repo: &Repository, which: &str) -> Result<(String, Snapshot), BackupError> {
    repo.master("reading a snapshot")?;
    if which == "latest" {
        return list(repo).await?.pop().ok_or_else(|| {
            BackupError::Invalid(format!(
                "repository {} has no snapshots yet; run `invsync backup`",
                repo.name
            ))
        });
    }
    let names = repo.list_names("snapshots").await?;
    let hits: Vec<&String> = names.iter().filter(|n| n.starts_with(which)).collect();
    let name = match hits.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(BackupError::Invalid(format!(
                "no snapshot `{which}` in {}; `invsync snapshots` lists them",
                repo.name
            )))
        }
        _ => {
            return Err(BackupError::Invalid(format!(
                "snapshot id `{which}` is ambiguous; give more characters"
            )))
        }
    };
    let snap = repo
        .read_object(KIND_SNAPSHOT, &format!("snapshots/{name}"))
        .await?;
    Ok((name, snap))
}
