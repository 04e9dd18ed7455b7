//! `invsync sync status`: where each pipeline stands, read from the source's slot and the
//! targets' `invsync` bookkeeping. Read-only; an unreachable database is reported, not fatal.
//! [`status_in`] reads through sessions the caller keeps open (the agent polls every few
//! seconds); a session that failed a read is dropped and made again on the next one.

use chrono::Utc;

use super::{progress, sequences, SyncError};
use crate::cdc::{names, slot};
use crate::config::{Config, MissingRows};
use crate::pg::{resolve_tables, Lsn, Sessions};

/// Lag above this many bytes shows a table as catching up rather than streaming.
const CATCHING_UP_BYTES: i64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineStatus {
    pub pipeline: String,
    pub source: String,
    pub slot: String,
    /// The pipeline's `missing_rows` policy.
    pub missing_rows: MissingRows,
    /// `None` when the source could not be read (see `source_error`) or the slot is missing.
    pub slot_state: Option<SlotStatus>,
    pub source_error: Option<String>,
    pub targets: Vec<TargetStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// WAL the slot keeps on the source, in bytes.
    pub retained_bytes: i64,
    pub source_lsn: Lsn,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetStatus {
    pub target: String,
    /// `copying` or `streaming`; `None` when not set up or unreachable.
    pub state: Option<progress::State>,
    pub applied_lsn: Option<Lsn>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    /// Updates and deletes whose row was not on this target, since setup.
    pub missing_rows: i64,
    /// The pipeline's sequences on the source and on this target.
    pub sequences: Vec<SequenceStatus>,
    pub tables: Vec<progress::TablePhase>,
    /// Set when the target was cut loose for holding too much WAL: it misses changes and
    /// needs a new copy (`error` says so too).
    pub cut_loose: Option<progress::Cut>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SequenceStatus {
    pub sequence: String,
    /// Last value on the source (`None`: never used, or the source could not be read).
    pub source_value: Option<i64>,
    /// Last value on the target (`None`: never used or missing there).
    pub target_value: Option<i64>,
}

/// Status of `pipeline`, or of every configured pipeline.
pub async fn status(
    config: &Config,
    pipeline: Option<&str>,
) -> Result<Vec<PipelineStatus>, SyncError> {
    status_in(config, pipeline, &mut Sessions::new()).await
}

/// [`status`], reading through `sessions` (kept open by the caller between calls).
pub async fn status_in(
    config: &Config,
    pipeline: Option<&str>,
    sessions: &mut Sessions,
) -> Result<Vec<PipelineStatus>, SyncError> {
    let wanted: Vec<String> = match pipeline {
        Some(p) => vec![config.pipeline(p).map_err(SyncError::Config)?.name.clone()],
        None => config.pipelines.keys().cloned().collect(),
    };
    let mut out = Vec::new();
    for name in wanted {
        out.push(one(config, &name, sessions).await?);
    }
    Ok(out)
}

async fn one(
    config: &Config,
    pipeline: &str,
    sessions: &mut Sessions,
) -> Result<PipelineStatus, SyncError> {
    let p = config.pipeline(pipeline).map_err(SyncError::Config)?;
    let source_conn = &config.database(&p.source).map_err(SyncError::Config)?.conn;
    let slot_name = names::slot(pipeline);
    let mut slot_state = None;
    let mut source_error = None;
    // The pipeline's sequences and their source values (none when the source cannot be read).
    let mut seqs = Vec::new();
    let mut source_values = Vec::new();
    let read: Result<(), SyncError> = async {
        let client = sessions.client(&p.source, source_conn).await?;
        match slot::state(client, source_conn, &slot_name).await? {
            Some(s) => slot_state = Some(s),
            None => {
                source_error = Some(format!(
                    "slot {slot_name} does not exist; run `invsync sync setup {pipeline}`"
                ))
            }
        }
        let tables = resolve_tables(client, source_conn, &p.tables).await?;
        seqs = sequences::of_tables(client, source_conn, &tables, &p.sequences).await?;
        source_values = sequences::last_values(client, source_conn, &seqs, true).await?;
        Ok(())
    }
    .await;
    if let Err(e) = read {
        sessions.forget(&p.source);
        source_error.get_or_insert(e.to_string());
    }
    let mut targets = Vec::new();
    let mut cuts: Vec<progress::Cut> = Vec::new();
    for t in &p.targets {
        let conn = &config.database(t).map_err(SyncError::Config)?.conn;
        let mut ts = TargetStatus {
            target: t.clone(),
            state: None,
            applied_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            missing_rows: 0,
            sequences: Vec::new(),
            tables: Vec::new(),
            cut_loose: None,
            error: None,
        };
        let result: Result<(), SyncError> = async {
            let client = sessions.client(t, conn).await?;
            cuts.extend(progress::cuts(client, conn, pipeline).await?);
            let Some(pr) = progress::load(client, conn, pipeline).await? else {
                ts.error = Some(format!("not set up; run `invsync sync setup {pipeline}`"));
                return Ok(());
            };
            let mut tables = progress::tables(client, conn, pipeline).await?;
            if pr.state == progress::State::Streaming {
                ts.applied_lsn = Some(pr.applied);
                if let Some(s) = &slot_state {
                    // The slot is confirmed only up to what every target holds (or does not
                    // need), so the larger of the two is what this target is at.
                    let at = pr.applied.max(s.confirmed_flush.unwrap_or_default());
                    let lag = s.current_lsn.0.saturating_sub(at.0) as i64;
                    ts.lag_bytes = Some(lag);
                    ts.lag_seconds = Some(match (lag, pr.applied_commit_time) {
                        (0, _) | (_, None) => 0.0,
                        (_, Some(t)) => {
                            ((Utc::now() - t).num_milliseconds().max(0) as f64) / 1000.0
                        }
                    });
                    for t in &mut tables {
                        // Behind the stream, or not yet at the position a joining table's
                        // copy was read at.
                        let before_join = t.ready_lsn.is_some_and(|r| {
                            pr.applied.max(s.confirmed_flush.unwrap_or_default()) < r
                        });
                        if t.phase == "streaming" && (lag > CATCHING_UP_BYTES || before_join) {
                            t.phase = "catching up".into();
                        }
                    }
                }
            }
            ts.missing_rows = pr.missing_rows;
            let target_values = sequences::last_values(client, conn, &seqs, true).await?;
            ts.sequences = seqs
                .iter()
                .zip(&source_values)
                .zip(target_values)
                .map(|((s, &source_value), target_value)| SequenceStatus {
                    sequence: s.to_string(),
                    source_value,
                    target_value,
                })
                .collect();
            ts.state = Some(pr.state);
            ts.tables = tables;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            sessions.forget(t);
            ts.error = Some(e.to_string());
        }
        targets.push(ts);
    }
    for ts in &mut targets {
        if let Some(c) = cuts.iter().find(|c| c.target == ts.target) {
            ts.error = Some(format!(
                "CUT LOOSE at {} ({}): {}; it misses changes and needs a new copy: with the pipeline stopped, run `invsync sync setup {pipeline}`",
                c.at.format("%Y-%m-%d %H:%M:%S UTC"),
                c.lsn,
                c.reason
            ));
            ts.cut_loose = Some(c.clone());
        }
    }
    Ok(PipelineStatus {
        pipeline: pipeline.to_string(),
        source: p.source.clone(),
        slot: slot_name,
        missing_rows: p.missing_rows,
        slot_state: slot_state.map(|s| SlotStatus {
            active: s.active_pid.is_some(),
            active_pid: s.active_pid,
            confirmed_lsn: s.confirmed_flush,
            restart_lsn: s.restart_lsn,
            retained_bytes: s.retained_bytes,
            source_lsn: s.current_lsn,
        }),
        source_error,
        targets,
    })
}
