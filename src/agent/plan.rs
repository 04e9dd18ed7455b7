//! The plan `invsync agent --check` prints: what the agent keeps running (pipelines and change
//! archives, which no window pauses), each schedule's next runs from an instant, with what the
//! peak calendar makes of each, and each blackout window's next openings.
//!
//! Each run is shown as if it were the only one: when a window defers two runs, both show the
//! window's end, and the agent runs the job there once (see `schedule`). Times are rendered on
//! the wall clock of the schedule's or window's zone, with their UTC offset.

use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::calendar::{self, Calendar};
use super::local_time::{self, Ambiguous};
use super::schedule::{self, Decision};
use crate::config::{Config, DuringBlackout, MissedRuns};

/// The whole plan, in the shape `--json` prints.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub config: String,
    /// The instant the runs are counted from, on the agent's zone.
    pub from: DateTime<FixedOffset>,
    pub time_zone: String,
    /// Streamed all the time: blackout windows do not pause them.
    pub pipelines: Vec<PipelinePlan>,
    /// Run all the time, like the pipelines.
    pub archives: Vec<ArchivePlan>,
    pub schedules: Vec<SchedulePlan>,
    pub blackouts: Vec<WindowPlan>,
}

#[derive(Debug, Serialize)]
pub struct PipelinePlan {
    pub name: String,
    pub source: String,
    pub targets: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ArchivePlan {
    pub name: String,
    pub db: String,
    pub repo: String,
    /// Empty: the tables of the pipelines that read from or write to `db`.
    pub tables: Vec<String>,
    pub segment_seconds: u64,
    pub segment_mib: u64,
}

#[derive(Debug, Serialize)]
pub struct SchedulePlan {
    pub name: String,
    /// backup, verify, forget, prune or drill.
    pub job: &'static str,
    pub cron: String,
    pub time_zone: String,
    /// The databases the job reads from, which windows are matched against.
    pub databases: Vec<String>,
    pub missed: MissedRuns,
    pub during_blackout: DuringBlackout,
    /// The next runs; fewer than asked when the expression has no more (a past year).
    pub runs: Vec<PlannedRun>,
}

#[derive(Debug, Serialize)]
pub struct PlannedRun {
    /// When the run falls due.
    pub at: DateTime<FixedOffset>,
    pub action: Action,
    /// With `defer`: when it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<FixedOffset>>,
    /// The windows covering the job's databases open at `at`; for a deferred run also those
    /// chained to them up to `until`.
    pub windows: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Run,
    /// A window is open, and the schedule ignores windows.
    RunInWindow,
    Defer,
    Skip,
}

#[derive(Debug, Serialize)]
pub struct WindowPlan {
    pub name: String,
    pub time_zone: String,
    /// `None`: every database.
    pub databases: Option<Vec<String>>,
    /// The next openings not yet closed at `from`.
    pub next: Vec<Opening>,
}

#[derive(Debug, Serialize)]
pub struct Opening {
    pub start: DateTime<FixedOffset>,
    pub end: DateTime<FixedOffset>,
}

/// The next `count` runs of every schedule of `config` after `from`, and the next `count`
/// openings of every window.
pub fn plan(config: &Config, from: DateTime<Utc>, count: usize) -> Plan {
    let calendar = Calendar::new(config.blackouts.clone());
    let schedules = config
        .schedules
        .iter()
        .map(|s| {
            let zone = s.time_zone;
            let runs = schedule::runs_after(s, from)
                .take(count)
                .map(|at| {
                    let (action, until, windows) = match schedule::decide(s, &calendar, at) {
                        Decision::Run => (Action::Run, None, Vec::new()),
                        Decision::RunInWindow { windows } => (Action::RunInWindow, None, windows),
                        Decision::Defer { until, windows } => {
                            (Action::Defer, Some(on(zone, until)), windows)
                        }
                        Decision::Skip { windows } => (Action::Skip, None, windows),
                    };
                    PlannedRun {
                        at: on(zone, at),
                        action,
                        until,
                        windows,
                    }
                })
                .collect();
            SchedulePlan {
                name: s.name.clone(),
                job: s.job.kind(),
                cron: s.cron.source().to_string(),
                time_zone: zone.name().to_string(),
                databases: s.databases.clone(),
                missed: s.missed,
                during_blackout: s.during_blackout,
                runs,
            }
        })
        .collect();
    let blackouts = calendar
        .windows()
        .iter()
        .map(|w| WindowPlan {
            name: w.name.clone(),
            time_zone: w.time_zone.name().to_string(),
            databases: w.databases.clone(),
            next: calendar::occurrences(w, from)
                .take(count)
                .map(|o| Opening {
                    start: on(w.time_zone, o.start),
                    end: on(w.time_zone, o.end),
                })
                .collect(),
        })
        .collect();
    Plan {
        config: config.path.display().to_string(),
        from: on(config.agent.time_zone, from),
        time_zone: config.agent.time_zone.name().to_string(),
        pipelines: config
            .pipelines
            .values()
            .map(|p| PipelinePlan {
                name: p.name.clone(),
                source: p.source.clone(),
                targets: p.targets.clone(),
            })
            .collect(),
        archives: config
            .archives
            .values()
            .map(|a| ArchivePlan {
                name: a.name.clone(),
                db: a.db.clone(),
                repo: a.repo.clone(),
                tables: a.tables.iter().map(ToString::to_string).collect(),
                segment_seconds: a.segment_age.as_secs(),
                segment_mib: (a.segment_bytes >> 20) as u64,
            })
            .collect(),
        schedules,
        blackouts,
    }
}

/// Reads an instant given as RFC 3339 (`2026-01-25T02:30:00+08:00`), or as a wall-clock time
/// `YYYY-MM-DD HH:MM[:SS]` (or with a `T`) on `zone`'s clock.
pub fn parse_instant(text: &str, zone: Tz) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
    .map(|local| local_time::instant(zone, local, Ambiguous::Earlier))
    .ok_or_else(|| {
        format!(
            "`{text}` is not a time; write \"YYYY-MM-DD HH:MM\" ({} time) or RFC 3339 \
                 (2026-01-25T02:30:00+08:00)",
            zone.name()
        )
    })
}

fn on(zone: Tz, at: DateTime<Utc>) -> DateTime<FixedOffset> {
    at.with_timezone(&zone).fixed_offset()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_from_the_command_line() {
        let taipei = chrono_tz::Asia::Taipei;
        let want: DateTime<Utc> = "2026-03-12T04:00:00Z".parse().unwrap();
        for text in [
            "2026-03-12 12:00",
            "2026-03-12T12:00:00",
            "2026-03-12T04:00:00Z",
            "2026-03-12T13:00:00+09:00",
        ] {
            assert_eq!(parse_instant(text, taipei), Ok(want), "{text}");
        }
        let e = parse_instant("next tuesday", taipei).unwrap_err();
        assert!(e.contains("Asia/Taipei time"), "{e}");
    }
}
