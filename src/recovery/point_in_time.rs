//! Point-in-time restore: a database as it was at a chosen moment, from a snapshot and the
//! change archive that carries it forward.
//!
//! # Target semantics
//!
//! The archive holds whole transactions in commit order, each with its commit end LSN (the WAL
//! position just past its commit record, what `pg_current_wal_lsn()` shows once it is
//! flushed) and its commit time.
//! - `--until TIME`: the transactions in commit order up to the first one that committed after
//!   `TIME` are in; that one and everything after it are out. With `--exclusive`, a
//!   transaction that committed exactly at `TIME` is out too.
//! - `--until-lsn LSN`: the transactions whose commit ends at or before `LSN` are in; with
//!   `--exclusive`, those ending before it.
//! - `--until latest`: everything archived in the newest unbroken stretch of the archive.
//!
//! # Plan, then write
//!
//! A database's segments form chains (see [`archive`]); each chain with a snapshot whose cut
//! it covers gives a *window*: from the oldest such snapshot (its cut LSN and its time) to the
//! chain's end (its LSN and its last commit time). The target must lie in one window, or the
//! restore fails naming every window; a gap thus ends a window, and a target before the gap
//! restores from that earlier window. The newest snapshot of the window at or before the target
//! is chosen, and the transactions it does not hold are read: those its cut did not see (by the
//! cut's xid snapshot, so a commit racing the cut is replayed exactly when the snapshot lacks
//! it; snapshots written before that was recorded fall back to "commit ends after the cut").
//! A snapshot that already holds a transaction after the target cannot be used and the next
//! older one is tried. Only then is anything written: the snapshot's tables are restored
//! ([`restore_db`], which refuses a non-empty target before writing) and the transactions are
//! replayed through sync's apply engine ([`Replay`]), which leaves no replication origin or
//! progress row behind. Last, each restored table's owned sequences move forward to at least
//! the largest value of their column, so they end at or past their values as of the target.

use std::collections::HashSet;
use std::future::Future;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;

use super::RecoveryError;
use crate::backup::archive::{self, ArchivedTransaction, Point, SegmentManifest};
use crate::backup::repository::Repository;
use crate::backup::restore::{restore_db, RestoreDbOptions, RestoredTable};
use crate::backup::snapshot::{self, Snapshot};
use crate::cdc::sink::ChangeSink;
use crate::pg::{quote_literal, ConnInfo, Lsn, PgError, TableName};
use crate::sync::replay::{Replay, ReplayStats};

/// The moment to restore to (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "at", rename_all = "snake_case")]
pub enum RecoveryTarget {
    Latest,
    Time(DateTime<Utc>),
    Lsn(Lsn),
}

impl std::fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryTarget::Latest => f.write_str("the latest archived point"),
            RecoveryTarget::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            RecoveryTarget::Lsn(l) => write!(f, "LSN {l}"),
        }
    }
}

impl RecoveryTarget {
    /// Parses `--until`: `latest`, an RFC 3339 time (`2026-12-07T03:00:00+08:00`), or
    /// `YYYY-MM-DD HH:MM:SS[.ffffff]` read as UTC.
    pub fn parse_until(text: &str) -> Result<RecoveryTarget, RecoveryError> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("latest") {
            return Ok(RecoveryTarget::Latest);
        }
        if let Ok(time) = DateTime::parse_from_rfc3339(t) {
            return Ok(RecoveryTarget::Time(time.with_timezone(&Utc)));
        }
        for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(naive) = NaiveDateTime::parse_from_str(t, format) {
                return Ok(RecoveryTarget::Time(naive.and_utc()));
            }
        }
        Err(RecoveryError::Invalid(format!(
            "--until {text:?} is not a time: give `latest`, an RFC 3339 time such as 2026-12-07T03:00:00+08:00, or `2026-12-07 03:00:00` (UTC)"
        )))
    }

    /// Parses `--until-lsn` (`16/B374D848`).
    pub fn parse_lsn(text: &str) -> Result<RecoveryTarget, RecoveryError> {
        text.trim().parse().map(RecoveryTarget::Lsn).map_err(|_| {
            RecoveryError::Invalid(format!(
                "--until-lsn {text:?} is not an LSN: give it as PostgreSQL prints one, e.g. 0/16B3748"
            ))
        })
    }
}

/// A stretch of time that can be restored to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// The oldest snapshot the stretch covers.
    pub start: Point,
    /// The end of the archive's chain: its LSN and its last commit time.
    pub end: Point,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let time = |p: &Point| p.time.map_or("-".to_string(), |t| t.to_rfc3339());
        write!(
            f,
            "from LSN {} ({}) to LSN {} ({})",
            self.start.lsn,
            time(&self.start),
            self.end.lsn,
            time(&self.end)
        )
    }
}

/// Where replay stops, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Lsn(Lsn),
    Time(DateTime<Utc>),
}

impl Stop {
    fn beyond(&self, t: &ArchivedTransaction) -> bool {
        match self {
            Stop::Lsn(l) => t.end_lsn > *l,
            Stop::Time(at) => t.commit_time > *at,
        }
    }
}

/// What the archive and the snapshots say about a target: the window holding it, where replay
/// stops, and the snapshots to start from, newest first.
#[derive(Debug)]
struct Plan<'a> {
    window: Window,
    chain: Vec<&'a SegmentManifest>,
    stop: Stop,
    candidates: Vec<&'a (String, Snapshot)>,
}

/// One chain of segments with the snapshots whose cut it covers (oldest first).
struct Stretch<'a> {
    window: Window,
    chain: Vec<&'a SegmentManifest>,
    covered: Vec<&'a (String, Snapshot)>,
}

/// The windows of `db`: one per chain of segments that covers a snapshot's cut, oldest first.
fn windows<'a>(
    segments: &'a [SegmentManifest],
    snapshots: &'a [(String, Snapshot)],
    db: &str,
) -> Vec<Stretch<'a>> {
    let mut out = Vec::new();
    for chain in archive::chains(segments) {
        let start = chain[0].start;
        let end = chain.iter().map(|m| m.end).max().unwrap_or(start);
        let mut covered: Vec<&(String, Snapshot)> = snapshots
            .iter()
            .filter(|(_, s)| s.source.as_deref() == Some(db))
            .filter(|(_, s)| s.lsn.is_some_and(|l| l >= start && l <= end))
            .collect();
        covered.sort_by_key(|(_, s)| (s.lsn, s.time));
        let Some((id, first)) = covered.first().copied() else {
            continue;
        };
        let window = Window {
            start: Point {
                lsn: first.lsn.unwrap_or_default(),
                time: Some(first.time),
                snapshot: Some(id.clone()),
            },
            end: Point {
                lsn: end,
                time: chain.iter().filter_map(|m| m.last_commit).max(),
                snapshot: None,
            },
        };
        out.push(Stretch {
            window,
            chain,
            covered,
        });
    }
    out
}

fn plan<'a>(
    segments: &'a [SegmentManifest],
    snapshots: &'a [(String, Snapshot)],
    db: &str,
    target: RecoveryTarget,
    exclusive: bool,
) -> Result<Plan<'a>, RecoveryError> {
    let all = windows(segments, snapshots, db);
    let outside = || RecoveryError::OutsideWindow {
        target: format!("{target}{}", if exclusive { " (exclusive)" } else { "" }),
        db: db.to_string(),
        windows: if all.is_empty() {
            "there is none (no snapshot taken while the archive ran: take a backup)".into()
        } else {
            all.iter()
                .map(|s| s.window.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        },
    };
    let chosen = match target {
        RecoveryTarget::Latest => all.last().map(|st| {
            let candidates = st.covered.iter().rev().copied().collect();
            (st, Stop::Lsn(st.window.end.lsn), candidates)
        }),
        RecoveryTarget::Lsn(l) => {
            let bound = if exclusive {
                Lsn(l.0.saturating_sub(1))
            } else {
                l
            };
            all.iter()
                .find(|st| st.window.start.lsn <= bound && bound <= st.window.end.lsn)
                .map(|st| {
                    let candidates = st
                        .covered
                        .iter()
                        .rev()
                        .filter(|(_, snap)| snap.lsn.is_some_and(|cut| cut <= bound))
                        .copied()
                        .collect();
                    (st, Stop::Lsn(bound), candidates)
                })
        }
        RecoveryTarget::Time(t) => {
            let bound = if exclusive {
                t - chrono::Duration::microseconds(1)
            } else {
                t
            };
            all.iter()
                .find(|st| {
                    st.window.start.time.is_some_and(|s| s <= bound)
                        && st.window.end.time.is_some_and(|e| bound <= e)
                })
                .map(|st| {
                    let candidates = st
                        .covered
                        .iter()
                        .rev()
                        .filter(|(_, snap)| snap.time <= bound)
                        .copied()
                        .collect();
                    (st, Stop::Time(bound), candidates)
                })
        }
    };
    let (stretch, stop, candidates) = chosen.ok_or_else(outside)?;
    Ok(Plan {
        window: stretch.window.clone(),
        chain: stretch.chain.clone(),
        stop,
        candidates,
    })
}

/// Fails when a segment of the plan's chain comes from another database system than one of
/// its snapshots (where both recorded theirs).
fn same_system(db: &str, plan: &Plan<'_>) -> Result<(), RecoveryError> {
    for (id, snap) in &plan.candidates {
        let Some(snap_system) = snap.cut.as_ref().map(|c| &c.system) else {
            continue;
        };
        if let Some(archive) = plan
            .chain
            .iter()
            .filter_map(|m| m.system.as_ref())
            .find(|s| *s != snap_system)
        {
            return Err(RecoveryError::ForeignArchive {
                db: db.to_string(),
                archive: archive.clone(),
                snapshot: snapshot::short(id).to_string(),
                snapshot_system: snap_system.clone(),
            });
        }
    }
    Ok(())
}

/// Whether `snap` already holds `t` (see the module documentation).
fn holds(snap: &Snapshot, t: &ArchivedTransaction) -> bool {
    match snap.cut.as_ref().and_then(|c| c.sees(t.xid)) {
        Some(seen) => seen,
        None => snap.lsn.is_some_and(|cut| t.end_lsn <= cut),
    }
}

/// Which archived transactions a replay onto a snapshot takes, judged one by one in commit
/// order. The archive is read twice with the same judgement: once to check that the snapshot
/// can be used ([`usable`]), once to replay ([`replay`]), so memory stays bounded by a segment.
struct Selection<'s> {
    snap: &'s Snapshot,
    stop: Stop,
    /// The end of the last transaction judged (segments may overlap).
    upto: Lsn,
    /// A transaction past the stop was met: nothing later is replayed.
    stopped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Replay,
    Skip,
    /// The snapshot already holds a transaction past the stop (a commit racing its cut was
    /// after the target).
    Unusable,
}

impl<'s> Selection<'s> {
    fn new(snap: &'s Snapshot, stop: Stop) -> Self {
        Selection {
            snap,
            stop,
            upto: Lsn(0),
            stopped: false,
        }
    }

    /// Whether segment `m` needs reading: `None` when no later one does either.
    fn reads(&self, m: &SegmentManifest) -> Option<bool> {
        if m.end <= self.snap.lsn.unwrap_or_default() {
            return Some(false);
        }
        // Past the stop, only the commits racing the cut matter, and they lie just after it.
        let past = match self.stop {
            Stop::Lsn(l) => m.start > l,
            Stop::Time(at) => m.first_commit.is_some_and(|f| f > at),
        };
        (!(self.stopped && past)).then_some(true)
    }

    fn judge(&mut self, t: &ArchivedTransaction) -> Verdict {
        if t.end_lsn <= self.upto {
            return Verdict::Skip;
        }
        self.upto = t.end_lsn;
        if holds(self.snap, t) {
            return if self.stop.beyond(t) {
                Verdict::Unusable
            } else {
                Verdict::Skip
            };
        }
        if self.stopped || self.stop.beyond(t) {
            self.stopped = true;
            return Verdict::Skip;
        }
        Verdict::Replay
    }
}

/// How many transactions a replay onto `snap` takes, or `None` when `snap` cannot be used
/// ([`Verdict::Unusable`]).
async fn usable(
    repo: &Repository,
    chain: &[&SegmentManifest],
    snap: &Snapshot,
    stop: Stop,
) -> Result<Option<u64>, RecoveryError> {
    let mut sel = Selection::new(snap, stop);
    let mut n = 0;
    for m in chain {
        match sel.reads(m) {
            None => break,
            Some(false) => continue,
            Some(true) => {}
        }
        for t in archive::read_segment(repo, m).await? {
            match sel.judge(&t) {
                Verdict::Replay => n += 1,
                Verdict::Skip => {}
                Verdict::Unusable => return Ok(None),
            }
        }
    }
    Ok(Some(n))
}

/// Options of [`restore_point_in_time`].
pub struct PointInTimeOptions {
    /// The archived database (as snapshots name it, or its configured name); may be left out
    /// when the repository archives one database.
    pub source: Option<String>,
    pub target: RecoveryTarget,
    /// Leave out what commits exactly at the target.
    pub exclusive: bool,
    /// How the snapshot is restored (tables, replace, owners).
    pub restore: RestoreDbOptions,
}

/// What a point-in-time restore did.
#[derive(Debug, Clone, Serialize)]
pub struct PointInTimeReport {
    pub db: String,
    pub target: RecoveryTarget,
    pub exclusive: bool,
    /// The window the target lies in.
    pub window: Window,
    pub snapshot: String,
    /// The snapshot's cut.
    pub snapshot_lsn: Lsn,
    pub tables: Vec<RestoredTable>,
    pub replay: ReplayStats,
    /// Sequences moved forward to their column's largest value.
    pub sequences_moved: u64,
    /// The point the database now stands at: the last replayed commit, or the snapshot's cut.
    pub restored_to: Point,
}

/// The archived database `wanted` names (exactly, or by the configured name before ` (`).
pub(super) fn pick_db(
    repo: &Repository,
    segments: &[SegmentManifest],
    wanted: Option<&str>,
) -> Result<String, RecoveryError> {
    let mut dbs: Vec<&str> = segments.iter().map(|m| m.db.as_str()).collect();
    dbs.sort();
    dbs.dedup();
    if dbs.is_empty() {
        return Err(RecoveryError::NoArchive {
            repo: repo.name.clone(),
            of: String::new(),
        });
    }
    let found: Vec<&str> = match wanted {
        None => dbs.clone(),
        Some(w) => dbs
            .iter()
            .copied()
            .filter(|d| *d == w || d.starts_with(&format!("{w} (")))
            .collect(),
    };
    match (found.as_slice(), wanted) {
        ([one], _) => Ok(one.to_string()),
        ([], Some(w)) => Err(RecoveryError::NoArchive {
            repo: repo.name.clone(),
            of: format!(" of {w} (it archives {})", dbs.join(", ")),
        }),
        _ => Err(RecoveryError::Invalid(format!(
            "repository {} archives several databases ({}); name one with --source",
            repo.name,
            found.join(", ")
        ))),
    }
}

/// Restores the archived database into `conn` as it was at `opts.target`: see the module
/// documentation. `stop` ends the snapshot restore as a failure (a signal).
pub async fn restore_point_in_time(
    repo: &Repository,
    conn: &ConnInfo,
    opts: &PointInTimeOptions,
    stop: impl Future<Output = String>,
) -> Result<PointInTimeReport, RecoveryError> {
    repo.master("point-in-time restore")?;
    let all_segments: Vec<SegmentManifest> = archive::list_segments(repo)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    let db = pick_db(repo, &all_segments, opts.source.as_deref())?;
    let segments: Vec<SegmentManifest> = all_segments.into_iter().filter(|m| m.db == db).collect();
    let snapshots = snapshot::list(repo).await?;
    let plan = plan(&segments, &snapshots, &db, opts.target, opts.exclusive)?;
    same_system(&db, &plan)?;
    let mut chosen = None;
    for candidate in &plan.candidates {
        if let Some(n) = usable(repo, &plan.chain, &candidate.1, plan.stop).await? {
            chosen = Some((*candidate, n));
            break;
        }
        tracing::info!(
            snapshot = snapshot::short(&candidate.0),
            "the snapshot already holds a transaction after the target; trying an older one"
        );
    }
    let Some(((id, snap), count)) = chosen else {
        return Err(RecoveryError::OutsideWindow {
            target: opts.target.to_string(),
            db,
            windows: format!(
                "{} (no snapshot at or before the target holds only transactions up to it)",
                plan.window
            ),
        });
    };

    let tables = restore_db(repo, snap, conn, &opts.restore, stop).await?;
    let restored: HashSet<TableName> = snap
        .tables
        .iter()
        .map(|t| t.schema.name.clone())
        .filter(|n| {
            opts.restore.tables.is_empty() || opts.restore.tables.iter().any(|p| p.matches(n))
        })
        .collect();
    let filter = (!opts.restore.tables.is_empty()).then(|| restored.clone());
    tracing::info!(
        snapshot = snapshot::short(id),
        transactions = count,
        "restoring the snapshot, then replaying the archive"
    );
    let stats = replay(
        repo,
        &db,
        conn,
        filter,
        &plan.chain,
        Selection::new(snap, plan.stop),
    )
    .await
    .map_err(|e| match e {
        RecoveryError::Sync(source) => RecoveryError::Replay {
            target: conn.to_string(),
            snapshot: snapshot::short(id).to_string(),
            source: Box::new(source),
        },
        other => other,
    })?;
    let mut names: Vec<TableName> = restored.into_iter().collect();
    names.sort_by_key(|n| n.to_string());
    let sequences_moved = advance_sequences(conn, &names).await?;
    let restored_to = match (stats.last_end, stats.last_commit) {
        (Some(lsn), time) => Point {
            lsn,
            time,
            snapshot: None,
        },
        (None, _) => Point {
            lsn: snap.lsn.unwrap_or_default(),
            time: Some(snap.time),
            snapshot: Some(id.clone()),
        },
    };
    Ok(PointInTimeReport {
        db,
        target: opts.target,
        exclusive: opts.exclusive,
        window: plan.window,
        snapshot: id.clone(),
        snapshot_lsn: snap.lsn.unwrap_or_default(),
        tables,
        replay: stats,
        sequences_moved,
        restored_to,
    })
}

/// Replays the transactions `sel` takes from `chain` into `conn`.
async fn replay(
    repo: &Repository,
    db: &str,
    conn: &ConnInfo,
    filter: Option<HashSet<TableName>>,
    chain: &[&SegmentManifest],
    mut sel: Selection<'_>,
) -> Result<ReplayStats, RecoveryError> {
    let mut replay = Replay::start(db, conn.clone(), filter).await?;
    for m in chain {
        match sel.reads(m) {
            None => break,
            Some(false) => continue,
            Some(true) => {}
        }
        for t in archive::read_segment(repo, m).await? {
            let corrupt = |reason| crate::backup::BackupError::Corrupt {
                object: format!("{}: archived transaction {}", repo.name, t.xid),
                reason,
            };
            if sel.judge(&t) != Verdict::Replay {
                // A later transaction of the segment may need the tables it describes.
                replay.describe(t.descriptions().map_err(corrupt)?).await?;
                continue;
            }
            replay
                .transaction(t.transaction().map_err(corrupt)?)
                .await?;
            if replay.wants_flush() {
                replay.flush().await?;
            }
        }
    }
    Ok(replay.finish().await?)
}

/// Moves each sequence the `tables` own forward to its column's largest value where it is
/// behind (a sequence only moves forward); returns how many moved.
async fn advance_sequences(conn: &ConnInfo, tables: &[TableName]) -> Result<u64, RecoveryError> {
    let client = conn.connect().await?;
    let owned = crate::pg::sequences::owned(&client, conn, tables).await?;
    let mut moved = 0;
    for s in owned {
        let seq = quote_literal(&s.sequence.quoted());
        let sql = format!(
            "SELECT setval({seq}, m) FROM (SELECT max({col})::bigint AS m FROM {table}) x \
             WHERE m IS NOT NULL AND COALESCE(pg_sequence_last_value({seq}::regclass), m - 1) < m",
            col = crate::pg::quote_ident(&s.column),
            table = s.table.quoted(),
        );
        let rows = client.query(&sql, &[]).await.map_err(|e| {
            PgError::query(format!("moving sequence {} forward", s.sequence), conn, e)
        })?;
        moved += rows.len() as u64;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::segment::CutPoint;

    fn seg(slot: &str, start: u64, end: u64, last: i64) -> SegmentManifest {
        SegmentManifest {
            version: 1,
            db: "src".into(),
            slot: slot.into(),
            system: None,
            start: Lsn(start),
            end: Lsn(end),
            first_commit: DateTime::from_timestamp(last - 5, 0),
            last_commit: DateTime::from_timestamp(last, 0),
            transactions: 1,
            bytes: 1,
            data: format!("{slot}{start}"),
            written: Utc::now(),
        }
    }

    fn snap(lsn: u64, time: i64) -> (String, Snapshot) {
        let s = Snapshot {
            version: 1,
            session: "s".into(),
            time: DateTime::from_timestamp(time, 0).unwrap(),
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

    fn at(secs: i64) -> RecoveryTarget {
        RecoveryTarget::Time(DateTime::from_timestamp(secs, 0).unwrap())
    }

    #[test]
    fn the_target_picks_the_newest_snapshot_before_it_in_its_window() {
        // Window 1: 100..300 (snapshots at 150, 250); a missing segment; window 2: 400..500.
        let segs = [
            seg("a", 100, 200, 1000),
            seg("a", 200, 300, 1100),
            seg("a", 400, 500, 1300),
        ];
        let snaps = [snap(150, 990), snap(250, 1050), snap(450, 1250)];
        let p = plan(&segs, &snaps, "src", RecoveryTarget::Lsn(Lsn(260)), false).unwrap();
        assert_eq!(p.candidates[0].0, "snap250");
        assert_eq!(p.window.end.lsn, Lsn(300));
        let p = plan(&segs, &snaps, "src", RecoveryTarget::Lsn(Lsn(250)), true).unwrap();
        assert_eq!(
            p.candidates[0].0, "snap150",
            "exclusive: a cut at the target is after it"
        );
        let p = plan(&segs, &snaps, "src", at(1060), false).unwrap();
        assert_eq!(p.candidates[0].0, "snap250");
        assert_eq!(
            p.stop,
            Stop::Time(DateTime::from_timestamp(1060, 0).unwrap())
        );
        let p = plan(&segs, &snaps, "src", RecoveryTarget::Latest, false).unwrap();
        assert_eq!(p.candidates[0].0, "snap450");
        assert_eq!(p.stop, Stop::Lsn(Lsn(500)));
    }

    #[test]
    fn targets_outside_every_window_fail_naming_the_windows() {
        let segs = [
            seg("a", 100, 200, 1000),
            seg("a", 200, 300, 1100),
            seg("a", 400, 500, 1300),
        ];
        let snaps = [snap(150, 990), snap(450, 1250)];
        for target in [
            RecoveryTarget::Lsn(Lsn(120)), // before the first snapshot
            RecoveryTarget::Lsn(Lsn(350)), // in the gap
            RecoveryTarget::Lsn(Lsn(501)), // after the last commit
            at(980),
            at(1200),
            at(1301),
        ] {
            let e = plan(&segs, &snaps, "src", target, false).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("from LSN 0/96") && text.contains("from LSN 0/1C2"),
                "{target}: {text}"
            );
        }
        assert!(plan(&segs, &snaps, "other", RecoveryTarget::Latest, false).is_err());
    }

    fn txn(xid: u32, end: u64) -> ArchivedTransaction {
        ArchivedTransaction {
            xid,
            commit_lsn: Lsn(end - 1),
            end_lsn: Lsn(end),
            commit_time: DateTime::from_timestamp(end as i64, 0).unwrap(),
            messages: Vec::new(),
        }
    }

    #[test]
    fn a_replay_takes_exactly_what_the_snapshot_lacks_up_to_the_stop() {
        // Cut at LSN 150; xids below 20 ended, 12 still in progress (it commits later but
        // ends before the cut's LSN was read), 21 committed in time to be seen though its
        // commit ends after that LSN.
        let (_, mut s) = snap(150, 1000);
        s.cut = Some(CutPoint {
            system: "7".into(),
            timeline: 1,
            xmin: 12,
            xmax: 22,
            xip: Some(vec![12]),
        });
        let stream = [
            txn(10, 120),
            txn(12, 140),
            txn(21, 160),
            txn(22, 170),
            txn(23, 180),
        ];
        let judged = |s: &Snapshot, stop: Stop| {
            let mut sel = Selection::new(s, stop);
            stream.iter().map(|t| sel.judge(t)).collect::<Vec<_>>()
        };
        let verdicts = |stop: Stop| judged(&s, stop);
        use Verdict::{Replay as R, Skip as S, Unusable as U};
        assert_eq!(verdicts(Stop::Lsn(Lsn(175))), [S, R, S, R, S]);
        assert_eq!(verdicts(Stop::Lsn(Lsn(200))), [S, R, S, R, R]);
        // Once a transaction is past the stop, nothing later is taken (commit order).
        let t = |secs| Stop::Time(DateTime::from_timestamp(secs, 0).unwrap());
        assert_eq!(verdicts(t(175)), [S, R, S, R, S]);
        // The snapshot holds 21, which ends after the stop: it cannot serve this target.
        assert_eq!(verdicts(Stop::Lsn(Lsn(155)))[2], U);
        // Without the cut's in-progress list, the cut's LSN decides.
        let mut old = s.clone();
        old.cut = None;
        assert_eq!(judged(&old, Stop::Lsn(Lsn(200))), [S, S, R, R, R]);
    }

    #[test]
    fn an_archive_of_another_database_system_is_refused() {
        let mut segs = [seg("a", 100, 200, 1000), seg("a", 200, 300, 1100)];
        let mut snaps = [snap(150, 990)];
        snaps[0].1.cut = Some(CutPoint {
            system: "7001".into(),
            timeline: 1,
            xmin: 1,
            xmax: 2,
            xip: None,
        });
        segs[1].system = Some("7001".into());
        let p = plan(&segs, &snaps, "src", RecoveryTarget::Latest, false).unwrap();
        assert!(same_system("src", &p).is_ok());
        segs[0].system = Some("7002".into());
        let p = plan(&segs, &snaps, "src", RecoveryTarget::Latest, false).unwrap();
        let e = same_system("src", &p).unwrap_err().to_string();
        assert!(e.contains("7002") && e.contains("7001"), "{e}");
    }

    #[test]
    fn until_parses_times_and_refuses_the_rest() {
        assert_eq!(
            RecoveryTarget::parse_until("latest").unwrap(),
            RecoveryTarget::Latest
        );
        let t = RecoveryTarget::parse_until("2026-12-07T11:00:00+08:00").unwrap();
        assert_eq!(
            t,
            RecoveryTarget::parse_until("2026-12-07 03:00:00").unwrap()
        );
        assert!(RecoveryTarget::parse_until("yesterday").is_err());
        assert!(RecoveryTarget::parse_lsn("0/16B3748").is_ok());
        assert!(RecoveryTarget::parse_lsn("16B3748").is_err());
    }
}
