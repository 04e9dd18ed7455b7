//! The agent's Prometheus metrics: one registry, written in the text exposition format by
//! `prometheus-client` for `/metrics`.
//!
//! The metric names are a published interface (alert rules and dashboards use them): add
//! series, never rename them. Every pipeline, target, schedule and window of the configuration
//! has its series from the start (at zero), so a rule can tell "never happened" from "absent".
//! Lag is what the last poll of the databases saw (see `pipelines`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::Config;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub pipeline: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TablePhaseLabels {
    pub pipeline: String,
    pub target: String,
    /// `copying`, `catching_up` or `streaming`.
    pub phase: String,
}

/// The phases a pipeline's table goes through on a target, as metric label values.
pub const TABLE_PHASES: [&str; 3] = ["copying", "catching_up", "streaming"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabels {
    pub schedule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub schedule: String,
    pub job: String,
    /// `success` or `failure`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub schedule: String,
    /// `overlap`, `blackout`, `missed` or `standby`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    pub repo: String,
    pub db: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabels {
    pub window: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// `pipeline/NAME`, `schedule/NAME` or `archive/NAME`.
    pub lease: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// A gauge holding seconds or a Unix timestamp.
pub type Seconds = Gauge<f64, AtomicU64>;

/// Every series the agent exports.
pub struct Metrics {
    registry: Registry,
    pub pipeline_up: Family<PipelineLabels, Gauge>,
    pub target_up: Family<TargetLabels, Gauge>,
    pub lag_seconds: Family<TargetLabels, Seconds>,
    pub lag_bytes: Family<TargetLabels, Gauge>,
    pub slot_retained_wal_bytes: Family<PipelineLabels, Gauge>,
    pub applied_transactions: Family<TargetLabels, Counter>,
    pub pipeline_restarts: Family<PipelineLabels, Counter>,
    pub missing_rows: Family<TargetLabels, Gauge>,
    pub target_cut_loose: Family<TargetLabels, Gauge>,
    pub tables: Family<TablePhaseLabels, Gauge>,
    pub job_runs: Family<RunLabels, Counter>,
    pub job_skipped: Family<SkipLabels, Counter>,
    pub job_deferred: Family<ScheduleLabels, Counter>,
    pub job_running: Family<ScheduleLabels, Gauge>,
    pub job_last_start: Family<ScheduleLabels, Seconds>,
    pub job_last_success: Family<ScheduleLabels, Seconds>,
    pub job_last_duration: Family<ScheduleLabels, Seconds>,
    pub job_read_bytes: Family<ScheduleLabels, Counter>,
    pub job_stored_bytes: Family<ScheduleLabels, Counter>,
    pub backup_last_success: Family<BackupLabels, Seconds>,
    pub verify_differences: Family<ScheduleLabels, Gauge>,
    pub blackout_active: Family<WindowLabels, Gauge>,
    pub lease_held: Family<LeaseLabels, Gauge>,
    pub lease_epoch: Family<LeaseLabels, Gauge>,
    pub archive: ArchiveMetrics,
}

impl Metrics {
    /// The registry, with a series for every pipeline, target, schedule and window of `config`.
    pub fn new(config: &Config) -> Metrics {
        let mut registry = Registry::with_prefix("invsync");
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The running invsync version (always 1)",
            build_info,
        );
        let m = Metrics {
            pipeline_up: Family::default(),
            target_up: Family::default(),
            lag_seconds: Family::default(),
            lag_bytes: Family::default(),
            slot_retained_wal_bytes: Family::default(),
            applied_transactions: Family::default(),
            pipeline_restarts: Family::default(),
            missing_rows: Family::default(),
            target_cut_loose: Family::default(),
            tables: Family::default(),
            job_runs: Family::default(),
            job_skipped: Family::default(),
            job_deferred: Family::default(),
            job_running: Family::default(),
            job_last_start: Family::default(),
            job_last_success: Family::default(),
            job_last_duration: Family::default(),
            job_read_bytes: Family::default(),
            job_stored_bytes: Family::default(),
            backup_last_success: Family::default(),
            verify_differences: Family::default(),
            blackout_active: Family::default(),
            lease_held: Family::default(),
            lease_epoch: Family::default(),
            archive: ArchiveMetrics::default(),
            registry: Registry::default(),
        };
        let Metrics {
            registry: _,
            pipeline_up,
            target_up,
            lag_seconds,
            lag_bytes,
            slot_retained_wal_bytes,
            applied_transactions,
            pipeline_restarts,
            missing_rows,
            target_cut_loose,
            tables,
            job_runs,
            job_skipped,
            job_deferred,
            job_running,
            job_last_start,
            job_last_success,
            job_last_duration,
            job_read_bytes,
            job_stored_bytes,
            backup_last_success,
            verify_differences,
            blackout_active,
            lease_held,
            lease_epoch,
            archive: _,
        } = &m;
        let r = &mut registry;
        r.register(
            "pipeline_up",
            "1 while the pipeline streams from its slot",
            pipeline_up.clone(),
        );
        r.register(
            "pipeline_target_up",
            "1 while the target is reachable and set up",
            target_up.clone(),
        );
        r.register(
            "pipeline_lag_seconds",
            "0 when the target holds everything the source has; else now minus the commit time of the last transaction it applied",
            lag_seconds.clone(),
        );
        r.register(
            "pipeline_lag_bytes",
            "The source's current WAL position minus what the target has applied",
            lag_bytes.clone(),
        );
        r.register(
            "pipeline_slot_retained_wal_bytes",
            "WAL the pipeline's slot keeps on the source (current position minus restart_lsn)",
            slot_retained_wal_bytes.clone(),
        );
        r.register(
            "pipeline_applied_transactions",
            "Source transactions applied to the target by this agent",
            applied_transactions.clone(),
        );
        r.register(
            "pipeline_restarts",
            "Times the pipeline failed and was started again",
            pipeline_restarts.clone(),
        );
        r.register(
            "pipeline_missing_rows",
            "Updates and deletes whose row was not on the target, since the pipeline was set up there (as its bookkeeping records them)",
            missing_rows.clone(),
        );
        r.register(
            "pipeline_target_cut_loose",
            "1 when the target was cut loose for holding too much WAL (max_retained_wal, max_target_downtime): it misses changes and needs a new copy",
            target_cut_loose.clone(),
        );
        r.register(
            "pipeline_tables",
            "The pipeline's tables on the target, by phase (copying, catching_up, streaming)",
            tables.clone(),
        );
        r.register(
            "job_runs",
            "Job runs by result (success, failure)",
            job_runs.clone(),
        );
        r.register(
            "job_skipped",
            "Runs not started, by reason (overlap, blackout, missed, standby: another agent holds the schedule's lease)",
            job_skipped.clone(),
        );
        r.register(
            "job_deferred",
            "Runs deferred to the end of a blackout window",
            job_deferred.clone(),
        );
        r.register(
            "job_running",
            "1 while the schedule's job runs",
            job_running.clone(),
        );
        r.register(
            "job_last_start_timestamp_seconds",
            "When the schedule's job last started (Unix time)",
            job_last_start.clone(),
        );
        r.register(
            "job_last_success_timestamp_seconds",
            "When the schedule's job last ended successfully (Unix time)",
            job_last_success.clone(),
        );
        r.register(
            "job_last_duration_seconds",
            "How long the schedule's last job run took",
            job_last_duration.clone(),
        );
        r.register(
            "job_read_bytes",
            "Bytes the schedule's backups read from databases and directories",
            job_read_bytes.clone(),
        );
        r.register(
            "job_stored_bytes",
            "Bytes the schedule's backups wrote to the repository",
            job_stored_bytes.clone(),
        );
        r.register(
            "backup_last_success_timestamp_seconds",
            "When the newest complete backup of the database in the repository was taken (Unix time)",
            backup_last_success.clone(),
        );
        r.register(
            "verify_differences",
            "Rows found different by the schedule's last verify run",
            verify_differences.clone(),
        );
        r.register(
            "blackout_active",
            "1 while the blackout window is open",
            blackout_active.clone(),
        );
        r.register(
            "lease_held",
            "1 while this agent holds the lease and runs its work",
            lease_held.clone(),
        );
        r.register(
            "lease_epoch",
            "The lease's epoch: this agent's term while it holds it, else the holder's last seen (0: none)",
            lease_epoch.clone(),
        );
        for (name, p) in &config.pipelines {
            let ll = Metrics::lease(&format!("pipeline/{name}"));
            let _ = lease_held.get_or_create(&ll);
            let _ = lease_epoch.get_or_create(&ll);
            let pl = PipelineLabels {
                pipeline: name.clone(),
            };
            let _ = pipeline_up.get_or_create(&pl);
            let _ = pipeline_restarts.get_or_create(&pl);
            let _ = slot_retained_wal_bytes.get_or_create(&pl);
            for t in &p.targets {
                let tl = TargetLabels {
                    pipeline: name.clone(),
                    target: t.clone(),
                };
                let _ = target_up.get_or_create(&tl);
                let _ = lag_bytes.get_or_create(&tl);
                let _ = lag_seconds.get_or_create(&tl);
                let _ = applied_transactions.get_or_create(&tl);
                let _ = missing_rows.get_or_create(&tl);
                let _ = target_cut_loose.get_or_create(&tl);
                for phase in TABLE_PHASES {
                    let _ = tables.get_or_create(&Metrics::table_phase(name, t, phase));
                }
            }
        }
        for s in &config.schedules {
            let ll = Metrics::lease(&format!("schedule/{}", s.name));
            let _ = lease_held.get_or_create(&ll);
            let _ = lease_epoch.get_or_create(&ll);
            let sl = ScheduleLabels {
                schedule: s.name.clone(),
            };
            for result in ["success", "failure"] {
                let _ = job_runs.get_or_create(&RunLabels {
                    schedule: s.name.clone(),
                    job: s.job.kind().to_string(),
                    result: result.to_string(),
                });
            }
            for reason in ["overlap", "blackout", "missed", "standby"] {
                let _ = job_skipped.get_or_create(&SkipLabels {
                    schedule: s.name.clone(),
                    reason: reason.to_string(),
                });
            }
            let _ = job_deferred.get_or_create(&sl);
            let _ = job_running.get_or_create(&sl);
            if s.job.kind() == "backup" {
                let _ = job_read_bytes.get_or_create(&sl);
                let _ = job_stored_bytes.get_or_create(&sl);
            }
            if s.job.kind() == "verify" {
                let _ = verify_differences.get_or_create(&sl);
            }
        }
        for w in &config.blackouts {
            let _ = blackout_active.get_or_create(&WindowLabels {
                window: w.name.clone(),
            });
        }
        let archive = ArchiveMetrics::new(&mut registry, config, lease_held, lease_epoch);
        Metrics {
            registry,
            archive,
            ..m
        }
    }

    /// The text exposition format (`text/plain; version=0.0.4` with `# EOF`, as
    /// OpenMetrics writes it).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn schedule(name: &str) -> ScheduleLabels {
        ScheduleLabels {
            schedule: name.to_string(),
        }
    }

    pub fn target(pipeline: &str, target: &str) -> TargetLabels {
        TargetLabels {
            pipeline: pipeline.to_string(),
            target: target.to_string(),
        }
    }

    pub fn table_phase(pipeline: &str, target: &str, phase: &str) -> TablePhaseLabels {
        TablePhaseLabels {
            pipeline: pipeline.to_string(),
            target: target.to_string(),
            phase: phase.to_string(),
        }
    }

    pub fn lease(lease: &str) -> LeaseLabels {
        LeaseLabels {
            lease: lease.to_string(),
        }
    }

    pub fn pipeline(pipeline: &str) -> PipelineLabels {
        PipelineLabels {
            pipeline: pipeline.to_string(),
        }
    }
}

// The change archives' series (see `archives`).

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArchiveLabels {
    pub archive: String,
}

/// The series of `[archives.NAME]`. `lag_bytes` and `recovery_point_age` exist only on the
/// agent running the archive (absent on a standby, so an alert needs no lease filter).
#[derive(Default)]
pub struct ArchiveMetrics {
    pub up: Family<ArchiveLabels, Gauge>,
    pub restarts: Family<ArchiveLabels, Counter>,
    pub segments: Family<ArchiveLabels, Counter>,
    pub transactions: Family<ArchiveLabels, Counter>,
    pub lag_bytes: Family<ArchiveLabels, Gauge>,
    pub recovery_point_age: Family<ArchiveLabels, Seconds>,
}

impl ArchiveMetrics {
    fn new(
        r: &mut Registry,
        config: &Config,
        lease_held: &Family<LeaseLabels, Gauge>,
        lease_epoch: &Family<LeaseLabels, Gauge>,
    ) -> ArchiveMetrics {
        let m = ArchiveMetrics::default();
        r.register(
            "archive_up",
            "1 while the change archive streams from its slot",
            m.up.clone(),
        );
        r.register(
            "archive_restarts",
            "Times the change archive failed and was started again",
            m.restarts.clone(),
        );
        r.register(
            "archive_segments",
            "Archive segments stored by this agent",
            m.segments.clone(),
        );
        r.register(
            "archive_transactions",
            "Source transactions archived by this agent",
            m.transactions.clone(),
        );
        r.register(
            "archive_lag_bytes",
            "WAL the archived database wrote past the end of the newest stored segment",
            m.lag_bytes.clone(),
        );
        r.register(
            "archive_recovery_point_age_seconds",
            "Time since the archive last held everything the database wrote: what a point-in-time restore would lose now",
            m.recovery_point_age.clone(),
        );
        for name in config.archives.keys() {
            let ll = Metrics::lease(&format!("archive/{name}"));
            let _ = lease_held.get_or_create(&ll);
            let _ = lease_epoch.get_or_create(&ll);
            let al = Metrics::archive(name);
            let _ = m.up.get_or_create(&al);
            let _ = m.restarts.get_or_create(&al);
            let _ = m.segments.get_or_create(&al);
            let _ = m.transactions.get_or_create(&al);
        }
        m
    }
}

impl Metrics {
    pub fn archive(archive: &str) -> ArchiveLabels {
        ArchiveLabels {
            archive: archive.to_string(),
        }
    }
}
