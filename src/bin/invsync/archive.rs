//! `invsync archive run|status`: the change archive (see `invsync::backup::archive`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Args, Subcommand};

use invsync::backup::archive::{self, ArchiveOptions, ClosingRule};

use crate::backup::{first_signal, json, load, open, RepoName};
use invsync::backup::session::DatabaseSource;
use invsync::config::TablePattern;

#[derive(Subcommand)]
pub enum ArchiveCommand {
    /// Archive a database's change stream into the repository until SIGINT or SIGTERM
    ///
    /// Creates the archive's publication and slot on the source on first use and stores
    /// whole transactions as encrypted segments, closing one every --segment-seconds or
    /// --segment-mib. The slot is confirmed only once a segment is stored.
    Run(RunArgs),
    /// Show each archived database's recoverable window and any gaps
    Status(StatusArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The database: a configured name or a connection string
    db: String,
    #[command(flatten)]
    repo: RepoName,
    /// Tables (`schema.table` or `schema.*`) [default: the tables of the pipelines of DB]
    #[arg(long, value_name = "TABLE", num_args = 1.., value_delimiter = ',')]
    tables: Vec<String>,
    /// Close a segment after this many seconds (the newest archived point is never older)
    #[arg(long, value_name = "S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    segment_seconds: u64,
    /// Close a segment once it holds this many MiB of changes
    #[arg(long, value_name = "M", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=2048))]
    segment_mib: u64,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    repo: RepoName,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub async fn run(command: ArchiveCommand, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    match command {
        ArchiveCommand::Run(args) => {
            let repo = open(&config, &args.repo).await?;
            let patterns = args
                .tables
                .iter()
                .map(|t| TablePattern::parse(t).map_err(|e| anyhow!(e)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // The same choice of tables as `invsync backup --db`: `--tables`, else the tables
            // of the pipelines that read from or write to the database.
            let source = DatabaseSource::select(&config, Some(&args.db), &patterns, false, 1)?
                .ok_or_else(|| anyhow!("database {} is not configured", args.db))?;
            let opts = ArchiveOptions {
                label: source.label,
                conn: source.conn,
                tables: source.tables,
                closing: ClosingRule {
                    max_age: Duration::from_secs(args.segment_seconds),
                    max_bytes: (args.segment_mib as usize) << 20,
                },
            };
            let (tx, mut rx) = tokio::sync::watch::channel(false);
            let signal = first_signal(Arc::new(AtomicU8::new(0)))?;
            tokio::spawn(async move {
                let name = signal.await;
                tracing::info!("{name}: storing the open segment, then stopping");
                let _ = tx.send(true);
            });
            let summary = archive::run(&repo, &opts, &mut rx).await?;
            if args.json {
                json(&summary)?;
            } else {
                outln!(
                    "archived {} transaction(s) in {} segment(s) through slot {}, from {} to {}",
                    summary.transactions,
                    summary.segments,
                    summary.slot,
                    summary.started_at,
                    summary.end
                );
            }
        }
        ArchiveCommand::Status(args) => {
            let repo = open(&config, &args.repo).await?;
            let dbs = archive::archive_status(&repo).await?;
            if args.json {
                json(&dbs)?;
            } else if dbs.is_empty() {
                return Err(anyhow!(
                    "repository {} holds no change archive; start one with `invsync archive run DB`",
                    repo.name
                ));
            } else {
                let point = |p: &archive::Point| {
                    let time = p
                        .time
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_else(|| "-".into());
                    format!("{} ({time})", p.lsn)
                };
                for d in &dbs {
                    outln!(
                        "{}: {} segment(s), {} transaction(s), slot {}",
                        d.db,
                        d.segments,
                        d.transactions,
                        d.slot
                    );
                    match &d.earliest {
                        Some(e) => outln!(
                            "    recoverable from {} (snapshot {}) to {}",
                            point(e),
                            e.snapshot.as_deref().map(|s| &s[..s.len().min(8)]).unwrap_or("-"),
                            point(&d.latest)
                        ),
                        None => outln!(
                            "    archived up to {}, but no snapshot is covered yet: take a backup while the archive runs",
                            point(&d.latest)
                        ),
                    }
                    for g in &d.gaps {
                        outln!("    gap after {}: {}", g.after, g.reason);
                    }
                }
            }
            if dbs.iter().any(|d| !d.gaps.is_empty()) {
                return Ok(ExitCode::from(3));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
