//! `invsync drill`: a disaster-recovery drill. Restores the archived database into a standby
//! at the latest recoverable point (or a chosen one) with [`point_in_time`], verifies the
//! standby against the live source with verify's machinery, measures RPO and RTO, and appends
//! the report to a tamper-evident drill history in the repository.
//!
//! # Explaining differences
//!
//! The standby stands at the restore point R; the source has moved on. The comparison runs on
//! the live source ([`verify_db`], each table in its own snapshot, differing rows re-read once).
//! Afterwards the drill reads the source's position P, waits until the change archive reaches
//! P, and decodes the archived transactions whose commit ends in (R, P]: a differing row whose
//! key one of them touched (insert, update on either side of a key change, delete, or a
//! TRUNCATE of its table) is *explained*: it differs because the source changed after the
//! restore point. Any other difference, a table that cannot be compared, or differences that
//! could not all be listed is a *finding* and fails the drill. The method is one-sided: a row
//! that was lost in the restore and also changed on the source after R is explained, not
//! found (its key was touched); it is exact for every row the source left alone after R.
//!
//! # History
//!
//! Each drill's report is sealed as a `drills/` object named by its hash (like every
//! repository object) and carries its sequence number and the name of the previous entry.
//! [`history`] reads them all and checks the chain: every object opens and is named by its
//! hash (an edited entry fails), the sequence numbers run 1..n without a hole (a removed entry
//! fails), and each entry names its predecessor. Removing the newest entry alone leaves a
//! valid shorter chain; compare the count with the drill reports kept elsewhere.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::point_in_time::{
    pick_db, restore_point_in_time, PointInTimeOptions, PointInTimeReport, RecoveryTarget,
};
use super::RecoveryError;
use crate::backup::archive::{self, Point, SegmentManifest};
use crate::backup::repository::Repository;
use crate::backup::restore::RestoreDbOptions;
use crate::backup::session::source_label;
use crate::backup::BackupError;
use crate::cdc::decoder::Message;
use crate::config::{Config, TablePattern};
use crate::pg::{ConnInfo, Lsn, PgError};
use crate::verify::db::{verify_db, DbVerifyOptions, Endpoint, NoProgress, TableStatus};
use crate::verify::touched::Touched;

/// The object kind of a drill history entry.
pub const KIND_DRILL: u8 = b'D';
/// Where the drill history lives in the repository.
pub const DRILLS_DIR: &str = "drills";
/// The version of [`DrillReport`]'s JSON shape; bumped when a field changes meaning or goes.
pub const REPORT_VERSION: u32 = 1;
/// Differing rows a drill lists per table; beyond, the rest cannot be explained and fail it.
const MAX_LISTED: usize = 100_000;

/// What a drill does.
pub struct DrillOptions {
    /// The live source to verify against.
    pub source: Endpoint,
    /// The archived database's label, when the repository archives several.
    pub archived: Option<String>,
    pub standby: Endpoint,
    pub target: RecoveryTarget,
    /// How the snapshot is restored (`replace` allows a standby that holds tables).
    pub restore: RestoreDbOptions,
    /// Skip the restore: the standby already stands at `target`, which must then be an LSN.
    pub no_restore: bool,
    /// How long to wait for the archive to reach the source's position after the verify.
    pub archive_wait: Duration,
}

/// The report of one drill (JSON schema version [`REPORT_VERSION`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    pub version: u32,
    pub passed: bool,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub repository: String,
    /// The archived database's label.
    pub db: String,
    pub source: String,
    pub standby: String,
    /// What was asked for: `{"kind": "latest"}`, `{"kind": "time", "at": ...}`, `{"kind": "lsn", ...}`.
    pub target: serde_json::Value,
    /// `None` with `--no-restore`.
    pub restore: Option<RestoreFigures>,
    pub rpo: Rpo,
    /// Wall time from the drill's start until the standby was verified.
    pub rto_seconds: f64,
    pub verify: VerifyFigures,
    /// Every difference, explained or not, and every table that could not be compared.
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreFigures {
    pub snapshot: String,
    pub snapshot_lsn: Lsn,
    pub tables: u64,
    /// Rows and bytes restored from the snapshot.
    pub rows: u64,
    pub bytes: u64,
    /// Archived transactions and row changes replayed on top.
    pub transactions: u64,
    pub changes: u64,
    /// Wall time of the whole restore (snapshot and replay).
    pub seconds: f64,
    /// Restored rows plus replayed changes per second of `seconds`.
    pub rows_per_second: f64,
}

/// The recovery point objective as measured: how much of the source the standby lacks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rpo {
    /// The source's WAL position and clock at the drill's start.
    pub source_lsn: Lsn,
    pub source_time: DateTime<Utc>,
    /// The newest commit the standby holds (end LSN and commit time).
    pub restored_lsn: Lsn,
    pub restored_time: Option<DateTime<Utc>>,
    /// `source_lsn - restored_lsn` (0 when the restore point is later).
    pub bytes: u64,
    /// `source_time - restored_time`, `None` when the restored point has no time.
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyFigures {
    pub tables: u64,
    pub rows_compared: u64,
    pub source_rows: u64,
    pub standby_rows: u64,
    /// Differences explained by source changes committed after the restore point.
    pub explained: u64,
    /// Differences and tables that fail the drill.
    pub unexplained: u64,
    /// The source's position after the verify, up to which archived changes were read.
    pub explained_up_to: Lsn,
}

/// One difference or failure, named.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub table: String,
    /// `(id)=(5)`, or `None` for a finding about the whole table.
    pub key: Option<String>,
    /// `missing`, `extra`, `changed`, `undecided`, `error` or `unlisted`.
    pub kind: String,
    pub explained: bool,
    pub detail: String,
}

/// The live source `name` (a configured database or a URL) and the label its archive and
/// snapshots carry.
pub fn source(config: Option<&Config>, name: &str) -> Result<(Endpoint, String), RecoveryError> {
    let endpoint = Endpoint::resolve(config, name)?;
    let label = match config.map(|c| c.database(name)) {
        Some(Ok(d)) => source_label(name, &d.conn),
        _ => name.to_string(),
    };
    Ok((endpoint, label))
}

/// The source's WAL position and clock.
async fn position(conn: &ConnInfo) -> Result<(Lsn, DateTime<Utc>), RecoveryError> {
    let client = conn.connect().await?;
    let row = client
        .query_one(
            "SELECT pg_current_wal_lsn()::text, \
             to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .map_err(|e| PgError::query("reading the source's WAL position", conn, e))?;
    let lsn: String = row.get(0);
    let time: String = row.get(1);
    let lsn = lsn
        .parse()
        .map_err(|e: String| RecoveryError::Invalid(format!("source WAL position {lsn:?}: {e}")))?;
    let time = DateTime::parse_from_rfc3339(&time)
        .map_err(|e| RecoveryError::Invalid(format!("source clock {time:?}: {e}")))?
        .with_timezone(&Utc);
    Ok((lsn, time))
}

/// The segments of `db`'s newest chain once it reaches `at`, waiting up to `wait`.
async fn archived_to(
    repo: &Repository,
    db: &str,
    at: Lsn,
    wait: Duration,
) -> Result<Option<Vec<SegmentManifest>>, RecoveryError> {
    let deadline = Instant::now() + wait;
    loop {
        let segments: Vec<SegmentManifest> = archive::list_segments(repo)
            .await?
            .into_iter()
            .map(|(_, m)| m)
            .filter(|m| m.db == db)
            .collect();
        let chain: Vec<SegmentManifest> = archive::chains(&segments)
            .pop()
            .unwrap_or_default()
            .into_iter()
            .cloned()
            .collect();
        if chain.last().is_some_and(|m| m.end >= at) {
            return Ok(Some(chain));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs a drill (see the module documentation) and appends its report to the history.
/// `stop` ends the snapshot restore as a failure (a signal). Bad input (no archive, a
/// non-empty standby without `replace`) fails before anything is written.
pub async fn drill(
    repo: &Repository,
    opts: &DrillOptions,
    stop: impl Future<Output = String>,
) -> Result<DrillReport, RecoveryError> {
    repo.master("a drill")?;
    let started = Utc::now();
    let clock = Instant::now();
    // Checked before anything is written: the repository must archive the database.
    let segments: Vec<SegmentManifest> = archive::list_segments(repo)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    let db = pick_db(repo, &segments, opts.archived.as_deref())?;
    let restored_at = match (opts.no_restore, opts.target) {
        (true, RecoveryTarget::Lsn(l)) => Some(l),
        (true, _) => {
            return Err(RecoveryError::Invalid(
                "--no-restore needs --until-lsn LSN: the point the standby was restored to (`restored_lsn` of its drill report)".into(),
            ))
        }
        (false, _) => None,
    };
    let (source_lsn, source_time) = position(&opts.source.conn).await?;

    let (restore, restored): (Option<(PointInTimeReport, f64)>, Point) = match restored_at {
        Some(lsn) => (
            None,
            Point {
                lsn,
                time: None,
                snapshot: None,
            },
        ),
        None => {
            let pit = PointInTimeOptions {
                source: Some(db.clone()),
                target: opts.target,
                exclusive: false,
                restore: RestoreDbOptions {
                    tables: opts.restore.tables.clone(),
                    replace: opts.restore.replace,
                    access: opts.restore.access,
                    lock_wait: opts.restore.lock_wait,
                },
            };
            let t = Instant::now();
            let report = restore_point_in_time(repo, &opts.standby.conn, &pit, stop).await?;
            let point = report.restored_to.clone();
            (Some((report, t.elapsed().as_secs_f64())), point)
        }
    };

    let tables = match &restore {
        Some((r, _)) => r
            .tables
            .iter()
            .map(|t| TablePattern::parse(&t.table).map_err(RecoveryError::Invalid))
            .collect::<Result<Vec<_>, _>>()?,
        None if opts.restore.tables.is_empty() => {
            vec![TablePattern::parse("public.*").map_err(RecoveryError::Invalid)?]
        }
        None => opts.restore.tables.clone(),
    };
    let verify = DbVerifyOptions {
        source: opts.source.clone(),
        targets: vec![opts.standby.clone()],
        tables,
        filter: None,
        settle: Duration::ZERO,
        pipeline: None,
        repair_sql: None,
        max_listed: MAX_LISTED,
        touched: None,
    };
    let checked = verify_db(&verify, &NoProgress).await?;
    let rto_seconds = clock.elapsed().as_secs_f64();

    // What the source changed after the restore point, up to its position now.
    let (after, _) = position(&opts.source.conn).await?;
    let touched = match archived_to(repo, &db, after, opts.archive_wait).await? {
        Some(chain) => Some(touched_after(repo, &chain, restored.lsn).await?),
        None => None,
    };

    let mut findings = Vec::new();
    for t in &checked.tables {
        // The keys the source touched after the restore point (`None`: any of its rows), for
        // a table with rows to explain.
        let listed = !t.differences.is_empty() || !t.undecided_rows.is_empty();
        let explaining: Option<Option<HashSet<Vec<String>>>> =
            touched.as_ref().filter(|_| listed).map(|x| {
                x.keys_in(&t.table, &t.key_columns)
                    .map(|keys| keys.into_iter().collect())
            });
        if t.status == TableStatus::Error {
            findings.push(Finding {
                table: t.table.clone(),
                key: None,
                kind: "error".into(),
                explained: false,
                detail: t.error.clone().unwrap_or_default(),
            });
            continue;
        }
        let listed = t
            .differences
            .iter()
            .map(|d| (d, d.kind.describe(), serde_kind(d.kind)));
        let undecided = t
            .undecided_rows
            .iter()
            .map(|d| (d, "undecided", "undecided"));
        for (d, describe, kind) in listed.chain(undecided) {
            let explained = explaining
                .as_ref()
                .is_some_and(|keys| keys.as_ref().is_none_or(|k| k.contains(&d.key_values)));
            let detail = match (&touched, explained) {
                (_, true) => format!("{describe}: the source changed the row after the restore point"),
                (None, false) => format!(
                    "{describe}: the change archive did not reach the source's position {after} within {} s, so it cannot be explained",
                    opts.archive_wait.as_secs()
                ),
                (Some(_), false) => format!("{describe}: no archived change after the restore point explains it"),
            };
            findings.push(Finding {
                table: t.table.clone(),
                key: Some(d.key_display(&t.key_columns)),
                kind: kind.into(),
                explained,
                detail,
            });
        }
        let unlisted = (t.differences_found as usize).saturating_sub(t.differences.len())
            + (t.undecided as usize).saturating_sub(t.undecided_rows.len());
        if unlisted > 0 {
            findings.push(Finding {
                table: t.table.clone(),
                key: None,
                kind: "unlisted".into(),
                explained: false,
                detail: format!("{unlisted} more differing row(s) than a drill lists ({MAX_LISTED}); run `invsync verify db` on the standby"),
            });
        }
    }
    let explained = findings.iter().filter(|f| f.explained).count() as u64;
    let unexplained = findings.len() as u64 - explained;

    let restore = restore.map(|(r, seconds)| {
        let rows: u64 = r.tables.iter().map(|t| t.rows).sum();
        RestoreFigures {
            snapshot: r.snapshot.clone(),
            snapshot_lsn: r.snapshot_lsn,
            tables: r.tables.len() as u64,
            rows,
            bytes: r.tables.iter().map(|t| t.bytes).sum(),
            transactions: r.replay.transactions,
            changes: r.replay.changes,
            seconds,
            rows_per_second: if seconds > 0.0 {
                (rows + r.replay.changes) as f64 / seconds
            } else {
                0.0
            },
        }
    });
    let report = DrillReport {
        version: REPORT_VERSION,
        passed: unexplained == 0,
        started,
        finished: Utc::now(),
        repository: repo.name.clone(),
        db,
        source: opts.source.name.clone(),
        standby: opts.standby.name.clone(),
        target: serde_json::to_value(opts.target)
            .map_err(|e| RecoveryError::Invalid(format!("rendering the target: {e}")))?,
        restore,
        rpo: Rpo {
            source_lsn,
            source_time,
            restored_lsn: restored.lsn,
            restored_time: restored.time,
            bytes: source_lsn.0.saturating_sub(restored.lsn.0),
            seconds: restored
                .time
                .map(|t| (source_time - t).num_microseconds().unwrap_or(0) as f64 / 1e6),
        },
        rto_seconds,
        verify: VerifyFigures {
            tables: checked.tables.len() as u64,
            rows_compared: checked.tables.iter().map(|t| t.rows_compared).sum(),
            source_rows: checked.tables.iter().map(|t| t.source_rows).sum(),
            standby_rows: checked.tables.iter().map(|t| t.target_rows).sum(),
            explained,
            unexplained,
            explained_up_to: after,
        },
        findings,
    };
    append(repo, &report).await?;
    Ok(report)
}

fn serde_kind(kind: crate::verify::db::DifferenceKind) -> &'static str {
    use crate::verify::db::DifferenceKind::*;
    match kind {
        Missing => "missing",
        Extra => "extra",
        Changed => "changed",
    }
}

/// The keys touched by archived transactions of `chain` whose commit ends after `from`.
async fn touched_after(
    repo: &Repository,
    chain: &[SegmentManifest],
    from: Lsn,
) -> Result<Touched, RecoveryError> {
    let mut touched = Touched::default();
    let mut upto = from;
    for m in chain.iter().filter(|m| m.end > from) {
        for t in archive::read_segment(repo, m).await? {
            // Relations are repeated per segment, so even skipped transactions describe tables.
            let messages = t.decode().map_err(|reason| BackupError::Corrupt {
                object: format!("{}: archived transaction {}", repo.name, t.xid),
                reason,
            })?;
            let skipped = t.end_lsn <= upto;
            if !skipped {
                upto = t.end_lsn;
            }
            for message in messages {
                if !skipped || matches!(message, Message::Relation(_)) {
                    touched.absorb(message);
                }
            }
        }
    }
    Ok(touched)
}

/// One entry of the drill history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// 1 for the first drill of the repository.
    pub seq: u64,
    /// The object name (hash) of entry `seq - 1`; `None` for the first.
    pub previous: Option<String>,
    pub report: DrillReport,
}

/// The drill history and whether its chain holds.
#[derive(Debug, Serialize)]
pub struct History {
    /// Entries that open, in sequence order, each with its object name.
    pub entries: Vec<(String, HistoryEntry)>,
    /// What breaks the chain; empty when it holds.
    pub broken: Vec<String>,
}

/// Reads every entry and checks the chain (see the module documentation).
pub async fn history(repo: &Repository) -> Result<History, RecoveryError> {
    repo.master("reading the drill history")?;
    let mut entries = Vec::new();
    let mut broken = Vec::new();
    for name in repo.list_names(DRILLS_DIR).await? {
        let rel = format!("{DRILLS_DIR}/{name}");
        let bytes = repo.get(&rel).await?;
        if blake3::hash(&bytes).to_hex().as_str() != name {
            broken.push(format!(
                "entry {name} was changed after it was written (its content no longer has that hash)"
            ));
        }
        match repo.open_sealed::<HistoryEntry>(KIND_DRILL, &rel, &bytes) {
            Ok(e) => entries.push((name, e)),
            Err(e) => broken.push(format!("entry {name} does not open: {e}")),
        }
    }
    entries.sort_by_key(|(_, e)| e.seq);
    broken.extend(chain_breaks(&entries));
    Ok(History { entries, broken })
}

/// Where a chain of entries, sorted by sequence number, does not hold.
fn chain_breaks(entries: &[(String, HistoryEntry)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut previous: Option<&str> = None;
    for (i, (name, e)) in entries.iter().enumerate() {
        let expected = i as u64 + 1;
        if e.seq != expected {
            out.push(format!(
                "entry {name} is number {} where number {expected} was expected: an entry is missing or duplicated",
                e.seq
            ));
        }
        if e.previous.as_deref() != previous {
            out.push(format!(
                "entry {name} (number {}) names {} as its predecessor, but the entry before it is {}",
                e.seq,
                e.previous.as_deref().unwrap_or("none"),
                previous.unwrap_or("none")
            ));
        }
        previous = Some(name);
    }
    out
}

/// Appends `report` to the history after its newest entry.
async fn append(repo: &Repository, report: &DrillReport) -> Result<String, RecoveryError> {
    let h = history(repo).await?;
    if !h.broken.is_empty() {
        tracing::warn!(
            problems = h.broken.join("; "),
            "the drill history is broken; appending after its newest readable entry"
        );
    }
    let (seq, previous) = match h.entries.last() {
        Some((name, e)) => (e.seq + 1, Some(name.clone())),
        None => (1, None),
    };
    let entry = HistoryEntry {
        seq,
        previous,
        report: report.clone(),
    };
    Ok(repo.write_object(KIND_DRILL, DRILLS_DIR, &entry).await?)
}

/// The report as Markdown, for an auditor.
pub fn markdown(r: &DrillReport) -> String {
    let mut s = String::new();
    let verdict = if r.passed { "PASSED" } else { "FAILED" };
    s.push_str(&format!("# DR drill {verdict}\n\n"));
    s.push_str(&format!(
        "- Started {}, finished {}\n- Repository `{}`, archived database `{}`\n- Source `{}`, standby `{}`\n- Target: `{}`\n\n",
        r.started.to_rfc3339(),
        r.finished.to_rfc3339(),
        r.repository,
        r.db,
        r.source,
        r.standby,
        r.target
    ));
    s.push_str("## Measures\n\n| measure | value |\n| --- | --- |\n");
    s.push_str(&format!(
        "| RPO (time) | {} |\n| RPO (WAL bytes) | {} |\n| RTO | {:.1} s |\n",
        r.rpo
            .seconds
            .map_or("unknown".to_string(), |x| format!("{x:.1} s")),
        r.rpo.bytes,
        r.rto_seconds
    ));
    s.push_str(&format!(
        "| source position at start | {} ({}) |\n| newest restored commit | {} ({}) |\n",
        r.rpo.source_lsn,
        r.rpo.source_time.to_rfc3339(),
        r.rpo.restored_lsn,
        r.rpo.restored_time.map_or("-".into(), |t| t.to_rfc3339())
    ));
    if let Some(x) = &r.restore {
        s.push_str(&format!(
            "| snapshot | {} (cut {}) |\n| rows restored | {} in {} table(s), {} bytes |\n| transactions replayed | {} ({} changes) |\n| restore time | {:.1} s ({:.0} rows and changes/s) |\n",
            x.snapshot, x.snapshot_lsn, x.rows, x.tables, x.bytes, x.transactions, x.changes, x.seconds, x.rows_per_second
        ));
    }
    s.push_str(&format!(
        "| rows compared | {} (source {}, standby {}) in {} table(s) |\n| differences explained | {} |\n| findings | {} |\n\n",
        r.verify.rows_compared,
        r.verify.source_rows,
        r.verify.standby_rows,
        r.verify.tables,
        r.verify.explained,
        r.verify.unexplained
    ));
    let failing: Vec<&Finding> = r.findings.iter().filter(|f| !f.explained).collect();
    if !failing.is_empty() {
        s.push_str("## Findings\n\n");
        for f in failing {
            s.push_str(&format!(
                "- `{}` {} {}: {}\n",
                f.table,
                f.key.as_deref().unwrap_or(""),
                f.kind,
                f.detail
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, previous: Option<&str>) -> HistoryEntry {
        HistoryEntry {
            seq,
            previous: previous.map(str::to_string),
            report: DrillReport {
                version: REPORT_VERSION,
                passed: true,
                started: Utc::now(),
                finished: Utc::now(),
                repository: "r".into(),
                db: "d".into(),
                source: "s".into(),
                standby: "t".into(),
                target: serde_json::json!({"kind": "latest"}),
                restore: None,
                rpo: Rpo {
                    source_lsn: Lsn(2),
                    source_time: Utc::now(),
                    restored_lsn: Lsn(1),
                    restored_time: None,
                    bytes: 1,
                    seconds: None,
                },
                rto_seconds: 1.0,
                verify: VerifyFigures {
                    tables: 0,
                    rows_compared: 0,
                    source_rows: 0,
                    standby_rows: 0,
                    explained: 0,
                    unexplained: 0,
                    explained_up_to: Lsn(2),
                },
                findings: Vec::new(),
            },
        }
    }

    #[test]
    fn a_chain_with_a_hole_or_a_wrong_predecessor_is_broken() {
        let whole = vec![
            ("a".to_string(), entry(1, None)),
            ("b".to_string(), entry(2, Some("a"))),
            ("c".to_string(), entry(3, Some("b"))),
        ];
        assert!(chain_breaks(&whole).is_empty());
        let mut hole = whole.clone();
        hole.remove(1);
        assert_eq!(chain_breaks(&hole).len(), 2, "{:?}", chain_breaks(&hole));
        let mut swapped = whole.clone();
        swapped[2].1.previous = Some("a".into());
        assert_eq!(chain_breaks(&swapped).len(), 1);
    }
}
