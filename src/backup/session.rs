//! A backup session: reads the tables and trees, stores new chunks, writes the snapshot.
//!
//! Order of writes, which is what makes an interrupted backup harmless: packs, then the index
//! objects listing them, then the snapshot manifest (after the fence check, for a backup run
//! under an agent's lease: see `fence`). Until the manifest exists nothing refers
//! to the session's packs; prune removes them later (see `lock` for why it never removes them
//! while the session runs).
//!
//! Deduplication: a host holding the repository key hashes chunks with the repository's id
//! key and skips every blob the index already lists. A write-only host cannot read the index
//! nor the id key, so it hashes with a fresh id key of its own (recorded, encrypted, in its
//! index objects and snapshot) and deduplicates only within its own snapshot. That is the
//! price of a host that cannot read its own backups.
//!
//! Incremental reads: tables are stored as key-range segments (see `segment`). With a parent
//! (the newest snapshot of the same database holding the table, when this host can read it), each parent
//! segment is checked in the cut and taken over unread when provably unchanged; only the
//! others are read again. Every table is still read at the one cut, so a snapshot is as
//! consistent as a full one, whichever segments it reused.
//!
//! Concurrency: tables (or, with a parent, their segments) are read by up to `jobs` reader tasks at once (each on its own
//! connection in the same cut, see `dump`), which chunk, hash and compress; one writer (the
//! session's own task) seals blobs into packs and hands packs to at most
//! [`PARALLEL_UPLOADS`] uploads. Readers reach the writer through a bounded channel, so memory
//! stays bounded however fast the database is: about `jobs` × (the COPY row being read + a
//! chunk being cut + the chunks in flight) + one pack being built + the packs uploading. A
//! row is the one piece held whole (the client library receives it as one message, and may
//! hold the next few rows it has read ahead), so the largest value sets the floor: a `bytea`
//! of N bytes is a row of 2N bytes of hex text.

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
use super::segment::{self, KeyCollation, Reread, Segment, Segments, Since};
use super::snapshot::{self, Snapshot, SnapshotStats, TableSnapshot};
use super::tree::{EntryKind, TreeSnapshot};
use super::{failpoint, fence, BackupError};
use crate::config::{Config, TablePattern};
use crate::pg::keyrange::{Key, KeyRange, Shape};
use crate::pg::{resolve_tables, ConnInfo, Fence, PgError, TableName};

/// Uploads in flight at once.
const PARALLEL_UPLOADS: usize = 2;

/// What to back up.
pub struct BackupOptions {
    pub database: Option<DatabaseSource>,
    pub config_dirs: Vec<PathBuf>,
    pub tags: Vec<String>,
    /// The agent's lease for this job: no snapshot is written once a newer epoch started (see
    /// [`fence`](super::fence)). `None` on the command line.
    pub fence: Option<Fence>,
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

impl DatabaseSource {
    /// The database a backup reads, as `invsync backup` and a backup schedule name it: `db` (a
    /// configured name or a connection string), else the only configured database unless only
    /// configuration directories were asked for; its `tables`, else the tables of the
    /// pipelines that read from or write to it. `None`: no database (configuration trees only).
    pub fn select(
        config: &Config,
        db: Option<&str>,
        tables: &[TablePattern],
        with_config_dirs: bool,
        jobs: usize,
    ) -> Result<Option<DatabaseSource>, BackupError> {
        let arg = match (db, config.databases.len()) {
            (Some(d), _) => d.to_string(),
            (None, 1) if !with_config_dirs || !tables.is_empty() => {
                match config.databases.keys().next() {
                    Some(name) => name.clone(),
                    None => return Ok(None),
                }
            }
            (None, n) if n > 1 && !tables.is_empty() => {
                return Err(BackupError::Invalid(
                    "several databases are configured; choose one with --db".into(),
                ))
            }
            _ => return Ok(None),
        };
        let database =
            crate::config::database_arg(Some(config), &arg).map_err(BackupError::Invalid)?;
        let tables = if tables.is_empty() {
            let mut patterns: Vec<TablePattern> = Vec::new();
            for p in config
                .pipelines
                .values()
                .filter(|p| p.source == arg || p.targets.contains(&arg))
            {
                for t in &p.tables {
                    if !patterns.contains(t) {
                        patterns.push(t.clone());
                    }
                }
            }
            if patterns.is_empty() {
                return Err(BackupError::Invalid(format!(
                    "no pipeline reads from or writes to database {arg}; name the tables with --tables"
                )));
            }
            patterns
        } else {
            tables.to_vec()
        };
        Ok(Some(DatabaseSource {
            label: database.name,
            conn: database.conn,
            tables,
            jobs,
        }))
    }
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
    /// Tables read whole although an earlier snapshot holds them, and why.
    pub reread: Vec<RereadTable>,
}

/// A table whose segments in the parent snapshot could not be reused.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RereadTable {
    pub table: String,
    pub reason: String,
}

/// Takes one snapshot.
/// How snapshots (and archive segments) name the database they come from: the configured
/// name and the URL without its password.
pub fn source_label(label: &str, conn: &ConnInfo) -> String {
    format!("{label} ({conn})")
}

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
    // A stale holder stops here, before it reads anything.
    if let Some(f) = &opts.fence {
        fence::raise(repo, f).await?;
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
    let mut cut = None;
    let mut source = None;
    let mut reread = Vec::new();
    if let (Some(src), Some((client, names))) = (&opts.database, db) {
        let conn = &src.conn;
        let label = source_label(&src.label, conn);
        // Earlier snapshots of the same database, newest first, if this host can read
        // snapshots (a write-only host hashes with an id key of its own, so it could not
        // reuse their chunks anyway).
        let earlier: Vec<Snapshot> = match repo.keys.master {
            Some(_) => snapshot::list(repo)
                .await?
                .into_iter()
                .rev()
                .map(|(_, s)| s)
                .filter(|s| s.source.as_deref() == Some(label.as_str()) && s.id_key.is_none())
                .collect(),
            None => Vec::new(),
        };
        let at = dump::begin_cut(client, conn).await?;
        cut = segment::cut_point(client, conn).await?;
        let parents: Vec<Parent> = earlier
            .iter()
            .filter_map(|p| {
                let since = match (&p.cut, p.lsn, &cut) {
                    (Some(pc), Some(pl), Some(c)) => segment::since((pc, pl), (c, at))?,
                    _ => return None,
                };
                Some(Parent { snapshot: p, since })
            })
            .collect();
        (tables, reread) = read_tables(client, src, names, &parents, &mut w, progress).await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| PgError::query("ending the backup transaction", conn, e))?;
        source = Some(label);
        lsn = Some(at);
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
    if let Some(f) = &opts.fence {
        fence::check(repo, f).await?;
    }
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
        cut,
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
        reread,
    })
}

/// Chunks in flight per reader between the readers and the writer: with chunks of at most
/// [`chunker::MAX_CHUNK`](super::chunker::MAX_CHUNK), this bounds the memory a fast database
/// can fill while packs upload.
const CHUNKS_IN_FLIGHT_PER_READER: usize = 4;
/// Progress is reported after this many bytes of a table.
const PROGRESS_STEP: u64 = 1 << 20;

/// One table as the readers see it.
struct TablePlan {
    schema: dump::TableSchema,
    /// `None` without a primary key (the table is one segment).
    shape: Option<Shape>,
    relations: Vec<u32>,
    text_shape: String,
    key_collations: Vec<KeyCollation>,
}

/// A piece of work for a reader: a key range of a table, with the parent's segment of that
/// range when it may be reused.
struct Item {
    table: usize,
    /// Position among the table's items.
    ordinal: usize,
    range: KeyRange,
    parent: Option<ParentSegment>,
}

/// A segment of the parent, its chunks, and how the new cut follows the parent's.
struct ParentSegment {
    segment: Segment,
    chunks: Vec<BlobId>,
    since: Since,
}

/// What a reader made of the items it took.
type ReaderOutput = Vec<(Item, Vec<Part>)>;

/// One segment of the new snapshot, as a reader made it.
struct Part {
    segment: Segment,
    chunks: Vec<BlobId>,
    reused: bool,
}

/// An earlier snapshot of the same database whose cut the new one continues, and how (see
/// `segment`).
struct Parent<'p> {
    snapshot: &'p Snapshot,
    since: Since,
}

/// Reads `names` inside the cut begun on `client`: up to `src.jobs` key ranges at once, each
/// reader on a connection of its own that joins the cut's exported snapshot. A table's parent
/// is the newest of `parents` that holds it; with one, the table's work is one item per parent
/// segment (reused when unchanged, else read again); without, one item, cut into segments as
/// it is read. Readers chunk, hash and
/// compress; new blobs reach `w` through a bounded channel. Returns the tables in the order
/// of `names`, and those read whole although a parent holds them, with the reason.
async fn read_tables(
    client: &tokio_postgres::Client,
    src: &DatabaseSource,
    names: &[TableName],
    parents: &[Parent<'_>],
    w: &mut Writer<'_>,
    progress: &dyn Progress,
) -> Result<(Vec<TableSnapshot>, Vec<RereadTable>), BackupError> {
    let conn = &src.conn;
    let snapshot = dump::export_snapshot(client, conn).await?;
    let mut plans = Vec::with_capacity(names.len());
    for t in names {
        let schema = dump::load_schema(client, conn, t).await?;
        plans.push(TablePlan {
            shape: segment::key_shape(&schema),
            relations: segment::relations(client, conn, t).await?,
            text_shape: segment::text_shape(client, conn, &schema).await?,
            key_collations: segment::key_collations(client, conn, &schema).await?,
            schema,
        });
    }
    let mut queue = VecDeque::new();
    let mut reread = Vec::new();
    for i in dump::largest_first(client, conn, names).await? {
        let plan = &plans[i];
        let reusable = parents.iter().find_map(|p| {
            let t = p
                .snapshot
                .tables
                .iter()
                .find(|t| t.schema.name == names[i])?;
            Some((p, t))
        });
        let reusable = reusable.and_then(|(p, t)| {
            let segments = segment::parent_segments(
                t,
                &plan.relations,
                &plan.text_shape,
                &plan.key_collations,
            );
            segments
                .map_err(|why| reread.push(said_reread(&names[i], &why)))
                .ok()
                .map(|segments| (p, segments))
        });
        match reusable {
            Some((p, segments)) => {
                for (ordinal, (seg, chunks)) in segments.into_iter().enumerate() {
                    queue.push_back(Item {
                        table: i,
                        ordinal,
                        range: seg.range(),
                        parent: Some(ParentSegment {
                            segment: seg.clone(),
                            chunks: chunks.to_vec(),
                            since: p.since,
                        }),
                    });
                }
            }
            None => queue.push_back(Item {
                table: i,
                ordinal: 0,
                range: KeyRange::default(),
                parent: None,
            }),
        }
    }
    let readers = src.jobs.clamp(1, queue.len().max(1));
    let queue = Arc::new(Mutex::new(queue));
    let plans = Arc::new(plans);
    let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT_PER_READER * readers);
    let mut tasks = JoinSet::new();
    for _ in 0..readers {
        tasks.spawn(read_queue(
            Reader {
                conn: conn.clone(),
                plans: plans.clone(),
                dedup: w.dedup.clone(),
                tx: tx.clone(),
            },
            snapshot.clone(),
            queue.clone(),
        ));
    }
    // The channel closes once every reader has ended and dropped its sender.
    drop(tx);
    let mut done: Vec<Vec<(usize, Vec<Part>)>> = (0..names.len()).map(|_| Vec::new()).collect();
    let mut record = |joined: Result<Result<ReaderOutput, BackupError>, _>| {
        let items = joined
            .map_err(|e| BackupError::Invalid(format!("table reader task failed: {e}")))??;
        for (item, parts) in items {
            done[item.table].push((item.ordinal, parts));
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
    let plans = Arc::try_unwrap(plans)
        .map_err(|_| BackupError::Invalid("a table reader is still running".into()))?;
    let mut tables = Vec::with_capacity(names.len());
    for (plan, mut items) in plans.into_iter().zip(done) {
        if items.is_empty() {
            return Err(BackupError::Invalid(format!(
                "table {} was not read",
                plan.schema.name
            )));
        }
        items.sort_by_key(|(ordinal, _)| *ordinal);
        let mut t = TableSnapshot {
            schema: plan.schema,
            rows: 0,
            bytes: 0,
            chunks: Vec::new(),
            segments: None,
        };
        let mut list = Vec::new();
        for part in items.into_iter().flat_map(|(_, parts)| parts) {
            t.rows += part.segment.rows;
            t.bytes += part.segment.bytes;
            if part.reused {
                w.stats.segments_reused += 1;
            } else {
                w.stats.segments_read += 1;
                w.stats.bytes_read += part.segment.bytes;
            }
            t.chunks.extend(part.chunks);
            list.push(part.segment);
        }
        t.segments = Some(Segments {
            relations: plan.relations,
            text_shape: plan.text_shape,
            key_collations: Some(plan.key_collations),
            list,
        });
        tables.push(t);
    }
    Ok((tables, reread))
}

/// Logs why `table` is read whole although a parent holds it; the entry for the report.
fn said_reread(table: &TableName, why: &Reread) -> RereadTable {
    // A collation that changed under a running database also puts its indexes in doubt,
    // which the operator should hear about; the other reasons follow from their own changes.
    if why.is_collation() {
        tracing::warn!(%table, "reading the whole table again: {why}");
    } else {
        tracing::info!(%table, "reading the whole table again: {why}");
    }
    RereadTable {
        table: table.to_string(),
        reason: why.to_string(),
    }
}

/// What readers send the writer.
enum Piece {
    /// A blob the repository does not have yet.
    Blob(NewBlob),
    /// `n` more bytes of table `i` were read.
    Read(usize, u64),
}

/// What every reader shares.
struct Reader {
    conn: ConnInfo,
    plans: Arc<Vec<TablePlan>>,
    dedup: Dedup,
    tx: mpsc::Sender<Piece>,
}

/// The writer stopped (it failed, and the backup with it): nothing more to do.
fn stopped() -> BackupError {
    BackupError::Invalid("the backup stopped while tables were read".into())
}

/// One reader: joins the cut, then takes items from `queue` until it is empty.
async fn read_queue(
    r: Reader,
    snapshot: String,
    queue: Arc<Mutex<VecDeque<Item>>>,
) -> Result<ReaderOutput, BackupError> {
    let client = r.conn.connect().await?;
    client
        .batch_execute(&crate::pg::settings::set_text_form_sql())
        .await
        .map_err(|e| PgError::query("setting up a table reader", &r.conn, e))?;
    dump::join_cut(&client, &r.conn, &snapshot).await?;
    let age_base = segment::age_base(&client, &r.conn).await?;
    let mut out = Vec::new();
    loop {
        let next = queue.lock().map_err(|_| stopped())?.pop_front();
        let Some(item) = next else { break };
        let parts = r.read_item(&client, age_base, &item).await?;
        out.push((item, parts));
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| PgError::query("ending a table reader's transaction", &r.conn, e))?;
    Ok(out)
}

impl Reader {
    /// Reuses the parent's segment of `item` when it is unchanged (see `segment`); otherwise
    /// reads the range, cut into segments of [`segment::SEGMENT_ROWS`] rows when it is new or
    /// has grown past [`segment::SPLIT_ROWS`].
    async fn read_item(
        &self,
        client: &tokio_postgres::Client,
        age_base: u32,
        item: &Item,
    ) -> Result<Vec<Part>, BackupError> {
        let plan = &self.plans[item.table];
        let name = &plan.schema.name;
        let mut checked = None;
        if let Some(ParentSegment {
            segment: seg,
            chunks,
            since,
        }) = &item.parent
        {
            let newer = since.newer_rows(age_base);
            let sql = segment::check_sql(&plan.schema, plan.shape.as_ref(), &item.range, &newer);
            let row = client.query_one(&sql, &[]).await.map_err(|e| {
                PgError::query(format!("checking a segment of {name}"), &self.conn, e)
            })?;
            let (rows, newer_rows): (i64, i64) = (row.get(0), row.get(1));
            if newer_rows == 0 && rows as u64 == seg.rows && self.dedup.has_all(chunks)? {
                return Ok(vec![Part {
                    segment: seg.clone(),
                    chunks: chunks.clone(),
                    reused: true,
                }]);
            }
            checked = Some(rows as u64);
        }
        let ranges = match &plan.shape {
            Some(shape) if checked.is_none_or(|n| n > segment::SPLIT_ROWS) => {
                let keys = self.cut_keys(client, plan, shape, item, checked).await?;
                // Out-of-order keys would make ranges overlap and rows be stored twice.
                let ascending: bool = client
                    .query_one(&shape.ascending_sql(&keys), &[])
                    .await
                    .map_err(|e| {
                        PgError::query(format!("checking the cuts of {name}"), &self.conn, e)
                    })?
                    .get(0);
                if !ascending {
                    return Err(BackupError::Invalid(format!(
                        "table {name}: the keys cutting it into segments are out of order; please report this as a bug"
                    )));
                }
                item.range.split(&keys)
            }
            _ => vec![item.range.clone()],
        };
        let mut parts = Vec::with_capacity(ranges.len());
        for range in ranges {
            parts.push(self.dump_range(client, item.table, range).await?);
        }
        let read: u64 = parts.iter().map(|p| p.segment.rows).sum();
        if checked.is_some_and(|n| n != read) {
            return Err(BackupError::Invalid(format!(
                "table {name}: a key range held {} rows when counted but {read} when read, in the same snapshot; please report this as a bug",
                checked.unwrap_or_default()
            )));
        }
        Ok(parts)
    }

    /// Keys cutting `item`'s range into segments of about [`segment::SEGMENT_ROWS`] rows: for
    /// a whole table read the first time, from a block sample sized by the table's statistics
    /// (none for a small table); for a grown segment of `checked` rows, or a table never
    /// analyzed, every `SEGMENT_ROWS`-th key of the range, read in key order.
    async fn cut_keys(
        &self,
        client: &tokio_postgres::Client,
        plan: &TablePlan,
        shape: &Shape,
        item: &Item,
        checked: Option<u64>,
    ) -> Result<Vec<Key>, BackupError> {
        let name = &plan.schema.name;
        let err = |e| PgError::query(format!("cutting {name} into segments"), &self.conn, e);
        let n = shape.key.len();
        let to_key = |r: &tokio_postgres::Row| (0..n).map(|i| r.get::<_, String>(i)).collect();
        let whole = item.range == KeyRange::default() && checked.is_none();
        let estimate = match whole {
            true => segment::estimate(client, &self.conn, &plan.relations).await?,
            false => None,
        };
        match estimate {
            Some((rows, _)) if rows <= segment::SPLIT_ROWS as f64 => Ok(Vec::new()),
            Some((rows, pages)) => {
                let (sql, parts) = segment::sample_sql(shape, rows, pages);
                let sample = client.query(&sql, &[]).await.map_err(err)?;
                Ok(segment::evenly(sample.iter().map(to_key).collect(), parts))
            }
            None => {
                let sql = shape.boundaries_sql(&item.range, segment::SEGMENT_ROWS);
                Ok(client
                    .query(&sql, &[])
                    .await
                    .map_err(err)?
                    .iter()
                    .map(to_key)
                    .collect())
            }
        }
    }

    /// Reads `range` of table `i` with COPY into a segment of its own chunks.
    async fn dump_range(
        &self,
        client: &tokio_postgres::Client,
        i: usize,
        range: KeyRange,
    ) -> Result<Part, BackupError> {
        let plan = &self.plans[i];
        let t = &plan.schema.name;
        let filter = match &plan.shape {
            Some(shape) => shape.range_where(&range),
            None => "TRUE".into(),
        };
        let conn = &self.conn;
        let stream = client
            .copy_out(&plan.schema.copy_out_sql(&filter))
            .await
            .map_err(|e| PgError::query(format!("reading {t}"), conn, e))?;
        futures::pin_mut!(stream);
        let mut chunker = Chunker::new();
        let mut chunks = Vec::new();
        let (mut rows, mut bytes, mut unreported) = (0u64, 0u64, 0u64);
        // A piece is one row of COPY text, however large; its chunks are cut and sent one at
        // a time, so a huge value costs itself and a few chunks, not a copy per chunk.
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| PgError::query(format!("reading {t}"), conn, e))?;
            rows += piece.iter().filter(|&&b| b == b'\n').count() as u64;
            bytes += piece.len() as u64;
            unreported += piece.len() as u64;
            for c in chunker.push(&piece) {
                self.emit(&c, &mut chunks).await?;
            }
            if unreported >= PROGRESS_STEP {
                self.report(i, std::mem::take(&mut unreported)).await?;
            }
        }
        for c in chunker.finish() {
            self.emit(&c, &mut chunks).await?;
        }
        if unreported > 0 {
            self.report(i, unreported).await?;
        }
        Ok(Part {
            segment: Segment {
                lo: range.lo,
                hi: range.hi,
                rows,
                bytes,
                chunks: chunks.len(),
            },
            chunks,
            reused: false,
        })
    }

    /// Names `chunk`, appends its id to `chunks`, and sends it to the writer when it is new.
    async fn emit(&self, chunk: &[u8], chunks: &mut Vec<BlobId>) -> Result<(), BackupError> {
        let (id, new) = self.dedup.prepare(chunk)?;
        chunks.push(id);
        if let Some(b) = new {
            self.tx.send(Piece::Blob(b)).await.map_err(|_| stopped())?;
        }
        Ok(())
    }

    /// Tells the writer that `bytes` more of table `i` were read.
    async fn report(&self, i: usize, bytes: u64) -> Result<(), BackupError> {
        self.tx
            .send(Piece::Read(i, bytes))
            .await
            .map_err(|_| stopped())
    }
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
    /// Whether the repository holds every one of `ids` (or this session is storing it).
    fn has_all(&self, ids: &[BlobId]) -> Result<bool, BackupError> {
        let known = self
            .known
            .lock()
            .map_err(|_| BackupError::Invalid("a chunk reader failed".into()))?;
        Ok(ids.iter().all(|id| known.contains(id)))
    }

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
