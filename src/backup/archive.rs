//! The change archive: a database's change stream stored in the repository as *segments*, so
//! that its snapshots can be carried forward (point-in-time restore builds on this).
//!
//! # What a segment holds
//!
//! A segment is the whole transactions of one database whose commit ends in `(start, end]`
//! (LSNs), in commit order, read through the archive's own slot. Each transaction keeps its
//! xid, commit LSN, end LSN, commit time, and its **raw `pgoutput` messages** (Relation,
//! Insert, Update with the old key when the key changed, Delete, Truncate, ...), so
//! [`decoder::decode`] reads them back exactly as the stream
//! sent them. A segment is self-contained: before the first change to a table in a segment,
//! the table's Relation message (as of that moment) is repeated, so a reader starting at any
//! segment knows every column it meets.
//!
//! Two objects per segment (see the format table in [`repository`](super::repository)):
//! `archive/data/<hash>` (kind `a`: the transactions) and then `archive/segments/<hash>` (kind
//! `A`: the small [`SegmentManifest`]: database, slot identity, LSN range, commit-time range,
//! transaction count, the data object's name). Both are sealed, zstd-compressed and named by
//! their hash like every other object; the manifest is written last, so a listed segment's
//! data exists. Change streams do not repeat, so segments are not chunked for deduplication.
//!
//! # Rules
//!
//! - A segment closes after [`ClosingRule::max_age`] (default 60 s, so the newest archived
//!   point is never older than that plus the store's write time) or when its data reaches
//!   [`ClosingRule::max_bytes`], always between transactions.
//! - The slot is confirmed only after the manifest is stored.
//! - The slot's identity is its name: a fixed prefix derived from the repository and the
//!   database, plus a random suffix chosen at creation. A run resumes at the later of the
//!   slot's confirmed position and the end of the last stored segment of the same slot; a
//!   segment stored but not confirmed (crash in between) is thus never written twice.
//! - Segments of one database chain when each starts at or before the end of the previous one
//!   and comes from the same slot. A reader ([`read_transactions`]) walks them by start LSN and
//!   drops every transaction whose `end_lsn` is not past what it already read, so an overlap
//!   (two runs that both stored the same commits) yields each transaction once.
//! - Anything else is a [`Gap`]: a segment starting after the previous one ended (a segment
//!   missing), or a different slot (the slot was lost or recreated). A gap is reported, and the
//!   recoverable window starts after the last one.
//! - A snapshot's `lsn` is its cut; it is *covered* when a chain starts at or before it. The
//!   recoverable window of a database runs from the oldest snapshot covered by the chain that
//!   reaches the newest segment, to that chain's end.
//! - Prune deletes a database's segments that end before its oldest kept snapshot's cut, and
//!   nothing of a database without a snapshot ([`forgettable`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::lock::{Lock, LockKind};
use super::repository::Repository;
use super::session::source_label;
use super::snapshot::{self, Snapshot};
use super::{failpoint, BackupError};
use crate::cdc::decoder::{self, Message};
use crate::cdc::sink::{self, ChangeSink, Transaction};
use crate::cdc::{names, publication, slot, CdcError};
use crate::config::TablePattern;
use crate::pg::{pg_time, resolve_tables, ConnInfo, Lsn, TableInfo, PG_EPOCH_MICROS};

pub const KIND_SEGMENT: u8 = b'A';
pub const KIND_SEGMENT_DATA: u8 = b'a';
pub const SEGMENTS_DIR: &str = "archive/segments";
pub const DATA_DIR: &str = "archive/data";

/// When an open segment is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosingRule {
    pub max_age: Duration,
    pub max_bytes: usize,
}

impl Default for ClosingRule {
    fn default() -> Self {
        ClosingRule {
            max_age: Duration::from_secs(60),
            max_bytes: 64 << 20,
        }
    }
}

impl ClosingRule {
    /// Whether a segment opened `age` ago, holding `bytes` of messages, closes now.
    /// `moved` tells whether it covers anything (transactions or an idle stretch of WAL):
    /// an empty segment is never written.
    pub fn closes(&self, age: Duration, bytes: usize, moved: bool) -> bool {
        moved && (age >= self.max_age || bytes >= self.max_bytes)
    }
}

/// The small record of one stored segment (`archive/segments/<hash>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentManifest {
    pub version: u32,
    /// The database, as snapshots name it ([`source_label`]).
    pub db: String,
    /// The slot's name: its identity (see the module documentation).
    pub slot: String,
    /// The source's `pg_control_system().system_identifier` (as a snapshot's cut records it),
    /// when the archiving role may read it; absent in segments written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Transactions whose commit ends in `(start, end]`.
    pub start: Lsn,
    pub end: Lsn,
    pub first_commit: Option<DateTime<Utc>>,
    pub last_commit: Option<DateTime<Utc>>,
    pub transactions: u64,
    /// Bytes of `pgoutput` messages.
    pub bytes: u64,
    /// The name of the `archive/data/` object.
    pub data: String,
    pub written: DateTime<Utc>,
}

/// One archived transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedTransaction {
    pub xid: u32,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: DateTime<Utc>,
    /// The raw `pgoutput` messages, hex.
    pub messages: Vec<String>,
}

impl ArchivedTransaction {
    /// The transaction as the stream delivered it (raw messages), to feed a [`ChangeSink`].
    pub fn transaction(&self) -> Result<Transaction, String> {
        let messages = self
            .messages
            .iter()
            .map(|m| hex::decode(m).map(Bytes::from).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Transaction {
            xid: self.xid,
            commit_lsn: self.commit_lsn,
            end_lsn: self.end_lsn,
            commit_time: self.commit_time.timestamp_micros() - PG_EPOCH_MICROS,
            messages,
        })
    }

    /// The messages, decoded.
    pub fn decode(&self) -> Result<Vec<Message>, String> {
        self.messages
            .iter()
            .map(|m| {
                let raw = hex::decode(m).map_err(|e| e.to_string())?;
                decoder::decode(&Bytes::from(raw)).map_err(|e| e.to_string())
            })
            .collect()
    }

    /// The table descriptions (raw `pgoutput` Relation messages) this transaction carries. A
    /// segment carries a table's description once, in the first of its transactions that
    /// touches the table: a reader that leaves a transaction out still needs these for the
    /// transactions after it.
    pub fn descriptions(&self) -> Result<Vec<Bytes>, String> {
        self.messages
            .iter()
            // A Relation message starts with the byte 'R'.
            .filter(|m| m.starts_with("52"))
            .map(|m| hex::decode(m).map(Bytes::from).map_err(|e| e.to_string()))
            .collect()
    }
}

/// The body of an `archive/data/` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentData {
    pub transactions: Vec<ArchivedTransaction>,
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    /// The database's configured name (segments name it as snapshots do, see
    /// [`source_label`]).
    pub label: String,
    pub conn: ConnInfo,
    pub tables: Vec<TablePattern>,
    pub closing: ClosingRule,
}

/// What an archive run tells its caller while it runs (the agent makes metrics and `/status`
/// of it). Called on the run's task between transactions: it must return at once.
pub trait ArchiveObserver: Sync {
    /// The stream from slot `slot` is open; everything up to `start` is archived already.
    fn streaming(&self, slot: &str, start: Lsn);
    /// A segment is stored (data, then manifest); the slot is confirmed up to its end next.
    fn stored(&self, segment: &SegmentManifest);
}

/// Tells nothing (`invsync archive run` prints its summary at the end).
pub struct Unobserved;

impl ArchiveObserver for Unobserved {
    fn streaming(&self, _: &str, _: Lsn) {}
    fn stored(&self, _: &SegmentManifest) {}
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiveSummary {
    pub slot: String,
    pub started_at: Lsn,
    pub segments: u64,
    pub transactions: u64,
    pub end: Lsn,
}

/// The archive's sink: buffers transactions into the open segment and stores it by the rule.
struct SegmentWriter<'a> {
    repo: &'a Repository,
    lock: &'a Lock,
    observer: &'a dyn ArchiveObserver,
    db: String,
    slot: String,
    system: Option<String>,
    rule: ClosingRule,
    start: Lsn,
    end: Lsn,
    opened: Instant,
    txns: Vec<ArchivedTransaction>,
    bytes: usize,
    /// Every table's latest Relation message, and which of them this segment has carried.
    relations: HashMap<u32, Bytes>,
    carried: std::collections::HashSet<u32>,
    summary: ArchiveSummary,
}

impl SegmentWriter<'_> {
    fn relation_id(m: &Message) -> Option<u32> {
        match m {
            Message::Insert { relation, .. }
            | Message::Update { relation, .. }
            | Message::Delete { relation, .. } => Some(*relation),
            _ => None,
        }
    }

    fn decode(&self, raw: &Bytes) -> Result<Message, BackupError> {
        decoder::decode(raw).map_err(|error| {
            BackupError::Stream(CdcError::Decode {
                target: self.db.clone(),
                error,
            })
        })
    }
}

impl ChangeSink for SegmentWriter<'_> {
    type Error = BackupError;

    async fn transaction(&mut self, txn: Transaction) -> Result<(), BackupError> {
        if txn.end_lsn <= self.end {
            // Already stored by an earlier run (see the module documentation).
            return Ok(());
        }
        let mut messages = Vec::with_capacity(txn.messages.len());
        for raw in txn.messages {
            let message = self.decode(&raw)?;
            let mut needs: Vec<u32> = match &message {
                Message::Relation(r) => {
                    self.relations.insert(r.id, raw.clone());
                    self.carried.insert(r.id);
                    Vec::new()
                }
                Message::Truncate { relations, .. } => relations.clone(),
                m => Self::relation_id(m).into_iter().collect(),
            };
            needs.retain(|id| !self.carried.contains(id));
            for id in needs {
                let Some(rel) = self.relations.get(&id) else {
                    return Err(CdcError::Protocol(format!(
                        "{}: a change to relation {id} arrived before its description",
                        self.db
                    ))
                    .into());
                };
                self.bytes += rel.len();
                messages.push(hex::encode(rel));
                self.carried.insert(id);
            }
            self.bytes += raw.len();
            messages.push(hex::encode(&raw));
        }
        self.txns.push(ArchivedTransaction {
            xid: txn.xid,
            commit_lsn: txn.commit_lsn,
            end_lsn: txn.end_lsn,
            commit_time: pg_time(txn.commit_time).unwrap_or_default(),
            messages,
        });
        self.end = txn.end_lsn;
        Ok(())
    }

    fn idle_until(&mut self, position: Lsn) {
        self.end = self.end.max(position);
    }

    fn wants_flush(&self) -> bool {
        self.rule
            .closes(self.opened.elapsed(), self.bytes, self.end > self.start)
    }

    async fn flush(&mut self) -> Result<Option<Lsn>, BackupError> {
        if self.end <= self.start {
            return Ok(None);
        }
        if !self.lock.held() {
            return Err(BackupError::Locked {
                repo: self.repo.name.clone(),
                message: "the archive's lock was not refreshed in time (store unreachable?); stopped before writing, run `invsync archive run` again".into(),
            });
        }
        let txns = std::mem::take(&mut self.txns);
        let manifest = SegmentManifest {
            version: 1,
            db: self.db.clone(),
            slot: self.slot.clone(),
            system: self.system.clone(),
            start: self.start,
            end: self.end,
            first_commit: txns.first().map(|t| t.commit_time),
            last_commit: txns.last().map(|t| t.commit_time),
            transactions: txns.len() as u64,
            bytes: self.bytes as u64,
            data: String::new(),
            written: Utc::now(),
        };
        let data = self
            .repo
            .write_object(
                KIND_SEGMENT_DATA,
                DATA_DIR,
                &SegmentData { transactions: txns },
            )
            .await?;
        let manifest = SegmentManifest { data, ..manifest };
        self.repo
            .write_object(KIND_SEGMENT, SEGMENTS_DIR, &manifest)
            .await?;
        self.observer.stored(&manifest);
        if manifest.transactions > 0 {
            // Stored, not yet confirmed: a restart must not store these transactions again.
            failpoint("archive-after-segment");
        }
        tracing::info!(
            db = %self.db,
            start = %self.start,
            end = %self.end,
            transactions = manifest.transactions,
            "segment stored"
        );
        self.summary.segments += 1;
        self.summary.transactions += manifest.transactions;
        self.summary.end = self.end;
        self.start = self.end;
        self.opened = Instant::now();
        self.bytes = 0;
        self.carried.clear();
        Ok(Some(self.end))
    }
}

/// The segment manifests of the repository, unreadable ones as errors naming them.
pub async fn list_segments(
    repo: &Repository,
) -> Result<Vec<(String, SegmentManifest)>, BackupError> {
    repo.master("reading the change archive")?;
    let mut out = Vec::new();
    for name in repo.list_names(SEGMENTS_DIR).await? {
        let m: SegmentManifest = repo
            .read_object(KIND_SEGMENT, &format!("{SEGMENTS_DIR}/{name}"))
            .await?;
        out.push((name, m));
    }
    out.sort_by_key(|a| (a.1.start, a.1.end));
    Ok(out)
}

/// Reads one segment's transactions, checking they match its manifest.
pub async fn read_segment(
    repo: &Repository,
    m: &SegmentManifest,
) -> Result<Vec<ArchivedTransaction>, BackupError> {
    let rel = format!("{DATA_DIR}/{}", m.data);
    let data: SegmentData = repo.read_object(KIND_SEGMENT_DATA, &rel).await?;
    let corrupt = |reason: &str| BackupError::Corrupt {
        object: format!("{}/{rel}", repo.name),
        reason: reason.to_string(),
    };
    if data.transactions.len() as u64 != m.transactions {
        return Err(corrupt(
            "holds another number of transactions than its manifest says",
        ));
    }
    let mut last = m.start;
    for t in &data.transactions {
        if t.end_lsn <= last || t.end_lsn > m.end {
            return Err(corrupt(
                "a transaction lies outside the segment's range or out of order",
            ));
        }
        last = t.end_lsn;
    }
    Ok(data.transactions)
}

/// Every archived transaction of `db` in the chain that reaches its newest segment, each once,
/// in commit order (see the module documentation for how overlaps are dropped).
pub async fn read_transactions(
    repo: &Repository,
    db: &str,
) -> Result<Vec<ArchivedTransaction>, BackupError> {
    let segments: Vec<SegmentManifest> = list_segments(repo)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| m.db == db)
        .collect();
    let chain = chains(&segments).pop().unwrap_or_default();
    let mut out: Vec<ArchivedTransaction> = Vec::new();
    let mut upto = Lsn(0);
    for m in chain {
        for t in read_segment(repo, m).await? {
            if t.end_lsn > upto {
                upto = t.end_lsn;
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// A break in a database's archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The end of the segments before the gap.
    pub after: Lsn,
    /// The start of the segments after it.
    pub resumes: Lsn,
    pub reason: String,
}

/// A point that can be restored to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    pub lsn: Lsn,
    pub time: Option<DateTime<Utc>>,
    /// The snapshot it starts from (earliest point only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// One database's archive, as `archive status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DbArchive {
    pub db: String,
    pub segments: usize,
    pub transactions: u64,
    /// The slot of the newest segment.
    pub slot: String,
    /// The oldest snapshot covered by the chain reaching the newest segment; `None` when no
    /// snapshot is covered (take a backup while archiving).
    pub earliest: Option<Point>,
    /// The end of the newest contiguous chain.
    pub latest: Point,
    pub gaps: Vec<Gap>,
}

/// Splits one database's segments (any order) into chains: runs of segments that each start
/// at or before the previous one's end, from the same slot. A segment entirely inside what
/// came before (a duplicate) joins the chain.
pub fn chains<'a>(
    segments: impl IntoIterator<Item = &'a SegmentManifest>,
) -> Vec<Vec<&'a SegmentManifest>> {
    let mut sorted: Vec<&SegmentManifest> = segments.into_iter().collect();
    sorted.sort_by_key(|a| (a.start, a.end));
    let mut out: Vec<Vec<&SegmentManifest>> = Vec::new();
    let mut end = Lsn(0);
    for m in sorted {
        match out.last_mut() {
            Some(chain) if m.start <= end && chain[0].slot == m.slot => {
                chain.push(m);
                end = end.max(m.end);
            }
            _ => {
                out.push(vec![m]);
                end = m.end;
            }
        }
    }
    out
}

fn gap_between(before: &[&SegmentManifest], after: &[&SegmentManifest]) -> Gap {
    let end = before.iter().map(|m| m.end).max().unwrap_or_default();
    let (a, b) = (before[0], after[0]);
    let reason = if a.slot != b.slot {
        format!(
            "the archive's slot changed from {} to {} (the slot was dropped or lost and created again); changes between them are not archived",
            a.slot, b.slot
        )
    } else {
        format!(
            "no segment covers {end} to {}: a segment is missing",
            b.start
        )
    };
    Gap {
        after: end,
        resumes: b.start,
        reason,
    }
}

/// Where a chain ends: its highest end LSN, and the newest commit it holds.
fn chain_end(chain: &[&SegmentManifest]) -> Point {
    let (lsn, end_time) = chain
        .iter()
        .map(|m| (m.end, m.last_commit))
        .max_by_key(|(e, _)| *e)
        .unwrap_or_default();
    Point {
        lsn,
        time: chain
            .iter()
            .filter_map(|m| m.last_commit)
            .max()
            .or(end_time),
        snapshot: None,
    }
}

/// Each database's segments split into [`chains`].
pub type DbChains<'a> = BTreeMap<&'a str, Vec<Vec<&'a SegmentManifest>>>;

/// The [`chains`] of every database with segments.
pub fn chains_by_db(segments: &[SegmentManifest]) -> DbChains<'_> {
    let mut by_db: BTreeMap<&str, Vec<&SegmentManifest>> = BTreeMap::new();
    for m in segments {
        by_db.entry(m.db.as_str()).or_default().push(m);
    }
    by_db
        .into_iter()
        .map(|(db, segs)| (db, chains(segs)))
        .collect()
}

/// How far forward the archive carries a restore of `snap`: the end of the unbroken chain of
/// its database's segments that covers its cut; `None` without one (a snapshot without a cut,
/// before the archive started, or in a gap).
pub fn reach(chains: &DbChains, snap: &Snapshot) -> Option<Point> {
    let (db, cut) = (snap.source.as_deref()?, snap.lsn?);
    chains
        .get(db)?
        .iter()
        .map(|c| (c[0].start, chain_end(c)))
        .find(|(start, end)| *start <= cut && cut <= end.lsn)
        .map(|(_, end)| end)
}

/// The archive status of every database with segments, given the repository's snapshots
/// (id, manifest).
pub fn status(segments: &[SegmentManifest], snapshots: &[(String, Snapshot)]) -> Vec<DbArchive> {
    let mut out = Vec::new();
    for (db, chains) in chains_by_db(segments) {
        let gaps = chains
            .windows(2)
            .map(|w| gap_between(&w[0], &w[1]))
            .collect();
        let Some(last) = chains.last() else { continue };
        let start = last[0].start;
        let latest = chain_end(last);
        let end = latest.lsn;
        let earliest = snapshots
            .iter()
            .filter(|(_, s)| s.source.as_deref() == Some(db))
            .filter_map(|(id, s)| s.lsn.map(|l| (l, id, s.time)))
            .filter(|(l, _, _)| *l >= start && *l <= end)
            .min_by_key(|(l, _, _)| *l)
            .map(|(lsn, id, time)| Point {
                lsn,
                time: Some(time),
                snapshot: Some(id.clone()),
            });
        out.push(DbArchive {
            db: db.to_string(),
            segments: chains.iter().map(Vec::len).sum(),
            transactions: chains.iter().flatten().map(|m| m.transactions).sum(),
            slot: last[0].slot.clone(),
            earliest,
            latest,
            gaps,
        });
    }
    out
}

/// The segments prune may delete: those of a database that end before the cut of its oldest
/// snapshot (no kept snapshot needs them to reach forward). A database without a snapshot
/// keeps all its segments.
pub fn forgettable<'a>(
    segments: &'a [(String, SegmentManifest)],
    snapshots: &[(String, Snapshot)],
) -> Vec<&'a (String, SegmentManifest)> {
    let mut oldest_cut: HashMap<&str, Lsn> = HashMap::new();
    for (_, s) in snapshots {
        if let (Some(db), Some(lsn)) = (s.source.as_deref(), s.lsn) {
            let e = oldest_cut.entry(db).or_insert(lsn);
            *e = (*e).min(lsn);
        }
    }
    segments
        .iter()
        .filter(|(_, m)| {
            oldest_cut
                .get(m.db.as_str())
                .is_some_and(|cut| m.end < *cut)
        })
        .collect()
}

/// The source's system identifier, `None` when this role may not read it.
async fn system_identifier(client: &tokio_postgres::Client) -> Option<String> {
    let row = client
        .query_one(
            "SELECT CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE') \
             THEN (SELECT system_identifier::text FROM pg_control_system()) END",
            &[],
        )
        .await
        .ok()?;
    row.get(0)
}

/// The slot this repository archives `db` through, if one exists: (name, confirmed position).
async fn find_slot(
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
    prefix: &str,
) -> Result<Option<(String, Option<Lsn>)>, BackupError> {
    let rows = client
        .query(
            "SELECT slot_name::text, confirmed_flush_lsn::text FROM pg_replication_slots \
             WHERE starts_with(slot_name::text, $1) ORDER BY slot_name",
            &[&format!("{prefix}_")],
        )
        .await
        .map_err(|e| crate::pg::PgError::query("reading replication slots", conn, e))?;
    if rows.len() > 1 {
        return Err(BackupError::Invalid(format!(
            "{conn}: several archive slots ({}) exist for this repository; drop all but the newest with SELECT pg_drop_replication_slot('NAME')",
            rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(rows.first().map(|r| {
        (
            r.get::<_, String>(0),
            r.get::<_, Option<String>>(1).and_then(|s| s.parse().ok()),
        )
    }))
}

/// Ends the walsender an earlier holder of this archive (a paused or cut-off agent) may still
/// stream from the archive's slot, as a new holder of its lease does before [`run_observed`].
/// Returns its process id, if one was active. Nothing to end when the slot does not exist yet.
pub async fn take_over(
    repo: &Repository,
    opts: &ArchiveOptions,
) -> Result<Option<i32>, BackupError> {
    let conn = &opts.conn;
    let prefix = names::archive(&repo.config.id, &source_label(&opts.label, conn));
    let client = conn.connect().await?;
    match find_slot(&client, conn, &prefix).await? {
        Some((slot, _)) => Ok(slot::end_walsender(&client, conn, &slot).await?),
        None => Ok(None),
    }
}

/// Archives `opts.conn`'s change stream into `repo` until `stop` turns true (the open segment
/// is stored first) or the stream fails. Creates the archive's publication and slot on first
/// use. Holds an archive lock, so prune keeps what it is writing.
pub async fn run(
    repo: &Repository,
    opts: &ArchiveOptions,
    stop: &mut watch::Receiver<bool>,
) -> Result<ArchiveSummary, BackupError> {
    run_observed(repo, opts, stop, &Unobserved).await
}

/// [`run`], telling `observer` where the archive stands as it goes.
pub async fn run_observed(
    repo: &Repository,
    opts: &ArchiveOptions,
    stop: &mut watch::Receiver<bool>,
    observer: &dyn ArchiveObserver,
) -> Result<ArchiveSummary, BackupError> {
    repo.master("archiving")?;
    let conn = &opts.conn;
    let db = source_label(&opts.label, conn);
    let client = conn.connect().await?;
    slot::check_source(&client, conn).await?;
    let names = resolve_tables(&client, conn, &opts.tables).await?;
    let mut tables = Vec::new();
    for t in &names {
        tables.push(TableInfo::load(&client, conn, t).await?);
    }
    publication::check_identity(&tables)?;
    let prefix = names::archive(&repo.config.id, &db);
    publication::ensure(&client, conn, &prefix, &tables).await?;

    let lock = Lock::acquire(repo, LockKind::Archive).await?;
    let result = async {
        let (slot_name, mut start) = match find_slot(&client, conn, &prefix).await? {
            Some((name, confirmed)) => (name, confirmed.unwrap_or_default()),
            None => {
                let suffix = uuid::Uuid::new_v4().simple().to_string();
                let name = format!("{prefix}_{}", &suffix[..8]);
                let created = slot::create(conn, &name, &prefix, false).await?;
                let at = created.consistent_point;
                created.release();
                tracing::info!(%db, slot = %name, "created the archive's slot at {at}");
                (name, at)
            }
        };
        // A segment stored whose confirmation did not reach the server: resume after it.
        let stored_end = list_segments(repo)
            .await?
            .into_iter()
            .filter(|(_, m)| m.db == db && m.slot == slot_name)
            .map(|(_, m)| m.end)
            .max();
        let confirmed = start;
        if let Some(end) = stored_end {
            start = start.max(end);
        }
        let stream = slot::stream(conn, &slot_name, &prefix, start, confirmed).await?;
        tracing::info!(%db, slot = %slot_name, %start, "archiving");
        observer.streaming(&slot_name, start);
        let mut writer = SegmentWriter {
            repo,
            lock: &lock,
            observer,
            db: db.clone(),
            slot: slot_name.clone(),
            system: system_identifier(&client).await,
            rule: opts.closing,
            start,
            end: start,
            opened: Instant::now(),
            txns: Vec::new(),
            bytes: 0,
            relations: HashMap::new(),
            carried: Default::default(),
            summary: ArchiveSummary {
                slot: slot_name,
                started_at: start,
                end: start,
                ..Default::default()
            },
        };
        sink::drive(conn, stream, &mut writer, stop).await?;
        Ok(writer.summary)
    }
    .await;
    lock.release(repo).await;
    result
}

/// `archive status`: every archived database's window and gaps.
pub async fn archive_status(repo: &Repository) -> Result<Vec<DbArchive>, BackupError> {
    let segments: Vec<SegmentManifest> = list_segments(repo)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    let snaps = snapshot::list(repo).await?;
    Ok(status(&segments, &snaps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(slot: &str, start: u64, end: u64) -> SegmentManifest {
        SegmentManifest {
            version: 1,
            db: "src".into(),
            slot: slot.into(),
            system: None,
            start: Lsn(start),
            end: Lsn(end),
            first_commit: None,
            last_commit: None,
            transactions: 1,
            bytes: 1,
            data: format!("{slot}{start}"),
            written: Utc::now(),
        }
    }

    fn snap(lsn: u64) -> (String, Snapshot) {
        let s = Snapshot {
            version: 1,
            session: "s".into(),
            time: Utc::now(),
            host: "h".into(),
            tags: Vec::new(),
            source: Some("src".into()),
            lsn: Some(Lsn(lsn)),
            cut: None,
            tables: Vec::new(),
            trees: Vec::new(),
            stats: Default::default(),
            id_key: None,
        };
        (format!("snap{lsn}"), s)
    }

    #[test]
    fn a_segment_closes_by_age_or_size_and_never_empty() {
        let r = ClosingRule {
            max_age: Duration::from_secs(60),
            max_bytes: 1000,
        };
        assert!(!r.closes(Duration::from_secs(59), 999, true));
        assert!(r.closes(Duration::from_secs(60), 0, true));
        assert!(r.closes(Duration::from_secs(1), 1000, true));
        assert!(!r.closes(Duration::from_secs(600), 5000, false));
    }

    #[test]
    fn contiguous_and_overlapping_segments_form_one_window() {
        let segs = [
            seg("a", 100, 200),
            seg("a", 200, 300),
            seg("a", 250, 300),
            seg("a", 300, 400),
        ];
        let st = status(&segs, &[snap(50), snap(150), snap(350)]);
        assert_eq!(st.len(), 1);
        assert!(st[0].gaps.is_empty(), "{:?}", st[0].gaps);
        assert_eq!(st[0].latest.lsn, Lsn(400));
        // The snapshot before the archive began is not covered.
        assert_eq!(st[0].earliest.as_ref().unwrap().lsn, Lsn(150));
    }

    #[test]
    fn a_missing_segment_and_a_new_slot_are_gaps() {
        let segs = [seg("a", 100, 200), seg("a", 300, 400), seg("b", 400, 500)];
        let st = status(&segs, &[snap(150), snap(350), snap(450)]);
        let gaps = &st[0].gaps;
        assert_eq!(gaps.len(), 2, "{gaps:?}");
        assert_eq!((gaps[0].after, gaps[0].resumes), (Lsn(200), Lsn(300)));
        assert!(gaps[0].reason.contains("missing"), "{}", gaps[0].reason);
        assert!(
            gaps[1].reason.contains("slot changed"),
            "{}",
            gaps[1].reason
        );
        // The window starts after the last gap.
        assert_eq!(st[0].earliest.as_ref().unwrap().lsn, Lsn(450));
        assert_eq!(st[0].latest.lsn, Lsn(500));
    }

    #[test]
    fn prune_keeps_what_the_oldest_snapshot_needs() {
        let segs: Vec<(String, SegmentManifest)> =
            [seg("a", 100, 200), seg("a", 200, 300), seg("a", 300, 400)]
                .into_iter()
                .map(|m| (m.data.clone(), m))
                .collect();
        let gone: Vec<&str> = forgettable(&segs, &[snap(250), snap(380)])
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(gone, ["a100"]);
        assert!(forgettable(&segs, &[]).is_empty());
    }
}
