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
//!
//! Concurrency: tables are read by up to `jobs` reader tasks at once (each on its own
//! connection in the same cut, see `dump`), which chunk, hash and compress; one writer (the
//! session's own task) seals blobs into packs and hands packs to at most
//! [`PARALLEL_UPLOADS`] uploads. Readers reach the writer through a bounded channel, so memory
//! stays bounded however fast the database is: about `jobs` × (a chunk being cut + the
//! chunks in flight) + one pack being built + the packs uploading.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Utc;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::chunker::Chunker;
use super::crypto::{BlobId, IdKey};
use super::dump;
use super::index::{self, IndexFile, KIND_INDEX, PACKS_PER_INDEX};
use super::lock::{self, Lock, LockKind};
use super::pack::{self, pack_path, PackBuilder, PackEntry, TARGET_PACK_SIZE};
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
    /// Tables read at once, each on a connection of its own (the backup uses one more to
    /// hold the cut); at least 1.
    pub jobs: usize,
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
        tables = read_tables(client, src, names, &mut w, progress).await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| PgError::query("ending the backup transaction", conn, e))?;
        w.stats.bytes_read += tables.iter().map(|t| t.bytes).sum::<u64>();
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
        id_key: w.own_id_key.then(|| w.dedup.id_key.to_hex()),
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

/// Chunks in flight per reader between the readers and the writer: with chunks of at most
/// [`chunker::MAX_CHUNK`](super::chunker::MAX_CHUNK), this bounds the memory a fast database
/// can fill while packs upload.
const CHUNKS_IN_FLIGHT_PER_READER: usize = 4;
/// Progress is reported after this many bytes of a table.
const PROGRESS_STEP: u64 = 1 << 20;

/// Reads `names` inside the cut begun on `client`: up to `src.jobs` tables at once, each
/// reader on a connection of its own that joins the cut's exported snapshot. Readers chunk,
/// hash and compress; new blobs reach `w` through a bounded channel. Returns the tables in
/// the order of `names`.
async fn read_tables(
    client: &tokio_postgres::Client,
    src: &DatabaseSource,
    names: &[TableName],
    w: &mut Writer<'_>,
    progress: &dyn Progress,
) -> Result<Vec<TableSnapshot>, BackupError> {
    let conn = &src.conn;
    let snapshot = dump::export_snapshot(client, conn).await?;
    let queue: VecDeque<(usize, TableName)> = dump::largest_first(client, conn, names)
        .await?
        .into_iter()
        .map(|i| (i, names[i].clone()))
        .collect();
    let queue = Arc::new(Mutex::new(queue));
    let readers = src.jobs.clamp(1, names.len().max(1));
    let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT_PER_READER * readers);
    let mut tasks = JoinSet::new();
    for _ in 0..readers {
        tasks.spawn(read_queue(
            conn.clone(),
            snapshot.clone(),
            queue.clone(),
            w.dedup.clone(),
            tx.clone(),
        ));
    }
    // The channel closes once every reader has ended and dropped its sender.
    drop(tx);
    let mut done: Vec<Option<TableSnapshot>> = vec![None; names.len()];
    let mut record = |joined: Result<Result<Vec<(usize, TableSnapshot)>, BackupError>, _>| {
        let tables = joined
            .map_err(|e| BackupError::Invalid(format!("table reader task failed: {e}")))??;
        for (i, t) in tables {
            done[i] = Some(t);
        }
        Ok::<(), BackupError>(())
    };
    loop {
        tokio::select! {
            piece = rx.recv() => match piece {
                Some(Piece::Blob(b)) => w.store(b).await?,
                Some(Piece::Read(i, n)) => progress.read(&names[i].to_string(), n),
                None => break,
            },
            // A failed reader ends the backup at once; returning drops (aborts) the others.
            Some(joined) = tasks.join_next() => record(joined)?,
        }
    }
    while let Some(joined) = tasks.join_next().await {
        record(joined)?;
    }
    done.into_iter()
        .zip(names)
        .map(|(t, name)| {
            t.ok_or_else(|| BackupError::Invalid(format!("table {name} was not read")))
        })
        .collect()
}

/// What readers send the writer.
enum Piece {
    /// A blob the repository does not have yet.
    Blob(NewBlob),
    /// `n` more bytes of table `i` were read.
    Read(usize, u64),
}

/// One reader: joins the cut, then takes tables from `queue` until it is empty.
async fn read_queue(
    conn: ConnInfo,
    snapshot: String,
    queue: Arc<Mutex<VecDeque<(usize, TableName)>>>,
    dedup: Dedup,
    tx: mpsc::Sender<Piece>,
) -> Result<Vec<(usize, TableSnapshot)>, BackupError> {
    let client = conn.connect().await?;
    dump::join_cut(&client, &conn, &snapshot).await?;
    let mut out = Vec::new();
    // The writer stopped (it failed, and the backup with it): nothing more to do.
    let stopped = || BackupError::Invalid("the backup stopped while tables were read".into());
    loop {
        let next = queue.lock().map_err(|_| stopped())?.pop_front();
        let Some((i, t)) = next else { break };
        let schema = dump::load_schema(&client, &conn, &t).await?;
        let stream = client
            .copy_out(&schema.copy_out_sql())
            .await
            .map_err(|e| PgError::query(format!("reading {t}"), &conn, e))?;
        futures::pin_mut!(stream);
        let mut chunker = Chunker::new();
        let mut chunks = Vec::new();
        let (mut rows, mut bytes, mut unreported) = (0u64, 0u64, 0u64);
        let mut finished = false;
        while !finished {
            let ready = match stream.next().await {
                Some(piece) => {
                    let piece =
                        piece.map_err(|e| PgError::query(format!("reading {t}"), &conn, e))?;
                    rows += piece.iter().filter(|&&b| b == b'\n').count() as u64;
                    bytes += piece.len() as u64;
                    unreported += piece.len() as u64;
                    chunker.push(&piece)
                }
                None => {
                    finished = true;
                    std::mem::take(&mut chunker).finish()
                }
            };
            for c in ready {
                let (id, new) = dedup.prepare(&c)?;
                chunks.push(id);
                if let Some(b) = new {
                    tx.send(Piece::Blob(b)).await.map_err(|_| stopped())?;
                }
            }
            if unreported >= PROGRESS_STEP || (finished && unreported > 0) {
                tx.send(Piece::Read(i, unreported))
                    .await
                    .map_err(|_| stopped())?;
                unreported = 0;
            }
        }
        out.push((
            i,
            TableSnapshot {
                schema,
                rows,
                bytes,
                chunks,
            },
        ));
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| PgError::query("ending a table reader's transaction", &conn, e))?;
    Ok(out)
}

/// Names chunks and decides which are new; shared by all readers of a session. The first
/// reader to see a chunk claims it in `known` and alone compresses and sends it, so readers
/// working at once never store one blob twice.
#[derive(Clone)]
struct Dedup {
    id_key: IdKey,
    known: Arc<Mutex<HashSet<BlobId>>>,
}

/// A chunk the repository does not hold yet, compressed, on its way into a pack.
struct NewBlob {
    id: BlobId,
    compressed: Vec<u8>,
    raw_len: usize,
}

impl Dedup {
    /// The chunk's id, and the blob to store when it is new.
    fn prepare(&self, chunk: &[u8]) -> Result<(BlobId, Option<NewBlob>), BackupError> {
        let id = self.id_key.id(chunk);
        let fresh = self
            .known
            .lock()
            .map_err(|_| BackupError::Invalid("a chunk reader failed".into()))?
            .insert(id);
        if !fresh {
            return Ok((id, None));
        }
        let compressed = pack::compress(chunk).map_err(|e| BackupError::Invalid(e.to_string()))?;
        Ok((
            id,
            Some(NewBlob {
                id,
                compressed,
                raw_len: chunk.len(),
            }),
        ))
    }
}

/// Stores blobs into packs, uploads packs, writes index objects.
struct Writer<'a> {
    repo: &'a Repository,
    lock: &'a Lock,
    session: String,
    own_id_key: bool,
    dedup: Dedup,
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
            own_id_key,
            dedup: Dedup {
                id_key,
                known: Arc::new(Mutex::new(known)),
            },
            pack: None,
            uploads: JoinSet::new(),
            unindexed: Vec::new(),
            stats: SnapshotStats::default(),
        })
    }

    /// Stores `chunk` unless the repository has it; returns its id.
    async fn add(&mut self, chunk: Vec<u8>) -> Result<BlobId, BackupError> {
        let (id, new) = self.dedup.prepare(&chunk)?;
        if let Some(b) = new {
            self.store(b).await?;
        }
        Ok(id)
    }

    /// Puts a new blob into the current pack; uploads the pack once it is full.
    async fn store(&mut self, b: NewBlob) -> Result<(), BackupError> {
        let crypto = |e: super::crypto::CryptoError| BackupError::Invalid(e.to_string());
        let pack = match self.pack.as_mut() {
            Some(p) => p,
            None => self
                .pack
                .insert(PackBuilder::new(&self.repo.keys).map_err(crypto)?),
        };
        pack.add_compressed(b.id, &b.compressed, b.raw_len)
            .map_err(crypto)?;
        let full = pack.len() >= TARGET_PACK_SIZE;
        self.stats.bytes_new += b.raw_len as u64;
        self.stats.blobs_new += 1;
        if full {
            self.flush_pack().await?;
        }
        Ok(())
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
            id_key: self.own_id_key.then(|| self.dedup.id_key.to_hex()),
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
