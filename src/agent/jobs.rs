//! Scheduled jobs: a `[[schedules]]` job spec run through the same library calls as the
//! command line (`invsync backup`, `verify db`, `verify repo`, `forget`, `prune`, `drill`), each
//! returning its typed report.
//!
//! A job that runs to its end but finds something wrong (rows that differ, a damaged
//! repository) is a failed run, as its command's non-zero exit would be.

use std::time::Duration;

use serde::Serialize;

use super::AgentError;
use crate::backup::check::{self as repo_check, RepoCheckOptions, RepoReport};
use crate::backup::fence as backup_fence;
use crate::backup::prune::{self, PruneReport};
use crate::backup::repository::Repository;
use crate::backup::restore::RestoreDbOptions;
use crate::backup::retention::{self, ForgetReport, Policy};
use crate::backup::session::{self, BackupOptions, BackupSummary, DatabaseSource, Quiet};
use crate::config::{Config, JobSpec};
use crate::pg::schema::AccessOptions;
use crate::pg::Fence;
use crate::recovery::drill::{self, DrillOptions, DrillReport};
use crate::recovery::point_in_time::RecoveryTarget;
use crate::verify::db::Endpoint;
use crate::verify::{self, DbReport, DbVerifyOptions};

/// Tables a scheduled backup reads at once (as `invsync backup`'s default `--jobs`).
const BACKUP_JOBS: usize = 2;

/// How long a scheduled drill waits for the standby's tables' locks, and for the archive to
/// reach the source's position after verifying (as `invsync drill`'s defaults).
const DRILL_LOCK_WAIT: Duration = Duration::from_secs(60);
const DRILL_ARCHIVE_WAIT: Duration = Duration::from_secs(180);

/// What a job did, in the shape `--json` of its command prints, tagged with the job's kind.
#[derive(Debug, Serialize)]
#[serde(tag = "job", rename_all = "kebab-case")]
pub enum JobReport {
    Backup {
        repo: String,
        /// The database backed up, as the snapshot records it.
        db: Option<String>,
        #[serde(flatten)]
        summary: BackupSummary,
    },
    VerifyDb(DbReport),
    VerifyRepo(RepoReport),
    Forget(ForgetReport),
    Prune(PruneReport),
    Drill(Box<DrillReport>),
}

impl JobReport {
    /// What was found wrong, making the run a failure.
    pub fn problem(&self) -> Option<String> {
        match self {
            JobReport::VerifyDb(r) if r.exit_code() != 0 => Some(format!(
                "{} row(s) differ, {} table(s) could not be verified or stayed undecided",
                r.differences(),
                r.tables
                    .iter()
                    .filter(|t| {
                        matches!(
                            t.status,
                            verify::TableStatus::Error | verify::TableStatus::Undecided
                        )
                    })
                    .count()
            )),
            JobReport::VerifyRepo(r) if r.has_errors() => Some(format!(
                "repository {} is damaged: {} finding(s)",
                r.repository,
                r.findings.len()
            )),
            JobReport::Drill(r) if !r.passed => Some(format!(
                "the drill into {} failed: {} finding(s) not explained by the source's later changes",
                r.standby, r.verify.unexplained
            )),
            _ => None,
        }
    }
}

/// Runs `job` to its end, under the fence of its schedule's lease when there is one: a
/// backup, forget or prune first raises the repository's fence to this epoch; a backup then
/// writes its snapshot, a forget or prune deletes, only if no newer epoch started meanwhile.
/// Verify jobs write nothing and need no fence.
pub async fn run(
    config: &Config,
    job: &JobSpec,
    fence: Option<&Fence>,
) -> Result<JobReport, AgentError> {
    let open = |name: &str| {
        let name = name.to_string();
        async move {
            let cfg = config.repository(Some(&name)).map_err(AgentError::Config)?;
            Ok::<_, AgentError>(Repository::open(cfg).await?)
        }
    };
    Ok(match job {
        JobSpec::Backup {
            repo,
            db,
            tables,
            config_dirs,
            tags,
        } => {
            let repository = open(repo).await?;
            if let Some(f) = fence {
                backup_fence::raise(&repository, f).await?;
            }
            let database = DatabaseSource::select(
                config,
                db.as_deref(),
                tables,
                !config_dirs.is_empty(),
                BACKUP_JOBS,
            )?;
            let label = database.as_ref().map(|d| d.label.clone());
            let opts = BackupOptions {
                database,
                config_dirs: config_dirs.clone(),
                tags: tags.clone(),
                fence: fence.cloned(),
            };
            JobReport::Backup {
                repo: repo.clone(),
                db: label,
                summary: session::backup(&repository, &opts, &Quiet).await?,
            }
        }
        JobSpec::VerifyPipeline { pipeline, tables } => {
            let opts =
                DbVerifyOptions::select(Some(config), Some(pipeline), None, None, &texts(tables))?;
            JobReport::VerifyDb(verify::verify_db(&opts, &verify::db::NoProgress).await?)
        }
        JobSpec::VerifyDatabases {
            source,
            target,
            tables,
        } => {
            let opts = DbVerifyOptions::select(
                Some(config),
                None,
                Some(source),
                Some(target),
                &texts(tables),
            )?;
            JobReport::VerifyDb(verify::verify_db(&opts, &verify::db::NoProgress).await?)
        }
        JobSpec::VerifyRepository { repo, read_data } => {
            let repository = open(repo).await?;
            JobReport::VerifyRepo(
                repo_check::check_repo(
                    &repository,
                    &RepoCheckOptions {
                        read_data: *read_data,
                    },
                )
                .await?,
            )
        }
        JobSpec::Forget { repo, keep, prune } => {
            let repository = open(repo).await?;
            let policy = Policy {
                keep_last: keep.keep_last,
                keep_hourly: keep.keep_hourly,
                keep_daily: keep.keep_daily,
                keep_weekly: keep.keep_weekly,
                keep_monthly: keep.keep_monthly,
            };
            if let Some(f) = fence {
                backup_fence::raise(&repository, f).await?;
            }
            JobReport::Forget(
                retention::forget_and_prune(&repository, &policy, false, *prune, fence).await?,
            )
        }
        JobSpec::Prune { repo } => {
            let repository = open(repo).await?;
            if let Some(f) = fence {
                backup_fence::raise(&repository, f).await?;
            }
            JobReport::Prune(prune::prune_fenced(&repository, false, fence).await?)
        }
        JobSpec::Drill {
            repo,
            source,
            target,
            tables,
        } => {
            let repository = open(repo).await?;
            let (source, label) = drill::source(Some(config), source)?;
            let opts = DrillOptions {
                source,
                archived: Some(label),
                standby: Endpoint::resolve(Some(config), target)?,
                target: RecoveryTarget::Latest,
                restore: RestoreDbOptions {
                    tables: tables.clone(),
                    replace: true,
                    access: AccessOptions::default(),
                    lock_wait: DRILL_LOCK_WAIT,
                },
                no_restore: false,
                archive_wait: DRILL_ARCHIVE_WAIT,
            };
            JobReport::Drill(Box::new(
                drill::drill(&repository, &opts, std::future::pending()).await?,
            ))
        }
    })
}

fn texts(tables: &[crate::config::TablePattern]) -> Vec<String> {
    tables.iter().map(|t| t.to_string()).collect()
}
