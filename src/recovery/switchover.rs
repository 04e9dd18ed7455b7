//! Switchover: a pipeline from A to B turned around, so that B becomes the primary of its tables
//! and a reverse pipeline from B feeds A, with no committed write lost and nothing copied.
//!
//! How writes stop on A: `ALTER ROLE r IN DATABASE d SET default_transaction_read_only = on`
//! for the pipeline's `application_roles`, then their sessions on A are ended (new sessions
//! start read-only). The setting is durable, so a switchover that crashes leaves A paused (safe:
//! no write can land on A that B will never see) until a rerun finishes or rolls back; a lock
//! held by our session would instead be released by the crash and let writes resume while B may
//! already be taking over. The previous value of the setting is recorded and put back on
//! rollback. It is a brake, not a wall: a session may `SET default_transaction_read_only = off`
//! itself, and roles not listed are not paused (the verification catches their writes).
//!
//! First the request is recorded (`requested`, with each role's setting): an agent streaming
//! the pipeline sees it within seconds and gives way (stops, its batches committed), and waits
//! until the switchover ends; giving up before `started` ends the request as `rolled_back`.
//! Before anything changes, the pipeline streams until B has caught up, and the tables are
//! compared whole while it streams (as `verify db --pipeline`), after temporary slots have
//! opened the stretches of changes that follow: on A, every change to the tables; on B (through
//! a publication of its own, dropped once the switchover ends), every change to them but the
//! pipeline's own apply; a difference stops there.
//! The steps, each recorded on A in `invsync.switchover` once done (the durable record, so a
//! rerun after `kill -9` knows where to go on, and `--rollback` what to undo):
//! `started` (record written, roles about to be paused) → `paused` (roles read-only, their
//! sessions ended, A's WAL position fixed as the pause LSN) → `drained` (the slot is confirmed
//! past the pause LSN: B durably applied everything A committed) → `sequences_copied` →
//! `verified` (the rows the stretches show changed since the comparison, up to each side's
//! position now, compare identical: every other row held still on A and was written on B by
//! the pipeline alone, so the comparison before the pause stands for it; a rerun, which lost
//! the stretches with the process, compares the whole tables) → `reverse_set_up` (the reverse
//! pipeline's slot made on B at B's current position, no copy: B holds exactly what A holds
//! and nothing writes B's tables) → `committed` (the point of no return) → `retired` (the old
//! pipeline's slot, publication and bookkeeping dropped) → `done` (the roles may write on B).
//!
//! Before `committed`, any failure rolls back: the reverse pipeline is torn down, the roles'
//! setting on A is put back, the old pipeline (whose slot was never touched) resumes where it
//! stopped. From `committed` on, a rerun finishes. The write pause runs from `started` to
//! `done`; it is measured with A's clock from the record, so a resumed run reports it whole.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::Client;

use super::RecoveryError;
use crate::cdc::{names, publication, slot};
use crate::config::{Config, PipelineConfig};
use crate::pg::{quote_ident, quote_literal, resolve_tables, ConnInfo, Lsn, PgError};
use crate::sync::{self, progress, NoCopyProgress, SetupOptions, SetupOutcome, SyncError};
use crate::verify::db::{verify_db, DbVerifyOptions, Endpoint, NoProgress, PIPELINE_SETTLE};
use crate::verify::touched::{Following, Touched};
use crate::verify::TableStatus;

/// How long the slot may stay in use once the request is recorded: an agent streaming the
/// pipeline sees the request within its poll (2 s) and stops (committing its batches); a
/// process that just died is released by the server within a few seconds.
const SLOT_RELEASE_GRACE: Duration = Duration::from_secs(10);
/// How long `pg_terminate_backend` waits for each ended session to be gone.
const TERMINATE_WAIT_MS: i64 = 10_000;
const POLL: Duration = Duration::from_millis(100);

/// Where a switchover stands, as recorded on the old primary. Ordered: each stage is reached
/// after the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Asked for: an agent streaming the pipeline gives way; nothing is changed yet.
    Requested,
    Started,
    Paused,
    Drained,
    SequencesCopied,
    Verified,
    ReverseSetUp,
    Committed,
    Retired,
    Done,
    /// Undone: the old primary is the primary again (outside the order of the others).
    RolledBack,
}

const STAGES: [Stage; 11] = [
    Stage::Requested,
    Stage::Started,
    Stage::Paused,
    Stage::Drained,
    Stage::SequencesCopied,
    Stage::Verified,
    Stage::ReverseSetUp,
    Stage::Committed,
    Stage::Retired,
    Stage::Done,
    Stage::RolledBack,
];

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Requested => "requested",
            Stage::Started => "started",
            Stage::Paused => "paused",
            Stage::Drained => "drained",
            Stage::SequencesCopied => "sequences_copied",
            Stage::Verified => "verified",
            Stage::ReverseSetUp => "reverse_set_up",
            Stage::Committed => "committed",
            Stage::Retired => "retired",
            Stage::Done => "done",
            Stage::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Result<Stage, String> {
        STAGES
            .iter()
            .copied()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "`{text}` is not a switchover stage; use one of {}",
                    STAGES.map(Stage::as_str).join(", ")
                )
            })
    }

    /// True while a switchover is under way (a rerun resumes it, or begins again from
    /// `requested`).
    pub fn in_progress(self) -> bool {
        !matches!(self, Stage::Done | Stage::RolledBack)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of the plan: what is done, and the stage recorded once it is (`None`: nothing
/// is recorded, nothing needs undoing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedStep {
    pub records: Option<Stage>,
    pub action: String,
}

/// What a switchover of a pipeline will do: checked against the configuration only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub pipeline: String,
    /// The configured pipeline from the new primary back to the old one.
    pub reverse: String,
    pub old_primary: String,
    pub new_primary: String,
    pub tables: Vec<String>,
    pub roles: Vec<String>,
    pub timeout_ms: u64,
    pub steps: Vec<PlannedStep>,
}

/// The user a database's connection logs in as (libpq's default: the OS user, unknown here).
fn login(conn: &ConnInfo) -> Option<&str> {
    conn.config().get_user()
}

fn same_tables(a: &PipelineConfig, b: &PipelineConfig) -> bool {
    let set = |p: &PipelineConfig| {
        let mut v: Vec<String> = p.tables.iter().map(|t| t.to_string()).collect();
        v.sort();
        v.dedup();
        v
    };
    set(a) == set(b)
}

/// The plan for switching `pipeline` over to `to` (default: its only target). Pure: reads the
/// configuration only, so `--dry-run` and the checks before anything changes agree.
pub fn plan(
    config: &Config,
    pipeline: &str,
    to: Option<&str>,
    timeout: Duration,
) -> Result<Plan, RecoveryError> {
    let p = config.pipeline(pipeline).map_err(RecoveryError::Invalid)?;
    let new_primary = match to {
        Some(t) if p.targets.iter().any(|x| x == t) => t.to_string(),
        Some(t) => {
            return Err(RecoveryError::Invalid(format!(
                "`{t}` is not a target of pipeline {pipeline} (its targets: {}); pass one of them to --to",
                p.targets.join(", ")
            )))
        }
        None if p.targets.len() == 1 => p.targets[0].clone(),
        None => {
            return Err(RecoveryError::Invalid(format!(
                "pipeline {pipeline} has several targets ({}); say which becomes the primary with --to",
                p.targets.join(", ")
            )))
        }
    };
    if p.targets.len() > 1 {
        return Err(RecoveryError::Invalid(format!(
            "pipeline {pipeline} also feeds {}; after a switchover to {new_primary} nothing would feed them: give each other target its own pipeline, then switch over",
            p.targets.iter().filter(|t| **t != new_primary).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let old_primary = p.source.clone();
    if p.application_roles.is_empty() {
        return Err(RecoveryError::Invalid(format!(
            "pipeline {pipeline} lists no application_roles: a switchover makes the roles the application writes with read-only on {old_primary}; add application_roles = [\"ROLE\", ...] to [pipelines.{pipeline}]"
        )));
    }
    for db in [&old_primary, &new_primary] {
        let conn = &config.database(db).map_err(RecoveryError::Invalid)?.conn;
        if let Some(user) = login(conn) {
            if p.application_roles.iter().any(|r| r == user) {
                return Err(RecoveryError::Invalid(format!(
                    "pipelines.{pipeline}.application_roles lists `{user}`, the role invsync connects to {db} as; a switchover would pause itself: connect invsync with a role of its own"
                )));
            }
        }
    }
    let reverses: Vec<&PipelineConfig> = config
        .pipelines
        .values()
        .filter(|r| {
            r.name != pipeline
                && r.source == new_primary
                && r.targets == [old_primary.clone()]
                && same_tables(p, r)
        })
        .collect();
    let reverse = match reverses.as_slice() {
        [r] => r.name.clone(),
        [] => {
            let list = |v: &[String]| {
                v.iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let tables: Vec<String> = p.tables.iter().map(|t| t.to_string()).collect();
            return Err(RecoveryError::Invalid(format!(
                "no pipeline from {new_primary} back to {old_primary} over the tables of {pipeline} is configured; a switchover sets it up: add to {}: [pipelines.{pipeline}_reverse] source = \"{new_primary}\" targets = [\"{old_primary}\"] tables = [{}] application_roles = [{}]",
                config.path.display(),
                list(&tables),
                list(&p.application_roles),
            )));
        }
        several => {
            return Err(RecoveryError::Invalid(format!(
                "pipelines {} all run from {new_primary} back to {old_primary} over the tables of {pipeline}; keep one",
                several.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    let roles = p.application_roles.clone();
    let role_list = roles.join(", ");
    let timeout_ms = timeout.as_millis() as u64;
    let steps = vec![
        PlannedStep {
            records: Some(Stage::Requested),
            action: format!("record the request in invsync.switchover on {old_primary}, with the current default_transaction_read_only of {role_list}: an agent streaming {pipeline} gives way within seconds"),
        },
        PlannedStep {
            records: None,
            action: format!("stream {pipeline} in this process until {new_primary} has caught up with {old_primary} (at most {timeout:?}); nothing is changed yet"),
        },
        PlannedStep {
            records: None,
            action: format!("compare the tables of {pipeline} on {old_primary} and {new_primary} while it streams (as verify db --pipeline); a difference stops here, with nothing changed"),
        },
        PlannedStep {
            records: Some(Stage::Started),
            action: "record that the write pause starts".into(),
        },
        PlannedStep {
            records: Some(Stage::Paused),
            action: format!("on {old_primary}: ALTER ROLE ... IN DATABASE ... SET default_transaction_read_only = on for {role_list}, end their sessions, and fix the pause LSN: the write pause starts"),
        },
        PlannedStep {
            records: Some(Stage::Drained),
            action: format!("stream {pipeline} until its slot is confirmed past the pause LSN (everything {old_primary} committed is applied on {new_primary}, at most {timeout:?}), then stop it"),
        },
        PlannedStep {
            records: Some(Stage::SequencesCopied),
            action: format!("bring the sequences of {pipeline} from {old_primary} to {new_primary} (never backwards)"),
        },
        PlannedStep {
            records: Some(Stage::Verified),
            action: format!("compare again the rows of {pipeline} changed on {old_primary} since that comparison (the whole tables when a rerun goes on from a recorded stage); any difference rolls back"),
        },
        PlannedStep {
            records: Some(Stage::ReverseSetUp),
            action: format!("set up {reverse} from {new_primary} to {old_primary} without a copy, its slot starting at {new_primary}'s current position"),
        },
        PlannedStep {
            records: Some(Stage::Committed),
            action: "commit: from here a rerun finishes the switchover instead of rolling it back".into(),
        },
        PlannedStep {
            records: Some(Stage::Retired),
            action: format!("tear down {pipeline}: its slot and publication on {old_primary}, its bookkeeping on {new_primary} (data stays)"),
        },
        PlannedStep {
            records: Some(Stage::Done),
            action: format!("on {new_primary}: ALTER ROLE ... IN DATABASE ... RESET default_transaction_read_only for {role_list}: the write pause ends; start `invsync sync run {reverse}`"),
        },
    ];
    Ok(Plan {
        pipeline: pipeline.to_string(),
        reverse,
        old_primary,
        new_primary,
        tables: p.tables.iter().map(|t| t.to_string()).collect(),
        roles,
        timeout_ms,
        steps,
    })
}

/// What `invsync sync switchover` is asked to do.
#[derive(Debug, Clone)]
pub struct SwitchoverOptions {
    /// The target that becomes the primary (default: the pipeline's only target).
    pub to: Option<String>,
    /// How long B may take to catch up, before the pause and after it.
    pub timeout: Duration,
    /// Undo a recorded switchover that has not reached `committed`.
    pub rollback: bool,
    /// Stop making progress once this stage is recorded, until killed: for crash tests.
    pub halt_after: Option<Stage>,
}

/// How a switchover ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    RolledBack,
}

/// One step as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: &'static str,
    pub millis: u64,
}

/// What a switchover did, in the shape `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverReport {
    pub plan: Plan,
    pub outcome: Outcome,
    /// The recorded stage a rerun went on from (after a crash).
    pub resumed_from: Option<Stage>,
    pub steps: Vec<StepTiming>,
    /// From pausing the roles on the old primary to releasing them on the new one.
    pub write_pause_ms: Option<u64>,
    /// A's WAL position once its application roles were paused.
    pub pause_lsn: Option<Lsn>,
    /// Where the reverse pipeline streams from on the new primary.
    pub reverse_start: Option<Lsn>,
    pub sequences_moved: usize,
    /// Rows of the old primary compared whole: before the pause, while streaming (inside it
    /// when a rerun went on from a recorded stage, the stretch since being unknown).
    pub rows_verified: u64,
    /// Rows changed since that comparison, compared again inside the pause.
    pub changed_rows_verified: u64,
}

/// The durable record of a switchover, one row per pipeline in `invsync.switchover` on the
/// pipeline's source.
#[derive(Debug, Clone)]
struct Record {
    stage: Stage,
    new_primary: String,
    roles: Vec<String>,
    /// Each role's `default_transaction_read_only` in A's database before the pause.
    previous: Vec<Option<String>>,
    pause_lsn: Option<Lsn>,
    reverse_lsn: Option<Lsn>,
}

const RECORD_TABLE: &str = "CREATE SCHEMA IF NOT EXISTS invsync;
CREATE TABLE IF NOT EXISTS invsync.switchover (
    pipeline text PRIMARY KEY,
    new_primary text NOT NULL,
    stage text NOT NULL,
    roles text[] NOT NULL,
    previous text[] NOT NULL,
    paused_at timestamptz,
    pause_lsn pg_lsn,
    reverse_lsn pg_lsn,
    reason text,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
)";

fn q(
    conn: &ConnInfo,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
    let what = what.into();
    move |e| PgError::query(what, conn, e)
}

async fn load_record(
    a: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<Option<Record>, RecoveryError> {
    a.batch_execute(RECORD_TABLE).await.map_err(q(
        conn,
        "creating invsync.switchover (the switchover record)",
    ))?;
    let row = a
        .query_opt(
            "SELECT stage, new_primary, roles, previous, pause_lsn::text, reverse_lsn::text \
             FROM invsync.switchover WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .map_err(q(conn, "reading the switchover record"))?;
    let Some(r) = row else { return Ok(None) };
    let stage = Stage::parse(&r.get::<_, String>(0)).map_err(|m| {
        RecoveryError::Invalid(format!(
            "invsync.switchover on {conn} holds an unknown stage for {pipeline}: {m}"
        ))
    })?;
    let lsn = |v: Option<String>| v.and_then(|s| s.parse().ok());
    Ok(Some(Record {
        stage,
        new_primary: r.get(1),
        roles: r.get(2),
        previous: r.get(3),
        pause_lsn: lsn(r.get(4)),
        reverse_lsn: lsn(r.get(5)),
    }))
}

/// A `sync run` of the pipeline owned by the switchover: stopped (and awaited) before the
/// switchover goes on past `drained` or gives up.
struct Streaming {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), SyncError>>,
    /// This run streams from the slot now (another process holding the slot keeps it false),
    /// so the slot's confirmation is this run's.
    up: Arc<AtomicBool>,
}

/// Tells [`Streaming`] when its run streams.
struct Up(Arc<AtomicBool>);

impl sync::Observer for Up {
    fn streaming(&self, up: bool) {
        self.0.store(up, Ordering::SeqCst);
    }
    fn applied(&self, _: &str) {}
}

impl Streaming {
    fn start(config: &Config, pipeline: &str) -> Streaming {
        let (stop, rx) = watch::channel(false);
        let config = config.clone();
        let pipeline = pipeline.to_string();
        let up = Arc::new(AtomicBool::new(false));
        let observer = Up(up.clone());
        let task = tokio::spawn(async move {
            sync::run_observed(&config, &pipeline, rx, None, &observer).await
        });
        Streaming { stop, task, up }
    }

    async fn stop(self) -> Result<(), RecoveryError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(RecoveryError::Invalid(format!(
                "the pipeline's stream ended abnormally: {e}"
            ))),
        }
    }
}

/// A switchover in progress: the plan, both databases, and what has been done.
struct Switch<'a> {
    config: &'a Config,
    plan: Plan,
    opts: &'a SwitchoverOptions,
    a_conn: ConnInfo,
    b_conn: ConnInfo,
    a: Client,
    b: Client,
    report: SwitchoverReport,
    stream: Option<Streaming>,
    /// The changes since the tables were compared before the pause, read by the verification
    /// inside it (none when a rerun goes on from a recorded stage: the tables are compared
    /// whole then).
    since_verified: Option<Stretches>,
    /// This run recorded the request (so giving up before the pause ends it).
    requested: bool,
}

/// The changes to the pipeline's tables since the comparison before the pause: all of A's,
/// and B's made by anything but the pipeline.
struct Stretches {
    on_a: Following,
    on_b: Following,
}

/// The configured pipeline whose switchover would set up `pipeline` as its way back, if any
/// (read from the configuration only, as [`plan`]).
pub fn way_back_of(config: &Config, pipeline: &str) -> Option<String> {
    config
        .pipelines
        .keys()
        .filter(|name| name.as_str() != pipeline)
        .find(|name| {
            plan(config, name, None, Duration::from_secs(60)).is_ok_and(|p| p.reverse == pipeline)
        })
        .cloned()
}

/// The stage of a switchover of `pipeline` under way on `client`'s database (the pipeline's
/// source), read without creating the record: None when none is under way.
pub async fn under_way(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<Option<Stage>, PgError> {
    let recorded: bool = client
        .query_one("SELECT to_regclass('invsync.switchover') IS NOT NULL", &[])
        .await
        .map_err(q(conn, "looking for the switchover record"))?
        .get(0);
    if !recorded {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT stage FROM invsync.switchover WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .map_err(q(conn, "reading the switchover record"))?;
    // A stage this version does not know is taken as under way: standing by is the safe side.
    Ok(row
        .map(|r| Stage::parse(&r.get::<_, String>(0)).unwrap_or(Stage::Started))
        .filter(|s| s.in_progress()))
}

/// A database's current WAL position.
async fn wal_position(client: &Client, conn: &ConnInfo) -> Result<Lsn, RecoveryError> {
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(q(conn, "reading the WAL position"))?
        .get(0);
    lsn.parse().map_err(RecoveryError::Invalid)
}

/// Runs (or resumes, or with `rollback` undoes) the switchover of `pipeline`. See the module
/// documentation for the steps and what a failure leaves.
pub async fn switchover(
    config: &Config,
    pipeline: &str,
    opts: &SwitchoverOptions,
) -> Result<SwitchoverReport, RecoveryError> {
    let plan = plan(config, pipeline, opts.to.as_deref(), opts.timeout)?;
    let a_conn = config
        .database(&plan.old_primary)
        .map_err(RecoveryError::Invalid)?
        .conn
        .clone();
    let b_conn = config
        .database(&plan.new_primary)
        .map_err(RecoveryError::Invalid)?
        .conn
        .clone();
    let a = a_conn.connect().await?;
    let b = b_conn.connect().await?;
    let record = load_record(&a, &a_conn, pipeline).await?;
    let report = SwitchoverReport {
        plan: plan.clone(),
        outcome: Outcome::Completed,
        resumed_from: None,
        steps: Vec::new(),
        write_pause_ms: None,
        pause_lsn: None,
        reverse_start: None,
        sequences_moved: 0,
        rows_verified: 0,
        changed_rows_verified: 0,
    };
    let mut s = Switch {
        config,
        plan,
        opts,
        a_conn,
        b_conn,
        a,
        b,
        report,
        stream: None,
        since_verified: None,
        requested: false,
    };
    let record = record.filter(|r| r.stage.in_progress());
    if let Some(r) = &record {
        if r.new_primary != s.plan.new_primary {
            return Err(RecoveryError::Invalid(format!(
                "a switchover of {pipeline} to {} is recorded at stage `{}`; finish it (`invsync sync switchover {pipeline} --to {}`) or roll it back (--rollback) first",
                r.new_primary, r.stage, r.new_primary
            )));
        }
    }
    if opts.rollback {
        let Some(r) = record else {
            return Err(RecoveryError::Invalid(format!(
                "no switchover of {pipeline} is in progress on {}; nothing to roll back",
                s.plan.old_primary
            )));
        };
        if r.stage >= Stage::Committed {
            return Err(RecoveryError::Invalid(format!(
                "the switchover of {pipeline} is committed (stage `{}`); it cannot be rolled back: run `invsync sync switchover {pipeline}` to finish it, then switch back with `invsync sync switchover {}`",
                r.stage, s.plan.reverse
            )));
        }
        s.report.resumed_from = Some(r.stage);
        s.rollback(&r, "asked for with --rollback").await?;
        s.report.outcome = Outcome::RolledBack;
        return Ok(s.report);
    }
    let record = match record {
        // A request alone changed nothing: it begins again.
        Some(r) if r.stage > Stage::Requested => {
            tracing::warn!(pipeline, stage = %r.stage, "resuming a switchover recorded on {}", s.plan.old_primary);
            s.report.resumed_from = Some(r.stage);
            r
        }
        _ => match s.begin().await {
            Ok(r) => r,
            Err(e) => {
                if let Some(st) = s.stream.take() {
                    let _ = st.stop().await;
                }
                s.drop_stretch_on_b().await;
                if s.requested {
                    // Nothing was changed: the request ends, and an agent streams again.
                    s.set_stage(Stage::RolledBack, Some(&e.to_string())).await?;
                }
                return Err(e);
            }
        },
    };
    s.forward(record).await?;
    Ok(s.report)
}

impl Switch<'_> {
    fn timed(&mut self, step: &'static str, since: Instant) {
        self.report.steps.push(StepTiming {
            step,
            millis: since.elapsed().as_millis() as u64,
        });
    }

    async fn set_stage(&self, stage: Stage, reason: Option<&str>) -> Result<(), RecoveryError> {
        self.a
            .execute(
                "UPDATE invsync.switchover SET stage = $2, reason = COALESCE($3, reason), \
                 updated_at = clock_timestamp() WHERE pipeline = $1",
                &[&self.plan.pipeline, &stage.as_str(), &reason],
            )
            .await
            .map_err(q(
                &self.a_conn,
                format!("recording switchover stage {stage}"),
            ))?;
        self.halt_if_asked(stage).await;
        Ok(())
    }

    /// Halts for good once `stage` is recorded when `--halt-after` names it (for tests that
    /// kill the process at that stage).
    async fn halt_if_asked(&self, stage: Stage) {
        if self.opts.halt_after == Some(stage) {
            tracing::warn!(%stage, "halting as asked (--halt-after); kill this process to go on");
            std::future::pending::<()>().await;
        }
    }

    /// The checks before anything changes, the catch-up before the pause, and the record.
    async fn begin(&mut self) -> Result<Record, RecoveryError> {
        let pipeline = self.plan.pipeline.clone();
        let slot_name = names::slot(&pipeline);
        if slot::state(&self.a, &self.a_conn, &slot_name)
            .await?
            .is_none()
        {
            return Err(RecoveryError::Invalid(format!(
                "pipeline {pipeline} is not set up on {} (no slot {slot_name}); there is nothing to switch over",
                self.plan.old_primary
            )));
        }
        match progress::load(&self.b, &self.b_conn, &pipeline).await? {
            Some(p) if p.state == progress::State::Streaming => {}
            _ => {
                return Err(RecoveryError::Invalid(format!(
                    "pipeline {pipeline} is not streaming to {} (its setup has not finished); run `invsync sync setup {pipeline}` first",
                    self.plan.new_primary
                )))
            }
        }
        let reverse_slot = names::slot(&self.plan.reverse);
        if slot::state(&self.b, &self.b_conn, &reverse_slot)
            .await?
            .is_some()
        {
            return Err(RecoveryError::Invalid(format!(
                "pipeline {} is already set up on {} (slot {reverse_slot}); both directions cannot stream the same tables: tear it down with `invsync sync teardown {} --yes`",
                self.plan.reverse, self.plan.new_primary, self.plan.reverse
            )));
        }
        let previous = self.role_settings().await?;
        self.roles_exist_on_b().await?;
        let record = Record {
            stage: Stage::Requested,
            new_primary: self.plan.new_primary.clone(),
            roles: self.plan.roles.clone(),
            previous,
            pause_lsn: None,
            reverse_lsn: None,
        };
        self.a
            .execute(
                "INSERT INTO invsync.switchover (pipeline, new_primary, stage, roles, previous) \
                 VALUES ($1, $2, 'requested', $3, $4) \
                 ON CONFLICT (pipeline) DO UPDATE SET new_primary = $2, stage = 'requested', roles = $3, \
                 previous = $4, paused_at = NULL, pause_lsn = NULL, reverse_lsn = NULL, \
                 reason = NULL, updated_at = clock_timestamp()",
                &[&pipeline, &record.new_primary, &record.roles, &record.previous],
            )
            .await
            .map_err(q(&self.a_conn, "writing the switchover record"))?;
        self.requested = true;
        self.halt_if_asked(Stage::Requested).await;
        // Read again now that the request is recorded. A process that takes the slot later is
        // caught by the catch-up below, which counts only its own stream's confirmation.
        let deadline = Instant::now() + SLOT_RELEASE_GRACE;
        while slot::state(&self.a, &self.a_conn, &slot_name)
            .await?
            .is_some_and(|s| s.active_pid.is_some())
        {
            if Instant::now() >= deadline {
                return Err(RecoveryError::Invalid(format!(
                    "switchover of {pipeline} did not start, nothing was changed: slot {slot_name} on {} is still in use {SLOT_RELEASE_GRACE:?} after the request: `invsync sync run {pipeline}` streams it (an agent would have given way); stop it: the switchover streams the pipeline itself",
                    self.plan.old_primary
                )));
            }
            tokio::time::sleep(POLL).await;
        }

        // Catch up before the pause, so the pause lasts only the lag left at its start.
        let t = Instant::now();
        self.stream = Some(Streaming::start(self.config, &pipeline));
        let now = self.a_position().await?;
        if let Err(e) = self.wait_confirmed(now).await {
            if let Some(st) = self.stream.take() {
                let _ = st.stop().await;
            }
            return Err(RecoveryError::Invalid(format!(
                "switchover of {pipeline} did not start, nothing was changed: {e}"
            )));
        }
        self.timed("catch_up", t);

        let t = Instant::now();
        if let Err(e) = self.verify_while_streaming().await {
            if let Some(st) = self.stream.take() {
                let _ = st.stop().await;
            }
            return Err(RecoveryError::Invalid(format!(
                "switchover of {pipeline} did not start, nothing was changed: {e}"
            )));
        }
        self.timed("verify_before_pause", t);

        // The write pause is measured from here.
        self.a
            .execute(
                "UPDATE invsync.switchover SET paused_at = clock_timestamp() WHERE pipeline = $1",
                &[&pipeline],
            )
            .await
            .map_err(q(&self.a_conn, "writing the switchover record"))?;
        self.set_stage(Stage::Started, None).await?;
        Ok(Record {
            stage: Stage::Started,
            ..record
        })
    }

    /// Each role's `default_transaction_read_only` in A's database; fails on a missing role.
    async fn role_settings(&self) -> Result<Vec<Option<String>>, RecoveryError> {
        let rows = self
            .a
            .query(
                "SELECT r.rolname, (SELECT substr(c, length('default_transaction_read_only=') + 1) \
                   FROM unnest(s.setconfig) c WHERE c LIKE 'default\\_transaction\\_read\\_only=%') \
                 FROM pg_roles r LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid \
                   AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 WHERE r.rolname = ANY($1)",
                &[&self.plan.roles],
            )
            .await
            .map_err(q(&self.a_conn, "reading the application roles' settings"))?;
        let mut out = Vec::new();
        for role in &self.plan.roles {
            match rows.iter().find(|r| r.get::<_, String>(0) == *role) {
                Some(r) => out.push(r.get(1)),
                None => {
                    return Err(RecoveryError::Invalid(format!(
                        "role `{role}` (pipelines.{}.application_roles) does not exist on {}; fix the list",
                        self.plan.pipeline, self.plan.old_primary
                    )))
                }
            }
        }
        Ok(out)
    }

    async fn roles_exist_on_b(&self) -> Result<(), RecoveryError> {
        let found: Vec<String> = self
            .b
            .query(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY($1)",
                &[&self.plan.roles],
            )
            .await
            .map_err(q(&self.b_conn, "looking up the application roles"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(missing) = self.plan.roles.iter().find(|r| !found.contains(r)) {
            return Err(RecoveryError::Invalid(format!(
                "role `{missing}` (pipelines.{}.application_roles) does not exist on {}, which would become the primary; create it there first",
                self.plan.pipeline, self.plan.new_primary
            )));
        }
        Ok(())
    }

    /// Waits until the pipeline's slot is confirmed at or past `lsn`: every target durably
    /// holds everything committed before it. Fails after the timeout or when the stream stops.
    async fn wait_confirmed(&mut self, lsn: Lsn) -> Result<(), String> {
        let slot_name = names::slot(&self.plan.pipeline);
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let st = slot::state(&self.a, &self.a_conn, &slot_name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("slot {slot_name} disappeared"))?;
            let confirmed = st.confirmed_flush.unwrap_or_default();
            // Confirmed by this switchover's own stream, not by a process that took the slot.
            let ours = self
                .stream
                .as_ref()
                .is_none_or(|s| s.up.load(Ordering::SeqCst));
            if confirmed >= lsn && ours {
                return Ok(());
            }
            if self.stream.as_ref().is_some_and(|s| s.task.is_finished()) {
                let ended = match self.stream.take() {
                    Some(s) => s.stop().await.err().map(|e| e.to_string()),
                    None => None,
                };
                return Err(format!(
                    "the stream of {} ended: {}",
                    self.plan.pipeline,
                    ended.unwrap_or_else(|| "without an error".into())
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not catch up within {:?}: the slot is confirmed up to {confirmed}, {} bytes short of {lsn}; retry when the lag is smaller, or pass a longer --timeout",
                    self.plan.new_primary,
                    self.opts.timeout,
                    lsn.0.saturating_sub(confirmed.0)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Goes on from `record`'s stage to `done`, rolling back on a failure before `committed`.
    async fn forward(&mut self, mut record: Record) -> Result<(), RecoveryError> {
        if record.stage < Stage::Committed {
            let result = self.before_commit(&mut record).await;
            let stopped = match self.stream.take() {
                Some(st) => st.stop().await,
                None => Ok(()),
            };
            let failure = match (result, stopped) {
                (Err((step, e)), _) => Some((step, e.to_string())),
                (Ok(()), Err(e)) => Some(("drain", e.to_string())),
                (Ok(()), Ok(())) => None,
            };
            if let Some((step, reason)) = failure {
                return Err(match self.rollback(&record, &reason).await {
                    Ok(()) => RecoveryError::RolledBack {
                        pipeline: self.plan.pipeline.clone(),
                        step,
                        reason,
                        primary: self.plan.old_primary.clone(),
                    },
                    Err(e) => RecoveryError::RollbackFailed {
                        pipeline: self.plan.pipeline.clone(),
                        step,
                        reason,
                        rollback: e.to_string(),
                    },
                });
            }
        }
        self.drop_stretch_on_b().await;
        let pipeline = self.plan.pipeline.clone();
        let after = |e: RecoveryError| {
            RecoveryError::Invalid(format!(
                "the switchover of {pipeline} is committed but could not finish: {e}; fix the cause and run `invsync sync switchover {pipeline}` again to finish it"
            ))
        };
        if record.stage < Stage::Retired {
            let t = Instant::now();
            sync::teardown(self.config, &self.plan.pipeline)
                .await
                .map_err(|e| after(e.into()))?;
            self.timed("retire", t);
            record.stage = Stage::Retired;
            self.set_stage(Stage::Retired, None).await.map_err(after)?;
        }
        if record.stage < Stage::Done {
            let t = Instant::now();
            self.release_roles_on_b().await.map_err(after)?;
            self.timed("release", t);
            record.stage = Stage::Done;
            self.set_stage(Stage::Done, None).await.map_err(after)?;
            let pause: Option<f64> = self
                .a
                .query_one(
                    "SELECT (extract(epoch FROM updated_at - paused_at) * 1000)::float8 \
                     FROM invsync.switchover WHERE pipeline = $1",
                    &[&self.plan.pipeline],
                )
                .await
                .map_err(q(&self.a_conn, "reading the switchover record"))?
                .get(0);
            self.report.write_pause_ms = pause.map(|ms| ms.max(0.0) as u64);
        }
        self.report.pause_lsn = self.report.pause_lsn.or(record.pause_lsn);
        self.report.reverse_start = self.report.reverse_start.or(record.reverse_lsn);
        Ok(())
    }

    /// The steps up to `committed`; a failure names its step.
    async fn before_commit(
        &mut self,
        record: &mut Record,
    ) -> Result<(), (&'static str, RecoveryError)> {
        let pipeline = self.plan.pipeline.clone();
        if record.stage < Stage::Paused {
            let t = Instant::now();
            let lsn = self.pause().await.map_err(|e| ("pause", e))?;
            self.a
                .execute(
                    "UPDATE invsync.switchover SET pause_lsn = $2::text::pg_lsn WHERE pipeline = $1",
                    &[&pipeline, &lsn.to_string()],
                )
                .await
                .map_err(|e| {
                    let e = q(&self.a_conn, "recording the pause LSN")(e);
                    ("pause", RecoveryError::from(e))
                })?;
            record.pause_lsn = Some(lsn);
            record.stage = Stage::Paused;
            self.timed("pause", t);
            self.set_stage(Stage::Paused, None)
                .await
                .map_err(|e| ("pause", e))?;
        }
        self.report.pause_lsn = record.pause_lsn;
        if record.stage < Stage::Drained {
            let t = Instant::now();
            let lsn = record.pause_lsn.ok_or_else(|| {
                (
                    "drain",
                    RecoveryError::Invalid("the record has no pause LSN".into()),
                )
            })?;
            if self.stream.is_none() {
                self.stream = Some(Streaming::start(self.config, &pipeline));
            }
            self.wait_confirmed(lsn)
                .await
                .map_err(|m| ("drain", RecoveryError::Invalid(m)))?;
            if let Some(st) = self.stream.take() {
                st.stop().await.map_err(|e| ("drain", e))?;
            }
            record.stage = Stage::Drained;
            self.timed("drain", t);
            self.set_stage(Stage::Drained, None)
                .await
                .map_err(|e| ("drain", e))?;
        }
        if record.stage < Stage::SequencesCopied {
            let t = Instant::now();
            self.report.sequences_moved =
                self.copy_sequences().await.map_err(|e| ("sequences", e))?;
            record.stage = Stage::SequencesCopied;
            self.timed("sequences", t);
            self.set_stage(Stage::SequencesCopied, None)
                .await
                .map_err(|e| ("sequences", e))?;
        }
        if record.stage < Stage::Verified {
            let t = Instant::now();
            self.verify().await.map_err(|e| ("verify", e))?;
            record.stage = Stage::Verified;
            self.timed("verify", t);
            self.set_stage(Stage::Verified, None)
                .await
                .map_err(|e| ("verify", e))?;
        }
        if record.stage < Stage::ReverseSetUp {
            let t = Instant::now();
            let lsn = self.set_up_reverse().await.map_err(|e| ("reverse", e))?;
            self.a
                .execute(
                    "UPDATE invsync.switchover SET reverse_lsn = $2::text::pg_lsn WHERE pipeline = $1",
                    &[&pipeline, &lsn.to_string()],
                )
                .await
                .map_err(|e| {
                    let e = q(&self.a_conn, "recording the reverse start")(e);
                    ("reverse", RecoveryError::from(e))
                })?;
            record.reverse_lsn = Some(lsn);
            record.stage = Stage::ReverseSetUp;
            self.timed("reverse", t);
            self.set_stage(Stage::ReverseSetUp, None)
                .await
                .map_err(|e| ("reverse", e))?;
        }
        self.report.reverse_start = record.reverse_lsn;
        record.stage = Stage::Committed;
        self.set_stage(Stage::Committed, None)
            .await
            .map_err(|e| ("commit", e))?;
        Ok(())
    }

    /// A's current WAL position.
    async fn a_position(&self) -> Result<Lsn, RecoveryError> {
        wal_position(&self.a, &self.a_conn).await
    }

    /// B's current WAL position.
    async fn b_position(&self) -> Result<Lsn, RecoveryError> {
        wal_position(&self.b, &self.b_conn).await
    }

    /// Makes the roles read-only on A, ends their sessions, and returns A's WAL position after.
    async fn pause(&self) -> Result<Lsn, RecoveryError> {
        let db = quote_ident(self.a_conn.dbname());
        for role in &self.plan.roles {
            self.a
                .batch_execute(&format!(
                    "ALTER ROLE {} IN DATABASE {db} SET default_transaction_read_only = on",
                    quote_ident(role)
                ))
                .await
                .map_err(q(&self.a_conn, format!("making role {role} read-only (the role invsync connects as needs CREATEROLE)")))?;
        }
        // Twice: a session that read the role's settings just before the change may show up in
        // pg_stat_activity only after the first look.
        for _ in 0..2 {
            self.a
                .query(
                    "SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity \
                     WHERE usename = ANY($1) AND datname = current_database() AND pid <> pg_backend_pid()",
                    &[&self.plan.roles, &TERMINATE_WAIT_MS],
                )
                .await
                .map_err(q(&self.a_conn, "ending the application roles' sessions (the role invsync connects as needs pg_signal_backend)"))?;
        }
        self.a_position().await
    }

    async fn copy_sequences(&self) -> Result<usize, RecoveryError> {
        let p = self
            .config
            .pipeline(&self.plan.pipeline)
            .map_err(RecoveryError::Invalid)?;
        let tables = resolve_tables(&self.a, &self.a_conn, &p.tables).await?;
        let seqs = sync::sequences::of_tables(&self.a, &self.a_conn, &tables, &p.sequences).await?;
        Ok(sync::sequences::bring(&self.a, &self.a_conn, &self.b, &self.b_conn, &seqs).await?)
    }

    /// Compares the tables whole while the pipeline streams (as `verify db --pipeline`), after
    /// opening the stretches of changes the verification inside the pause reads (A's, and B's
    /// not made by the pipeline). A row changed after they began is compared again inside the
    /// pause; every other row held still on A and was written on B by the pipeline alone, so
    /// this comparison of it stands.
    async fn verify_while_streaming(&mut self) -> Result<(), RecoveryError> {
        let pipeline = self.plan.pipeline.clone();
        let on_b = self.follow_writes_on_b().await?;
        let on_a = slot::create_temporary(
            &self.a_conn,
            &names::verify_slot(&pipeline),
            &names::publication(&pipeline),
        )
        .await
        .map_err(SyncError::from)?;
        // Read in the background from now on, so that the pause reads only the last of them.
        let on_a = Touched::default().follow(on_a);
        let (rows, _) = self.compare(Some(pipeline), None).await?;
        self.report.rows_verified = rows;
        self.since_verified = Some(Stretches { on_a, on_b });
        Ok(())
    }

    /// Opens the stretch of B's changes to the pipeline's tables that leaves out the
    /// pipeline's own apply: a publication of B's tables (the reverse pipeline's, resolved on
    /// B) and a temporary slot on it.
    async fn follow_writes_on_b(&self) -> Result<Following, RecoveryError> {
        let name = names::switchover_stretch(&self.plan.pipeline);
        let reverse = self
            .config
            .pipeline(&self.plan.reverse)
            .map_err(RecoveryError::Invalid)?;
        let tables = resolve_tables(&self.b, &self.b_conn, &reverse.tables).await?;
        publication::ensure_for(&self.b, &self.b_conn, &name, &tables)
            .await
            .map_err(SyncError::from)?;
        let slot = slot::create_temporary(&self.b_conn, &name, &name)
            .await
            .map_err(SyncError::from)?;
        let own = names::all_origins(&self.plan.pipeline, &self.plan.new_primary);
        Ok(Touched::except_origins(own).follow(slot))
    }

    /// Drops B's publication for the stretch, if there is one (a failure is only logged: the
    /// publication streams nothing once its slot is gone, and the next switchover drops it).
    async fn drop_stretch_on_b(&self) {
        let name = names::switchover_stretch(&self.plan.pipeline);
        if let Err(e) = publication::drop(&self.b, &self.b_conn, &name).await {
            tracing::warn!(pipeline = %self.plan.pipeline, "{e}");
        }
    }

    /// Inside the pause, with B drained: compares the rows changed since the comparison before
    /// the pause, up to each side's current position (a write by a role not paused included,
    /// on A, or by anything but the pipeline, on B), or the whole tables when those stretches
    /// are not known.
    async fn verify(&mut self) -> Result<(), RecoveryError> {
        let touched = match self.since_verified.take() {
            Some(Stretches { on_a, on_b }) => {
                let (a_now, b_now) = (self.a_position().await?, self.b_position().await?);
                let on_a = on_a.until(a_now).await.map_err(SyncError::from)?;
                let on_b = on_b.until(b_now).await.map_err(SyncError::from)?;
                Some(Arc::new(on_a.union(on_b)))
            }
            None => None,
        };
        let changed_only = touched.is_some();
        let (rows, compared) = self.compare(None, touched).await?;
        if changed_only {
            self.report.changed_rows_verified = compared;
        } else {
            self.report.rows_verified = rows;
        }
        Ok(())
    }

    /// Compares the pipeline's tables on A and B (as `verify db`): while `pipeline` streams
    /// into B, or with neither side moving; only the `touched` rows when given. Fails naming
    /// the tables that differ. Returns the rows counted on A and the rows compared.
    async fn compare(
        &mut self,
        pipeline: Option<String>,
        touched: Option<Arc<Touched>>,
    ) -> Result<(u64, u64), RecoveryError> {
        let p = self
            .config
            .pipeline(&self.plan.pipeline)
            .map_err(RecoveryError::Invalid)?;
        let opts = DbVerifyOptions {
            source: Endpoint {
                name: self.plan.old_primary.clone(),
                conn: self.a_conn.clone(),
            },
            targets: vec![Endpoint {
                name: self.plan.new_primary.clone(),
                conn: self.b_conn.clone(),
            }],
            tables: p.tables.clone(),
            filter: None,
            // Streaming: as `verify db --pipeline`. Paused: A is paused and nothing streams
            // into B, so each row is read once.
            settle: if pipeline.is_some() {
                PIPELINE_SETTLE
            } else {
                Duration::ZERO
            },
            pipeline,
            repair_sql: None,
            max_listed: 10,
            touched,
        };
        let report = verify_db(&opts, &NoProgress).await?;
        // Streaming, a row still moving (undecided) changed after the stretch began: the
        // verification inside the pause compares it.
        let streaming = opts.pipeline.is_some();
        let bad: Vec<String> = report
            .tables
            .iter()
            .filter(|t| {
                t.status != TableStatus::Identical
                    && !(streaming && t.status == TableStatus::Undecided)
            })
            .map(|t| match &t.error {
                Some(e) => format!("{}: {e}", t.table),
                None => format!("{}: {} differing row(s)", t.table, t.differences_found),
            })
            .collect();
        if !bad.is_empty() {
            return Err(RecoveryError::Invalid(format!(
                "{} and {} differ ({}); `invsync verify db --pipeline {}` lists the rows",
                self.plan.old_primary,
                self.plan.new_primary,
                bad.join("; "),
                self.plan.pipeline
            )));
        }
        if !streaming {
            if let Some(s) = report.sequences_behind.first() {
                return Err(RecoveryError::Invalid(format!(
                    "sequence {} on {} is behind {}'s; fix: {}",
                    s.sequence,
                    self.plan.new_primary,
                    self.plan.old_primary,
                    s.fix.trim_end_matches(';')
                )));
            }
        }
        // A table compared by its touched rows counts no rows; one compared whole counts them all.
        Ok((
            report.tables.iter().map(|t| t.source_rows).sum(),
            report
                .tables
                .iter()
                .map(|t| t.source_rows.max(t.rows_compared))
                .sum(),
        ))
    }

    /// Sets up the reverse pipeline without a copy: its slot starts at B's current position,
    /// where B holds exactly what A holds.
    async fn set_up_reverse(&self) -> Result<Lsn, RecoveryError> {
        let opts = SetupOptions {
            create: false,
            copy: false,
            jobs: 1,
            drop: false,
        };
        match sync::setup(self.config, &self.plan.reverse, &opts, &NoCopyProgress).await? {
            SetupOutcome::SetUp {
                consistent_point, ..
            } => Ok(consistent_point),
            SetupOutcome::AlreadySetUp { .. } | SetupOutcome::Changed { .. } => {
                // Only after a crash between its setup and the record: read where it starts.
                let slot_name = names::slot(&self.plan.reverse);
                let st = slot::state(&self.b, &self.b_conn, &slot_name).await?;
                Ok(st.and_then(|s| s.confirmed_flush).unwrap_or_default())
            }
        }
    }

    async fn release_roles_on_b(&self) -> Result<(), RecoveryError> {
        let db = quote_ident(self.b_conn.dbname());
        for role in &self.plan.roles {
            self.b
                .batch_execute(&format!(
                    "ALTER ROLE {} IN DATABASE {db} RESET default_transaction_read_only",
                    quote_ident(role)
                ))
                .await
                .map_err(q(&self.b_conn, format!("letting role {role} write")))?;
        }
        Ok(())
    }

    /// Undoes a switchover recorded before `committed`: the reverse pipeline, then the pause.
    async fn rollback(&mut self, record: &Record, reason: &str) -> Result<(), RecoveryError> {
        let t = Instant::now();
        tracing::warn!(pipeline = %self.plan.pipeline, stage = %record.stage, reason, "rolling the switchover back");
        self.drop_stretch_on_b().await;
        if record.stage >= Stage::Verified {
            sync::teardown(self.config, &self.plan.reverse).await?;
        }
        let db = quote_ident(self.a_conn.dbname());
        for (role, previous) in record.roles.iter().zip(&record.previous) {
            let sql = match previous {
                None => format!(
                    "ALTER ROLE {} IN DATABASE {db} RESET default_transaction_read_only",
                    quote_ident(role)
                ),
                Some(v) => format!(
                    "ALTER ROLE {} IN DATABASE {db} SET default_transaction_read_only = {}",
                    quote_ident(role),
                    quote_literal(v)
                ),
            };
            self.a.batch_execute(&sql).await.map_err(q(
                &self.a_conn,
                format!("putting back role {role}'s setting"),
            ))?;
        }
        self.set_stage(Stage::RolledBack, Some(reason)).await?;
        self.timed("rollback", t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[databases.dc]\nurl = \"postgres://invsync@dc/einvoice\"\n\
             [databases.cloud]\nurl = \"postgres://invsync@cloud/einvoice\"\n\
             [pipelines.invoices]\nsource = \"dc\"\ntargets = [\"cloud\"]\ntables = [\"public.*\"]\n\
             application_roles = [\"app\"]\n\
             [pipelines.carriers]\nsource = \"cloud\"\ntargets = [\"dc\"]\ntables = [\"carrier.*\"]\n{extra}"
        );
        Config::parse(Path::new("invsync.toml"), &text, &|_| None).unwrap()
    }

    const REVERSE: &str = "[pipelines.invoices_back]\nsource = \"cloud\"\ntargets = [\"dc\"]\n\
                           tables = [\"public.*\"]\napplication_roles = [\"app\"]\n";

    #[test]
    fn the_plan_turns_the_pipeline_around_and_records_each_step_in_order() {
        let plan = plan(&config(REVERSE), "invoices", None, Duration::from_secs(60)).unwrap();
        assert_eq!(plan.reverse, "invoices_back");
        assert_eq!(
            (plan.old_primary.as_str(), plan.new_primary.as_str()),
            ("dc", "cloud")
        );
        assert_eq!(plan.roles, ["app"]);
        let recorded: Vec<Stage> = plan.steps.iter().filter_map(|s| s.records).collect();
        assert_eq!(recorded, STAGES[..10].to_vec());
        assert!(recorded.windows(2).all(|w| w[0] < w[1]));
        // The request is recorded before anything else happens.
        assert_eq!(plan.steps[0].records, Some(Stage::Requested));
        // The same plan whatever the way the target is named.
        assert_eq!(
            plan,
            super::plan(
                &config(REVERSE),
                "invoices",
                Some("cloud"),
                Duration::from_secs(60)
            )
            .unwrap()
        );
    }

    #[test]
    fn the_reverse_must_cover_the_same_tables_and_is_shown_when_missing() {
        // The carriers pipeline runs cloud -> dc too, but over other tables: not a reverse.
        let e = plan(&config(""), "invoices", None, Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[pipelines.invoices_reverse] source = \"cloud\" targets = [\"dc\"] tables = [\"public.*\"] application_roles = [\"app\"]"), "{e}");
        let twice = format!(
            "{REVERSE}{}",
            REVERSE.replace("invoices_back", "invoices_again")
        );
        let e = plan(&config(&twice), "invoices", None, Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invoices_again, invoices_back"), "{e}");
    }

    #[test]
    fn bad_requests_are_refused_before_anything_runs() {
        let cfg = config(REVERSE);
        let e = plan(&cfg, "invoices", Some("dc"), Duration::from_secs(1)).unwrap_err();
        assert!(
            e.to_string()
                .contains("`dc` is not a target of pipeline invoices"),
            "{e}"
        );
        // The carriers pipeline names no application roles.
        let e = plan(&cfg, "carriers", None, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("lists no application_roles"), "{e}");
        let own = config(&REVERSE.replace("[\"app\"]", "[\"invsync\"]"));
        let e = plan(&own, "invoices_back", None, Duration::from_secs(1)).unwrap_err();
        assert!(
            e.to_string().contains("the role invsync connects to"),
            "{e}"
        );
    }

    #[test]
    fn stages_read_back_as_written() {
        for s in STAGES {
            assert_eq!(Stage::parse(s.as_str()), Ok(s));
        }
        assert!(Stage::parse("paws")
            .unwrap_err()
            .contains("started, paused"));
        assert!(Stage::Committed.in_progress() && !Stage::Done.in_progress());
    }
}
