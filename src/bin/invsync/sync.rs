//! `invsync sync ...`: options and rendering for the CDC pipeline commands.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use invsync::config::Config;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use invsync::recovery::switchover::{self, Outcome, Stage, SwitchoverOptions};
use invsync::sync::{self, CopyProgress, SetupOptions, SetupOutcome};

#[derive(Subcommand)]
pub enum SyncCommand {
    /// Check the tables, create the publication, slot and target tables, and copy the rows
    ///
    /// Refuses tables without a primary key or replica identity. The copy reads the snapshot the
    /// slot exported, so `sync run` continues exactly where it ends. Re-running a complete setup
    /// changes nothing; an interrupted one is redone from the start. On a pipeline that streams,
    /// tables and targets added to the configuration are copied and join the stream where their
    /// copy was read (a running `sync run` keeps streaming; a new target needs it stopped), and
    /// those removed leave it.
    Setup(SetupArgs),
    /// Stream changes from the source to every target until SIGINT or SIGTERM
    ///
    /// On a signal, finishes the source transaction being received, commits every target's
    /// batch with its progress and exits 0. Reconnects with backoff when a database goes away.
    Run {
        /// Pipeline name, as in [pipelines.NAME]
        pipeline: String,
    },
    /// Show slot state, retained WAL, and per target the applied LSN, lag and table phases
    Status {
        /// Only this pipeline (default: all)
        pipeline: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Drop the slot, the publication and invsync's bookkeeping on the targets (not their data)
    Teardown {
        /// Pipeline name
        pipeline: String,
        /// Do it (without this, only says what would be dropped)
        #[arg(long)]
        yes: bool,
    },
    /// Make the pipeline's target the primary: pause writes on the source, drain, copy
    /// sequences, verify, and set up the configured reverse pipeline with no copy
    ///
    /// The application roles (`application_roles` of the pipeline) are made read-only on the
    /// source and their sessions ended; each step is recorded on the source, so a rerun after a
    /// crash finishes the switchover (or, before its commit point, `--rollback` undoes it).
    /// Any failing step before the commit point rolls back and says why.
    Switchover(SwitchoverArgs),
}

#[derive(Args)]
pub struct SwitchoverArgs {
    /// Pipeline name, as in [pipelines.NAME]
    pipeline: String,
    /// The target that becomes the primary (default: the pipeline's only target)
    #[arg(long)]
    to: Option<String>,
    /// How long the target may take to catch up, before the pause and during it
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Print the plan and change nothing
    #[arg(long)]
    dry_run: bool,
    /// Undo a switchover that stopped before its commit point
    #[arg(long, conflicts_with = "dry_run")]
    rollback: bool,
    /// Stop making progress once this stage is recorded, until killed (for crash tests)
    #[arg(long, hide = true, value_parser = Stage::parse)]
    halt_after: Option<Stage>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SetupArgs {
    /// Pipeline name, as in [pipelines.NAME]
    pipeline: String,
    /// Require the tables to exist on the targets instead of creating them
    #[arg(long)]
    no_create: bool,
    /// Skip the initial copy: the targets already hold the source's rows
    #[arg(long)]
    no_copy: bool,
    /// Concurrent copy sessions
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Drop the tables that left the configuration on the targets (and a removed target's
    /// tables); without, their rows stay
    #[arg(long)]
    drop: bool,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

pub async fn run(config: Config, cmd: SyncCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncCommand::Setup(a) => {
            let opts = SetupOptions {
                create: !a.no_create,
                copy: !a.no_copy,
                jobs: a.jobs,
                drop: a.drop,
            };
            let outcome = sync::setup(&config, &a.pipeline, &opts, &CopyBars::new()).await?;
            if a.json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&outcome).context("rendering JSON")?
                );
            } else {
                match &outcome {
                    SetupOutcome::AlreadySetUp { pipeline, slot } => outln!(
                        "pipeline {pipeline} is already set up (slot {slot}); nothing changed. Start it with `invsync sync run {pipeline}`"
                    ),
                    SetupOutcome::SetUp { pipeline, slot, consistent_point, copied, resumed, .. } => {
                        if *resumed {
                            outln!("found an interrupted setup of {pipeline}; started over");
                        }
                        for c in copied {
                            outln!(
                                "copied {} -> {}: {} rows, {} bytes ({})",
                                c.table,
                                c.target,
                                c.rows,
                                c.bytes,
                                if c.binary { "binary" } else { "text" }
                            );
                        }
                        outln!(
                            "pipeline {pipeline} set up: slot {slot} streams from {consistent_point}; start it with `invsync sync run {pipeline}`"
                        );
                    }
                    SetupOutcome::Changed { pipeline, changes } => {
                        let list = |v: &[String]| v.join(", ");
                        for c in &changes.copied {
                            outln!("copied {} -> {}: {} rows", c.table, c.target, c.rows);
                        }
                        if !changes.added_tables.is_empty() {
                            outln!("tables joined: {}", list(&changes.added_tables));
                        }
                        if !changes.removed_tables.is_empty() {
                            outln!(
                                "tables left: {} ({} on the targets)",
                                list(&changes.removed_tables),
                                if changes.dropped { "dropped" } else { "rows kept" }
                            );
                        }
                        if !changes.added_targets.is_empty() {
                            outln!("targets copied: {}", list(&changes.added_targets));
                        }
                        if !changes.removed_targets.is_empty() {
                            outln!("targets left: {}", list(&changes.removed_targets));
                        }
                        match changes.join_point {
                            Some(at) => outln!("pipeline {pipeline} changed; the copies join the stream at {at}"),
                            None => outln!("pipeline {pipeline} changed"),
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SyncCommand::Run { pipeline } => {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let signals = tokio::spawn(async move {
                super::wait_for_signal().await;
                let _ = tx.send(true);
            });
            let result = sync::run(&config, &pipeline, rx, None).await;
            signals.abort();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        SyncCommand::Status { pipeline, json } => {
            let all = sync::status(&config, pipeline.as_deref()).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&all).context("rendering JSON")?
                );
            } else {
                for p in &all {
                    print_status(p);
                }
            }
            let ok = all
                .iter()
                .all(|p| p.source_error.is_none() && p.targets.iter().all(|t| t.error.is_none()));
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        SyncCommand::Teardown { pipeline, yes } => {
            config.pipeline(&pipeline).map_err(anyhow::Error::msg)?;
            if !yes {
                outln!(
                    "would drop slot {} and publication {} on the source, and the bookkeeping of {pipeline} on its targets (their data stays); run again with --yes",
                    invsync::cdc::names::slot(&pipeline),
                    invsync::cdc::names::publication(&pipeline)
                );
                return Ok(ExitCode::FAILURE);
            }
            let r = sync::teardown(&config, &pipeline).await?;
            outln!(
                "pipeline {} torn down: slot {}, publication {} dropped; bookkeeping removed on {}",
                r.pipeline,
                if r.slot_dropped {
                    "dropped"
                } else {
                    "was already gone"
                },
                r.publication,
                r.targets.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        SyncCommand::Switchover(a) => run_switchover(&config, a).await,
    }
}

async fn run_switchover(config: &Config, a: SwitchoverArgs) -> anyhow::Result<ExitCode> {
    if a.dry_run {
        let plan = switchover::plan(config, &a.pipeline, a.to.as_deref(), a.timeout)?;
        if a.json {
            outln!(
                "{}",
                serde_json::to_string_pretty(&plan).context("rendering JSON")?
            );
        } else {
            outln!(
                "switchover of {} from {} to {}, then {} streams back (tables {}; roles paused: {}):",
                plan.pipeline,
                plan.old_primary,
                plan.new_primary,
                plan.reverse,
                plan.tables.join(", "),
                plan.roles.join(", ")
            );
            for (i, step) in plan.steps.iter().enumerate() {
                match step.records {
                    Some(stage) => outln!("  {}. {} [records `{stage}`]", i + 1, step.action),
                    None => outln!("  {}. {}", i + 1, step.action),
                }
            }
            outln!("nothing was changed (--dry-run)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = SwitchoverOptions {
        to: a.to,
        timeout: a.timeout,
        rollback: a.rollback,
        halt_after: a.halt_after,
    };
    let r = switchover::switchover(config, &a.pipeline, &opts).await?;
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&r).context("rendering JSON")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(stage) = r.resumed_from {
        outln!(
            "found a switchover of {} recorded at stage `{stage}`",
            r.plan.pipeline
        );
    }
    for s in &r.steps {
        outln!("  {:<20} {:>8} ms", s.step, s.millis);
    }
    match r.outcome {
        Outcome::RolledBack => outln!(
            "switchover of {} rolled back: {} is the primary again and its application roles may write; start `invsync sync run {}`",
            r.plan.pipeline, r.plan.old_primary, r.plan.pipeline
        ),
        Outcome::Completed => {
            outln!(
                "switchover of {} done: {} is the primary; {} sequence(s) moved, {} row(s) verified, {} changed since then verified again in the pause; writes paused {}",
                r.plan.pipeline,
                r.plan.new_primary,
                r.sequences_moved,
                r.rows_verified,
                r.changed_rows_verified,
                r.write_pause_ms
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_else(|| "?".into())
            );
            outln!(
                "point the application at {}, and start `invsync sync run {}` (it streams from {})",
                r.plan.new_primary,
                r.plan.reverse,
                r.reverse_start
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "its slot".into())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One progress bar per table of the initial copy, on stderr (hidden when it is no terminal).
struct CopyBars {
    bars: MultiProgress,
    style: ProgressStyle,
    tables: Mutex<Vec<ProgressBar>>,
}

impl CopyBars {
    fn new() -> CopyBars {
        CopyBars {
            bars: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            style: ProgressStyle::with_template("{prefix:40} {bar:30} {bytes:>10} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            tables: Mutex::new(Vec::new()),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Vec<ProgressBar>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CopyProgress for CopyBars {
    fn table(&self, _index: usize, table: &str, target: &str, bytes: u64) {
        let bar = self.bars.add(ProgressBar::new(bytes));
        bar.set_style(self.style.clone());
        bar.set_prefix(format!("{table} -> {target}"));
        self.tables().push(bar);
    }
    fn copied(&self, index: usize, bytes: u64) {
        if let Some(bar) = self.tables().get(index) {
            bar.inc(bytes);
        }
    }
    fn finished(&self) {
        for bar in self.tables().iter() {
            bar.finish();
        }
    }
}

fn bytes(n: i64) -> String {
    let mut v = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v.abs() < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{n} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{n} B")
}

fn print_status(p: &sync::PipelineStatus) {
    out!(
        "pipeline {} (source {}, slot {})",
        p.pipeline,
        p.source,
        p.slot
    );
    match &p.slot_state {
        Some(s) => outln!(
            ": {}, confirmed {}, retains {} of WAL",
            match s.active_pid {
                Some(pid) => format!("streaming (pid {pid})"),
                None => "idle".to_string(),
            },
            s.confirmed_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            bytes(s.retained_bytes)
        ),
        None => outln!(),
    }
    if let Some(e) = &p.source_error {
        outln!("  problem: {e}");
    }
    for t in &p.targets {
        match (&t.state, &t.error) {
            (_, Some(e)) => outln!("  target {}: {e}", t.target),
            (Some(state), None) => outln!(
                "  target {}: {}, applied {}, lag {} / {:.1} s, {} missing rows ({})",
                t.target,
                serde_json::to_value(state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                t.applied_lsn
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "-".into()),
                t.lag_bytes.map(bytes).unwrap_or_else(|| "?".into()),
                t.lag_seconds.unwrap_or(0.0),
                t.missing_rows,
                serde_json::to_value(p.missing_rows)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            ),
            (None, None) => outln!("  target {}: unknown", t.target),
        }
        for table in &t.tables {
            outln!(
                "    {:40} {:12} {} rows copied",
                table.table,
                table.phase,
                table.rows_copied
            );
        }
        let value = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
        for s in &t.sequences {
            outln!(
                "    sequence {:31} source {} target {}",
                s.sequence,
                value(s.source_value),
                value(s.target_value)
            );
        }
    }
}
