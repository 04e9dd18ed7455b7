//! `invsync agent`: runs the agent until SIGTERM/SIGINT; with `--check`, prints the plan of the
//! schedules for people or `--json`.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use chrono::{DateTime, FixedOffset, Utc};
use clap::Args;

use invsync::agent::plan::{self, Action, Plan};
use invsync::agent::AgentOptions;
use invsync::config::Config;

#[derive(Args)]
pub struct AgentArgs {
    /// Validate the schedules and blackout windows, print each schedule's next runs and what
    /// the windows do to them, and exit
    #[arg(long)]
    check: bool,
    /// With --check: count the runs from this time: "YYYY-MM-DD HH:MM" on the agent's time
    /// zone, or RFC 3339 [default: now]
    #[arg(long, value_name = "TIME", requires = "check")]
    from: Option<String>,
    /// With --check: how many runs of each schedule (and openings of each window) to show
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
    count: u16,
    /// With --check: print the plan as JSON
    #[arg(long, requires = "check")]
    json: bool,
    /// Serve /healthz, /readyz, /status and /metrics here [default: [agent] listen, or
    /// 127.0.0.1:9187]
    #[arg(long, value_name = "ADDR", conflicts_with = "check")]
    listen: Option<String>,
}

pub async fn run(config: Config, args: AgentArgs) -> anyhow::Result<ExitCode> {
    if args.check {
        return check(config, args);
    }
    let listen = match &args.listen {
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            anyhow!("--listen: `{text}` is not an address and port; write e.g. 127.0.0.1:9187 or [::1]:9187")
        })?),
        None => None,
    };
    invsync::agent::run(config, AgentOptions { listen }, super::wait_for_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

fn check(config: Config, args: AgentArgs) -> anyhow::Result<ExitCode> {
    let from = match &args.from {
        Some(text) => {
            plan::parse_instant(text, config.agent.time_zone).map_err(|e| anyhow!("--from: {e}"))?
        }
        None => Utc::now(),
    };
    let plan = plan::plan(&config, from, args.count.into());
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&plan).context("rendering JSON")?
        );
    } else {
        print_plan(&plan);
    }
    Ok(ExitCode::SUCCESS)
}

fn time(t: &DateTime<FixedOffset>) -> String {
    t.format("%Y-%m-%d %H:%M:%S %:z").to_string()
}

fn print_plan(plan: &Plan) {
    outln!(
        "config {}: {} pipeline(s), {} archive(s), {} schedule(s), {} blackout window(s) valid; from {} ({})",
        plan.config,
        plan.pipelines.len(),
        plan.archives.len(),
        plan.schedules.len(),
        plan.blackouts.len(),
        time(&plan.from),
        plan.time_zone
    );
    if !plan.pipelines.is_empty() || !plan.archives.is_empty() {
        outln!("\nrunning all the time (no window pauses them):");
    }
    for p in &plan.pipelines {
        outln!(
            "  pipeline {}: {} -> {}",
            p.name,
            p.source,
            p.targets.join(", ")
        );
    }
    for a in &plan.archives {
        let tables = if a.tables.is_empty() {
            format!("the tables of {}'s pipelines", a.db)
        } else {
            a.tables.join(", ")
        };
        outln!(
            "  archive {}: {} into {} ({tables}), a segment every {} s or {} MiB",
            a.name,
            a.db,
            a.repo,
            a.segment_seconds,
            a.segment_mib
        );
    }
    for s in &plan.schedules {
        let on = if s.databases.is_empty() {
            "no database".to_string()
        } else {
            s.databases.join(", ")
        };
        outln!(
            "\nschedule {}: {} ({on}), cron \"{}\" in {}, missed: {}, during blackout: {}",
            s.name,
            s.job,
            s.cron,
            s.time_zone,
            serde_plain(&s.missed),
            serde_plain(&s.during_blackout)
        );
        if s.runs.is_empty() {
            outln!("  no future runs");
        }
        for r in &s.runs {
            let windows = r.windows.join(", ");
            let what = match (r.action, &r.until) {
                (Action::Defer, Some(until)) => format!("defer to {} ({windows})", time(until)),
                (Action::Skip, _) => format!("skip ({windows})"),
                (Action::RunInWindow, _) => format!("run, ignoring {windows}"),
                _ => "run".to_string(),
            };
            outln!("  {}  {what}", time(&r.at));
        }
    }
    for w in &plan.blackouts {
        let covers = match &w.databases {
            None => "every database".to_string(),
            Some(list) => list.join(", "),
        };
        outln!("\nblackout {} ({covers}) in {}", w.name, w.time_zone);
        if w.next.is_empty() {
            outln!("  no future openings");
        }
        for o in &w.next {
            outln!("  {} to {}", time(&o.start), time(&o.end));
        }
    }
}

/// A unit enum's serde name (`run-once`, `defer`), as the configuration spells it.
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
