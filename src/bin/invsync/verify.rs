//! `invsync verify ...`: options, one library call, and the report for people or `--json`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use invsync::verify::{self, DbReport, DbVerifyOptions, Progress, TableReport, TableStatus};

#[derive(Subcommand)]
pub enum VerifyCommand {
    /// Prove that a target database holds exactly the source's rows
    ///
    /// Compares checksums of key hash buckets computed inside both databases at once, compares
    /// the rows of differing buckets, and reports every row that is missing on the
    /// target, extra on the target, or changed (with the columns that differ). With --pipeline,
    /// rows that differ only because the pipeline has not applied them yet are proven to lag
    /// against the source's change stream (a temporary slot; needs REPLICATION on the source),
    /// else re-checked until --settle ends; rows neither proven equal nor different are
    /// reported as undecided, apart.
    /// Exit status: 0 identical, 1 differences found, 2 could not verify, 3 no difference
    /// found but some rows undecided.
    Db(DbArgs),
    /// Check that every snapshot of a repository is whole and readable
    ///
    /// Every snapshot's references must resolve to indexed objects that exist; with
    /// --read-data, packs are also downloaded, decrypted, decompressed and hashed. Names every
    /// damaged snapshot, table and file. Exit status: 0 no damage, 1 damage found, 2 could not
    /// check.
    Repo(super::backup::VerifyRepoArgs),
}

#[derive(Args)]
pub struct DbArgs {
    /// Compare the pipeline's source with its targets, over the pipeline's tables
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "source",
        required_unless_present = "source"
    )]
    pipeline: Option<String>,
    /// The source: a configured database name or a connection string (postgres://... or host=... dbname=...)
    #[arg(long, value_name = "DB", requires = "target")]
    source: Option<String>,
    /// The target: a configured database name or a connection string (postgres://... or host=... dbname=...) (with --pipeline: one of its targets)
    #[arg(long, value_name = "DB")]
    target: Option<String>,
    /// Tables to compare (`schema.table` or `schema.*`) [default: the pipeline's, or public.*]
    #[arg(long, value_name = "TABLE", num_args = 1.., value_delimiter = ',')]
    tables: Vec<String>,
    /// Compare only rows matching this SQL condition (on both sides)
    #[arg(long = "where", value_name = "SQL")]
    filter: Option<String>,
    /// Seconds to wait for a pipeline's target to apply past the source's cut, or to keep
    /// re-checking differing rows before reporting them [default: 15 with --pipeline, else 0]
    #[arg(long, value_name = "SECS")]
    settle: Option<f64>,
    /// Write SQL statements that make the target match the source to FILE
    #[arg(long, value_name = "FILE")]
    repair_sql: Option<PathBuf>,
    /// List at most N differing rows per table, the first in key order (the counts and the
    /// repair SQL cover every one)
    #[arg(long, value_name = "N", default_value_t = verify::db::DEFAULT_MAX_LISTED)]
    max_listed: usize,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

/// Runs a verify command. Like `diff`, any failure to verify exits with status 2, so that 1
/// always means "differences found".
pub async fn run(command: VerifyCommand, config_flag: Option<&Path>) -> anyhow::Result<ExitCode> {
    let result = match command {
        VerifyCommand::Db(args) => db(args, config_flag).await,
        VerifyCommand::Repo(args) => super::backup::verify_repo(args, config_flag).await,
    };
    result.or_else(|e| {
        eprintln!("error: {}", super::one_line(&e));
        Ok(ExitCode::from(2))
    })
}

async fn db(args: DbArgs, config_flag: Option<&Path>) -> anyhow::Result<ExitCode> {
    let needs_config = args.pipeline.is_some()
        || [&args.source, &args.target]
            .into_iter()
            .flatten()
            .any(|d| !invsync::pg::ConnInfo::is_connection_string(d));
    let config = if needs_config {
        Some(super::load_config(config_flag)?)
    } else {
        None
    };
    let mut opts = DbVerifyOptions::select(
        config.as_ref(),
        args.pipeline.as_deref(),
        args.source.as_deref(),
        args.target.as_deref(),
        &args.tables,
    )?;
    opts.filter = args.filter;
    opts.repair_sql = args.repair_sql;
    opts.max_listed = args.max_listed;
    if let Some(secs) = args.settle {
        opts.settle = Duration::try_from_secs_f64(secs)
            .context("--settle takes a number of seconds, such as 10 or 0.5")?;
    }
    let bar = Bar::new(!args.json);
    let report = verify::verify_db(&opts, &bar).await?;
    bar.0.finish_and_clear();
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).context("rendering JSON")?
        );
    } else {
        print_report(&report);
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// A progress bar over all tables' estimated rows, drawn only on a terminal.
struct Bar(ProgressBar);

impl Bar {
    fn new(visible: bool) -> Bar {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {human_pos}/{human_len} rows, {elapsed} (ETA {eta}) {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar(bar)
    }
}

impl Progress for Bar {
    fn table_started(&self, table: &str, estimated_rows: u64) {
        self.0.set_prefix(table.to_string());
        self.0.inc_length(estimated_rows);
    }
    fn advance(&self, rows: u64, phase: &str) {
        self.0.inc(rows);
        self.0.set_message(phase.to_string());
    }
    fn add_work(&self, rows: u64) {
        self.0.inc_length(rows);
    }
    fn table_finished(&self, _report: &TableReport) {}
}

fn print_report(report: &DbReport) {
    let mut counts = [0usize; 4];
    for t in &report.tables {
        let on = if t.target.is_empty() {
            String::new()
        } else {
            format!(" on {}", t.target)
        };
        let secs = t.elapsed_ms as f64 / 1000.0;
        match t.status {
            TableStatus::Identical => {
                counts[0] += 1;
                outln!(
                    "ok    {}{on}: identical ({} rows, {secs:.1} s)",
                    t.table,
                    t.source_rows
                );
            }
            TableStatus::Different => {
                counts[1] += 1;
                outln!(
                    "DIFF  {}{on}: {} rows differ: {} missing, {} extra, {} changed \
                     ({} source rows, {} target rows, {secs:.1} s)",
                    t.table,
                    t.differences_found,
                    t.missing,
                    t.extra,
                    t.changed,
                    t.source_rows,
                    t.target_rows
                );
                print_rows(t, &t.differences, t.differences_found, "");
            }
            TableStatus::Undecided => {
                counts[3] += 1;
                outln!(
                    "UNDEC {}{on}: no difference proven ({} source rows, {} target rows, {secs:.1} s)",
                    t.table, t.source_rows, t.target_rows
                );
            }
            TableStatus::Error => {
                counts[2] += 1;
                outln!(
                    "ERROR {}{on}: {}",
                    t.table,
                    t.error.as_deref().unwrap_or("could not be verified")
                );
            }
        }
        if t.undecided > 0 && t.exact {
            outln!(
                "      {} rows undecided: the source's change stream does not show all their \
                 values (unchanged TOAST values, generated columns); last seen:",
                t.undecided
            );
            print_rows(t, &t.undecided_rows, t.undecided, "undecided, ");
        } else if t.undecided > 0 {
            outln!(
                "      {} rows undecided: the source kept changing them until the settle window \
                 ended (re-run, or raise --settle); last seen:",
                t.undecided
            );
            print_rows(t, &t.undecided_rows, t.undecided, "undecided, ");
        }
        if t.in_flight > 0 && t.exact {
            outln!(
                "      ({} rows only lagged: the source's changes up to the target's position make them equal)",
                t.in_flight
            );
        } else if t.in_flight > 0 {
            outln!(
                "      ({} rows were in flight and matched on re-check)",
                t.in_flight
            );
        }
    }
    outln!(
        "{} tables identical, {} different ({} rows), {} with only undecided rows ({} rows undecided \
         in all), {} could not be verified",
        counts[0],
        counts[1],
        report.differences(),
        counts[3],
        report.tables.iter().map(|t| t.undecided).sum::<u64>(),
        counts[2]
    );
    let value = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    for b in &report.sequences_behind {
        outln!(
            "SEQUENCE {} on {}: at {}, behind the source's {} (largest {} there: {}); run on the target: {}",
            b.sequence,
            b.target,
            value(b.target_value),
            value(b.source_value),
            b.owned_by,
            value(b.source_max_key),
            b.fix
        );
    }
    if let Some(path) = &report.repair_sql {
        outln!("repair SQL written to {path}");
    }
}

/// The listed rows of a table (`prefix` before each kind), and how many more there are of
/// `total`.
fn print_rows(t: &TableReport, rows: &[verify::Difference], total: u64, prefix: &str) {
    for d in rows {
        let mut line = format!(
            "      {:<18} {}",
            format!("{prefix}{}", d.kind.describe()),
            d.key_display(&t.key_columns)
        );
        let changes: Vec<String> = d
            .changes
            .iter()
            .map(|c| format!("{}: {} -> {}", c.column, shown(&c.source), shown(&c.target)))
            .collect();
        if !changes.is_empty() {
            line.push_str(&format!("  {}", changes.join("; ")));
        }
        outln!("{line}");
    }
    if total > rows.len() as u64 {
        outln!(
            "      ... and {} more (raise --max-listed to list them)",
            total - rows.len() as u64
        );
    }
}

/// Longest value a human report shows whole; a longer one (a value of megabytes would fill
/// the terminal) is cut, with its length and a hash so two long values that differ late are
/// still told apart. `--json` keeps every value whole.
const SHOWN_MAX: usize = 200;

/// A value as SQL would show it: quoted text, or NULL.
fn shown(v: &Option<String>) -> String {
    match v {
        Some(s) if s.len() > SHOWN_MAX => {
            let mut cut = SHOWN_MAX / 2;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            format!(
                "{}... ({} bytes, blake3 {})",
                invsync::pg::quote_literal(&s[..cut]),
                s.len(),
                &blake3::hash(s.as_bytes()).to_hex()[..12]
            )
        }
        Some(s) => invsync::pg::quote_literal(s),
        None => "NULL".into(),
    }
}
