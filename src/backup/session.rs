//! A backup session: reads the tables and trees, stores new chunks, writes the snapshot.
//!
//! Order of writes, which is what makes an interrupted backup harmless: packs, then the index
//! objects listing them, then the snapshot manifest. Until the manifest exists nothing refers
//! to the session's packs; prune removes them later (see `lock` for why it never removes them
//! while the session runs).
//!
//! Deduplication: a host holding the repository key hashes chunks with the repository's id
//! key and skips every blob the index already lists. A write-only host cannot read the index
//! nor the id key, so it hashes with a fresh id key of its own (recorded, encrypted, in its
//! index objects and snapshot) and deduplicates only within its own snapshot. That is the
//! price of a host that cannot read its own backups.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use chrono::Utc;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::chunker::Chunker;
use super::crypto::{BlobId, IdKey};
use super::dump;
use super::index::{self, IndexFile, KIND_INDEX, PACKS_PER_INDEX};
use super::lock::{self, Lock, LockKind};
use super::pack::{pack_path, PackBuilder, PackEntry, TARGET_PACK_SIZE};
use super::repository::{put_create_at, Repository};
use super::snapshot::{self, Snapshot, SnapshotStats, TableSnapshot};
use super::tree::{EntryKind, TreeSnapshot};
use super::{failpoint, BackupError};
use crate::config::TablePattern;
use crate::pg::{resolve_tables, ConnInfo, PgError, TableName};

/// Uploads in flight at once.
const PARALLEL_UPLOADS: usize = 2;

/// What to back up.
pub struct BackupOptions {
    pub database: Option<DatabaseSource>,
    pub config_dirs: Vec<PathBuf>,
    pub tags: Vec<String>,
}

/// A database to back up.
pub struct DatabaseSource {
    /// Its configured name, recorded in the snapshot.
    pub label: String,
    pub conn: ConnInfo,
    /// `schema.table` / `schema.*` patterns; each must match at least one table.
    pub tables: Vec<TablePattern>,
}

/// Told about progress, for a progress bar. Calls come from the backup task, in order.
pub trait Progress: Send + Sync {
    /// `bytes` more were read from the database or the trees; `what` is being read now.
    fn read(&self, what: &str, bytes: u64);
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {
    fn read(&self, _: &str, _: u64) {}
}

/// The result of a backup.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub snapshot: String,
    pub stats: SnapshotStats,
    pub tables: usize,
    pub rows: u64,
    pub files: usize,
}

/// Takes one snapshot.
pub async fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupSummary, BackupError> {
    if opts.database.is_none() && opts.config_dirs.is_empty() {
        return Err(BackupError::Invalid(
            "nothing to back up: give --db (or --tables) and/or --config-dir".into(),
        ));
    }
    // Connect before taking the lock or writing anything: an unreachable database costs nothing.
    let mut db = None;
    if let Some(src) = &opts.database {
        let client = src.conn.connect().await?;
        let tables = resolve_tables(&client, &src.conn, &src.tables).await?;
        db = Some((client, tables));
    }
    let lock = Lock::acquire(repo, LockKind::Backup).await?;
    let result = run(repo, opts, db.as_ref(), progress, &lock).await;
    lock.release(repo).await;
    result
}

async fn run(
    repo: &Repository,
    opts: &BackupOptions,
    db: Option<&(tokio_postgres::Client, Vec<TableName>)>,
    progress: &dyn Progress,
    lock: &Lock,
) -> Result<BackupSummary, BackupError> {
    let started = Instant::now();
    let mut w = Writer::new(repo, lock).await?;
    let mut tables = Vec::new();
    let mut lsn = None;
    let mut source = None;
    if let (Some(src), Some((client, names))) = (&opts.database, db) {
        let conn = &src.conn;
        source = Some(format!("{} ({conn})", src.label));
        lsn = Some(dump::begin_cut(client, conn).await?);
        for t in names {
            let schema = dump::load_schema(client, conn, t).await?;
            let stream = client
                .copy_out(&schema.copy_out_sql())
                .await
                .map_err(|e| PgError::query(format!("reading {t}"), conn, e))?;
            futures::pin_mut!(stream);
            let mut chunker = Chunker::new();
            let mut chunks = Vec::new();
            let (mut rows, mut bytes) = (0u64, 0u64);
            let label = t.to_string();
            while let Some(piece) = stream.next().await {
                let piece = piece.map_err(|e| PgError::query(format!("reading {t}"), conn, e))?;
                rows += piece.iter().filter(|&&b| b == b'\n').count() as u64;
                bytes += piece.len() as u64;
                progress.read(&label, piece.len() as u64);
                for c in chunker.push(&piece) {
                    chunks.push(w.add(c).await?);
                }
            }
            for c in chunker.finish() {
                chunks.push(w.add(c).await?);
            }
            w.stats.bytes_read += bytes;
            tables.push(TableSnapshot {
                schema,
                rows,
                bytes,
                chunks,
            });
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| PgError::query("ending the backup transaction", conn, e))?;
    }
    let mut trees = Vec::new();
    let mut files = 0;
    for dir in &opts.config_dirs {
        let (root, entries) = super::tree::walk(dir)?;
        let mut out = Vec::new();
        for (abs, mut entry) in entries {
            if entry.kind == EntryKind::File {
                // The size read, not the size listed: the file may change while it is read.
                (entry.chunks, entry.size) = w.add_file(&abs, progress).await?;
                files += 1;
            }
            out.push(entry);
        }
        trees.push(TreeSnapshot { root, entries: out });
    }
    w.finish().await?;
    failpoint("backup-before-snapshot");
    check_held(repo, lock)?;
    let mut stats = w.stats.clone();
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let rows = tables.iter().map(|t| t.rows).sum();
    let snap = Snapshot {
        version: 1,
        session: w.session.clone(),
        time: Utc::now(),
        host: lock::hostname(),
        tags: opts.tags.clone(),
        source,
        lsn,
        tables,
        trees,
        stats: stats.clone(),
        id_key: w.own_id_key.then(|| w.id_key.to_hex()),
    };
    let id = snapshot::save(repo, &snap).await?;
    Ok(BackupSummary {
        snapshot: id,
        stats,
        tables: snap.tables.len(),
        rows,
        files,
    })
}

/// Stores blobs into packs, uploads packs, writes index objects.
struct Writer<'a> {
    repo: &'a Repository,
    lock: &'a Lock,
    session: String,
    id_key: IdKey,
    own_id_key: bool,
    known: HashSet<BlobId>,
    pack: Option<PackBuilder>,
    uploads: JoinSet<Result<(), BackupError>>,
    unindexed: Vec<PackEntry>,
    stats: SnapshotStats,
}

impl<'a> Writer<'a> {
    async fn new(repo: &'a Repository, lock: &'a Lock) -> Result<Writer<'a>, BackupError> {
        let (id_key, own_id_key, known) = match &repo.keys.master {
            Some(m) => (m.id_key.clone(), false, index::known_blobs(repo).await?),
            None => (IdKey::random(), true, HashSet::new()),
        };
        Ok(Writer {
            repo,
            lock,
            session: uuid::Uuid::new_v4().simple().to_string(),
            id_key,
            own_id_key,
            known,
            pack: None,
            uploads: JoinSet::new(),
            unindexed: Vec::new(),
            stats: SnapshotStats::default(),
        })
    }

    /// Stores `chunk` unless the repository has it; returns its id.
    async fn add(&mut self, chunk: Vec<u8>) -> Result<BlobId, BackupError> {
        let id = self.id_key.id(&chunk);
        if !self.known.insert(id) {
            return Ok(id);
        }
        let crypto = |e: super::crypto::CryptoError| BackupError::Invalid(e.to_string());
        if self.pack.is_none() {
            self.pack = Some(PackBuilder::new(&self.repo.keys).map_err(crypto)?);
        }
        let full = match self.pack.as_mut() {
            Some(p) => {
                p.add(id, &chunk).map_err(crypto)?;
                p.len() >= TARGET_PACK_SIZE
            }
            None => false,
        };
        self.stats.bytes_new += chunk.len() as u64;
        self.stats.blobs_new += 1;
        if full {
            self.flush_pack().await?;
        }
        Ok(id)
    }

    async fn add_file(
        &mut self,
        path: &std::path::Path,
        progress: &dyn Progress,
    ) -> Result<(Vec<BlobId>, u64), BackupError> {
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|e| BackupError::io(path.display(), e))?;
        let mut chunker = Chunker::new();
        let mut ids = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let label = path.display().to_string();
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| BackupError::io(path.display(), e))?;
            if n == 0 {
                break;
            }
            self.stats.bytes_read += n as u64;
            size += n as u64;
            progress.read(&label, n as u64);
            for c in chunker.push(&buf[..n]) {
                ids.push(self.add(c).await?);
            }
        }
        for c in chunker.finish() {
            ids.push(self.add(c).await?);
        }
        Ok((ids, size))
    }

    async fn flush_pack(&mut self) -> Result<(), BackupError> {
        let Some(pack) = self.pack.take() else {
            return Ok(());
        };
        let (bytes, entry) = pack
            .finish()
            .map_err(|e| BackupError::Invalid(e.to_string()))?;
        while self.uploads.len() >= PARALLEL_UPLOADS {
            self.join_one().await?;
        }
        self.stats.bytes_stored += bytes.len() as u64;
        let path = pack_path(&entry.id);
        let store = self.repo.location.store.clone();
        let full = self.repo.path(&path);
        let name = self.repo.name.clone();
        self.uploads.spawn(async move {
            match put_create_at(&store, &full, bytes, &format!("{name}/{path}")).await {
                // Same content, same name: the pack is there already.
                Ok(()) | Err(BackupError::Exists { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        });
        self.unindexed.push(entry);
        if self.unindexed.len() >= PACKS_PER_INDEX {
            self.write_index().await?;
        }
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), BackupError> {
        if let Some(r) = self.uploads.join_next().await {
            r.map_err(|e| BackupError::Invalid(format!("pack upload task failed: {e}")))??;
        }
        Ok(())
    }

    /// Waits for the uploads, then indexes the packs they stored.
    async fn write_index(&mut self) -> Result<(), BackupError> {
        while !self.uploads.is_empty() {
            self.join_one().await?;
        }
        if self.unindexed.is_empty() {
            return Ok(());
        }
        check_held(self.repo, self.lock)?;
        let file = IndexFile {
            version: 1,
            session: Some(self.session.clone()),
            id_key: self.own_id_key.then(|| self.id_key.to_hex()),
            packs: std::mem::take(&mut self.unindexed),
        };
        let bytes = self.repo.seal(KIND_INDEX, &file)?;
        self.stats.bytes_stored += bytes.len() as u64;
        let name = blake3::hash(&bytes).to_hex().to_string();
        self.repo.put_create(&format!("index/{name}"), bytes).await
    }

    async fn finish(&mut self) -> Result<(), BackupError> {
        self.flush_pack().await?;
        while !self.uploads.is_empty() {
            self.join_one().await?;
        }
        failpoint("backup-before-index");
        self.write_index().await
    }
}

/// Refuses to write the index or snapshot when the lock went unrefreshed for long: a prune may
/// have taken this backup for dead and deleted its unindexed packs.
fn check_held(repo: &Repository, lock: &Lock) -> Result<(), BackupError> {
    if lock.held() {
        Ok(())
    } else {
        Err(BackupError::Locked {
            repo: repo.name.clone(),
            message: "this backup could not refresh its lock for a long time (store unreachable, or the process was suspended), so a prune may have removed its data; no snapshot was written; run the backup again".into(),
        })
    }
}
