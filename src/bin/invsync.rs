//! The `invsync` command line: parses options, loads the configuration, calls the library and
//! renders its results for people or, with `--json`, for scripts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use invsync::config::{self, Config};

#[path = "invsync/output.rs"]
#[macro_use]
mod output;

#[path = "invsync/agent.rs"]
mod agent;
#[path = "invsync/archive.rs"]
mod archive;
#[path = "invsync/backup.rs"]
mod backup;
#[path = "invsync/drill.rs"]
mod drill;
#[path = "invsync/sync.rs"]
mod sync;
#[path = "invsync/verify.rs"]
mod verify;

#[derive(Parser)]
#[command(
    name = "invsync",
    version,
    about = "Keeps e-invoice data in sync and safe across clouds",
    long_about = "Keeps e-invoice data in sync and safe across clouds: CDC replication between \
PostgreSQL databases, encrypted deduplicated backups to object storage, and verification that \
copies hold exactly the source's rows.\n\nThe configuration is read from --config, else \
$INVSYNC_CONFIG, else ./invsync.toml; `invsync init` writes a commented example."
)]
struct Cli {
    /// Configuration file [default: $INVSYNC_CONFIG or ./invsync.toml]
    #[arg(long, short = 'c', global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Log filter, e.g. `info`, `debug`, `invsync=debug` (also from RUST_LOG)
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        default_value = "info,object_store=warn"
    )]
    log: String,

    /// Write log lines as JSON (for log collectors)
    #[arg(long, global = true)]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a commented example configuration (never overwrites a file)
    Init {
        /// Where to write it
        #[arg(default_value = config::DEFAULT_CONFIG_PATH)]
        path: PathBuf,
    },
    /// Inspect the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    #[command(flatten)]
    Backup(backup::BackupCommand),
    /// The change archive: a database's committed transactions as segments in a repository
    #[command(subcommand)]
    Archive(archive::ArchiveCommand),
    /// A disaster-recovery drill: restore the latest recoverable point into a standby, verify
    /// it against the live source, measure RPO and RTO, and append the report to the
    /// repository's tamper-evident drill history (`drill history` lists and checks it)
    ///
    /// Exits 0 when the drill passes, 1 when it fails (findings are named).
    Drill(drill::DrillArgs),
    /// Prove that copies hold exactly the source's data and that repositories are whole
    #[command(subcommand)]
    Verify(verify::VerifyCommand),
    /// CDC replication pipelines: setup, run, status, teardown
    #[command(subcommand)]
    Sync(sync::SyncCommand),
    /// Run every pipeline and every scheduled job until SIGTERM/SIGINT, serving health and
    /// metrics
    ///
    /// Pipelines stream through blackout windows; backup, verify, forget and prune jobs run on
    /// their cron schedules around them. Serves /healthz, /readyz, /status (JSON) and /metrics
    /// (Prometheus). On SIGTERM or SIGINT, commits every pipeline's batch and exits 0 within
    /// [agent] shutdown_timeout. With --check: validates `[agent]`, `[[schedules]]` and
    /// `[[blackouts]]` and prints each schedule's next runs, and for each whether a blackout
    /// window defers or skips it.
    Agent(agent::AgentArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and connect to every database and repository
    ///
    /// Reports each database's server version, wal_level, whether the role may replicate and
    /// which pipeline tables are missing, and whether each repository is reachable. Exits 0
    /// only when everything is usable.
    Check(JsonFlag),
}

#[derive(Args)]
struct JsonFlag {
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    // `sync run` is one stream of small messages handled in order, with a few connections' I/O
    // beside it: on one thread, handing each message between tasks costs no cross-thread wakeup
    // (a quarter of its CPU in the catch-up benchmark). Other commands spread work over cores.
    let runtime = if matches!(cli.command, Command::Sync(sync::SyncCommand::Run { .. })) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    match output::check() {
        Ok(()) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// Completes at the first SIGINT or SIGTERM.
pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    if let Ok(mut term) = signal(SignalKind::terminate()) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_config(flag: Option<&Path>) -> anyhow::Result<Config> {
    Ok(Config::load(&config::resolve_path(flag))?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init { path } => {
            config::write_example(&path)?;
            outln!(
                "wrote {}; edit the databases, pipelines and repositories, then run `invsync config check`",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup(command) => backup::run(command, cli.config.as_deref()).await,
        Command::Archive(command) => archive::run(command, cli.config.as_deref()).await,
        Command::Drill(args) => drill::run(args, cli.config.as_deref()).await,
        Command::Verify(command) => verify::run(command, cli.config.as_deref()).await,
        Command::Sync(cmd) => sync::run(load_config(cli.config.as_deref())?, cmd).await,
        Command::Agent(args) => agent::run(load_config(cli.config.as_deref())?, args).await,
        Command::Config(ConfigCommand::Check(flags)) => {
            let config = load_config(cli.config.as_deref())?;
            let report = invsync::check::check(&config).await;
            if flags.json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("rendering JSON")?
                );
            } else {
                print_check(&report);
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print_check(report: &invsync::check::CheckReport) {
    outln!("config {}: syntax ok", report.config);
    for db in &report.databases {
        let mark = if db.problems.is_empty() { "ok " } else { "BAD" };
        let mut facts = Vec::new();
        if let Some(v) = &db.server_version {
            facts.push(format!("PostgreSQL {v}"));
        }
        if let Some(w) = &db.wal_level {
            facts.push(format!("wal_level={w}"));
        }
        if let Some(r) = db.can_replicate {
            facts.push(if r { "may replicate" } else { "no REPLICATION" }.to_string());
        }
        outln!(
            "{mark} database {} ({}) {}",
            db.name,
            db.url,
            facts.join(", ")
        );
        for p in &db.problems {
            outln!("    problem: {p}");
        }
        for n in &db.notes {
            outln!("    note: {n}");
        }
    }
    for r in &report.repositories {
        let mark = if r.problems.is_empty() { "ok " } else { "BAD" };
        let state = if r.reachable {
            "reachable"
        } else {
            "unreachable"
        };
        outln!("{mark} repository {} ({}) {state}", r.name, r.url);
        for p in &r.problems {
            outln!("    problem: {p}");
        }
    }
    if report.ok() {
        outln!("all checks passed");
    } else {
        let n: usize = report
            .databases
            .iter()
            .map(|d| d.problems.len())
            .sum::<usize>()
            + report
                .repositories
                .iter()
                .map(|r| r.problems.len())
                .sum::<usize>();
        outln!("{n} problem(s) found");
    }
}
