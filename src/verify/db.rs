//! `invsync verify db`: proves that a target holds exactly the source's rows, table by table,
//! and names every row that differs.
//!
//! For each table both sides first checksum it in key hash buckets (a hash of each row's key
//! text picks its bucket; per bucket the row count and the sum of the row hashes), each inside
//! its own snapshot (taken together, or the target's after the pipeline has caught up with the
//! source's): one plain scan with no key comparisons, so an identical table costs what reading
//! it costs, and the differing buckets already show where the differing rows are. Their rows
//! alone are then read from both sides (key and row hash) and compared: in one slice when they
//! are few, or, when many buckets differ, streamed in key ranges cut at sampled keys, each
//! holding a bounded number of them. Candidate keys are re-read fresh from both sides on a
//! second pair of sessions ([`super::recheck`]), in batches while the walk goes on, so that
//! changes in flight are not reported; or, when a named pipeline feeds the target, the source's
//! snapshot is a temporary slot's cut and the target's is taken at its pipeline's position past
//! it, and the candidates, kept whole for the table, are decided by replaying the source's
//! changes in between ([`super::replay`]) inside the same snapshots. Without REPLICATION on the
//! source, or a target that does not get past the cut, verify says so in one log line and
//! re-checks instead.
//!
//! Invariants: a table that cannot be compared (no primary key, missing on a side, different
//! columns, a query failing) is reported as an error, never as identical, and the other tables
//! are still verified. A key equal on both sides but written differently (numeric 1.0 vs 1.00)
//! may hash into another bucket on each side; both buckets then differ and are compared in the
//! same slice or key range, where the server's own equality makes it one changed row. Key
//! ranges are walked in key order and each range's candidates are put in the server's key
//! order, so differences come out in key order (bytewise for text keys whose collations differ
//! between the sides, so that a range selects the same rows on both: a row in one range on one
//! side and another range on the other would be counted in both) (with a settle window, rows that needed several
//! re-reads come later). Memory is bounded by the slice size, the re-check batch and the number
//! of differences listed (and, when decided against the stream, by the table's differing keys);
//! counts by kind are exact whatever the number, and repair SQL is spooled to files as
//! differences are proven.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::recheck::{self, Settle, Verdict};
use super::repair;
use super::replay::{Outcome, Replay};
use super::side::{Checksum, RowText, Side};
use super::touched::Touched;
use super::VerifyError;
use crate::cdc::names;
use crate::cdc::slot::{self, TemporarySlot};
use crate::config::{Config, TablePattern};
use crate::pg::keyrange::{BucketSet, Key, KeyRange, Shape};
use crate::pg::{ConnInfo, Lsn, PgError, TableName};

/// Rows per key hash bucket aimed at: a differing row costs fetching its bucket's rows.
const ROWS_PER_BUCKET: f64 = 1024.0;
/// Bounds on the number of buckets. More buckets make the checksum scan slower (the server's
/// hash aggregate outgrows the CPU caches: 4096 buckets cost 1.3x the scan floor, 1024 about
/// the floor), while more rows per bucket only make the read of differing buckets return
/// more rows: that read scans the table once however many it returns.
const MIN_BUCKETS: u32 = 64;
const MAX_BUCKETS: u32 = 1024;
/// The rows of the differing buckets are compared (key and row hash) in one slice when there
/// are at most this many on each side (one scan of the table); beyond, they are streamed.
const SLICE_ROWS: i64 = 32_768;
/// Streamed differing buckets' rows come in key ranges holding about this many each, which
/// bounds memory whatever the number of differences.
const STREAM_ROWS: i64 = 8_192;
/// Above this many rows, the key ranges are cut at keys from a row sample.
const SAMPLE_ABOVE_ROWS: f64 = 200_000.0;
/// Sampled keys per key range: enough for even quantiles.
const SAMPLED_KEYS_PER_RANGE: f64 = 16.0;
/// Candidate keys are re-checked (and their differences handed on) in batches of this many
/// while the walk goes on, so memory does not grow with the number of differences.
const RECHECK_BATCH: usize = 4096;
/// The least time allowed for cutting the source with a temporary slot.
const CUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Differing rows listed per table in the report unless asked otherwise; counts stay exact.
pub const DEFAULT_MAX_LISTED: usize = 10_000;

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
        let db = crate::config::database_arg(config, name_or_url).map_err(VerifyError::Options)?;
        Ok(Endpoint {
            name: db.name,
            conn: db.conn,
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
    /// pipeline); zero re-reads them once. With a pipeline, also how long its target may take to
    /// apply past the source's cut.
    pub settle: Duration,
    /// The pipeline feeding the targets, whose replication slot shows how far they have caught up.
    pub pipeline: Option<String>,
    /// Where to write SQL that makes the targets match the source.
    pub repair_sql: Option<PathBuf>,
    /// How many differing rows of a table the report lists (the first in key order); the
    /// counts and the repair SQL cover all of them.
    pub max_listed: usize,
    /// Compare only the rows these changes touched (a table they cannot tie to keys whole),
    /// for sides known equal before the changes and not moving now (the settle window is then
    /// used as is: zero reads each row once).
    pub touched: Option<Arc<Touched>>,
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
            max_listed: DEFAULT_MAX_LISTED,
            touched: None,
        })
    }
}

/// Receives progress while verification runs (a terminal progress bar, or nothing).
pub trait Progress: Send + Sync {
    /// A table's comparison starts; `estimated_rows` is the planner's estimate (0 if unknown).
    fn table_started(&self, table: &str, estimated_rows: u64);
    /// `rows` more source rows have been compared; `phase` says what is being done.
    fn advance(&self, rows: u64, phase: &str);
    /// `rows` more rows than the table's estimate will be compared (many differing rows, read
    /// a second time).
    fn add_work(&self, rows: u64);
    /// The table is done.
    fn table_finished(&self, report: &TableReport);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn table_started(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64, _: &str) {}
    fn add_work(&self, _: u64) {}
    fn table_finished(&self, _: &TableReport) {}
}

/// The result of `verify db`, in the shape `--json` prints.
#[derive(Debug, Serialize)]
pub struct DbReport {
    pub source: String,
    pub tables: Vec<TableReport>,
    /// Where the repair SQL was written, if asked for.
    pub repair_sql: Option<String>,
    /// Target sequences behind the source's (see [`SequenceBehind`]); reported, not counted in
    /// the exit code.
    pub sequences_behind: Vec<SequenceBehind>,
}

/// A target sequence whose last value is behind the source sequence's, or behind the largest
/// value its column holds on the source (the least, for a descending sequence): once that
/// target is promoted, the application's
/// defaults would hand out keys the source already used.
#[derive(Debug, Serialize)]
pub struct SequenceBehind {
    pub target: String,
    pub sequence: String,
    /// The column that owns it, `schema.table.column`.
    pub owned_by: String,
    pub source_value: Option<i64>,
    /// The column's largest value on the source (least, for a descending sequence).
    pub source_max_key: Option<i64>,
    /// `None`: never used, or missing on the target.
    pub target_value: Option<i64>,
    /// The statement that brings it forward, to run on the target.
    pub fix: String,
}

impl DbReport {
    /// 0 identical, 1 differences found, 2 something could not be verified (as `diff` does),
    /// 3 no difference proven but some rows undecided (still moving on a live source). Sequences
    /// behind do not count: a live pipeline brings them only every `sequence_interval`.
    pub fn exit_code(&self) -> u8 {
        let any = |status| self.tables.iter().any(|t| t.status == status);
        if any(TableStatus::Error) {
            2
        } else if any(TableStatus::Different) {
            1
        } else if any(TableStatus::Undecided) {
            3
        } else {
            0
        }
    }

    /// Differing rows found in all tables (not only those listed).
    pub fn differences(&self) -> u64 {
        self.tables.iter().map(|t| t.differences_found).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableStatus {
    Identical,
    Different,
    /// No difference proven, but some rows differed on every read and could not be decided
    /// (see `undecided`).
    Undecided,
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
    /// Key hash buckets whose checksums were compared.
    pub buckets_checked: u64,
    /// Rows compared one by one (key and hash).
    pub rows_compared: u64,
    /// Differences seen in the snapshots that were gone on a fresh read (changes in flight).
    pub in_flight: u64,
    /// Differing rows found, and of them missing on the target, extra on it, and changed.
    pub differences_found: u64,
    pub missing: u64,
    pub extra: u64,
    pub changed: u64,
    /// The first differing rows in key order, at most `max_listed` of them.
    pub differences: Vec<Difference>,
    /// Rows that differed on every read while the source kept changing them, so that neither
    /// a difference nor lag could be proven within the settle window: never counted as
    /// differences. Each listed with the difference last seen, at most `max_listed`.
    pub undecided: u64,
    pub undecided_rows: Vec<Difference>,
    /// True when the differing rows were decided against the source's change stream (the
    /// target read at its pipeline's position, the source at a cut before it, the changes in
    /// between replayed); false when they were re-read until they settled.
    pub exact: bool,
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
    let mut sequences_behind = Vec::new();
    for target in &opts.targets {
        // A second pair of sessions re-reads differing rows fresh while the first pair's
        // snapshots are still being walked.
        let (source, dst, fresh_source, fresh_dst) = tokio::try_join!(
            Side::open(&opts.source.conn),
            Side::open(&target.conn),
            Side::open(&opts.source.conn),
            Side::open(&target.conn)
        )?;
        let mut exact = match &opts.pipeline {
            Some(pipeline) => Exact::find(&source, pipeline).await,
            None => None,
        };
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
        let compared: Vec<TableName> = names
            .iter()
            .filter_map(|n| n.as_ref().ok().cloned())
            .collect();
        for name in names {
            let started = Instant::now();
            let mut report = match name {
                Ok(table) => {
                    let name = table.to_string();
                    let compared = verify_table(
                        [&source, &dst, &fresh_source, &fresh_dst],
                        &table,
                        opts,
                        &settle,
                        &mut exact,
                        repair_file.as_mut(),
                        progress,
                    )
                    .await;
                    if let Some(file) = repair_file.as_mut() {
                        file.end_table()?;
                    }
                    match compared {
                        Ok(report) => report,
                        // The repair file cannot be written: nothing else can be trusted to it.
                        Err(e @ VerifyError::RepairFile { .. }) => return Err(e),
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
        sequences_behind.extend(sequences_behind_on(&opts.source, target, &compared).await?);
    }
    let repair_sql = match repair_file {
        Some(file) => Some(file.finish()?),
        None => None,
    };
    Ok(DbReport {
        source: opts.source.name.clone(),
        tables,
        repair_sql,
        sequences_behind,
    })
}

/// The sequences that `tables`' columns own on the source and that are behind on `target`
/// (see [`SequenceBehind`]). Read on sessions of their own: sequences are not transactional.
async fn sequences_behind_on(
    source: &Endpoint,
    target: &Endpoint,
    tables: &[TableName],
) -> Result<Vec<SequenceBehind>, VerifyError> {
    let (src, dst) = tokio::try_join!(source.conn.connect(), target.conn.connect())?;
    let owned = crate::pg::sequences::owned(&src, &source.conn, tables).await?;
    let names: Vec<TableName> = owned.iter().map(|o| o.sequence.clone()).collect();
    let source_values = crate::pg::sequences::last_values(&src, &source.conn, &names).await?;
    let target_values = crate::pg::sequences::last_values(&dst, &target.conn, &names).await?;
    let mut out = Vec::new();
    for ((o, at_source), target_value) in owned.iter().zip(source_values).zip(target_values) {
        // The key furthest along in the sequence's direction (the least for a descending one).
        let furthest = if at_source.descending { "min" } else { "max" };
        let max_key: Option<i64> = src
            .query_one(
                &format!(
                    "SELECT {furthest}({})::bigint FROM {}",
                    crate::pg::quote_ident(&o.column),
                    o.table.quoted()
                ),
                &[],
            )
            .await
            .map_err(|e| {
                PgError::query(
                    format!("reading the furthest {} of {}", o.column, o.table),
                    &source.conn,
                    e,
                )
            })?
            .get(0);
        let needed = match (at_source.last, max_key) {
            (Some(a), Some(b)) if at_source.descending => Some(a.min(b)),
            (a, b) => a.max(b),
        };
        let Some(needed) = needed else {
            continue;
        };
        if target_value.covers(needed) {
            continue;
        }
        let (source_value, target_value) = (at_source.last, target_value.last);
        out.push(SequenceBehind {
            target: target.name.clone(),
            sequence: o.sequence.to_string(),
            owned_by: format!("{}.{}", o.table, o.column),
            source_value,
            source_max_key: max_key,
            target_value,
            fix: format!(
                "SELECT setval({}, {needed});",
                crate::pg::quote_literal(&o.sequence.quoted())
            ),
        });
    }
    Ok(out)
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
            buckets_checked: 0,
            rows_compared: 0,
            in_flight: 0,
            differences_found: 0,
            missing: 0,
            extra: 0,
            changed: 0,
            differences: Vec::new(),
            undecided: 0,
            undecided_rows: Vec::new(),
            exact: false,
            elapsed_ms: 0,
        }
    }
}

/// Compares one table inside snapshots of `source` and `target`, re-reading differing rows
/// on `fresh_source` and `fresh_target`; every difference goes to `repair` as it is proven.
async fn verify_table(
    [source, target, fresh_source, fresh_target]: [&Side; 4],
    table: &TableName,
    opts: &DbVerifyOptions,
    settle: &Settle,
    exact: &mut Option<Exact>,
    repair: Option<&mut repair::RepairFile>,
    progress: &dyn Progress,
) -> Result<TableReport, VerifyError> {
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
    let mut shape = Shape::agree(&src_info, &dst_info, opts.filter.clone()).map_err(|detail| {
        VerifyError::ShapeMismatch {
            table: table.to_string(),
            detail,
        }
    })?;
    // Key ranges must select the same rows on both sides: text keys whose collations differ
    // (a `C` source, an ICU `en-US` target) are bounded and ordered bytewise on both.
    let (src_collations, dst_collations) =
        tokio::try_join!(source.key_collations(&shape), target.key_collations(&shape))?;
    let bytewise: Vec<bool> = src_collations
        .iter()
        .zip(&dst_collations)
        .map(|(s, d)| s.is_some() && s != d)
        .collect();
    shape.order_bytewise(&bytewise);
    let estimate = source.estimated_rows(&shape).await?;
    progress.table_started(&table.to_string(), estimate.max(0.0) as u64);

    let mut walk = Walk {
        source,
        target,
        fresh: (fresh_source, fresh_target),
        settle,
        shape: &shape,
        progress,
        candidates: Vec::new(),
        found: Found {
            shape: &shape,
            limit: opts.max_listed,
            listed: Vec::new(),
            counts: [0; 3],
            undecided: 0,
            undecided_listed: Vec::new(),
            repair,
        },
        in_flight: 0,
        buckets_checked: 0,
        rows_compared: 0,
        exact: false,
    };
    if let Some(keys) = opts.touched.as_ref().and_then(|t| t.keys_of(&shape)) {
        // Only the touched rows, in this server's key text (the stream sends the key types'
        // output forms), each once.
        for chunk in keys.chunks(recheck::BATCH) {
            walk.candidates
                .extend(source.sort_keys(&shape, chunk).await?);
        }
        walk.rows_compared = walk.candidates.len() as u64;
        walk.recheck().await?;
        return Ok(walk.report(table, &shape, (0, 0)));
    }
    let cut = match exact.as_ref() {
        Some(e) if !e.published.contains(table) => {
            tracing::warn!(
                "verify db: {table} is not in pipeline `{}`'s publication; re-checking its differing rows until they settle instead",
                e.pipeline
            );
            None
        }
        Some(e) => match e.open_cut(source, target, &opts.source.conn, settle).await {
            Ok(cut) => cut,
            Err(error) => {
                tracing::warn!(
                    "verify db: cannot cut the source at a stream position ({error}); \
                     re-checking differing rows until they settle instead"
                );
                *exact = None;
                None
            }
        },
        None => None,
    };
    walk.exact = cut.is_some();
    let snapshots = match cut {
        Some(_) => Ok(()),
        None => open_snapshots(source, target, settle).await,
    };
    let compared = match snapshots {
        Ok(()) => match walk.run(estimate).await {
            Ok(totals) => match cut {
                Some(cut) => walk
                    .replay(cut, opts.filter.is_some())
                    .await
                    .map(|()| totals),
                None => Ok(totals),
            },
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    // End both snapshots whatever happened, then report the first failure.
    let ended = tokio::join!(source.end_snapshot(), target.end_snapshot());
    let (source_rows, target_rows) = compared?;
    ended.0?;
    ended.1?;
    walk.recheck().await?;

    Ok(walk.report(table, &shape, (source_rows, target_rows)))
}

/// A table's differences as they are proven: counted exactly, the first `limit` kept for the
/// report, every one written to the repair file; and its undecided rows, counted and listed
/// apart, never repaired. Memory holds at most `limit` of each.
struct Found<'a> {
    shape: &'a Shape,
    limit: usize,
    listed: Vec<Difference>,
    /// Missing, extra, changed.
    counts: [u64; 3],
    undecided: u64,
    undecided_listed: Vec<Difference>,
    repair: Option<&'a mut repair::RepairFile>,
}

impl Found<'_> {
    fn take(&mut self, verdict: Verdict) -> Result<(), VerifyError> {
        match verdict {
            Verdict::Proven(difference) => self.add(difference),
            Verdict::Undecided(difference) => {
                self.undecided += 1;
                if self.undecided_listed.len() < self.limit {
                    self.undecided_listed.push(Difference {
                        source_row: None,
                        ..difference
                    });
                }
                Ok(())
            }
        }
    }

    fn add(&mut self, difference: Difference) -> Result<(), VerifyError> {
        self.counts[match difference.kind {
            DifferenceKind::Missing => 0,
            DifferenceKind::Extra => 1,
            DifferenceKind::Changed => 2,
        }] += 1;
        if let Some(file) = self.repair.as_mut() {
            file.add(self.shape, &difference)?;
        }
        if self.listed.len() < self.limit {
            self.listed.push(Difference {
                source_row: None,
                ..difference
            });
        }
        Ok(())
    }
}

/// A named pipeline's stream, for comparing its target exactly ([`super::replay`]).
struct Exact {
    pipeline: String,
    publication: String,
    /// The tables the publication streams: only theirs are replayed.
    published: Vec<TableName>,
}

/// The source cut at a stream position, and the target's position past it: the source's
/// snapshot shows the commits before the slot's consistent point C, the target's everything
/// its pipeline applied up to `applied` (T >= C).
struct Cut {
    slot: TemporarySlot,
    applied: Lsn,
}

impl Exact {
    /// The pipeline's stream on the source, or None (with a log line saying why) when there is
    /// no publication to follow.
    async fn find(source: &Side, pipeline: &str) -> Option<Exact> {
        let publication = names::publication(pipeline);
        match source.published(&publication).await {
            Ok(Some(published)) => Some(Exact {
                pipeline: pipeline.to_string(),
                publication,
                published,
            }),
            Ok(None) => {
                tracing::warn!("verify db: pipeline `{pipeline}` has no publication {publication} on the source (not set up?); re-checking differing rows until they settle instead");
                None
            }
            Err(e) => {
                tracing::warn!("verify db: cannot read publication {publication} ({e}); re-checking differing rows until they settle instead");
                None
            }
        }
    }

    /// Cuts the source with a temporary slot and opens both snapshots: the source's at the
    /// cut, the target's once its pipeline has applied past the cut (waiting at most the
    /// settle window). `Ok(None)` (no snapshot open) when the target does not get there, or
    /// is not fed by the pipeline; an error when the source cannot be cut (no REPLICATION
    /// role, wal_level not logical).
    ///
    /// On a quiet source no commit moves the target's recorded position past the cut, but the
    /// pipeline confirms its slot past it once every target it streams to holds all the
    /// commits before it (keepalives move the confirmation when nothing is pending): a
    /// streaming target at a position before the cut, with the slot confirmed at or past the
    /// cut, holds exactly the source's state at the cut.
    async fn open_cut(
        &self,
        source: &Side,
        target: &Side,
        source_conn: &ConnInfo,
        settle: &Settle,
    ) -> Result<Option<Cut>, VerifyError> {
        // Creating a slot waits for the transactions running on the source to end.
        let slot = tokio::time::timeout(
            settle.window.max(CUT_TIMEOUT),
            slot::create_temporary(
                source_conn,
                &names::verify_slot(&self.pipeline),
                &self.publication,
            ),
        )
        .await
        .map_err(|_| VerifyError::CutTimeout {
            conn: source_conn.to_string(),
            waited: settle.window.max(CUT_TIMEOUT),
        })??;
        let cut = slot.consistent_point;
        source.begin_snapshot_at(&slot.snapshot).await?;
        let deadline = Instant::now() + settle.window;
        let pipeline_slot = names::slot(&self.pipeline);
        loop {
            match target.applied_position(&self.pipeline).await? {
                Some(applied) if applied >= cut => break,
                Some(_)
                    if source
                        .slot_confirmed(&pipeline_slot)
                        .await?
                        .is_some_and(|c| c >= cut) =>
                {
                    break
                }
                Some(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                applied => {
                    tracing::warn!(
                        "verify db: the target has applied pipeline `{}` up to {}, not past the cut at {cut} within {:?}; re-checking differing rows until they settle instead",
                        self.pipeline,
                        applied.map_or("nothing".to_string(), |a| a.to_string()),
                        settle.window
                    );
                    slot.release();
                    source.end_snapshot().await?;
                    return Ok(None);
                }
            }
        }
        target.begin_snapshot().await?;
        // Read inside the snapshot: the position of exactly the rows it shows (at least the
        // cut, which the loop above saw it hold).
        let applied = target
            .applied_position(&self.pipeline)
            .await?
            .unwrap_or_default()
            .max(cut);
        Ok(Some(Cut { slot, applied }))
    }
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

/// The comparison of one table inside both snapshots: bucket checksums, then the rows of the
/// differing buckets, in key ranges visited in key order, each range's candidates put in key
/// order, so differences come out in key order.
struct Walk<'a> {
    source: &'a Side,
    target: &'a Side,
    /// Sessions outside the snapshots, for re-reading candidates fresh.
    fresh: (&'a Side, &'a Side),
    settle: &'a Settle,
    shape: &'a Shape,
    progress: &'a dyn Progress,
    /// Keys whose rows differ in the snapshots, not re-checked yet (at most a batch).
    candidates: Vec<Key>,
    found: Found<'a>,
    in_flight: u64,
    buckets_checked: u64,
    rows_compared: u64,
    /// The snapshots are a cut of the source and the target at its pipeline's position: the
    /// candidates are kept whole and decided by [`Walk::replay`], not re-read.
    exact: bool,
}

/// How many key hash buckets a table of about `rows` rows is cut into: a power of two.
fn bucket_count(rows: f64) -> u32 {
    let wanted = (rows.max(0.0) / ROWS_PER_BUCKET).min(MAX_BUCKETS as f64) as u32;
    wanted.next_power_of_two().clamp(MIN_BUCKETS, MAX_BUCKETS)
}

impl Walk<'_> {
    /// The table's report once the walk is done, with the rows each side counted.
    fn report(
        self,
        table: &TableName,
        shape: &Shape,
        (source_rows, target_rows): (u64, u64),
    ) -> TableReport {
        tracing::debug!(
            table = %table,
            buckets = self.buckets_checked,
            rows_compared = self.rows_compared,
            differences = self.found.counts.iter().sum::<u64>(),
            "table compared"
        );
        let Found {
            listed,
            counts: [missing, extra, changed],
            undecided,
            undecided_listed,
            ..
        } = self.found;
        let differences_found = missing + extra + changed;
        TableReport {
            table: table.to_string(),
            target: String::new(),
            status: if differences_found > 0 {
                TableStatus::Different
            } else if undecided > 0 {
                TableStatus::Undecided
            } else {
                TableStatus::Identical
            },
            error: None,
            key_columns: shape.key.iter().map(|c| c.name.clone()).collect(),
            source_rows,
            target_rows,
            buckets_checked: self.buckets_checked,
            rows_compared: self.rows_compared,
            in_flight: self.in_flight,
            differences_found,
            missing,
            extra,
            changed,
            differences: listed,
            undecided,
            undecided_rows: undecided_listed,
            exact: self.exact,
            elapsed_ms: 0,
        }
    }

    /// Walks the table; returns the row counts of the source and target snapshots.
    async fn run(&mut self, estimate: f64) -> Result<(u64, u64), VerifyError> {
        // One scan per side checksums every key hash bucket: no key comparisons, so it costs
        // about what a plain checksum of the table costs, and most verified tables are
        // identical. The differing buckets show where the differing rows are.
        let count = bucket_count(estimate);
        let phase = "checksumming the table by key hash (one scan)";
        self.progress.advance(0, phase);
        let progress = self.progress;
        let (mut on_source, mut on_target) = (|rows| progress.advance(rows, phase), |_| {});
        let (src, dst) = tokio::try_join!(
            self.source.checksums(self.shape, count, &mut on_source),
            self.target.checksums(self.shape, count, &mut on_target)
        )?;
        self.buckets_checked += u64::from(count);
        let rows = |sums: &[Checksum]| sums.iter().map(|c| c.rows.max(0) as u64).sum::<u64>();
        let totals = (rows(&src), rows(&dst));
        let mut differing = BucketSet {
            count,
            members: Vec::new(),
        };
        let (mut src_rows, mut dst_rows) = (0i64, 0i64);
        for (bucket, (s, d)) in (0..count).zip(src.iter().zip(&dst)) {
            if s != d {
                differing.members.push(bucket);
                src_rows += s.rows;
                dst_rows += d.rows;
            }
        }
        drop((src, dst));
        tracing::debug!(
            table = %self.shape.table,
            buckets = count,
            differing = differing.members.len(),
            src_rows,
            dst_rows,
            "bucket checksums compared"
        );
        if differing.members.is_empty() {
            return Ok(totals);
        }
        let root = KeyRange::default();
        let big = src_rows.max(dst_rows);
        if big <= SLICE_ROWS {
            self.progress
                .advance(0, "comparing rows of differing buckets");
            self.compare_rows(&root, &differing).await?;
            return Ok(totals);
        }
        // Many differences: stream the differing buckets' rows in key ranges holding about
        // STREAM_ROWS of them each (hashing spreads them evenly over the key order), cut at
        // keys of the side with more rows, so that differences still come out in key order.
        let parts = (big as u64).div_ceil(STREAM_ROWS as u64) as usize;
        let (side, side_rows) = if totals.0 >= totals.1 {
            (self.source, totals.0 as f64)
        } else {
            (self.target, totals.1 as f64)
        };
        let sample = (side_rows > SAMPLE_ABOVE_ROWS).then(|| {
            (100.0 * parts as f64 * SAMPLED_KEYS_PER_RANGE / side_rows).clamp(0.001, 100.0)
        });
        self.progress.advance(0, "sampling key boundaries");
        let bounds = side
            .boundaries(self.shape, &root, parts, side_rows as i64, sample)
            .await?;
        self.progress.add_work(src_rows.max(0) as u64);
        for part in root.split(&bounds) {
            let compared = self.compare_rows(&part, &differing).await?;
            self.progress
                .advance(compared, "comparing rows of differing buckets");
        }
        Ok(totals)
    }

    /// Compares the rows of a range whose key falls in `buckets` by key and row hash;
    /// differing keys become candidates, in key order. Returns how many source rows it read.
    async fn compare_rows(
        &mut self,
        range: &KeyRange,
        buckets: &BucketSet,
    ) -> Result<u64, VerifyError> {
        let (src, dst) = tokio::try_join!(
            self.source.row_hashes(self.shape, range, buckets),
            self.target.row_hashes(self.shape, range, buckets)
        )?;
        self.rows_compared += src.len().max(dst.len()) as u64;
        let compared = src.len() as u64;
        let src_hashes: HashMap<&Key, i64> = src.iter().map(|(k, h)| (k, *h)).collect();
        let dst_hashes: HashMap<&Key, i64> = dst.iter().map(|(k, h)| (k, *h)).collect();
        // Each list is in key order; rows only on the target must be merged in by the server's
        // ordering, which only the server knows (collations). The server also keeps one of
        // keys equal but written differently on each side (numeric 1.0 and 1.00): one row.
        let mut keys: Vec<Key> = src
            .iter()
            .filter(|(k, h)| dst_hashes.get(k) != Some(h))
            .map(|(k, _)| k.clone())
            .collect();
        let extra: Vec<Key> = dst
            .iter()
            .filter(|(k, _)| !src_hashes.contains_key(k))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            keys = extra;
        } else if !extra.is_empty() {
            keys.extend(extra);
            keys = self.fresh.0.sort_keys(self.shape, &keys).await?;
        }
        self.candidates.extend(keys);
        if self.candidates.len() >= RECHECK_BATCH && !self.exact {
            self.recheck().await?;
        }
        Ok(compared)
    }

    /// Decides the candidates against the source's stream: the changes committed between the
    /// cut and the target's position are replayed onto the candidates' source rows at the cut
    /// (only the candidates' changes are kept), and each is compared with its target row;
    /// both read in the still open snapshots. If the stream cannot be read, the candidates are
    /// left for [`Walk::recheck`].
    async fn replay(&mut self, cut: Cut, filtered: bool) -> Result<(), VerifyError> {
        if self.candidates.is_empty() {
            cut.slot.release();
            return Ok(());
        }
        self.progress.advance(
            0,
            "replaying the source's changes up to the target's position",
        );
        let mut seen = HashSet::new();
        self.candidates.retain(|k| seen.insert(k.clone()));
        drop(seen);
        // The stream sends keys as their types' output functions render them, which a key's
        // text may not be (`character(n)`): the replay knows the candidates in that form.
        let mut wanted = HashSet::with_capacity(self.candidates.len());
        let mut renamed: HashMap<Key, Key> = HashMap::new();
        for chunk in self.candidates.chunks(recheck::BATCH) {
            let forms = self.source.output_forms(self.shape, chunk).await?;
            for (key, form) in chunk.iter().zip(forms) {
                if &form != key {
                    renamed.insert(key.clone(), form.clone());
                }
                wanted.insert(form);
            }
        }
        let mut replay = Replay::new(self.shape, &wanted, filtered);
        let read = cut
            .slot
            .changes_until(cut.applied, &mut |message| {
                replay.absorb(message);
                Ok(())
            })
            .await;
        if let Err(e) = read {
            tracing::warn!("verify db: cannot read the source's changes of {} ({e}); re-checking its differing rows until they settle instead", self.shape.table);
            self.exact = false;
            return Ok(());
        }
        let candidates = std::mem::take(&mut self.candidates);
        let keep_rows = self.found.repair.is_some();
        for chunk in candidates.chunks(recheck::BATCH) {
            let (mut at_cut, mut on_target) = tokio::try_join!(
                self.source.fetch_rows(self.shape, chunk),
                self.target.fetch_rows(self.shape, chunk)
            )?;
            for key in chunk {
                let (s, t) = (at_cut.remove(key), on_target.remove(key));
                let form = renamed.get(key).unwrap_or(key);
                let verdict = match replay.decide(form, s.as_ref(), t.as_ref()) {
                    Outcome::Lag => None,
                    Outcome::Differs(source_row) => {
                        recheck::difference(self.shape, key, source_row.as_ref(), t.as_ref())
                            .map(Verdict::Proven)
                    }
                    Outcome::Undecided => {
                        recheck::difference(self.shape, key, s.as_ref(), t.as_ref())
                            .map(Verdict::Undecided)
                    }
                };
                match verdict {
                    Some(mut verdict) => {
                        if !keep_rows {
                            let (Verdict::Proven(d) | Verdict::Undecided(d)) = &mut verdict;
                            d.source_row = None;
                        }
                        self.found.take(verdict)?;
                    }
                    None => self.in_flight += 1,
                }
            }
        }
        Ok(())
    }

    /// Re-reads the candidates found so far on the fresh sessions and hands on the
    /// differences that hold.
    async fn recheck(&mut self) -> Result<(), VerifyError> {
        if self.candidates.is_empty() {
            return Ok(());
        }
        self.progress.advance(0, "re-checking differing rows");
        let candidates = std::mem::take(&mut self.candidates);
        let found = &mut self.found;
        let keep_rows = found.repair.is_some();
        self.in_flight += recheck::recheck(
            self.fresh.0,
            self.fresh.1,
            self.shape,
            candidates,
            self.settle,
            keep_rows,
            &mut |verdict| found.take(verdict),
        )
        .await?;
        Ok(())
    }
}
