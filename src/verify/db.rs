//! `invsync verify db`: proves that a target holds exactly the source's rows, table by table,
//! and names every row that differs.
//!
//! For each table both sides compute checksums of the same key ranges at once, each inside its
//! own snapshot (taken together, or the target's after the pipeline has caught up with the
//! source's). Ranges whose checksums differ are split again at sampled key boundaries until
//! they are small enough to compare row by row (key and row hash); when most sub-ranges of a
//! split differ, splitting stops paying off and the differing ranges are compared row by row
//! in chunks of bounded size instead. Candidate keys are then re-read fresh from both sides
//! ([`super::recheck`]) so that changes in flight are not reported.
//!
//! Invariants: a table that cannot be compared (no primary key, missing on a side, different
//! columns, a query failing) is reported as an error, never as identical, and the other tables
//! are still verified. Memory is bounded by the chunk size and the differences found.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::keyrange::{Key, KeyRange, Shape};
use super::recheck::{self, Settle};
use super::repair;
use super::side::{Checksum, RowText, Side};
use super::VerifyError;
use crate::config::{Config, TablePattern};
use crate::pg::{ConnInfo, PgError, TableName};

/// Ranges with at most this many rows on both sides are compared row by row.
const LEAF_ROWS: i64 = 4096;
/// A differing range is split into at most this many parts per step of bisection.
const FANOUT: usize = 16;
/// The first split of a table: at most this many ranges. Each row pays log2 of it in key
/// comparisons during the one full scan (costly for text keys under a linguistic collation),
/// while a differing range only costs a scan of its own rows; 64 balances the two.
const MAX_ROOT_RANGES: usize = 64;
/// Above this many (estimated) rows, root boundaries come from a row sample.
const SAMPLE_ABOVE_ROWS: f64 = 200_000.0;
/// Sampled keys per root range: enough for even quantiles.
const SAMPLED_KEYS_PER_RANGE: f64 = 16.0;

/// A database taking part in a comparison.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The configuration name, or the URL (password hidden) when given directly.
    pub name: String,
    pub conn: ConnInfo,
}

impl Endpoint {
    /// A configured database name, or a `postgres://` URL.
    pub fn resolve(config: Option<&Config>, name_or_url: &str) -> Result<Endpoint, VerifyError> {
        if name_or_url.contains("://") {
            let conn = ConnInfo::parse(name_or_url).map_err(VerifyError::Options)?;
            return Ok(Endpoint {
                name: conn.to_string(),
                conn,
            });
        }
        let config = config.ok_or_else(|| {
            VerifyError::Options(format!(
                "database {name_or_url} needs a configuration file; pass --config or a postgres:// URL"
            ))
        })?;
        let db = config.database(name_or_url).map_err(VerifyError::Options)?;
        Ok(Endpoint {
            name: db.name.clone(),
            conn: db.conn.clone(),
        })
    }
}

/// What to compare and how.
#[derive(Debug, Clone)]
pub struct DbVerifyOptions {
    pub source: Endpoint,
    /// Each target is compared with the source in turn.
    pub targets: Vec<Endpoint>,
    /// Tables to compare (`schema.table` or `schema.*`), resolved on the source.
    pub tables: Vec<TablePattern>,
    /// An SQL condition restricting the rows compared on both sides.
    pub filter: Option<String>,
    /// How long differing rows are re-read before being reported (for targets fed by a live
    /// pipeline); zero re-reads them once.
    pub settle: Duration,
    /// The pipeline feeding the targets, whose replication slot shows how far they have caught up.
    pub pipeline: Option<String>,
    /// Where to write SQL that makes the targets match the source.
    pub repair_sql: Option<PathBuf>,
}

/// How long `--pipeline` re-checks by default: long enough for a healthy pipeline's lag.
pub const PIPELINE_SETTLE: Duration = Duration::from_secs(15);

impl DbVerifyOptions {
    /// Options for `--pipeline NAME` (its source, targets and tables; `tables` narrows them) or
    /// for `--source`/`--target` (configured names or URLs; `tables` defaults to `public.*`).
    pub fn select(
        config: Option<&Config>,
        pipeline: Option<&str>,
        source: Option<&str>,
        target: Option<&str>,
        tables: &[String],
    ) -> Result<DbVerifyOptions, VerifyError> {
        let mut patterns = tables
            .iter()
            .map(|t| TablePattern::parse(t).map_err(VerifyError::Options))
            .collect::<Result<Vec<_>, _>>()?;
        let (source, targets, pipeline) = match (pipeline, source, target) {
            (Some(name), None, target) => {
                let config = config.ok_or_else(|| {
                    VerifyError::Options(
                        "--pipeline needs a configuration file; pass --config".into(),
                    )
                })?;
                let p = config.pipeline(name).map_err(VerifyError::Options)?;
                if patterns.is_empty() {
                    patterns = p.tables.clone();
                }
                let targets = match target {
                    Some(t) => vec![Endpoint::resolve(Some(config), t)?],
                    None => p
                        .targets
                        .iter()
                        .map(|t| Endpoint::resolve(Some(config), t))
                        .collect::<Result<_, _>>()?,
                };
                (
                    Endpoint::resolve(Some(config), &p.source)?,
                    targets,
                    Some(name.to_string()),
                )
            }
            (None, Some(s), Some(t)) => (
                Endpoint::resolve(config, s)?,
                vec![Endpoint::resolve(config, t)?],
                None,
            ),
            _ => {
                return Err(VerifyError::Options(
                    "say what to compare: --pipeline NAME, or --source DB --target DB".into(),
                ))
            }
        };
        if patterns.is_empty() {
            patterns.push(TablePattern::parse("public.*").map_err(VerifyError::Options)?);
        }
        Ok(DbVerifyOptions {
            source,
            targets,
            tables: patterns,
            filter: None,
            settle: if pipeline.is_some() {
                PIPELINE_SETTLE
            } else {
                Duration::ZERO
            },
            pipeline,
            repair_sql: None,
        })
    }
}

/// Receives progress while verification runs (a terminal progress bar, or nothing).
pub trait Progress: Send + Sync {
    /// A table's comparison starts; `estimated_rows` is the planner's estimate (0 if unknown).
    fn table_started(&self, table: &str, estimated_rows: u64);
    /// `rows` more source rows have been compared; `phase` says what is being done.
    fn advance(&self, rows: u64, phase: &str);
    /// The table is done.
    fn table_finished(&self, report: &TableReport);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn table_started(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64, _: &str) {}
    fn table_finished(&self, _: &TableReport) {}
}

/// The result of `verify db`, in the shape `--json` prints.
#[derive(Debug, Serialize)]
pub struct DbReport {
    pub source: String,
    pub tables: Vec<TableReport>,
    /// Where the repair SQL was written, if asked for.
    pub repair_sql: Option<String>,
}

impl DbReport {
    /// 0 identical, 1 differences found, 2 something could not be verified (as `diff` does).
    pub fn exit_code(&self) -> u8 {
        if self.tables.iter().any(|t| t.status == TableStatus::Error) {
            2
        } else if self
            .tables
            .iter()
            .any(|t| t.status == TableStatus::Different)
        {
            1
        } else {
            0
        }
    }

    pub fn differences(&self) -> usize {
        self.tables.iter().map(|t| t.differences.len()).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableStatus {
    Identical,
    Different,
    /// Could not be compared; see `error`.
    Error,
}

/// One table compared on one target.
#[derive(Debug, Serialize)]
pub struct TableReport {
    pub table: String,
    pub target: String,
    pub status: TableStatus,
    pub error: Option<String>,
    /// The primary key columns, in key order.
    pub key_columns: Vec<String>,
    /// Rows in the source's and target's snapshots.
    pub source_rows: u64,
    pub target_rows: u64,
    /// Key ranges whose checksums were compared.
    pub ranges_checked: u64,
    /// Rows compared one by one (key and hash).
    pub rows_compared: u64,
    /// Differences seen in the snapshots that were gone on a fresh read (changes in flight).
    pub in_flight: u64,
    pub differences: Vec<Difference>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// The row is on the source but not on the target.
    Missing,
    /// The row is on the target but not on the source.
    Extra,
    /// The row is on both with different values.
    Changed,
}

impl DifferenceKind {
    pub fn describe(self) -> &'static str {
        match self {
            DifferenceKind::Missing => "missing on target",
            DifferenceKind::Extra => "extra on target",
            DifferenceKind::Changed => "changed",
        }
    }
}

/// One column of a changed row: its text on each side (`None` is NULL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnChange {
    pub column: String,
    pub source: Option<String>,
    pub target: Option<String>,
}

/// A row that differs.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    /// Key column -> value, as text.
    pub key: BTreeMap<String, String>,
    pub kind: DifferenceKind,
    /// For `changed`: the columns that differ, in table order.
    pub columns: Vec<String>,
    pub changes: Vec<ColumnChange>,
    /// The key values in key order (for display and repair).
    #[serde(skip)]
    pub key_values: Vec<String>,
    /// The source row (for repair).
    #[serde(skip)]
    pub(crate) source_row: Option<RowText>,
}

impl Difference {
    pub(crate) fn new(
        shape: &Shape,
        key: Key,
        kind: DifferenceKind,
        changes: Vec<ColumnChange>,
        source_row: Option<RowText>,
    ) -> Difference {
        Difference {
            key: shape
                .key
                .iter()
                .map(|c| c.name.clone())
                .zip(key.iter().cloned())
                .collect(),
            kind,
            columns: changes.iter().map(|c| c.column.clone()).collect(),
            changes,
            key_values: key,
            source_row,
        }
    }

    /// `(id)=(5)` style, in key order.
    pub fn key_display(&self, key_columns: &[String]) -> String {
        format!(
            "({})=({})",
            key_columns.join(", "),
            self.key_values.join(", ")
        )
    }
}

/// Compares the tables of `opts` on every target. Fails only when a database cannot be reached
/// or the repair file cannot be written; a table that cannot be compared is an `error` entry.
pub async fn verify_db(
    opts: &DbVerifyOptions,
    progress: &dyn Progress,
) -> Result<DbReport, VerifyError> {
    if opts.repair_sql.is_some() && opts.targets.len() > 1 {
        return Err(VerifyError::Options(
            "--repair-sql writes statements for one target; pick it with --target".into(),
        ));
    }
    let mut repair_file = match &opts.repair_sql {
        Some(path) => Some(repair::RepairFile::create(path)?),
        None => None,
    };
    let settle = Settle {
        window: opts.settle,
        slot_hint: opts.pipeline.clone(),
    };
    let mut tables = Vec::new();
    for target in &opts.targets {
        let (source, dst) =
            tokio::try_join!(Side::open(&opts.source.conn), Side::open(&target.conn))?;
        let mut names = resolve(&source, &opts.tables).await;
        // Tables the patterns select on the target alone: the source lost them, or the target
        // holds data nobody replicates. Either way the copies are not the same.
        for found in resolve(&dst, &opts.tables).await.into_iter().flatten() {
            if !names.iter().any(|n| n.as_ref().is_ok_and(|t| t == &found)) {
                names.push(Err((
                    found.to_string(),
                    VerifyError::MissingTable {
                        table: found.to_string(),
                        side: "source",
                        conn: opts.source.conn.to_string(),
                    },
                )));
            }
        }
        for name in names {
            let started = Instant::now();
            let mut report = match name {
                Ok(table) => {
                    let name = table.to_string();
                    match verify_table(
                        &source,
                        &dst,
                        &table,
                        opts.filter.clone(),
                        &settle,
                        repair_file.is_some(),
                        progress,
                    )
                    .await
                    {
                        Ok((report, shape)) => {
                            if let Some(file) = repair_file.as_mut() {
                                file.write_table(&shape, &report.differences)?;
                            }
                            report
                        }
                        Err(e) => TableReport::failed(name, e.to_string()),
                    }
                }
                Err((pattern, e)) => TableReport::failed(pattern, e.to_string()),
            };
            report.target = target.name.clone();
            report.elapsed_ms = started.elapsed().as_millis() as u64;
            progress.table_finished(&report);
            tables.push(report);
        }
    }
    let repair_sql = match repair_file {
        Some(file) => Some(file.finish()?),
        None => None,
    };
    Ok(DbReport {
        source: opts.source.name.clone(),
        tables,
        repair_sql,
    })
}

/// The source's tables for each pattern; a pattern matching nothing is an error entry.
async fn resolve(
    source: &Side,
    patterns: &[TablePattern],
) -> Vec<Result<TableName, (String, VerifyError)>> {
    let mut out: Vec<Result<TableName, (String, VerifyError)>> = Vec::new();
    for p in patterns {
        match source.resolve(p).await {
            Ok(names) => {
                for n in names {
                    if !out.iter().any(|o| o.as_ref().is_ok_and(|t| t == &n)) {
                        out.push(Ok(n));
                    }
                }
            }
            Err(PgError::MissingTable { table, target }) => out.push(Err((
                table.clone(),
                VerifyError::MissingTable {
                    table,
                    side: "source",
                    conn: target,
                },
            ))),
            Err(e) => out.push(Err((p.to_string(), e.into()))),
        }
    }
    out
}

impl TableReport {
    fn failed(table: String, error: String) -> TableReport {
        TableReport {
            table,
            target: String::new(),
            status: TableStatus::Error,
            error: Some(error),
            key_columns: Vec::new(),
            source_rows: 0,
            target_rows: 0,
            ranges_checked: 0,
            rows_compared: 0,
            in_flight: 0,
            differences: Vec::new(),
            elapsed_ms: 0,
        }
    }
}

/// Compares one table; returns its report and the shape both sides agreed on.
async fn verify_table(
    source: &Side,
    target: &Side,
    table: &TableName,
    filter: Option<String>,
    settle: &Settle,
    keep_rows: bool,
    progress: &dyn Progress,
) -> Result<(TableReport, Shape), VerifyError> {
    let src_info = source.describe(table).await?;
    let dst_info = target.describe(table).await.map_err(|e| match e {
        PgError::MissingTable {
            table,
            target: conn,
        } => VerifyError::MissingTable {
            table,
            side: "target",
            conn,
        },
        e => e.into(),
    })?;
    for (info, side) in [(&src_info, "source"), (&dst_info, "target")] {
        if info.primary_key.is_empty() {
            return Err(VerifyError::NoPrimaryKey {
                table: table.to_string(),
                side,
            });
        }
    }
    let shape = Shape::agree(&src_info, &dst_info, filter).map_err(|detail| {
        VerifyError::ShapeMismatch {
            table: table.to_string(),
            detail,
        }
    })?;
    let estimate = source.estimated_rows(&shape).await?;
    progress.table_started(&table.to_string(), estimate.max(0.0) as u64);

    let mut walk = Walk {
        source,
        target,
        shape: &shape,
        progress,
        candidates: Vec::new(),
        ranges_checked: 0,
        rows_compared: 0,
    };
    let snapshots = open_snapshots(source, target, settle).await;
    let compared = match snapshots {
        Ok(()) => walk.run(estimate).await,
        Err(e) => Err(e),
    };
    // End both snapshots whatever happened, then report the first failure.
    let ended = tokio::join!(source.end_snapshot(), target.end_snapshot());
    let (source_rows, target_rows) = compared?;
    ended.0?;
    ended.1?;

    tracing::debug!(
        table = %table,
        ranges = walk.ranges_checked,
        rows_compared = walk.rows_compared,
        candidates = walk.candidates.len(),
        "snapshot comparison done"
    );
    progress.advance(0, "re-checking differing rows");
    let candidates = std::mem::take(&mut walk.candidates);
    let outcome = recheck::recheck(source, target, &shape, candidates, settle, keep_rows).await?;
    let status = if outcome.differences.is_empty() {
        TableStatus::Identical
    } else {
        TableStatus::Different
    };
    Ok((
        TableReport {
            table: table.to_string(),
            target: String::new(),
            status,
            error: None,
            key_columns: shape.key.iter().map(|c| c.name.clone()).collect(),
            source_rows,
            target_rows,
            ranges_checked: walk.ranges_checked,
            rows_compared: walk.rows_compared,
            in_flight: outcome.in_flight,
            differences: outcome.differences,
            elapsed_ms: 0,
        },
        shape,
    ))
}

/// Opens a snapshot on each side. When a pipeline's slot shows how far the target has applied,
/// the target's snapshot waits (within the settle window) until it includes everything the
/// source's does, so rows in flight rarely show up at all; otherwise both are taken at once.
async fn open_snapshots(source: &Side, target: &Side, settle: &Settle) -> Result<(), VerifyError> {
    if !settle.window.is_zero() {
        if let Some(lsn) = source.begin_snapshot().await? {
            let deadline = Instant::now() + settle.window;
            while let Some(confirmed) = source.slots_confirmed(settle.slot_hint.as_deref()).await? {
                if confirmed >= lsn || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            target.begin_snapshot().await?;
            return Ok(());
        }
        source.end_snapshot().await?;
    }
    tokio::try_join!(source.begin_snapshot(), target.begin_snapshot())?;
    Ok(())
}

/// The bisection over one table inside both snapshots.
struct Walk<'a> {
    source: &'a Side,
    target: &'a Side,
    shape: &'a Shape,
    progress: &'a dyn Progress,
    /// Keys whose rows differ in the snapshots.
    candidates: Vec<Key>,
    ranges_checked: u64,
    rows_compared: u64,
}

/// A range whose checksums differ, with its row count on each side.
struct Pending {
    range: KeyRange,
    source_rows: i64,
    target_rows: i64,
    /// Most ranges of the split that produced it differed: compare row by row, don't split.
    stream: bool,
}

impl Walk<'_> {
    /// Walks the table; returns the row counts of the source and target snapshots.
    async fn run(&mut self, estimate: f64) -> Result<(u64, u64), VerifyError> {
        let root = KeyRange::default();
        let parts = ((estimate / LEAF_ROWS as f64).ceil() as usize).clamp(1, MAX_ROOT_RANGES);
        let sample = (estimate > SAMPLE_ABOVE_ROWS).then(|| {
            (100.0 * parts as f64 * SAMPLED_KEYS_PER_RANGE / estimate).clamp(0.001, 100.0)
        });
        self.progress.advance(0, "sampling key boundaries");
        let boundaries = self
            .source
            .boundaries(self.shape, &root, parts, estimate.max(1.0) as i64, sample)
            .await?;
        self.progress.advance(0, "computing checksums");
        let (src, dst, mut pending) = self.split(&root, &boundaries).await?;
        tracing::debug!(
            table = %self.shape.table,
            ranges = src.len(),
            differing = pending.len(),
            "root checksums compared"
        );
        let totals = (
            src.iter().map(|c| c.rows.max(0) as u64).sum(),
            dst.iter().map(|c| c.rows.max(0) as u64).sum(),
        );
        // Depth first, so that pending ranges stay few.
        while let Some(p) = pending.pop() {
            let big = p.source_rows.max(p.target_rows);
            if big <= LEAF_ROWS {
                self.compare_rows(&p.range).await?;
                self.progress
                    .advance(p.source_rows.max(0) as u64, "comparing rows");
                continue;
            }
            // Boundaries from the side with more rows, so every part is small on both sides
            // when it comes to row-by-row comparison.
            let (side, rows) = if p.source_rows >= p.target_rows {
                (self.source, p.source_rows)
            } else {
                (self.target, p.target_rows)
            };
            let wanted = (big as u64).div_ceil(LEAF_ROWS as u64) as usize;
            let parts = if p.stream { wanted } else { wanted.min(FANOUT) };
            let bounds = side
                .boundaries(self.shape, &p.range, parts, rows, None)
                .await?;
            if p.stream {
                for part in p.range.split(&bounds) {
                    self.compare_rows(&part).await?;
                }
                self.progress
                    .advance(p.source_rows.max(0) as u64, "comparing rows");
            } else {
                let (_, _, more) = self.split(&p.range, &bounds).await?;
                pending.extend(more);
            }
        }
        Ok(totals)
    }

    /// Checksums of `range` split at `boundaries` on both sides at once; returns them and the
    /// differing parts. Equal parts count as progress.
    async fn split(
        &mut self,
        range: &KeyRange,
        boundaries: &[Key],
    ) -> Result<(Vec<Checksum>, Vec<Checksum>, Vec<Pending>), VerifyError> {
        let (src, dst) = tokio::try_join!(
            self.source.checksums(self.shape, range, boundaries),
            self.target.checksums(self.shape, range, boundaries)
        )?;
        self.ranges_checked += src.len() as u64;
        let parts = range.split(boundaries);
        let mut differing = Vec::new();
        let mut equal_rows = 0u64;
        for ((part, s), d) in parts.into_iter().zip(&src).zip(&dst) {
            if s == d {
                equal_rows += s.rows.max(0) as u64;
            } else {
                differing.push(Pending {
                    range: part,
                    source_rows: s.rows,
                    target_rows: d.rows,
                    stream: false,
                });
            }
        }
        // When most parts differ, bisecting further costs more scans than it saves.
        let stream = src.len() >= 4 && differing.len() * 2 > src.len();
        for p in &mut differing {
            p.stream = stream;
        }
        self.progress
            .advance(equal_rows, "bisecting differing ranges");
        Ok((src, dst, differing))
    }

    /// Compares the rows of a small range by key and row hash; differing keys become candidates.
    async fn compare_rows(&mut self, range: &KeyRange) -> Result<(), VerifyError> {
        let (src, mut dst) = tokio::try_join!(
            self.source.row_hashes(self.shape, range),
            self.target.row_hashes(self.shape, range)
        )?;
        self.rows_compared += src.len().max(dst.len()) as u64;
        for (key, hash) in src {
            match dst.remove(&key) {
                Some(h) if h == hash => {}
                _ => self.candidates.push(key),
            }
        }
        self.candidates.extend(dst.into_keys());
        Ok(())
    }
}
