//! What the agent knows about itself, for `/status` and `/readyz`: each pipeline's state and
//! its targets' positions, each schedule's last run, next run and deferral, and the windows
//! open now. One value behind a mutex: writers (the pipeline, schedule and poll tasks) hold it
//! only to copy a few fields in, never across an `.await`.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::schedule::Counters;
use crate::config::Config;
use crate::pg::Lsn;

/// `/status`, as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub version: &'static str,
    pub started: DateTime<Utc>,
    pub config: String,
    pub time_zone: String,
    pub pipelines: Vec<PipelineView>,
    pub schedules: Vec<ScheduleView>,
    /// The change archives (`[archives.NAME]`).
    pub archives: Vec<ArchiveView>,
    /// The blackout windows open now.
    pub windows_active: Vec<String>,
    /// Every lease of this agent's work and who holds it, as its keeper last saw.
    pub leases: Vec<LeaseView>,
}

/// One lease as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseView {
    /// `pipeline/NAME` or `schedule/NAME`.
    pub lease: String,
    /// The database holding the lease row.
    pub database: String,
    /// True while this agent holds the lease (and runs its work).
    pub held: bool,
    /// This agent's epoch while it holds the lease, else the holder's last seen (0: none).
    pub epoch: i64,
    /// The other agent holding it, as last seen.
    pub holder: Option<String>,
    /// Its database has answered at least once since the agent started.
    pub known: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineState {
    /// Connecting to the source and targets.
    Starting,
    /// Streaming from the slot.
    Streaming,
    /// Failed; restarts at `retry_at`.
    Retrying,
    /// Another agent holds the pipeline's lease (or none could be acquired yet): this agent
    /// stands by, ready to take over.
    Standby,
    /// This agent holds the lease but the pipeline is not to stream now: a switchover of it is
    /// under way, or it is not set up (the way back of a switchover, before one); `waiting_for`
    /// says which. It streams once that changes.
    Waiting,
    /// Stopped by the shutdown.
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineView {
    pub name: String,
    pub source: String,
    pub state: PipelineState,
    pub restarts: u64,
    pub last_error: Option<String>,
    pub retry_at: Option<DateTime<Utc>>,
    /// While `waiting`: what the pipeline waits for.
    pub waiting_for: Option<String>,
    /// WAL the slot keeps on the source, at the last poll.
    pub slot_retained_wal_bytes: Option<i64>,
    /// When the source and targets were last polled.
    pub polled: Option<DateTime<Utc>>,
    pub targets: Vec<TargetView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetView {
    pub name: String,
    /// Reachable and set up at the last poll.
    pub up: bool,
    pub applied_lsn: Option<Lsn>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub applied_transactions: u64,
    /// Why it is not up.
    pub error: Option<String>,
}

/// One change archive as `/status` shows it (see `archives`). Its state is a pipeline's:
/// standby, starting, streaming, retrying or stopped.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveView {
    pub name: String,
    pub db: String,
    pub repo: String,
    pub state: PipelineState,
    pub restarts: u64,
    pub last_error: Option<String>,
    pub retry_at: Option<DateTime<Utc>>,
    /// The archive's slot, once streaming.
    pub slot: Option<String>,
    /// The end of the newest stored segment (or where the run resumed).
    pub archived_lsn: Option<Lsn>,
    /// Segments stored by this agent since it started.
    pub segments: u64,
    /// WAL written on the database past `archived_lsn`, at the last poll.
    pub lag_bytes: Option<i64>,
    /// Everything the database wrote up to this instant is archived.
    pub recovery_point: Option<DateTime<Utc>>,
    pub recovery_point_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    pub name: String,
    pub job: &'static str,
    pub cron: String,
    pub databases: Vec<String>,
    pub running_since: Option<DateTime<Utc>>,
    pub last_run: Option<RunRecord>,
    pub last_success: Option<DateTime<Utc>>,
    pub next_run: Option<DateTime<Utc>>,
    /// A run waiting for blackout windows to close.
    pub deferred: Option<Deferral>,
    /// After a failure: when the job is tried again (before its next run).
    pub retry_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize)]
pub struct Deferral {
    pub due: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub windows: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunResult {
    Success,
    Failure,
}

impl RunResult {
    pub fn label(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failure => "failure",
        }
    }
}

/// One run of a job, as `/status` shows it and the state file keeps it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub result: RunResult,
    /// Why it failed: the error, or what the job found (differences, damage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The job's own report, as `jobs::JobReport` serialises it (absent in the state file and when
    /// the job failed to run).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

/// The shared status.
pub struct Board(Mutex<AgentStatus>);

impl Board {
    pub fn new(config: &Config) -> Board {
        let pipelines = config
            .pipelines
            .values()
            .map(|p| PipelineView {
                name: p.name.clone(),
                source: p.source.clone(),
                state: PipelineState::Starting,
                restarts: 0,
                last_error: None,
                retry_at: None,
                waiting_for: None,
                slot_retained_wal_bytes: None,
                polled: None,
                targets: p
                    .targets
                    .iter()
                    .map(|t| TargetView {
                        name: t.clone(),
                        up: false,
                        applied_lsn: None,
                        lag_bytes: None,
                        lag_seconds: None,
                        applied_transactions: 0,
                        error: Some("not polled yet".into()),
                    })
                    .collect(),
            })
            .collect();
        let schedules = config
            .schedules
            .iter()
            .map(|s| ScheduleView {
                name: s.name.clone(),
                job: s.job.kind(),
                cron: s.cron.source().to_string(),
                databases: s.databases.clone(),
                running_since: None,
                last_run: None,
                last_success: None,
                next_run: None,
                deferred: None,
                retry_at: None,
                consecutive_failures: 0,
                counters: Counters::default(),
            })
            .collect();
        Board(Mutex::new(AgentStatus {
            version: env!("CARGO_PKG_VERSION"),
            started: Utc::now(),
            config: config.path.display().to_string(),
            time_zone: config.agent.time_zone.name().to_string(),
            pipelines,
            schedules,
            archives: super::archives::views(config),
            windows_active: Vec::new(),
            leases: Vec::new(),
        }))
    }

    /// A copy of the whole status.
    pub fn snapshot(&self) -> AgentStatus {
        self.lock().clone()
    }

    /// Changes the view of pipeline `name`.
    pub fn pipeline(&self, name: &str, change: impl FnOnce(&mut PipelineView)) {
        if let Some(p) = self.lock().pipelines.iter_mut().find(|p| p.name == name) {
            change(p);
        }
    }

    /// Changes the view of schedule `name`.
    pub fn schedule(&self, name: &str, change: impl FnOnce(&mut ScheduleView)) {
        if let Some(s) = self.lock().schedules.iter_mut().find(|s| s.name == name) {
            change(s);
        }
    }

    /// Changes the view of archive `name`.
    pub fn archive(&self, name: &str, change: impl FnOnce(&mut ArchiveView)) {
        if let Some(a) = self.lock().archives.iter_mut().find(|a| a.name == name) {
            change(a);
        }
    }

    /// A copy of the view of archive `name`.
    pub fn archive_view(&self, name: &str) -> Option<ArchiveView> {
        self.lock()
            .archives
            .iter()
            .find(|a| a.name == name)
            .cloned()
    }

    pub fn set_windows_active(&self, windows: Vec<String>) {
        self.lock().windows_active = windows;
    }

    /// Shows `lease` as its keeper sees it now.
    pub fn set_lease(&self, lease: LeaseView) {
        let leases = &mut self.lock().leases;
        match leases.iter_mut().find(|l| l.lease == lease.lease) {
            Some(l) => *l = lease,
            None => leases.push(lease),
        }
    }

    /// `Ok` when the database of every lease has answered once (so the agent knows which work
    /// is its own), every pipeline this agent runs streams with its targets up, and every
    /// archive it runs streams; else each reason. A pipeline on standby (another agent holds
    /// its lease) or waiting (a switchover, or its turn in a switchover pair) counts as ready:
    /// the agent is healthy, just standing by.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let status = self.lock();
        let mut reasons = Vec::new();
        for l in status.leases.iter().filter(|l| !l.known) {
            reasons.push(format!(
                "lease {} is not known yet: database {} has not answered",
                l.lease, l.database
            ));
        }
        for p in status
            .pipelines
            .iter()
            .filter(|p| !matches!(p.state, PipelineState::Standby | PipelineState::Waiting))
        {
            if p.state != PipelineState::Streaming {
                let why = p
                    .last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                reasons.push(format!(
                    "pipeline {} is {}{why}",
                    p.name,
                    serde_json::to_value(p.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ));
            }
            for t in p.targets.iter().filter(|t| !t.up) {
                reasons.push(format!(
                    "target {} of pipeline {} is down: {}",
                    t.name,
                    p.name,
                    t.error.as_deref().unwrap_or("unknown")
                ));
            }
        }
        for a in status
            .archives
            .iter()
            .filter(|a| !matches!(a.state, PipelineState::Standby | PipelineState::Streaming))
        {
            let why = a
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            reasons.push(format!("archive {} is not streaming{why}", a.name));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentStatus> {
        // A writer that panicked left plain data behind, still worth showing.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
