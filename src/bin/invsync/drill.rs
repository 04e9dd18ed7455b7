//! `invsync drill` and `invsync drill history` (see `invsync::recovery::drill`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};

use invsync::backup::restore::RestoreDbOptions;
use invsync::backup::{archive, BackupError};
use invsync::config::TablePattern;
use invsync::pg::schema::AccessOptions;
use invsync::recovery::drill::{self, DrillOptions, DrillReport};
use invsync::recovery::point_in_time::RecoveryTarget;
use invsync::recovery::RecoveryError;
use invsync::verify::db::Endpoint;

use crate::backup::{first_signal, json, load, open, RepoName};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DrillArgs {
    #[command(subcommand)]
    history: Option<DrillCommand>,
    #[command(flatten)]
    repo: RepoName,
    /// The standby to restore into: a configured name or a connection string
    #[arg(long, value_name = "DB")]
    to_db: Option<String>,
    /// The live source to verify against (a configured name or a connection string) [default:
    /// the configured database the repository archives]
    #[arg(long, value_name = "DB")]
    source: Option<String>,
    /// Restore to this TIME (RFC 3339 or `YYYY-MM-DD HH:MM:SS` UTC) instead of the latest point
    #[arg(long, value_name = "TIME|latest", default_value = "latest")]
    until: String,
    /// Restore up to this LSN instead (with --no-restore: where the standby already stands)
    #[arg(long, value_name = "LSN", conflicts_with = "until")]
    until_lsn: Option<String>,
    /// Only verify: the standby was restored before (give its point with --until-lsn)
    #[arg(long, requires = "until_lsn")]
    no_restore: bool,
    /// Only these tables
    #[arg(long, value_name = "TABLE", num_args = 1.., value_delimiter = ',')]
    tables: Vec<String>,
    /// Drop and recreate the standby's tables that exist and hold rows
    #[arg(long)]
    replace: bool,
    /// Seconds to wait for the archive to reach the source's position after the verify
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    archive_wait: u64,
    /// Write drill-<time>.json and drill-<time>.md into this directory
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum DrillCommand {
    /// List the drill history and check its chain (exit 1 when broken)
    History(HistoryArgs),
}

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    repo: RepoName,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub async fn run(args: DrillArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    if let Some(DrillCommand::History(h)) = &args.history {
        return history(&open(&config, &h.repo).await?, h.json).await;
    }
    // Parsed before anything is opened: bad input costs nothing.
    let target = match &args.until_lsn {
        Some(l) => RecoveryTarget::parse_lsn(l)?,
        None => RecoveryTarget::parse_until(&args.until)?,
    };
    let tables = args
        .tables
        .iter()
        .map(|t| TablePattern::parse(t).map_err(|e| anyhow!(e)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let to_db = args
        .to_db
        .as_deref()
        .ok_or_else(|| anyhow!("a drill needs --to-db STANDBY (or `invsync drill history`)"))?;
    let standby = Endpoint::resolve(Some(&config), to_db)?;
    let repo = open(&config, &args.repo).await?;
    let (source, archived) = match &args.source {
        Some(s) => {
            let (e, label) = drill::source(Some(&config), s)?;
            (e, Some(label))
        }
        None => {
            // The configured database the repository archives, when there is exactly one.
            let mut dbs: Vec<String> = archive::list_segments(&repo)
                .await?
                .into_iter()
                .map(|(_, m)| m.db)
                .collect();
            dbs.sort();
            dbs.dedup();
            let [label] = dbs.as_slice() else {
                return Err(if dbs.is_empty() {
                    RecoveryError::NoArchive {
                        repo: repo.name.clone(),
                        of: String::new(),
                    }
                    .into()
                } else {
                    anyhow!(
                        "repository {} archives several databases ({}); name the live one with --source",
                        repo.name,
                        dbs.join(", ")
                    )
                });
            };
            let name = label.split(" (").next().unwrap_or(label);
            let e = Endpoint::resolve(Some(&config), name).map_err(|_| {
                anyhow!("the archived database {label} is not configured; name the live source with --source")
            })?;
            (e, Some(label.clone()))
        }
    };
    let opts = DrillOptions {
        source,
        archived,
        standby,
        target,
        restore: RestoreDbOptions {
            tables,
            replace: args.replace,
            access: AccessOptions::default(),
            lock_wait: Duration::from_secs(60),
        },
        no_restore: args.no_restore,
        archive_wait: Duration::from_secs(args.archive_wait),
    };
    let caught = Arc::new(AtomicU8::new(0));
    let stop = first_signal(caught.clone())?;
    let report = match drill::drill(&repo, &opts, stop).await {
        Err(RecoveryError::Backup(e @ BackupError::Interrupted(_))) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(128 + caught.load(Ordering::Relaxed)));
        }
        other => other?,
    };
    if let Some(dir) = &args.report {
        write_report(dir, &report)?;
    }
    if args.json {
        json(&report)?;
    } else {
        out!("{}", drill::markdown(&report));
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_report(dir: &Path, report: &DrillReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the report directory {}", dir.display()))?;
    let stem = format!("drill-{}", report.started.format("%Y%m%dT%H%M%SZ"));
    let json_path = dir.join(format!("{stem}.json"));
    let text = serde_json::to_string_pretty(report).context("rendering JSON")?;
    std::fs::write(&json_path, text)
        .with_context(|| format!("writing the drill report {}", json_path.display()))?;
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, drill::markdown(report))
        .with_context(|| format!("writing the drill report {}", md_path.display()))?;
    Ok(())
}

async fn history(
    repo: &invsync::backup::repository::Repository,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let h = drill::history(repo).await?;
    if as_json {
        json(&h)?;
    } else {
        for (name, e) in &h.entries {
            let r = &e.report;
            outln!(
                "#{} {} {} {} RPO {} / {} bytes, RTO {:.1} s, {} finding(s) ({})",
                e.seq,
                &name[..12.min(name.len())],
                r.started.format("%Y-%m-%d %H:%M:%S"),
                if r.passed { "passed" } else { "FAILED" },
                r.rpo.seconds.map_or("-".into(), |s| format!("{s:.1} s")),
                r.rpo.bytes,
                r.rto_seconds,
                r.verify.unexplained,
                r.standby
            );
        }
        for b in &h.broken {
            outln!("broken: {b}");
        }
        outln!(
            "{} drill(s); chain {}",
            h.entries.len(),
            if h.broken.is_empty() {
                "intact"
            } else {
                "BROKEN"
            }
        );
    }
    Ok(if h.broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
