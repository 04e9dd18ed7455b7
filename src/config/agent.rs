//! The agent's sections of the configuration: `[agent]`, `[[schedules]]`, `[[blackouts]]` and
//! `[archives.NAME]`.
//!
//! Everything here is validated when the file is loaded, with the same file:line: key errors as
//! the rest of the configuration: a cron expression that does not parse, an unknown time zone, a
//! window that ends at or before it starts, a job naming an unknown repository, database or
//! pipeline, or an option that does not belong to its job. What the values mean at run time (the
//! next run, whether a window blocks it) is computed in `crate::agent`, not here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use chrono_tz::Tz;
use serde::Deserialize;
use toml::Spanned;

use super::{
    ConfigError, Context, DatabaseConfig, PipelineConfig, RepositoryConfig, UnsetVariable,
};
use crate::pg::TablePattern;

/// The time zone schedules and windows are read in when the configuration names none.
pub const DEFAULT_TIME_ZONE: Tz = chrono_tz::Asia::Taipei;
/// Where the agent serves health and metrics when `[agent] listen` is not set: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";
/// How long the agent may take to stop after SIGTERM when `[agent] shutdown_timeout` is not set.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// `[agent]`: settings of the long-running agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The address of the health and metrics endpoint.
    pub listen: SocketAddr,
    /// The zone schedules and windows are read in unless they name their own.
    pub time_zone: Tz,
    /// The bound on stopping after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// How long leases last and when their holder renews them or gives up.
    pub lease: LeaseTiming,
    /// The database holding every lease; `None`: each lease lives in the database its work
    /// reads from.
    pub lease_db: Option<String>,
    /// Where the agent records each schedule's last run (`agent-state.json`), so that a
    /// restart knows which runs it missed; relative to the configuration file's directory.
    /// `None`: that directory itself.
    pub state_dir: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: DEFAULT_LISTEN.parse().expect("a valid socket address"),
            time_zone: DEFAULT_TIME_ZONE,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            lease: LeaseTiming::default(),
            lease_db: None,
            state_dir: None,
        }
    }
}

/// The timing of an agent's leases (`lease_duration`, `renew_interval`, `renew_deadline`).
///
/// Kept: `renew_interval < renew_deadline < duration`. The holder renews every
/// `renew_interval`; if no renewal sent within the last `renew_deadline` (on its own monotonic
/// clock) has succeeded, it stops all work, which is before the lease (`duration` from the
/// database's clock at the last renewal) can have expired. A standby tries to acquire every
/// `renew_interval`, so it takes over at most `duration + renew_interval` after the holder's
/// last renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub duration: Duration,
    pub renew_interval: Duration,
    pub renew_deadline: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// `[[schedules]]`: a job the agent starts whenever its cron expression matches.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    pub name: String,
    /// The cron expression, with seconds: `sec min hour day-of-month month day-of-week [year]`.
    pub cron: cron::Schedule,
    /// The zone whose wall clock the cron expression is read on.
    pub time_zone: Tz,
    pub job: JobSpec,
    /// The databases the job reads from: what blackout windows are matched against. Empty for
    /// jobs that touch only a repository (forget, prune, verify of a repository).
    pub databases: Vec<String>,
    pub missed: MissedRuns,
    pub during_blackout: DuringBlackout,
}

/// `[archives.NAME]`: a change archive the agent keeps running (`invsync archive run`), under
/// its lease, restarted with backoff like a pipeline.
#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    pub name: String,
    /// The database whose change stream is archived.
    pub db: String,
    pub repo: String,
    /// Empty: the tables of the pipelines that read from or write to `db`, as `archive run`.
    pub tables: Vec<TablePattern>,
    /// A segment is stored after this long (`segment_seconds`, default 60)...
    pub segment_age: Duration,
    /// ...or once it holds this many bytes (`segment_mib`, default 64 MiB).
    pub segment_bytes: usize,
}

/// What a scheduled job does, with its options as the command line names them.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSpec {
    /// `invsync backup`: tables of `db` (when set) and configuration directories.
    Backup {
        repo: String,
        db: Option<String>,
        /// Empty: the tables of the pipelines of `db`.
        tables: Vec<TablePattern>,
        config_dirs: Vec<PathBuf>,
        tags: Vec<String>,
    },
    /// `invsync verify db --pipeline`: the pipeline's source against each of its targets.
    VerifyPipeline {
        pipeline: String,
        /// Empty: the pipeline's tables.
        tables: Vec<TablePattern>,
    },
    /// `invsync verify db --source --target`.
    VerifyDatabases {
        source: String,
        target: String,
        /// Empty: `public.*`.
        tables: Vec<TablePattern>,
    },
    /// `invsync verify repo`; `read_data` is the percentage of packs downloaded and checked.
    VerifyRepository {
        repo: String,
        read_data: Option<f64>,
    },
    /// `invsync forget`, then `prune` when `prune` is set.
    Forget {
        repo: String,
        keep: KeepPolicy,
        prune: bool,
    },
    /// `invsync prune`.
    Prune { repo: String },
    /// `invsync drill --replace`: the latest recoverable point of `source` restored into the
    /// dedicated standby `target` and verified against `source`.
    Drill {
        repo: String,
        source: String,
        target: String,
        /// Empty: every table of the snapshot.
        tables: Vec<TablePattern>,
    },
}

impl JobSpec {
    /// The job's kind as written in `job = "..."`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Backup { .. } => "backup",
            JobSpec::VerifyPipeline { .. }
            | JobSpec::VerifyDatabases { .. }
            | JobSpec::VerifyRepository { .. } => "verify",
            JobSpec::Forget { .. } => "forget",
            JobSpec::Prune { .. } => "prune",
            JobSpec::Drill { .. } => "drill",
        }
    }
}

/// The `keep_*` options of a forget job (see `invsync forget --help`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub keep_last: Option<usize>,
    pub keep_hourly: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
}

/// `missed`: what the agent does with runs that fell due while it was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissedRuns {
    /// One run when the agent starts, however many were missed.
    RunOnce,
    /// None: wait for the next one.
    Skip,
}

/// `during_blackout`: what happens to a run that falls due inside a blackout window covering
/// one of the job's databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuringBlackout {
    /// Run once when the window ends (the default).
    Defer,
    /// Do not run; wait for the next run after the window.
    Skip,
    /// Run as if there were no window (for light jobs).
    Ignore,
}

/// `[[blackouts]]`: a window of the peak calendar during which heavy jobs do not start on the
/// databases it covers.
#[derive(Debug, Clone)]
pub struct BlackoutConfig {
    pub name: String,
    pub when: BlackoutWhen,
    /// The zone whose wall clock the window's days and times are read on.
    pub time_zone: Tz,
    /// The databases it covers; `None`: every database.
    pub databases: Option<Vec<String>>,
}

/// When a window is open, on the wall clock of its time zone. Start inclusive, end exclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlackoutWhen {
    /// Every month listed: from `start_day` at `start_time` to `end_day` at `end_time`; an
    /// `end_day` below `start_day` falls in the next month. A day past a month's last day means
    /// its last day (so 31 is always the month end).
    Monthly {
        /// `months[0]` is January.
        months: [bool; 12],
        start_day: u32,
        start_time: TimeOfDay,
        end_day: u32,
        end_time: TimeOfDay,
    },
    /// Once: from `start` to `end`.
    Dated {
        start: NaiveDateTime,
        end: NaiveDateTime,
    },
}

/// A wall-clock time on a day, to the minute, from 00:00 to 24:00 (the end of the day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay {
    minutes: u32,
}

impl TimeOfDay {
    pub const MIDNIGHT: TimeOfDay = TimeOfDay { minutes: 0 };
    pub const END_OF_DAY: TimeOfDay = TimeOfDay { minutes: 24 * 60 };

    /// Reads `HH:MM` (00:00 to 24:00).
    pub fn parse(s: &str) -> Option<TimeOfDay> {
        let (h, m) = s.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(TimeOfDay {
            minutes: h * 60 + m,
        })
    }

    /// This time on `date` (24:00 is the next day's midnight).
    pub fn on(self, date: NaiveDate) -> NaiveDateTime {
        date.and_time(NaiveTime::MIN) + chrono::Duration::minutes(self.minutes.into())
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    listen: Option<Spanned<String>>,
    time_zone: Option<Spanned<String>>,
    /// Seconds.
    shutdown_timeout: Option<Spanned<u64>>,
    /// Seconds.
    lease_duration: Option<Spanned<u64>>,
    /// Seconds.
    renew_interval: Option<Spanned<u64>>,
    /// Seconds.
    renew_deadline: Option<Spanned<u64>>,
    lease_db: Option<Spanned<String>>,
    state_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    name: Spanned<String>,
    cron: Spanned<String>,
    job: Spanned<String>,
    time_zone: Option<Spanned<String>>,
    missed: Option<Spanned<String>>,
    during_blackout: Option<Spanned<String>>,
    repo: Option<Spanned<String>>,
    db: Option<Spanned<String>>,
    tables: Option<Spanned<Vec<Spanned<String>>>>,
    config_dirs: Option<Spanned<Vec<String>>>,
    tags: Option<Spanned<Vec<String>>>,
    pipeline: Option<Spanned<String>>,
    source: Option<Spanned<String>>,
    target: Option<Spanned<String>>,
    read_data: Option<Spanned<f64>>,
    keep_last: Option<Spanned<usize>>,
    keep_hourly: Option<Spanned<usize>>,
    keep_daily: Option<Spanned<usize>>,
    keep_weekly: Option<Spanned<usize>>,
    keep_monthly: Option<Spanned<usize>>,
    prune: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawArchive {
    db: Spanned<String>,
    repo: Option<Spanned<String>>,
    tables: Option<Spanned<Vec<Spanned<String>>>>,
    segment_seconds: Option<Spanned<u64>>,
    segment_mib: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBlackout {
    name: Spanned<String>,
    time_zone: Option<Spanned<String>>,
    databases: Option<Spanned<Vec<Spanned<String>>>>,
    months: Option<Spanned<RawMonths>>,
    start_day: Option<Spanned<u32>>,
    start_time: Option<Spanned<String>>,
    end_day: Option<Spanned<u32>>,
    end_time: Option<Spanned<String>>,
    start: Option<Spanned<String>>,
    end: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMonths {
    Word(String),
    List(Vec<u32>),
}

const DATABASE: (&str, &str) = ("database", "databases");

/// What the rest of the configuration offers the agent's sections to refer to.
pub(super) struct Names<'a> {
    pub databases: &'a BTreeMap<String, Result<DatabaseConfig, UnsetVariable>>,
    pub pipelines: &'a BTreeMap<String, PipelineConfig>,
    pub repositories: &'a BTreeMap<String, Result<RepositoryConfig, UnsetVariable>>,
}

impl Context<'_> {
    pub(super) fn agent(
        &self,
        raw: Option<RawAgent>,
        databases: &BTreeMap<String, Result<DatabaseConfig, UnsetVariable>>,
    ) -> Result<AgentConfig, ConfigError> {
        let raw = raw.unwrap_or_default();
        let mut agent = AgentConfig::default();
        if let Some(listen) = &raw.listen {
            agent.listen = listen.get_ref().parse().map_err(|_| {
                self.invalid(
                    "agent.listen",
                    listen,
                    format!(
                        "`{}` is not an address and port; write e.g. \"{DEFAULT_LISTEN}\"",
                        listen.get_ref()
                    ),
                )
            })?;
        }
        if let Some(zone) = &raw.time_zone {
            agent.time_zone = self.time_zone("agent.time_zone", zone)?;
        }
        if let Some(secs) = &raw.shutdown_timeout {
            if *secs.get_ref() == 0 {
                return Err(self.invalid(
                    "agent.shutdown_timeout",
                    secs,
                    "must be at least 1 second (the default is 30)".into(),
                ));
            }
            agent.shutdown_timeout = Duration::from_secs(*secs.get_ref());
        }
        agent.lease = self.lease_timing(&raw)?;
        if let Some(db) = &raw.lease_db {
            agent.lease_db = Some(self.named("agent.lease_db", db, DATABASE, databases)?);
        }
        agent.state_dir = raw.state_dir;
        Ok(agent)
    }

    /// `lease_duration`, `renew_interval` and `renew_deadline`; the deadline defaults to the
    /// duration less the interval. See [`LeaseTiming`] for the order they must keep.
    fn lease_timing(&self, raw: &RawAgent) -> Result<LeaseTiming, ConfigError> {
        let default = LeaseTiming::default();
        let secs = |v: &Option<Spanned<u64>>| v.as_ref().map(|s| Duration::from_secs(*s.get_ref()));
        let duration = secs(&raw.lease_duration).unwrap_or(default.duration);
        let renew_interval = secs(&raw.renew_interval).unwrap_or(default.renew_interval);
        let renew_deadline =
            secs(&raw.renew_deadline).unwrap_or_else(|| duration.saturating_sub(renew_interval));
        if let Some(v) = raw.renew_interval.as_ref().filter(|v| *v.get_ref() == 0) {
            return Err(self.invalid(
                "agent.renew_interval",
                v,
                "must be at least 1 second (the default is 5)".into(),
            ));
        }
        // Report on the key that was written, the later one when several were.
        let written = [
            ("agent.renew_deadline", &raw.renew_deadline),
            ("agent.renew_interval", &raw.renew_interval),
            ("agent.lease_duration", &raw.lease_duration),
        ];
        let blame = |message: String| {
            let (key, at) = written
                .iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
                .max_by_key(|(_, v)| v.span().start)
                .expect("defaults keep the order, so some key was written");
            self.invalid(key, at, message)
        };
        let s = |d: Duration| d.as_secs();
        if renew_deadline >= duration {
            return Err(blame(format!(
                "the renew deadline ({} s) must be shorter than the lease ({} s), so a holder stops work before its lease can expire; lower renew_deadline or raise lease_duration",
                s(renew_deadline),
                s(duration)
            )));
        }
        if renew_interval >= renew_deadline {
            return Err(blame(format!(
                "renew_interval ({} s) must be shorter than the renew deadline ({} s), so a holder gets more than one try to renew; lower renew_interval or raise lease_duration",
                s(renew_interval),
                s(renew_deadline)
            )));
        }
        Ok(LeaseTiming {
            duration,
            renew_interval,
            renew_deadline,
        })
    }

    /// `v`, the name of a `kind` the configuration defines in `known`, its `[section.NAME]`s.
    fn named<V>(
        &self,
        key: &str,
        v: &Spanned<String>,
        (kind, section): (&str, &str),
        known: &BTreeMap<String, V>,
    ) -> Result<String, ConfigError> {
        let name = v.get_ref();
        if known.contains_key(name) {
            return Ok(name.clone());
        }
        Err(self.invalid(
            key,
            v,
            format!("no {kind} named `{name}`; add [{section}.{name}] or fix the name"),
        ))
    }

    fn time_zone(&self, key: &str, value: &Spanned<String>) -> Result<Tz, ConfigError> {
        Tz::from_str(value.get_ref()).map_err(|_| {
            self.invalid(
                key,
                value,
                format!(
                    "unknown time zone `{}`; use an IANA name such as Asia/Taipei or UTC",
                    value.get_ref()
                ),
            )
        })
    }

    pub(super) fn schedules(
        &self,
        raw: Vec<RawSchedule>,
        zone: Tz,
        names: &Names,
    ) -> Result<Vec<ScheduleConfig>, ConfigError> {
        let mut out: Vec<ScheduleConfig> = Vec::new();
        for (i, s) in raw.into_iter().enumerate() {
            let name = s.name.get_ref().clone();
            let at = |field: &str| format!("schedules[{i}].{field}");
            if name.is_empty() || out.iter().any(|o| o.name == name) {
                return Err(self.invalid(
                    &at("name"),
                    &s.name,
                    format!("`{name}`: each schedule needs a name of its own"),
                ));
            }
            // The crate's message points into the expression with a caret: not one line.
            let cron = cron::Schedule::from_str(s.cron.get_ref()).map_err(|_| {
                self.invalid(
                    &at("cron"),
                    &s.cron,
                    format!(
                        "`{}` is not a cron expression; write six fields with seconds first (sec \
                         min hour day-of-month month day-of-week, and an optional year), e.g. \
                         \"0 30 2 * * *\" for 02:30:00 every day",
                        s.cron.get_ref()
                    ),
                )
            })?;
            let time_zone = match &s.time_zone {
                Some(z) => self.time_zone(&at("time_zone"), z)?,
                None => zone,
            };
            let missed = match s.missed.as_ref().map(|m| m.get_ref().as_str()) {
                None | Some("run-once") => MissedRuns::RunOnce,
                Some("skip") => MissedRuns::Skip,
                Some(other) => {
                    return Err(self.invalid(
                        &at("missed"),
                        s.missed.as_ref().expect("matched Some"),
                        format!("`{other}` is not a choice; use \"run-once\" or \"skip\""),
                    ))
                }
            };
            let during_blackout = match s.during_blackout.as_ref().map(|m| m.get_ref().as_str()) {
                None | Some("defer") => DuringBlackout::Defer,
                Some("skip") => DuringBlackout::Skip,
                Some("ignore") => DuringBlackout::Ignore,
                Some(other) => {
                    return Err(self.invalid(
                        &at("during_blackout"),
                        s.during_blackout.as_ref().expect("matched Some"),
                        format!("`{other}` is not a choice; use \"defer\", \"skip\" or \"ignore\""),
                    ))
                }
            };
            let (job, databases) = self.job(&s, &at, names)?;
            out.push(ScheduleConfig {
                name,
                cron,
                time_zone,
                job,
                databases,
                missed,
                during_blackout,
            });
        }
        Ok(out)
    }

    /// The job of a schedule and the databases it reads from.
    fn job(
        &self,
        s: &RawSchedule,
        at: &dyn Fn(&str) -> String,
        names: &Names,
    ) -> Result<(JobSpec, Vec<String>), ConfigError> {
        let kind = s.job.get_ref().as_str();
        // Which options each job takes; any other is refused rather than silently ignored.
        let allowed: &[&str] = match kind {
            "backup" => &["repo", "db", "tables", "config_dirs", "tags"],
            "verify" => &[
                "repo",
                "read_data",
                "pipeline",
                "source",
                "target",
                "tables",
            ],
            "forget" => &[
                "repo",
                "keep_last",
                "keep_hourly",
                "keep_daily",
                "keep_weekly",
                "keep_monthly",
                "prune",
            ],
            "prune" => &["repo"],
            "drill" => &["repo", "source", "target", "tables"],
            other => {
                return Err(self.invalid(
                    &at("job"),
                    &s.job,
                    format!("unknown job `{other}`; use backup, verify, forget, prune or drill"),
                ))
            }
        };
        let given: [(&str, Option<std::ops::Range<usize>>); 15] = [
            ("repo", s.repo.as_ref().map(Spanned::span)),
            ("db", s.db.as_ref().map(Spanned::span)),
            ("tables", s.tables.as_ref().map(Spanned::span)),
            ("config_dirs", s.config_dirs.as_ref().map(Spanned::span)),
            ("tags", s.tags.as_ref().map(Spanned::span)),
            ("pipeline", s.pipeline.as_ref().map(Spanned::span)),
            ("source", s.source.as_ref().map(Spanned::span)),
            ("target", s.target.as_ref().map(Spanned::span)),
            ("read_data", s.read_data.as_ref().map(Spanned::span)),
            ("keep_last", s.keep_last.as_ref().map(Spanned::span)),
            ("keep_hourly", s.keep_hourly.as_ref().map(Spanned::span)),
            ("keep_daily", s.keep_daily.as_ref().map(Spanned::span)),
            ("keep_weekly", s.keep_weekly.as_ref().map(Spanned::span)),
            ("keep_monthly", s.keep_monthly.as_ref().map(Spanned::span)),
            ("prune", s.prune.as_ref().map(Spanned::span)),
        ];
        for (key, span) in given {
            if let Some(span) = span.filter(|_| !allowed.contains(&key)) {
                return Err(self.invalid_at(
                    &at(key),
                    span.start,
                    format!(
                        "a {kind} job takes no `{key}`; its options are {}",
                        allowed.join(", ")
                    ),
                ));
            }
        }

        let database =
            |key: &str, v: &Spanned<String>| self.named(&at(key), v, DATABASE, names.databases);
        let tables = || -> Result<Vec<TablePattern>, ConfigError> {
            let Some(list) = &s.tables else {
                return Ok(Vec::new());
            };
            list.get_ref()
                .iter()
                .map(|t| {
                    TablePattern::parse(t.get_ref()).map_err(|m| self.invalid(&at("tables"), t, m))
                })
                .collect()
        };
        let repo = || self.repository(s.repo.as_ref(), &at("repo"), (&at("job"), &s.job), names);

        Ok(match kind {
            "backup" => {
                let db = s.db.as_ref().map(|d| database("db", d)).transpose()?;
                let config_dirs: Vec<PathBuf> = s
                    .config_dirs
                    .as_ref()
                    .map(|d| d.get_ref().iter().map(PathBuf::from).collect())
                    .unwrap_or_default();
                if db.is_none() && config_dirs.is_empty() {
                    return Err(self.invalid(
                        &at("job"),
                        &s.job,
                        "a backup job needs `db` (a database to back up), `config_dirs`, or both"
                            .into(),
                    ));
                }
                let tables = tables()?;
                if db.is_none() && !tables.is_empty() {
                    return Err(self.invalid(
                        &at("tables"),
                        s.tables.as_ref().expect("tables are listed"),
                        "tables need `db`, the database they are read from".into(),
                    ));
                }
                let databases = db.iter().cloned().collect();
                let job = JobSpec::Backup {
                    repo: repo()?,
                    db,
                    tables,
                    config_dirs,
                    tags: s
                        .tags
                        .as_ref()
                        .map(|t| t.get_ref().clone())
                        .unwrap_or_default(),
                };
                (job, databases)
            }
            "drill" => {
                let (Some(source), Some(target)) = (&s.source, &s.target) else {
                    return Err(self.invalid(
                        &at("job"),
                        &s.job,
                        "a drill job needs `source` (the archived database) and `target` (a \
                         dedicated standby: the drill drops and recreates its tables)"
                            .into(),
                    ));
                };
                let (source, target) = (database("source", source)?, database("target", target)?);
                let databases = vec![source.clone(), target.clone()];
                let job = JobSpec::Drill {
                    repo: repo()?,
                    source,
                    target,
                    tables: tables()?,
                };
                (job, databases)
            }
            "verify" => match (&s.pipeline, &s.source, &s.target) {
                (Some(p), None, None) if s.repo.is_none() && s.read_data.is_none() => {
                    let name = self.named(
                        &at("pipeline"),
                        p,
                        ("pipeline", "pipelines"),
                        names.pipelines,
                    )?;
                    let pipeline = &names.pipelines[&name];
                    let mut databases = vec![pipeline.source.clone()];
                    databases.extend(pipeline.targets.iter().cloned());
                    let job = JobSpec::VerifyPipeline {
                        pipeline: pipeline.name.clone(),
                        tables: tables()?,
                    };
                    (job, databases)
                }
                (None, Some(source), Some(target)) if s.repo.is_none() && s.read_data.is_none() => {
                    let (source, target) =
                        (database("source", source)?, database("target", target)?);
                    let databases = vec![source.clone(), target.clone()];
                    let job = JobSpec::VerifyDatabases {
                        source,
                        target,
                        tables: tables()?,
                    };
                    (job, databases)
                }
                (None, None, None) if s.tables.is_none() => {
                    let read_data = s.read_data.as_ref().map(|r| *r.get_ref());
                    if let Some(pct) =
                        read_data.filter(|p| !(0.0..=100.0).contains(p) || p.is_nan())
                    {
                        return Err(self.invalid(
                            &at("read_data"),
                            s.read_data.as_ref().expect("read_data is set"),
                            format!("{pct} is not a percentage from 0 to 100"),
                        ));
                    }
                    let job = JobSpec::VerifyRepository {
                        repo: repo()?,
                        read_data,
                    };
                    (job, Vec::new())
                }
                _ => {
                    return Err(self.invalid(
                        &at("job"),
                        &s.job,
                        "a verify job compares a `pipeline`, or a `source` with a `target` (with \
                         optional `tables`), or checks a `repo` (with optional `read_data`); give \
                         exactly one of these"
                            .into(),
                    ))
                }
            },
            "forget" => {
                let get = |v: &Option<Spanned<usize>>| v.as_ref().map(|v| *v.get_ref());
                let keep = KeepPolicy {
                    keep_last: get(&s.keep_last),
                    keep_hourly: get(&s.keep_hourly),
                    keep_daily: get(&s.keep_daily),
                    keep_weekly: get(&s.keep_weekly),
                    keep_monthly: get(&s.keep_monthly),
                };
                if keep == KeepPolicy::default() {
                    return Err(self.invalid(
                        &at("job"),
                        &s.job,
                        "a forget job needs at least one of keep_last, keep_hourly, keep_daily, \
                         keep_weekly, keep_monthly"
                            .into(),
                    ));
                }
                let job = JobSpec::Forget {
                    repo: repo()?,
                    keep,
                    prune: s.prune.as_ref().is_some_and(|p| *p.get_ref()),
                };
                (job, Vec::new())
            }
            _ => (JobSpec::Prune { repo: repo()? }, Vec::new()),
        })
    }

    /// The `repo` given (at key `key`), or the only repository when none is, as the command
    /// line does; without one, the error points at `needs` (the key and value that need it).
    fn repository(
        &self,
        repo: Option<&Spanned<String>>,
        key: &str,
        needs: (&str, &Spanned<String>),
        names: &Names,
    ) -> Result<String, ConfigError> {
        match repo {
            Some(r) => self.named(key, r, ("repository", "repositories"), names.repositories),
            None => {
                let mut all = names.repositories.keys();
                match (all.next(), all.next()) {
                    (Some(only), None) => Ok(only.clone()),
                    (None, _) => Err(self.invalid(
                        needs.0,
                        needs.1,
                        "this needs a repository; add a [repositories.NAME] section".into(),
                    )),
                    _ => Err(self.invalid(
                        needs.0,
                        needs.1,
                        "several repositories are configured; choose one with `repo`".into(),
                    )),
                }
            }
        }
    }

    /// `[archives.NAME]`: each archive's database, repository, tables and segment rule.
    pub(super) fn archives(
        &self,
        raw: BTreeMap<String, RawArchive>,
        names: &Names,
    ) -> Result<BTreeMap<String, ArchiveConfig>, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, a) in raw {
            let at = |field: &str| format!("archives.{name}.{field}");
            let db = self.named(&at("db"), &a.db, DATABASE, names.databases)?;
            let repo = self.repository(a.repo.as_ref(), &at("repo"), (&at("db"), &a.db), names)?;
            let mut tables = Vec::new();
            for t in a.tables.iter().flat_map(|l| l.get_ref()) {
                tables.push(
                    TablePattern::parse(t.get_ref())
                        .map_err(|m| self.invalid(&at("tables"), t, m))?,
                );
            }
            let bounded = |key: &str, v: &Option<Spanned<u64>>, default: u64, max: u64| match v {
                None => Ok(default),
                Some(v) if (1..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
                Some(v) => Err(self.invalid(
                    &at(key),
                    v,
                    format!("{} is out of range; use 1 to {max}", v.get_ref()),
                )),
            };
            let segment_seconds = bounded("segment_seconds", &a.segment_seconds, 60, 86_400)?;
            let segment_mib = bounded("segment_mib", &a.segment_mib, 64, 2048)?;
            out.insert(
                name.clone(),
                ArchiveConfig {
                    name,
                    db,
                    repo,
                    tables,
                    segment_age: Duration::from_secs(segment_seconds),
                    segment_bytes: (segment_mib as usize) << 20,
                },
            );
        }
        Ok(out)
    }

    pub(super) fn blackouts(
        &self,
        raw: Vec<RawBlackout>,
        zone: Tz,
        names: &Names,
    ) -> Result<Vec<BlackoutConfig>, ConfigError> {
        let mut out: Vec<BlackoutConfig> = Vec::new();
        for (i, b) in raw.into_iter().enumerate() {
            let name = b.name.get_ref().clone();
            let at = |field: &str| format!("blackouts[{i}].{field}");
            if name.is_empty() || out.iter().any(|o| o.name == name) {
                return Err(self.invalid(
                    &at("name"),
                    &b.name,
                    format!("`{name}`: each blackout window needs a name of its own"),
                ));
            }
            let time_zone = match &b.time_zone {
                Some(z) => self.time_zone(&at("time_zone"), z)?,
                None => zone,
            };
            let databases = match &b.databases {
                None => None,
                Some(list) => Some(
                    list.get_ref()
                        .iter()
                        .map(|d| self.named(&at("databases"), d, DATABASE, names.databases))
                        .collect::<Result<_, _>>()?,
                ),
            };
            let when = self.blackout_when(&b, &at)?;
            out.push(BlackoutConfig {
                name,
                when,
                time_zone,
                databases,
            });
        }
        Ok(out)
    }

    fn blackout_when(
        &self,
        b: &RawBlackout,
        at: &dyn Fn(&str) -> String,
    ) -> Result<BlackoutWhen, ConfigError> {
        let monthly_keys = [
            ("months", b.months.as_ref().map(Spanned::span)),
            ("start_day", b.start_day.as_ref().map(Spanned::span)),
            ("start_time", b.start_time.as_ref().map(Spanned::span)),
            ("end_day", b.end_day.as_ref().map(Spanned::span)),
            ("end_time", b.end_time.as_ref().map(Spanned::span)),
        ];
        match (&b.start, &b.end) {
            (None, None) => {}
            (Some(start), Some(end)) => {
                if let Some((key, Some(span))) = monthly_keys.into_iter().find(|(_, s)| s.is_some())
                {
                    return Err(self.invalid_at(
                        &at(key),
                        span.start,
                        "a window is either dated (`start`, `end`) or monthly (`start_day`, \
                         `end_day`, ...), not both"
                            .into(),
                    ));
                }
                let start_at = self.date_time(&at("start"), start)?;
                let end_at = self.date_time(&at("end"), end)?;
                if end_at <= start_at {
                    return Err(self.invalid(
                        &at("end"),
                        end,
                        format!(
                            "the window ends ({}) at or before it starts ({}); fix `end`",
                            end.get_ref(),
                            start.get_ref()
                        ),
                    ));
                }
                return Ok(BlackoutWhen::Dated {
                    start: start_at,
                    end: end_at,
                });
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(self.invalid(
                    &at("name"),
                    &b.name,
                    "a dated window needs both `start` and `end` (\"YYYY-MM-DD HH:MM\")".into(),
                ))
            }
        }

        let Some(start_day) = &b.start_day else {
            return Err(self.invalid(
                &at("name"),
                &b.name,
                "a window needs `start_day` (and `end_day`) for every month it recurs in, or a \
                 dated `start` and `end`"
                    .into(),
            ));
        };
        let day = |key: &str, d: &Spanned<u32>| {
            if (1..=31).contains(d.get_ref()) {
                Ok(*d.get_ref())
            } else {
                Err(self.invalid(
                    &at(key),
                    d,
                    format!("{} is not a day of the month (1 to 31)", d.get_ref()),
                ))
            }
        };
        let time = |key: &str, t: &Option<Spanned<String>>, default: TimeOfDay| match t {
            None => Ok(default),
            Some(t) => TimeOfDay::parse(t.get_ref()).ok_or_else(|| {
                self.invalid(
                    &at(key),
                    t,
                    format!(
                        "`{}` is not a time; write HH:MM, from 00:00 to 24:00",
                        t.get_ref()
                    ),
                )
            }),
        };
        let start_day_n = day("start_day", start_day)?;
        let end_day_n = match &b.end_day {
            Some(d) => day("end_day", d)?,
            None => start_day_n,
        };
        let start_time = time("start_time", &b.start_time, TimeOfDay::MIDNIGHT)?;
        let end_time = time("end_time", &b.end_time, TimeOfDay::END_OF_DAY)?;
        if start_time == TimeOfDay::END_OF_DAY {
            return Err(self.invalid(
                &at("start_time"),
                b.start_time.as_ref().expect("24:00 was written"),
                "a window cannot start at 24:00; write 00:00 of the next day".into(),
            ));
        }
        if end_day_n == start_day_n && end_time <= start_time {
            let (key, span) = match &b.end_time {
                Some(t) => ("end_time", t.span()),
                None => (
                    "end_day",
                    b.end_day.as_ref().map_or(start_day.span(), Spanned::span),
                ),
            };
            return Err(self.invalid_at(
                &at(key),
                span.start,
                format!(
                    "the window ends at or before it starts (both on day {end_day_n}); to cross \
                     midnight set end_day to the next day (an end_day below start_day is in the \
                     next month)"
                ),
            ));
        }
        let months =
            match &b.months {
                None => [true; 12],
                Some(m) => {
                    let mut months = [false; 12];
                    match m.get_ref() {
                        RawMonths::Word(w) if w == "all" => months = [true; 12],
                        RawMonths::Word(w) if w == "odd" || w == "even" => {
                            let first = usize::from(w == "even");
                            for i in (first..12).step_by(2) {
                                months[i] = true;
                            }
                        }
                        RawMonths::List(list) if !list.is_empty() => {
                            for &n in list {
                                if !(1..=12).contains(&n) {
                                    return Err(self.invalid(
                                        &at("months"),
                                        m,
                                        format!("{n} is not a month (1 to 12)"),
                                    ));
                                }
                                months[n as usize - 1] = true;
                            }
                        }
                        _ => return Err(self.invalid(
                            &at("months"),
                            m,
                            "write \"all\", \"odd\", \"even\" or a list of month numbers such as \
                             [1, 3, 5]"
                                .into(),
                        )),
                    }
                    months
                }
            };
        Ok(BlackoutWhen::Monthly {
            months,
            start_day: start_day_n,
            start_time,
            end_day: end_day_n,
            end_time,
        })
    }

    /// Reads `YYYY-MM-DD HH:MM` (or with a `T`), or `YYYY-MM-DD` for its midnight.
    fn date_time(&self, key: &str, v: &Spanned<String>) -> Result<NaiveDateTime, ConfigError> {
        let s = v.get_ref().trim();
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M")
            .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
            .or_else(|_| {
                NaiveDate::parse_from_str(s, "%Y-%m-%d").map(|d| TimeOfDay::MIDNIGHT.on(d))
            })
            .map_err(|_| {
                self.invalid(
                    key,
                    v,
                    format!(
                        "`{s}` is not a date and time; write \"YYYY-MM-DD HH:MM\" (local time)"
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[databases.maindc]
url = "postgres://invsync@127.0.0.1/einvoice"
[databases.cloud_a]
url = "postgres://invsync@127.0.0.2/einvoice"
[repositories.offsite]
url = "file:///tmp/repo"
"#;

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(Path::new("a.toml"), &format!("{BASE}{extra}"), &|_| None)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_without_an_agent_section() {
        let c = parse("").unwrap();
        assert_eq!(c.agent.time_zone, chrono_tz::Asia::Taipei);
        assert_eq!(c.agent.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.agent.shutdown_timeout, Duration::from_secs(30));
        let c = parse("[agent]\nlisten = \"0.0.0.0:9999\"\nshutdown_timeout = 5\n").unwrap();
        assert_eq!(c.agent.listen.port(), 9999);
        assert_eq!(c.agent.shutdown_timeout, Duration::from_secs(5));
        let e = parse("[agent]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(e.starts_with("a.toml:9: agent.listen: `localhost`"), "{e}");
    }

    #[test]
    fn lease_keys_defaults_and_order() {
        let c = parse("").unwrap();
        assert_eq!(c.agent.lease, LeaseTiming::default());
        assert_eq!(c.agent.lease.renew_deadline, Duration::from_secs(10));
        assert_eq!(c.agent.lease_db, None);
        let c =
            parse("[agent]\nlease_duration = 30\nrenew_interval = 10\nlease_db = \"cloud_a\"\n")
                .unwrap();
        assert_eq!(c.agent.lease.duration, Duration::from_secs(30));
        assert_eq!(c.agent.lease.renew_deadline, Duration::from_secs(20));
        assert_eq!(c.agent.lease_db.as_deref(), Some("cloud_a"));

        let e = parse("[agent]\nlease_duration = 10\nrenew_deadline = 10\n").unwrap_err();
        assert!(
            e.starts_with("a.toml:10: agent.renew_deadline: the renew deadline (10 s) must be shorter than the lease (10 s)"),
            "{e}"
        );
        let e = parse("[agent]\nlease_duration = 6\n").unwrap_err();
        assert!(
            e.starts_with("a.toml:9: agent.lease_duration: renew_interval (5 s) must be shorter than the renew deadline (1 s)"),
            "{e}"
        );
        let e = parse("[agent]\nrenew_interval = 0\n").unwrap_err();
        assert!(
            e.contains("agent.renew_interval: must be at least 1 second"),
            "{e}"
        );
        let e = parse("[agent]\nlease_db = \"nowhere\"\n").unwrap_err();
        assert!(
            e.starts_with("a.toml:9: agent.lease_db: no database named `nowhere`"),
            "{e}"
        );
    }

    #[test]
    fn schedule_defaults_and_job_options() {
        let c = parse(
            "[[schedules]]\nname = \"f\"\ncron = \"0 0 4 * * Sun\"\njob = \"forget\"\nkeep_last = 3\n\
             [[schedules]]\nname = \"r\"\ncron = \"0 0 5 * * *\"\njob = \"verify\"\nread_data = 10.0\nmissed = \"skip\"\n",
        )
        .unwrap();
        let f = &c.schedules[0];
        // The only repository is the one used, as on the command line.
        assert_eq!(
            f.job,
            JobSpec::Forget {
                repo: "offsite".into(),
                keep: KeepPolicy {
                    keep_last: Some(3),
                    ..KeepPolicy::default()
                },
                prune: false
            }
        );
        assert_eq!(f.missed, MissedRuns::RunOnce);
        assert_eq!(f.during_blackout, DuringBlackout::Defer);
        assert!(f.databases.is_empty());
        assert_eq!(
            c.schedules[1].job,
            JobSpec::VerifyRepository {
                repo: "offsite".into(),
                read_data: Some(10.0)
            }
        );
        assert_eq!(c.schedules[1].missed, MissedRuns::Skip);
    }

    #[test]
    fn incomplete_or_mixed_jobs_are_refused() {
        let job = |body: &str| {
            parse(&format!(
                "[[schedules]]\nname = \"j\"\ncron = \"0 0 4 * * *\"\n{body}"
            ))
            .unwrap_err()
        };
        let e = job("job = \"forget\"\n");
        assert!(
            e.contains("schedules[0].job: a forget job needs at least one of keep_last"),
            "{e}"
        );
        let e = job("job = \"verify\"\npipeline = \"p\"\nrepo = \"offsite\"\n");
        assert!(e.contains("give exactly one of these"), "{e}");
        let e = job("job = \"backup\"\n");
        assert!(e.contains("a backup job needs `db`"), "{e}");
        let e = job("job = \"backup\"\nconfig_dirs = [\"/etc\"]\ntables = [\"public.t\"]\n");
        assert!(e.contains("schedules[0].tables: tables need `db`"), "{e}");
        let e = job("job = \"prune\"\nkeep_last = 2\n");
        assert!(e.contains("a prune job takes no `keep_last`"), "{e}");
        let e = job("job = \"prune\"\n[[schedules]]\nname = \"j\"\ncron = \"0 0 4 * * *\"\njob = \"prune\"\n");
        assert!(
            e.contains("schedules[1].name: `j`: each schedule needs a name of its own"),
            "{e}"
        );
        let e = job("job = \"prune\"\nmissed = \"later\"\n");
        assert!(e.contains("use \"run-once\" or \"skip\""), "{e}");
    }

    #[test]
    fn archives_defaults_and_errors() {
        let c = parse("[archives.dc]\ndb = \"maindc\"\n").unwrap();
        let a = &c.archives["dc"];
        assert_eq!((a.db.as_str(), a.repo.as_str()), ("maindc", "offsite"));
        assert_eq!(a.segment_age, Duration::from_secs(60));
        assert_eq!(a.segment_bytes, 64 << 20);
        assert!(a.tables.is_empty());
        let c = parse(
            "[archives.dc]\ndb = \"maindc\"\ntables = [\"public.invoice\"]\nsegment_seconds = 5\nsegment_mib = 1\n",
        )
        .unwrap();
        let a = &c.archives["dc"];
        assert_eq!(a.segment_age, Duration::from_secs(5));
        assert_eq!(a.segment_bytes, 1 << 20);
        assert_eq!(a.tables.len(), 1);
        let e = parse("[archives.dc]\ndb = \"nope\"\n").unwrap_err();
        assert!(
            e.contains("archives.dc.db: no database named `nope`"),
            "{e}"
        );
        let e = parse("[archives.dc]\ndb = \"maindc\"\nrepo = \"gone\"\n").unwrap_err();
        assert!(
            e.contains("archives.dc.repo: no repository named `gone`"),
            "{e}"
        );
        let e = parse("[archives.dc]\ndb = \"maindc\"\nsegment_seconds = 0\n").unwrap_err();
        assert!(
            e.contains("archives.dc.segment_seconds: 0 is out of range; use 1 to 86400"),
            "{e}"
        );
        let e = parse("[archives.dc]\ndb = \"maindc\"\ncron = \"x\"\n").unwrap_err();
        assert!(e.contains("cron"), "{e}");
    }

    #[test]
    fn windows_monthly_and_dated() {
        let c = parse(
            "[[blackouts]]\nname = \"close\"\nmonths = \"even\"\nstart_day = 30\nstart_time = \"22:00\"\nend_day = 2\nend_time = \"06:00\"\n\
             [[blackouts]]\nname = \"q\"\nmonths = [3, 6]\nstart_day = 1\n\
             [[blackouts]]\nname = \"move\"\nstart = \"2026-12-30\"\nend = \"2027-01-02 06:00\"\ndatabases = [\"cloud_a\"]\ntime_zone = \"UTC\"\n",
        )
        .unwrap();
        let [close, q, moved] = &c.blackouts[..] else {
            panic!("three windows")
        };
        let BlackoutWhen::Monthly {
            months, end_day, ..
        } = &close.when
        else {
            panic!("monthly")
        };
        assert_eq!(months.iter().filter(|m| **m).count(), 6);
        assert!(months[1] && !months[0], "February, not January");
        assert_eq!(*end_day, 2);
        assert_eq!(
            q.when,
            BlackoutWhen::Monthly {
                months: [
                    false, false, true, false, false, true, false, false, false, false, false,
                    false
                ],
                start_day: 1,
                start_time: TimeOfDay::MIDNIGHT,
                end_day: 1,
                end_time: TimeOfDay::END_OF_DAY,
            }
        );
        assert_eq!(q.databases, None);
        assert_eq!(moved.time_zone, chrono_tz::UTC);
        assert_eq!(moved.databases, Some(vec!["cloud_a".to_string()]));
        let BlackoutWhen::Dated { start, end } = moved.when else {
            panic!("dated")
        };
        assert_eq!(start.to_string(), "2026-12-30 00:00:00");
        assert_eq!(end.to_string(), "2027-01-02 06:00:00");

        let e = parse("[[blackouts]]\nname = \"x\"\nstart = \"2026-12-30\"\nstart_day = 3\nend = \"2027-01-01\"\n").unwrap_err();
        assert!(
            e.contains("blackouts[0].start_day: a window is either dated"),
            "{e}"
        );
        let e = parse("[[blackouts]]\nname = \"x\"\nstart_day = 3\nstart_time = \"25:00\"\n")
            .unwrap_err();
        assert!(
            e.contains("blackouts[0].start_time: `25:00` is not a time"),
            "{e}"
        );
        let e = parse("[[blackouts]]\nname = \"x\"\nstart_day = 32\n").unwrap_err();
        assert!(e.contains("blackouts[0].start_day: 32 is not a day"), "{e}");
        let e = parse("[[blackouts]]\nname = \"x\"\nstart = \"2026-12-30\"\n").unwrap_err();
        assert!(e.contains("needs both `start` and `end`"), "{e}");
    }

    #[test]
    fn times_of_day() {
        assert_eq!(TimeOfDay::parse("24:00"), Some(TimeOfDay::END_OF_DAY));
        assert_eq!(TimeOfDay::parse("00:00"), Some(TimeOfDay::MIDNIGHT));
        for bad in ["24:01", "7:00", "12:60", "noon", "12"] {
            assert_eq!(TimeOfDay::parse(bad), None, "{bad}");
        }
        let d = NaiveDate::from_ymd_opt(2026, 1, 31).unwrap();
        assert_eq!(
            TimeOfDay::END_OF_DAY.on(d).to_string(),
            "2026-02-01 00:00:00"
        );
    }
}
