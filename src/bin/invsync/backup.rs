//! `invsync repo|key|backup|snapshots|restore|forget|prune` and `invsync verify repo`:
//! options, one library call each, and output for people or `--json`.

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use invsync::backup::check::{self as repo_check, RepoCheckOptions, Severity};
use invsync::backup::repository::{KeySummary, Repository};
use invsync::backup::restore::{self, RestoreDbOptions};
use invsync::backup::retention::{self, Policy};
use invsync::backup::session::{self, BackupOptions, DatabaseSource, Progress};
use invsync::backup::snapshot::SnapshotSummary;
use invsync::backup::{archive, prune, snapshot, BackupError};
use invsync::config::{Config, TablePattern};
use invsync::pg::schema::AccessOptions;
use invsync::pg::ConnInfo;
use invsync::recovery::point_in_time::{restore_point_in_time, PointInTimeOptions, RecoveryTarget};
use invsync::recovery::RecoveryError;

#[derive(Subcommand)]
pub enum BackupCommand {
    /// Manage backup repositories
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Manage who can read a repository (no data is rewritten)
    #[command(subcommand)]
    Key(KeyCommand),
    /// Take a snapshot of tables (one consistent cut) and configuration directories
    Backup(BackupArgs),
    /// List the snapshots of a repository
    Snapshots(RepoJson),
    /// Restore tables into a database (--to-db) or configuration trees into a directory (--to-dir)
    Restore(RestoreArgs),
    /// Forget snapshots by a retention policy (their data goes at the next prune)
    Forget(ForgetArgs),
    /// Delete data no snapshot references (safe beside running backups)
    Prune(PruneArgs),
}

#[derive(Subcommand)]
pub enum RepoCommand {
    /// Create the repository at the configured URL (refuses one that exists)
    ///
    /// Wraps a new repository key for every configured recipient and the passphrase.
    Init(RepoName),
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Let another age recipient (`age1...`) or a passphrase read the repository
    Add(KeyAddArgs),
    /// List the keys that can open the repository
    List(RepoJson),
    /// Remove a key by id (as `key list` shows it); the last key cannot be removed
    Remove(KeyRemoveArgs),
}

#[derive(Args)]
pub struct RepoName {
    /// The repository [default: the only one configured]
    #[arg(long, value_name = "NAME")]
    pub repo: Option<String>,
}

#[derive(Args)]
pub struct RepoJson {
    #[command(flatten)]
    repo: RepoName,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct KeyAddArgs {
    #[command(flatten)]
    repo: RepoName,
    /// An age X25519 recipient (`age1...`)
    #[arg(
        required_unless_present = "passphrase_env",
        conflicts_with = "passphrase_env"
    )]
    recipient: Option<String>,
    /// Add a passphrase read from this environment variable
    #[arg(long, value_name = "VAR")]
    passphrase_env: Option<String>,
}

#[derive(Args)]
pub struct KeyRemoveArgs {
    #[command(flatten)]
    repo: RepoName,
    /// The key id
    id: String,
}

#[derive(Args)]
pub struct BackupArgs {
    #[command(flatten)]
    repo: RepoName,
    /// The database: a configured name or a connection string (postgres://... or host=...) [default: the only one configured,
    /// when --tables or a pipeline names it]
    #[arg(long, value_name = "DB")]
    db: Option<String>,
    /// Tables (`schema.table` or `schema.*`) [default: the tables of the pipelines of --db]
    #[arg(long, value_name = "TABLE", num_args = 1.., value_delimiter = ',')]
    tables: Vec<String>,
    /// A configuration directory to include (repeatable)
    #[arg(long, value_name = "PATH")]
    config_dir: Vec<PathBuf>,
    /// Tables read at once, each on its own database connection (all in the same cut)
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// A tag for the snapshot (repeatable)
    #[arg(long, value_name = "TAG")]
    tag: Vec<String>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    repo: RepoName,
    /// Snapshot id (or a unique prefix), or `latest`; left out with --until or --until-lsn
    #[arg(required_unless_present_any = ["until", "until_lsn"], conflicts_with_all = ["until", "until_lsn"])]
    snapshot: Option<String>,
    /// Point-in-time restore: the database as it was at TIME (RFC 3339, or `YYYY-MM-DD
    /// HH:MM:SS[.ffffff]` in UTC), or `latest`: the newest snapshot before it, then the change
    /// archive; a transaction committed at or before TIME is in, later ones are out
    #[arg(
        long,
        value_name = "TIME|latest",
        requires = "to_db",
        conflicts_with = "until_lsn"
    )]
    until: Option<String>,
    /// Point-in-time restore up to the transactions whose commit ends at or before LSN
    #[arg(long, value_name = "LSN", requires = "to_db")]
    until_lsn: Option<String>,
    /// With --until/--until-lsn: leave out what commits exactly at the target
    #[arg(long)]
    exclusive: bool,
    /// With --until/--until-lsn: the archived database (its configured name), when the
    /// repository archives several
    #[arg(long, value_name = "DB")]
    source: Option<String>,
    /// Restore tables into this database (a configured name or a connection string: postgres://... or host=...)
    #[arg(
        long,
        value_name = "DB",
        required_unless_present = "to_dir",
        conflicts_with = "to_dir"
    )]
    to_db: Option<String>,
    /// Only these tables
    #[arg(long, value_name = "TABLE", num_args = 1.., value_delimiter = ',', requires = "to_db")]
    tables: Vec<String>,
    /// Drop and recreate tables that exist and hold rows
    #[arg(long, requires = "to_db")]
    replace: bool,
    /// Leave restored objects owned by the connecting role instead of their saved owners
    #[arg(long, requires = "to_db")]
    no_owner: bool,
    /// Do not restore privileges (grants); objects keep their default privileges
    #[arg(long, requires = "to_db")]
    no_acl: bool,
    /// With --replace: seconds to keep trying for the locks on tables in use (queries on them
    /// are let through between attempts), then fail naming the sessions holding them
    #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "to_db")]
    lock_wait: u64,
    /// Restore configuration trees below this directory
    #[arg(long, value_name = "PATH")]
    to_dir: Option<PathBuf>,
    /// Only these saved paths (absolute, as backed up)
    #[arg(long, value_name = "PATH", requires = "to_dir")]
    path: Vec<String>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    repo: RepoName,
    /// Keep the N most recent snapshots
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Keep the newest snapshot of each of the last N hours that have one
    #[arg(long, value_name = "N")]
    keep_hourly: Option<usize>,
    /// Keep the newest snapshot of each of the last N days (UTC) that have one
    #[arg(long, value_name = "N")]
    keep_daily: Option<usize>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one
    #[arg(long, value_name = "N")]
    keep_weekly: Option<usize>,
    /// Keep the newest snapshot of each of the last N months that have one
    #[arg(long, value_name = "N")]
    keep_monthly: Option<usize>,
    /// Only show what would be forgotten
    #[arg(long)]
    dry_run: bool,
    /// Prune afterwards
    #[arg(long)]
    prune: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    repo: RepoName,
    /// Only show what would be deleted
    #[arg(long)]
    dry_run: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// `invsync verify repo`.
#[derive(Args)]
pub struct VerifyRepoArgs {
    #[command(flatten)]
    repo: RepoName,
    /// Also download and check data: all packs, or PERCENT of them chosen at random
    #[arg(long, value_name = "PERCENT", num_args = 0..=1, default_missing_value = "100")]
    read_data: Option<f64>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn load(config: Option<&Path>) -> anyhow::Result<Config> {
    Ok(Config::load(&invsync::config::resolve_path(config))?)
}

pub async fn open(config: &Config, name: &RepoName) -> anyhow::Result<Repository> {
    let cfg = config
        .repository(name.repo.as_deref())
        .map_err(|e| anyhow!(e))?;
    Ok(Repository::open(cfg).await?)
}

/// A database argument: a configured name or a URL. Returns (label, connection).
fn database(config: &Config, arg: &str) -> anyhow::Result<(String, ConnInfo)> {
    let db = invsync::config::database_arg(Some(config), arg).map_err(|e| anyhow!(e))?;
    Ok((db.name, db.conn))
}

pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).context("rendering JSON")?
    );
    Ok(())
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A progress bar on stderr when it is a terminal.
struct Bar(ProgressBar);

impl Bar {
    fn new(enabled: bool) -> Bar {
        let pb = if enabled && std::io::stderr().is_terminal() {
            let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template("{spinner} {bytes} read ({bytes_per_sec}) {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        } else {
            ProgressBar::hidden()
        };
        Bar(pb)
    }
}

impl Progress for Bar {
    fn read(&self, what: &str, bytes: u64) {
        self.0.inc(bytes);
        self.0.set_message(what.to_string());
    }
}

pub async fn run(command: BackupCommand, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    match command {
        BackupCommand::Repo(RepoCommand::Init(name)) => {
            let cfg = config
                .repository(name.repo.as_deref())
                .map_err(|e| anyhow!(e))?;
            let repo = Repository::init(cfg).await?;
            outln!("created repository {} (id {})", repo.name, repo.config.id);
        }
        BackupCommand::Key(KeyCommand::Add(args)) => {
            let repo = open(&config, &args.repo).await?;
            let pass = match &args.passphrase_env {
                Some(var) => Some(age::secrecy::SecretString::from(
                    std::env::var(var)
                        .map_err(|_| anyhow!("environment variable {var} is not set"))?,
                )),
                None => None,
            };
            let kf = repo.add_key(args.recipient.as_deref(), pass).await?;
            outln!("added key {} to {}", kf.id, repo.name);
        }
        BackupCommand::Key(KeyCommand::List(args)) => {
            let repo = open(&config, &args.repo).await?;
            let keys = repo.list_keys().await?;
            if args.json {
                let rows: Vec<KeySummary> = keys.iter().map(KeySummary::from).collect();
                json(&rows)?;
            } else {
                for k in &keys {
                    let who = k.recipient.clone().unwrap_or_else(|| "passphrase".into());
                    outln!("{}  {}  {}", k.id, k.created.format("%Y-%m-%d %H:%M"), who);
                }
            }
        }
        BackupCommand::Key(KeyCommand::Remove(args)) => {
            let repo = open(&config, &args.repo).await?;
            let kf = repo.remove_key(&args.id).await?;
            outln!("removed key {} from {}", kf.id, repo.name);
        }
        BackupCommand::Backup(args) => {
            let repo = open(&config, &args.repo).await?;
            let tables = args
                .tables
                .iter()
                .map(|t| TablePattern::parse(t).map_err(|e| anyhow!(e)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let database = DatabaseSource::select(
                &config,
                args.db.as_deref(),
                &tables,
                !args.config_dir.is_empty(),
                args.jobs.into(),
            )?;
            let opts = BackupOptions {
                database,
                config_dirs: args.config_dir,
                tags: args.tag,
                fence: None,
            };
            let bar = Bar::new(!args.json);
            let summary = session::backup(&repo, &opts, &bar).await;
            bar.0.finish_and_clear();
            let s = summary?;
            if args.json {
                json(&s)?;
            } else {
                outln!(
                    "snapshot {} saved: {} table(s), {} row(s), {} file(s); table segments: {} reused unread, {} read; {} read, {} new, {} stored, in {:.1}s",
                    snapshot::short(&s.snapshot),
                    s.tables,
                    s.rows,
                    s.files,
                    s.stats.segments_reused,
                    s.stats.segments_read,
                    human_bytes(s.stats.bytes_read),
                    human_bytes(s.stats.bytes_new),
                    human_bytes(s.stats.bytes_stored),
                    s.stats.duration_ms as f64 / 1000.0
                );
            }
        }
        BackupCommand::Snapshots(args) => {
            let repo = open(&config, &args.repo).await?;
            let snaps = snapshot::list(&repo).await?;
            if args.json {
                let segments: Vec<_> = archive::list_segments(&repo)
                    .await?
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect();
                let chains = archive::chains_by_db(&segments);
                let rows: Vec<SnapshotSummary> = snaps
                    .iter()
                    .map(|(id, s)| SnapshotSummary {
                        recoverable_to: archive::reach(&chains, s),
                        ..SnapshotSummary::new(id, s)
                    })
                    .collect();
                json(&rows)?;
            } else {
                for (id, s) in &snaps {
                    outln!(
                        "{}  {}  {}  tags [{}]  lsn {}  {} read, {} stored",
                        snapshot::short(id),
                        s.time.format("%Y-%m-%d %H:%M:%S"),
                        s.source.as_deref().unwrap_or("-"),
                        s.tags.join(","),
                        s.lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                        human_bytes(s.stats.bytes_read),
                        human_bytes(s.stats.bytes_stored)
                    );
                    for t in &s.tables {
                        outln!("    table {} {} rows", t.schema.name, t.rows);
                    }
                    for t in &s.trees {
                        outln!("    config {} ({} entries)", t.root, t.entries.len());
                    }
                }
                outln!("{} snapshot(s)", snaps.len());
            }
        }
        BackupCommand::Restore(args) => {
            // Parsed before anything is opened: bad input costs nothing.
            let until = match (&args.until, &args.until_lsn) {
                (Some(t), _) => Some(RecoveryTarget::parse_until(t)?),
                (None, Some(l)) => Some(RecoveryTarget::parse_lsn(l)?),
                (None, None) => None,
            };
            if until.is_none() && (args.exclusive || args.source.is_some()) {
                return Err(anyhow!(
                    "--exclusive and --source go with --until or --until-lsn"
                ));
            }
            let repo = open(&config, &args.repo).await?;
            if let Some(target) = until {
                return point_in_time(&config, &repo, &args, target).await;
            }
            let which = args.snapshot.as_deref().unwrap_or("latest");
            let (id, snap) = snapshot::find(&repo, which).await?;
            if let Some(db) = &args.to_db {
                let (_, conn) = database(&config, db)?;
                let caught = Arc::new(AtomicU8::new(0));
                let stop = first_signal(caught.clone())?;
                let done =
                    match restore::restore_db(&repo, &snap, &conn, &restore_options(&args)?, stop)
                        .await
                    {
                        Err(e @ BackupError::Interrupted(_)) => {
                            eprintln!("error: {e}");
                            // The shell's convention for a process ended by signal N.
                            return Ok(ExitCode::from(128 + caught.load(Ordering::Relaxed)));
                        }
                        other => other?,
                    };
                if args.json {
                    json(&done)?;
                } else {
                    for t in &done {
                        outln!("restored {} ({} rows)", t.table, t.rows);
                    }
                    outln!(
                        "restored {} table(s) from snapshot {}",
                        done.len(),
                        snapshot::short(&id)
                    );
                }
            } else if let Some(dir) = &args.to_dir {
                let s = restore::restore_dir(&repo, &snap, dir, &args.path).await?;
                if args.json {
                    json(&s)?;
                } else {
                    outln!(
                        "restored {} file(s), {} dir(s), {} symlink(s), {} into {} from snapshot {}",
                        s.files,
                        s.dirs,
                        s.symlinks,
                        human_bytes(s.bytes),
                        dir.display(),
                        snapshot::short(&id)
                    );
                }
            }
        }
        BackupCommand::Forget(args) => {
            let repo = open(&config, &args.repo).await?;
            let policy = Policy {
                keep_last: args.keep_last,
                keep_hourly: args.keep_hourly,
                keep_daily: args.keep_daily,
                keep_weekly: args.keep_weekly,
                keep_monthly: args.keep_monthly,
            };
            let report =
                retention::forget_and_prune(&repo, &policy, args.dry_run, args.prune, None).await?;
            if args.json {
                json(&report)?;
            } else {
                for d in &report.snapshots {
                    let verb = match (d.keep, args.dry_run) {
                        (true, _) => format!("keep   ({})", d.reasons.join(", ")),
                        (false, true) => "would forget".into(),
                        (false, false) => "forgot".into(),
                    };
                    outln!(
                        "{}  {}  {verb}",
                        snapshot::short(&d.id),
                        d.time.format("%Y-%m-%d %H:%M:%S")
                    );
                }
                if let Some(p) = &report.prune {
                    print_prune(p);
                }
            }
        }
        BackupCommand::Prune(args) => {
            let repo = open(&config, &args.repo).await?;
            let p = prune::prune(&repo, args.dry_run).await?;
            if args.json {
                json(&p)?;
            } else {
                print_prune(&p);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Catches SIGINT and SIGTERM from now on; the future completes at the first, with its name,
/// and `caught` holds its number, so a job can clean up and exit as the signal asked.
fn restore_options(args: &RestoreArgs) -> anyhow::Result<RestoreDbOptions> {
    let tables = args
        .tables
        .iter()
        .map(|t| TablePattern::parse(t).map_err(|e| anyhow!(e)))
        .collect::<anyhow::Result<_>>()?;
    Ok(RestoreDbOptions {
        tables,
        replace: args.replace,
        access: AccessOptions {
            no_owner: args.no_owner,
            no_acl: args.no_acl,
        },
        lock_wait: Duration::from_secs(args.lock_wait),
    })
}

/// `restore --until|--until-lsn`: see [`invsync::recovery::point_in_time`].
async fn point_in_time(
    config: &Config,
    repo: &Repository,
    args: &RestoreArgs,
    target: RecoveryTarget,
) -> anyhow::Result<ExitCode> {
    let Some(db) = &args.to_db else {
        return Err(anyhow!("--until needs --to-db"));
    };
    let (_, conn) = database(config, db)?;
    let source = args
        .source
        .as_ref()
        .map(|name| match config.database(name) {
            Ok(d) => session::source_label(name, &d.conn),
            Err(_) => name.clone(),
        });
    let opts = PointInTimeOptions {
        source,
        target,
        exclusive: args.exclusive,
        restore: restore_options(args)?,
    };
    let caught = Arc::new(AtomicU8::new(0));
    let stop = first_signal(caught.clone())?;
    let report = match restore_point_in_time(repo, &conn, &opts, stop).await {
        Err(RecoveryError::Backup(e @ BackupError::Interrupted(_))) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(128 + caught.load(Ordering::Relaxed)));
        }
        other => other?,
    };
    if args.json {
        json(&report)?;
    } else {
        for t in &report.tables {
            outln!("restored {} ({} rows)", t.table, t.rows);
        }
        outln!(
            "restored snapshot {} (cut {}) of {}, then replayed {} transaction(s), {} change(s); {} sequence(s) moved forward",
            snapshot::short(&report.snapshot),
            report.snapshot_lsn,
            report.db,
            report.replay.transactions,
            report.replay.changes,
            report.sequences_moved
        );
        outln!(
            "the database stands at LSN {}{} (target: {}{}; window {})",
            report.restored_to.lsn,
            report
                .restored_to
                .time
                .map(|t| format!(", committed {}", t.to_rfc3339()))
                .unwrap_or_default(),
            report.target,
            if report.exclusive { ", exclusive" } else { "" },
            report.window
        );
        if report.replay.missing_rows > 0 {
            outln!(
                "warning: {} update(s)/delete(s) found no row; run `invsync verify db` against the source",
                report.replay.missing_rows
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn first_signal(caught: Arc<AtomicU8>) -> anyhow::Result<impl Future<Output = String>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    Ok(async move {
        let (name, number) = tokio::select! {
            _ = int.recv() => ("SIGINT", 2),
            _ = term.recv() => ("SIGTERM", 15),
        };
        caught.store(number, Ordering::Relaxed);
        name.to_string()
    })
}

fn print_prune(p: &prune::PruneReport) {
    let verb = if p.dry_run { "would delete" } else { "deleted" };
    outln!(
        "{verb} {} of {} pack(s) ({}); {} snapshot(s) kept",
        p.packs_deleted,
        p.packs,
        human_bytes(p.bytes_deleted),
        p.snapshots
    );
    if p.running_backups + p.running_readers > 0 {
        outln!(
            "{} backup(s) and {} restore(s) or check(s) running: {} unreferenced pack(s) kept for now; prune again later",
            p.running_backups, p.running_readers, p.packs_deferred
        );
    }
}

/// `invsync verify repo`: exit 0 when every snapshot is restorable, 1 when damage was found,
/// 2 when the check could not run.
pub async fn verify_repo(args: VerifyRepoArgs, config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let result = async {
        let config = load(config)?;
        let repo = open(&config, &args.repo).await?;
        let report = repo_check::check_repo(
            &repo,
            &RepoCheckOptions {
                read_data: args.read_data,
            },
        )
        .await?;
        anyhow::Ok(report)
    }
    .await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "error: {}",
                e.chain()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ")
                    .replace('\n', " ")
            );
            return Ok(ExitCode::from(2));
        }
    };
    if args.json {
        json(&report)?;
    } else {
        outln!(
            "repository {}: {} snapshot(s), {} index object(s), {} pack(s){}",
            report.repository,
            report.snapshots,
            report.index_objects,
            report.packs,
            if args.read_data.is_some() {
                format!(
                    ", {} pack(s) and {} blob(s) read",
                    report.packs_read, report.blobs_checked
                )
            } else {
                String::new()
            }
        );
        for f in &report.findings {
            let sev = match f.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "warning",
            };
            outln!("{sev} {:?} {}: {}", f.kind, f.object, f.message);
            for a in &f.affects {
                outln!("    affects {a}");
            }
        }
        if report.has_errors() {
            outln!("damaged: some data cannot be restored");
        } else {
            outln!("no errors found");
        }
    }
    Ok(if report.has_errors() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
