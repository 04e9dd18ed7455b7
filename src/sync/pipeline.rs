//! A pipeline's life: `setup` (checks, publication, slot, target tables, initial copy),
//! `run` (stream from the slot and apply to every target until stopped), and `teardown`.
//!
//! `run` keeps these promises:
//! - The stream starts at the oldest applied LSN among the targets; each target skips the
//!   transactions it already holds, so none is applied twice.
//! - The slot is confirmed up to the smallest durable applied LSN among the targets (commits the
//!   target has flushed, not only made visible), or, when no
//!   target has anything pending, up to the last keepalive's WAL end, so a quiet source (or one
//!   busy with other tables) does not keep WAL behind the slot.
//! - A target that goes away is retried with backoff while the others keep applying; when it is
//!   back and behind, the stream restarts from its position.
//! - A batch is committed as soon as every target has its earlier commits back (so under a light
//!   load each source transaction is visible on the targets about one round trip after it
//!   arrives, and under a heavy one batches grow while the targets work), or once it is full or
//!   old.
//! - A stop request (SIGINT/SIGTERM in the CLI) finishes the source transaction being received,
//!   commits every target's batch with its progress, and returns `Ok`.
//! - Every `sequence_interval` (and when a session starts), the sequences move forward on the
//!   targets to the source's values ([`sequences`]), queued on each target's writer between
//!   the changes, so apply does not wait for them.
//! - Every 2 s the run reads its configuration file again: a target added there is streamed
//!   once setup has copied it (the slot held while it is copied, see [`join`]), one removed
//!   stops receiving changes (its batch committed first); neither needs a restart.
//! - A source or stream failure reconnects with backoff and says so in the log; errors a person
//!   must fix (schema, permissions, configuration) stop the pipeline.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify};

use super::apply::{Change, ColumnSource, StreamRelation, Target};
use super::copy::{self, CopyProgress, CopyStats, TableCopy};
use super::progress::TableJoin;
use super::reconnect::{Next, Reconnect};
use super::{join, progress, schema, sequences, SyncError};
use crate::cdc::decoder::{self, Message};
use crate::cdc::{names, publication, slot, CdcError};
use crate::config::{Config, PipelineConfig};
use crate::pg::{pg_time, resolve_tables, ConnInfo, Fence, Lsn, PgError, TableInfo, TableName};

/// A batch is committed, even while a target still works on an earlier one, once it holds this
/// many changes...
pub(super) const BATCH_ROWS: usize = 20_000;
/// ...or has been open this long.
const BATCH_TIME: Duration = Duration::from_millis(150);
/// How often a target with only unflushed commits is asked how far its WAL is flushed (its WAL
/// writer flushes asynchronous commits every `wal_writer_delay`, 200 ms by default).
const FLUSH_CHECK: Duration = Duration::from_millis(200);

/// Options of `invsync sync setup`.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Create missing tables (and their types) on the targets.
    pub create: bool,
    /// Copy the existing rows; without, the targets must already hold them.
    pub copy: bool,
    /// Concurrent copy sessions.
    pub jobs: usize,
    /// Drop the tables that leave the pipeline on its targets (and a removed target's tables
    /// there); without, their rows stay.
    pub drop: bool,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            create: true,
            copy: true,
            jobs: 4,
            drop: false,
        }
    }
}

/// What setup did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum SetupOutcome {
    /// The pipeline was set up before; nothing was changed.
    AlreadySetUp { pipeline: String, slot: String },
    /// The pipeline is ready for `run`.
    SetUp {
        pipeline: String,
        slot: String,
        publication: String,
        /// Streaming starts here.
        consistent_point: Lsn,
        copied: Vec<CopyStats>,
        /// Whether an interrupted setup was found and redone.
        resumed: bool,
    },
    /// The pipeline streams already: tables or targets joined or left it.
    Changed {
        pipeline: String,
        #[serde(flatten)]
        changes: join::Changes,
    },
}

/// A pipeline's configuration, its source, and its targets by name.
type Resolved<'a> = (&'a PipelineConfig, ConnInfo, Vec<(String, ConnInfo)>);

fn lookup<'a>(config: &'a Config, pipeline: &str) -> Result<Resolved<'a>, SyncError> {
    let p = config.pipeline(pipeline).map_err(SyncError::Config)?;
    let pairs = config
        .pipelines
        .iter()
        .flat_map(|(name, q)| q.targets.iter().map(move |t| (name.as_str(), t.as_str())));
    if let Some(((p1, t1), (p2, t2), origin)) = names::origin_clash(pairs) {
        return Err(SyncError::Config(format!(
            "pipeline `{p1}` (target `{t1}`) and pipeline `{p2}` (target `{t2}`) would share the \
             replication origin `{origin}` on their target; rename one of them in the configuration"
        )));
    }
    let source = config
        .database(&p.source)
        .map_err(SyncError::Config)?
        .conn
        .clone();
    let mut targets = Vec::new();
    for t in &p.targets {
        targets.push((
            t.clone(),
            config.database(t).map_err(SyncError::Config)?.conn.clone(),
        ));
    }
    Ok((p, source, targets))
}

/// Sets up `pipeline`: see the module documentation; the initial copy reports to `progress`.
/// Safe to re-run: a complete setup is left
/// alone, an interrupted one is redone from the start.
pub async fn setup(
    config: &Config,
    pipeline: &str,
    opts: &SetupOptions,
    progress: &dyn CopyProgress,
) -> Result<SetupOutcome, SyncError> {
    let (p, source_conn, target_conns) = lookup(config, pipeline)?;
    let slot_name = names::slot(pipeline);
    let pub_name = names::publication(pipeline);

    let source = source_conn.connect().await?;
    slot::check_source(&source, &source_conn).await?;
    let table_names = resolve_tables(&source, &source_conn, &p.tables).await?;
    let mut tables = Vec::new();
    for t in &table_names {
        tables.push(TableInfo::load(&source, &source_conn, t).await?);
    }
    publication::check_identity(&tables)?;

    let mut targets = Vec::new();
    for (name, conn) in &target_conns {
        let client = conn.connect().await?;
        progress::install(&client, conn).await?;
        let state = progress::load(&client, conn, pipeline).await?;
        targets.push((name, conn, client, state));
    }
    let existing_slot = slot::state(&source, &source_conn, &slot_name).await?;
    let any_streaming = targets
        .iter()
        .any(|(_, _, _, s)| matches!(s, Some(s) if s.state == progress::State::Streaming));
    if let (Some(existing), true) = (&existing_slot, any_streaming) {
        // Set up and streaming: tables and targets join or leave without a new slot.
        let mut joining: Vec<join::SetupTarget> = targets
            .into_iter()
            .map(|(name, conn, client, state)| join::SetupTarget {
                name,
                conn,
                client,
                state,
            })
            .collect();
        return join::change(
            config,
            p,
            &source,
            &source_conn,
            &tables,
            &mut joining,
            existing.active_pid,
            opts,
            progress,
        )
        .await;
    }
    let resumed = existing_slot.is_some() || targets.iter().any(|(_, _, _, s)| s.is_some());
    if existing_slot.is_some() {
        // Left by an interrupted setup: its snapshot is gone, so the copy starts over.
        slot::drop(&source, &source_conn, &slot_name).await?;
    }

    let mut copies = Vec::new();
    for (name, conn, client, state) in &mut targets {
        if opts.copy && matches!(state, Some(s) if s.state == progress::State::Copying) {
            // Rows of the interrupted copy: setup checked these tables were empty before it.
            let partial = progress::copying_tables(client, conn, pipeline).await?;
            let ours: Vec<String> = partial
                .iter()
                .filter(|t| table_names.contains(t))
                .map(|t| t.quoted())
                .collect();
            if !ours.is_empty() {
                tracing::info!(target = %name, "emptying {} table(s) of an interrupted copy", ours.len());
                client
                    .batch_execute(&format!("TRUNCATE {}", ours.join(", ")))
                    .await
                    .map_err(|e| {
                        PgError::query("emptying tables of an interrupted copy", conn, e)
                    })?;
            }
        }
        for t in &tables {
            let target_table =
                schema::ensure_table(&source, &source_conn, client, conn, t, opts.create).await?;
            if opts.copy {
                let has_rows: bool = client
                    .query_one(
                        &format!("SELECT EXISTS (SELECT 1 FROM {})", t.name.quoted()),
                        &[],
                    )
                    .await
                    .map_err(|e| {
                        PgError::query(format!("checking that {} is empty", t.name), conn, e)
                    })?
                    .get(0);
                if has_rows {
                    return Err(SyncError::TargetNotEmpty {
                        table: t.name.to_string(),
                        target: conn.to_string(),
                    });
                }
            }
            copies.push(TableCopy {
                source: t.clone(),
                target: target_table,
                target_name: name.to_string(),
                target_conn: (*conn).clone(),
            });
        }
        progress::ensure_origin(client, conn, &names::origin(pipeline, name)).await?;
        progress::begin_copy(
            client,
            conn,
            pipeline,
            &p.source,
            &slot_name,
            &table_names,
            opts.copy,
        )
        .await?;
    }

    publication::ensure(&source, &source_conn, &pub_name, &tables).await?;
    let created = slot::create(&source_conn, &slot_name, &pub_name, opts.copy).await?;
    let consistent_point = created.consistent_point;
    let copied = match &created.snapshot {
        Some(snapshot) => {
            copy::copy_all(
                &source_conn,
                snapshot,
                pipeline,
                copies,
                opts.jobs,
                progress,
            )
            .await?
        }
        None => Vec::new(),
    };
    let seqs = sequences::of_tables(&source, &source_conn, &table_names, &p.sequences).await?;
    for (_, conn, client, _) in &targets {
        progress::finish_copy(client, conn, pipeline, consistent_point).await?;
        sequences::bring(&source, &source_conn, client, conn, &seqs).await?;
    }
    created.release();
    tracing::info!(pipeline, %consistent_point, "pipeline set up");
    Ok(SetupOutcome::SetUp {
        pipeline: pipeline.to_string(),
        slot: slot_name,
        publication: pub_name,
        consistent_point,
        copied,
        resumed,
    })
}

/// What teardown removed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TeardownReport {
    pub pipeline: String,
    pub slot_dropped: bool,
    pub publication: String,
    pub targets: Vec<String>,
}

/// Drops the slot and the publication, and invsync's bookkeeping and origin on every target.
/// Target data is left alone. Idempotent.
pub async fn teardown(config: &Config, pipeline: &str) -> Result<TeardownReport, SyncError> {
    let (_, source_conn, target_conns) = lookup(config, pipeline)?;
    let source = source_conn.connect().await?;
    let slot_dropped = slot::drop(&source, &source_conn, &names::slot(pipeline)).await?;
    publication::drop(&source, &source_conn, &names::publication(pipeline)).await?;
    let mut targets = Vec::new();
    for (name, conn) in &target_conns {
        let client = conn.connect().await?;
        progress::forget(&client, conn, pipeline).await?;
        progress::drop_origins(&client, conn, &names::all_origins(pipeline, name)).await?;
        targets.push(name.clone());
    }
    Ok(TeardownReport {
        pipeline: pipeline.to_string(),
        slot_dropped,
        publication: names::publication(pipeline),
        targets,
    })
}

enum SessionEnd {
    /// Stop was requested and everything is committed.
    Stopped,
    /// A target came back behind the stream, or a joining target's copy began or ended:
    /// start again from the targets' positions.
    Restart,
    /// The configuration lists other targets now: these.
    Members(Vec<(String, ConnInfo)>),
}

/// What a running pipeline tells whoever watches it (the agent's metrics and `/status`).
/// Calls come from the pipeline's task, in order; they must be cheap and must not block.
pub trait Observer: Send + Sync {
    /// The stream from the slot started (`true`) or ended (`false`: reconnecting or stopped).
    fn streaming(&self, up: bool);
    /// `target` received one more whole source transaction (committed there with its batch).
    fn applied(&self, target: &str);
}

/// Nobody watches (the CLI's `sync run`).
impl Observer for () {
    fn streaming(&self, _: bool) {}
    fn applied(&self, _: &str) {}
}

/// Streams `pipeline` until `stop` turns true (or its sender is dropped). See the module
/// documentation for what is promised. With a `fence` (the agent's lease), a batch commits on a
/// target only while no newer epoch has written it; otherwise the run stops with
/// [`SyncError::Fenced`].
pub async fn run(
    config: &Config,
    pipeline: &str,
    stop: watch::Receiver<bool>,
    fence: Option<&Fence>,
) -> Result<(), SyncError> {
    run_observed(config, pipeline, stop, fence, &()).await
}

/// [`run`], telling `observer` when the stream is up and what each target applies.
pub async fn run_observed(
    config: &Config,
    pipeline: &str,
    mut stop: watch::Receiver<bool>,
    fence: Option<&Fence>,
    observer: &dyn Observer,
) -> Result<(), SyncError> {
    let (p, source_conn, target_conns) = lookup(config, pipeline)?;
    let answered = Arc::new(Notify::new());
    let mut targets: Vec<Target> = target_conns
        .iter()
        .map(|(name, conn)| {
            Target::new(
                pipeline,
                name,
                conn.clone(),
                answered.clone(),
                fence.cloned(),
                p.missing_rows,
            )
        })
        .collect();
    let mut reconnect = Reconnect::new();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let ended = session(
            p,
            &config.path,
            &source_conn,
            &mut targets,
            &answered,
            &mut stop,
            observer,
        )
        .await;
        observer.streaming(false);
        match ended {
            Ok(SessionEnd::Stopped) => return Ok(()),
            Ok(SessionEnd::Members(listed)) => {
                reconnect.ended();
                targets.retain_mut(|t| {
                    let kept = listed.iter().any(|(name, _)| *name == t.name);
                    if !kept {
                        tracing::info!(pipeline, target = %t.name, "target left the configuration: no longer streamed");
                        t.disconnect();
                    }
                    kept
                });
                for (name, conn) in &listed {
                    if targets.iter().all(|t| t.name != *name) {
                        tracing::info!(pipeline, target = %name, "target joined the configuration: streamed once `invsync sync setup {pipeline}` has copied it");
                        let mut t = Target::new(
                            pipeline,
                            name,
                            conn.clone(),
                            answered.clone(),
                            fence.cloned(),
                            p.missing_rows,
                        );
                        t.joining = join::Joining::Listed;
                        targets.push(t);
                    }
                }
                continue;
            }
            Ok(SessionEnd::Restart) => {
                reconnect.ended();
                tracing::info!(
                    pipeline,
                    "a target is back: restarting the stream from its position"
                );
                continue;
            }
            Err(SyncError::AwaitingCopy { table, target, .. }) => {
                // The open batches roll back; the stream starts again from what each target
                // committed, once the table's copy is done.
                for t in &mut targets {
                    t.disconnect();
                }
                tracing::info!(pipeline, %target, "a change to {table} is due while its copy runs: waiting for the copy");
                let Some(t) = targets.iter().find(|t| t.name == target) else {
                    continue;
                };
                if !copy_done(t, &table, &mut stop).await {
                    return Ok(());
                }
                reconnect.ended();
                continue;
            }
            Err(e) if e.is_transient() => {
                for t in &mut targets {
                    t.disconnect();
                }
                let next = if let SyncError::Cdc(CdcError::SlotInUse { .. }) = e {
                    reconnect.slot_busy(Instant::now())
                } else {
                    reconnect.failed(started.elapsed())
                };
                let wait = match next {
                    Next::GiveUp => return Err(e),
                    Next::After(wait) => wait,
                };
                tracing::warn!(pipeline, "{e}; reconnecting in {wait:?}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            Err(e) => {
                for t in &mut targets {
                    t.disconnect();
                }
                return Err(e);
            }
        }
    }
}

pub(super) struct Txn {
    /// Where the source transaction commits (a joining table's changes apply from its ready
    /// position on).
    pub(super) commit: Lsn,
    /// Applied elsewhere and carrying an origin: dropped.
    pub(super) skip: bool,
    /// Indexes of the targets applying it.
    pub(super) targets: Vec<usize>,
}

/// Handles a target's error: a transient one takes the target down (the others go on), any
/// other stops the pipeline. Fails too when no target is left.
pub(super) fn target_failed(
    targets: &mut [Target],
    i: usize,
    e: SyncError,
) -> Result<(), SyncError> {
    if !e.is_transient() {
        return Err(e);
    }
    targets[i].went_away(&e);
    if targets.iter().any(Target::is_up) {
        Ok(())
    } else {
        Err(e)
    }
}

/// The LSN every target holds (or does not need): see the module documentation.
fn confirm_point(targets: &[Target], position: Lsn, floor: Lsn) -> Lsn {
    targets
        .iter()
        .filter(|t| {
            t.joining == join::Joining::Copying
                || !(t.cut_loose || t.joining == join::Joining::Listed)
        })
        .map(|t| {
            if !t.known || t.joining == join::Joining::Copying {
                floor
            } else if t.is_up() && !t.pending() {
                t.durable.max(position)
            } else {
                t.durable
            }
        })
        .min()
        .unwrap_or(floor)
}

/// True when every target that is up has all its commits back (a target that fails to tell
/// is handled as [`target_failed`] says).
async fn targets_free(targets: &mut [Target]) -> Result<bool, SyncError> {
    let mut free = true;
    for i in 0..targets.len() {
        if targets[i].is_up() {
            match targets[i].committed_all().await {
                Ok(all) => free &= all,
                Err(e) => target_failed(targets, i, e)?,
            }
        }
    }
    Ok(free)
}

/// Commits every target's batch; `durably` waits until the commits are flushed on the targets.
async fn flush_all(targets: &mut [Target], durably: bool) -> Result<(), SyncError> {
    for i in 0..targets.len() {
        if targets[i].is_up() {
            if let Err(e) = targets[i].flush(durably).await {
                target_failed(targets, i, e)?;
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn session(
    p: &PipelineConfig,
    config_path: &Path,
    source_conn: &ConnInfo,
    targets: &mut [Target],
    answered: &Notify,
    stop: &mut watch::Receiver<bool>,
    observer: &dyn Observer,
) -> Result<SessionEnd, SyncError> {
    let pipeline = p.name.as_str();
    let slot_name = names::slot(pipeline);
    let source = source_conn.connect().await?;
    let table_names = resolve_tables(&source, source_conn, &p.tables).await?;
    let seqs = sequences::of_tables(&source, source_conn, &table_names, &p.sequences).await?;
    let slot_state = slot::state(&source, source_conn, &slot_name)
        .await?
        .ok_or_else(|| CdcError::SlotMissing {
            slot: slot_name.clone(),
            target: source_conn.to_string(),
            pipeline: pipeline.to_string(),
        })?;
    if let Some(pid) = slot_state.active_pid {
        return Err(CdcError::SlotInUse {
            slot: slot_name,
            target: source_conn.to_string(),
            pid,
        }
        .into());
    }
    let mut last_error = None;
    let targets_len = targets.len();
    for t in targets.iter_mut() {
        if !t.is_up() && !t.cut_loose && t.joining == join::Joining::No {
            match t.connect().await {
                Ok(()) => {}
                Err(e @ SyncError::NotSetUp { .. }) if targets_len > 1 => {
                    last_error = Some(e);
                    // Not set up yet, or being copied by setup: it joins once copied.
                    t.joining = match joining_row(t).await {
                        Ok(Some(row))
                            if row.state == progress::State::Copying
                                && !progress::released(&row) =>
                        {
                            join::Joining::Copying
                        }
                        _ => join::Joining::Listed,
                    };
                    tracing::info!(pipeline, target = %t.name, "target is not set up yet: streamed once `invsync sync setup {pipeline}` has copied it");
                }
                Err(e) if e.is_transient() => {
                    t.went_away(&e);
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
    }
    mark_cut(pipeline, targets).await;
    if !targets.iter().any(Target::is_up) {
        return Err(
            last_error.unwrap_or_else(|| SyncError::Config("the pipeline has no targets".into()))
        );
    }
    let mut joins = Vec::new();
    for i in 0..targets.len() {
        joins.push(HashMap::new());
        if targets[i].is_up() {
            match read_joins(&targets[i], pipeline).await {
                Ok(j) => joins[i] = j,
                Err(e) => target_failed(targets, i, e)?,
            }
        }
    }
    let floor = slot_state.confirmed_flush.unwrap_or_default();
    // The slot stays at `floor` in this session for targets being copied: their copies'
    // snapshots are taken after this is recorded.
    for t in targets
        .iter()
        .filter(|t| t.joining == join::Joining::Copying)
    {
        if let Err(e) = hold_for(t, floor).await {
            tracing::warn!(pipeline, target = %t.name, "{e}");
        }
    }
    let start = targets
        .iter()
        .filter(|t| t.is_up())
        .map(|t| t.applied)
        .min()
        .unwrap_or(floor);
    let ack = confirm_point(targets, start, floor).min(floor.max(start));
    let mut stream = slot::stream(
        source_conn,
        &slot_name,
        &names::publication(pipeline),
        start,
        ack,
    )
    .await?;
    tracing::info!(
        pipeline,
        %start,
        targets_up = targets.iter().filter(|t| t.is_up()).count(),
        "streaming"
    );
    observer.streaming(true);
    // With the slot now ours, a copy setup began (when it saw the slot free) is held for.
    if follow_copies(pipeline, targets, floor).await {
        stream.stop();
        return Ok(SessionEnd::Restart);
    }

    let mut relations: HashMap<u32, StreamRelation> = HashMap::new();
    let mut txn: Option<Txn> = None;
    let mut position = start;
    let mut batch_started: Option<Instant> = None;
    let mut stopping = false;
    let mut confirmed = ack;
    let mut flush_checked = Instant::now();
    let mut sequences_at = Instant::now();
    let mut joins_at = Instant::now() + JOINS_RELOAD;

    loop {
        let flush_at = batch_started.map(|s| s + BATCH_TIME);
        let flush_check_at = targets
            .iter()
            .any(Target::awaits_flush)
            .then(|| flush_checked + FLUSH_CHECK);
        let retry_at = targets
            .iter()
            .filter(|t| !t.is_up() && !t.cut_loose && t.joining == join::Joining::No)
            .map(|t| t.retry_at)
            .min();
        let mut progressed = false;
        tokio::select! {
            biased;
            changed = stop.changed(), if !stopping => {
                let _ = changed;
                stopping = true;
                tracing::info!(pipeline, "stop requested: finishing the current batch");
            }
            _ = sleep_until(flush_at), if txn.is_none() && flush_at.is_some() => {
                flush_all(targets, false).await?;
                batch_started = None;
                progressed = true;
            }
            _ = answered.notified(), if txn.is_none() && batch_started.is_some() => {
                if targets_free(targets).await? {
                    flush_all(targets, false).await?;
                    batch_started = None;
                }
                progressed = true;
            }
            _ = sleep_until(flush_check_at), if txn.is_none() && flush_check_at.is_some() => {
                for i in 0..targets.len() {
                    if targets[i].awaits_flush() {
                        if let Err(e) = targets[i].check_flushed().await {
                            target_failed(targets, i, e)?;
                        }
                    }
                }
                flush_checked = Instant::now();
                progressed = true;
            }
            _ = sleep_until(Some(sequences_at)), if txn.is_none() && !stopping && !seqs.is_empty() => {
                let values = sequences::last_values(&source, source_conn, &seqs, false).await?;
                if let Some(sql) = sequences::advance_sql(&seqs, &values) {
                    for i in 0..targets.len() {
                        if targets[i].is_up() {
                            if let Err(e) = targets[i].aside(sql.clone()).await {
                                target_failed(targets, i, e)?;
                            }
                        }
                    }
                }
                sequences_at = Instant::now() + p.sequence_interval;
            }
            _ = sleep_until(Some(joins_at)), if txn.is_none() && !stopping => {
                reload_joins(targets, &mut joins, pipeline).await?;
                if let Some(end) = membership(p, config_path, targets, floor).await {
                    // Every commit back (durably: the next session starts from what each
                    // target holds, and skips it there).
                    flush_all(targets, true).await?;
                    stream.stop();
                    return Ok(end);
                }
                joins_at = Instant::now() + JOINS_RELOAD;
            }
            _ = sleep_until(retry_at), if txn.is_none() && retry_at.is_some() && !stopping => {
                for i in 0..targets.len() {
                    if targets[i].is_up() || targets[i].cut_loose || targets[i].joining != join::Joining::No || targets[i].retry_at > Instant::now() {
                        continue;
                    }
                    match targets[i].connect().await {
                        Ok(()) => {
                            match read_joins(&targets[i], pipeline).await {
                                Ok(j) => joins[i] = j,
                                Err(e) => {
                                    target_failed(targets, i, e)?;
                                    continue;
                                }
                            }
                            tracing::info!(pipeline, target = %targets[i].name, "target is back at {}", targets[i].durable);
                            if targets[i].applied < position {
                                flush_all(targets, true).await?;
                                stream.stop();
                                return Ok(SessionEnd::Restart);
                            }
                        }
                        Err(e) if e.is_transient() => targets[i].went_away(&e),
                        Err(e) => return Err(e),
                    }
                }
            }
            event = stream.recv() => {
                let event = match event {
                    Ok(Some(ev)) => ev,
                    Ok(None) => return Err(CdcError::Replication {
                        target: source_conn.to_string(),
                        reason: "the replication stream ended".into(),
                        transient: true,
                    }.into()),
                    Err(e) => {
                        if txn.is_none() {
                            flush_all(targets, false).await?;
                        }
                        return Err(slot::stream_error(source_conn, e).into());
                    }
                };
                use pgwire_replication::ReplicationEvent as E;
                match event {
                    E::Begin { final_lsn, .. } => {
                        let commit_lsn = Lsn(final_lsn.0);
                        txn = Some(Txn {
                            commit: commit_lsn,
                            skip: false,
                            targets: (0..targets.len()).filter(|&i| targets[i].wants(commit_lsn)).collect(),
                        });
                    }
                    E::Commit { end_lsn, commit_time_micros, .. } => {
                        let end = Lsn(end_lsn.0);
                        if let Some(t) = txn.take() {
                            if !t.skip {
                                let time: Option<DateTime<Utc>> = pg_time(commit_time_micros);
                                for &i in &t.targets {
                                    if targets[i].is_up() {
                                        targets[i].end_source_transaction(end, time);
                                        observer.applied(&targets[i].name);
                                    }
                                }
                                if !t.targets.is_empty() {
                                    batch_started.get_or_insert_with(Instant::now);
                                }
                            }
                        }
                        position = position.max(end);
                        let full = targets.iter().any(|t| t.batch_rows() >= BATCH_ROWS);
                        let old = batch_started.is_some_and(|s| s.elapsed() >= BATCH_TIME);
                        if full || old || stopping || (batch_started.is_some() && targets_free(targets).await?) {
                            flush_all(targets, stopping).await?;
                            batch_started = None;
                        }
                        progressed = true;
                    }
                    E::XLogData { data, .. } => {
                        let message = decoder::decode(&data).map_err(|error| CdcError::Decode {
                            target: source_conn.to_string(),
                            error,
                        })?;
                        if matches!(message, Message::Relation(_)) {
                            // A table may have joined: its first change follows.
                            reload_joins(targets, &mut joins, pipeline).await?;
                        }
                        let columns = ColumnSource::Database { client: &source, conn: source_conn };
                        apply_message(message, &mut txn, &mut relations, targets, &joins, columns).await?;
                    }
                    E::KeepAlive { wal_end, .. } => {
                        if txn.is_none() && !targets.iter().any(Target::pending) {
                            position = position.max(Lsn(wal_end.0));
                            progressed = true;
                        }
                    }
                    E::Message { .. } | E::StoppedAt { .. } => {}
                }
            }
        }
        if progressed {
            if let Some((i, reason)) = over_limit(p, targets, position, floor) {
                if targets[i].joining == join::Joining::Copying {
                    release_copy(pipeline, &mut targets[i], reason).await;
                } else {
                    cut_loose(pipeline, targets, i, floor, reason).await;
                }
            }
            let c = confirm_point(targets, position, floor);
            if c > confirmed {
                stream.update_applied_lsn(pgwire_replication::Lsn(c.0));
                confirmed = c;
            }
        }
        if stopping && txn.is_none() {
            flush_all(targets, true).await?;
            let c = confirm_point(targets, position, floor);
            if c > confirmed {
                stream.update_applied_lsn(pgwire_replication::Lsn(c.0));
            }
            // Gives the worker one status interval to tell the server, then ends the stream.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = stream.shutdown().await;
            tracing::info!(
                pipeline,
                "stopped; applied up to {}",
                targets
                    .iter()
                    .map(|t| format!("{}={}", t.name, t.durable))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(SessionEnd::Stopped);
        }
    }
}

/// How often a session reads the targets' table lists again (besides when a relation is
/// described, which a joining table's first change follows).
const JOINS_RELOAD: Duration = Duration::from_secs(2);

/// The table list of `target`, read on a connection of its own (the target's session may be
/// inside a batch).
async fn read_joins(
    target: &Target,
    pipeline: &str,
) -> Result<HashMap<TableName, TableJoin>, SyncError> {
    let client = target.conn.connect().await?;
    progress::table_joins(&client, &target.conn, pipeline).await
}

/// Reads every up target's table list again.
async fn reload_joins(
    targets: &mut [Target],
    joins: &mut [HashMap<TableName, TableJoin>],
    pipeline: &str,
) -> Result<(), SyncError> {
    for i in 0..targets.len() {
        if targets[i].is_up() {
            match read_joins(&targets[i], pipeline).await {
                Ok(j) => joins[i] = j,
                Err(e) => target_failed(targets, i, e)?,
            }
        }
    }
    Ok(())
}

fn awaiting(targets: &[Target], i: usize, table: TableName) -> SyncError {
    SyncError::AwaitingCopy {
        pipeline: targets[i].pipeline().to_string(),
        table,
        target: targets[i].name.clone(),
    }
}

/// The pipeline's row on `target`, read on a connection of its own.
async fn joining_row(target: &Target) -> Result<Option<progress::TargetProgress>, SyncError> {
    let client = target.conn.connect().await?;
    progress::load(&client, &target.conn, target.pipeline()).await
}

/// Records on `target`, whose copy has begun, that this session holds the slot at `floor`.
async fn hold_for(target: &Target, floor: Lsn) -> Result<(), SyncError> {
    let client = target.conn.connect().await?;
    if progress::record_hold(&client, &target.conn, target.pipeline(), floor).await? {
        tracing::info!(pipeline = target.pipeline(), target = %target.name, "holding the slot at {floor} while setup copies the target");
    }
    Ok(())
}

/// What changed in the pipeline's targets since the session started, if that needs a new
/// session: the configuration at `config_path` lists other targets ([`SessionEnd::Members`]),
/// or setup began or finished copying a joining or cut-loose target ([`SessionEnd::Restart`]:
/// the next session holds the slot for it, or streams it from its copy's position). A target
/// that cannot be read is looked at again next time.
async fn membership(
    p: &PipelineConfig,
    config_path: &Path,
    targets: &mut [Target],
    floor: Lsn,
) -> Option<SessionEnd> {
    let pipeline = p.name.as_str();
    if config_path.exists() {
        match Config::load(config_path) {
            Ok(c) => {
                if let Ok(np) = c.pipeline(pipeline) {
                    let listed: Vec<(String, ConnInfo)> = np
                        .targets
                        .iter()
                        .filter_map(|t| Some((t.clone(), c.database(t).ok()?.conn.clone())))
                        .collect();
                    let same = listed.len() == np.targets.len()
                        && listed.len() == targets.len()
                        && listed
                            .iter()
                            .all(|(n, _)| targets.iter().any(|t| t.name == *n));
                    if !same && !listed.is_empty() && listed.len() == np.targets.len() {
                        return Some(SessionEnd::Members(listed));
                    }
                }
            }
            Err(e) => tracing::debug!(pipeline, "configuration not reloaded: {e}"),
        }
    }
    follow_copies(pipeline, targets, floor)
        .await
        .then_some(SessionEnd::Restart)
}

/// Follows setup's copies of targets that do not stream: one whose copy began (listed, or cut
/// loose) is held for from now on ([`join::Joining::Copying`]); one whose copy is done streams
/// from its position, which takes a new session (true).
async fn follow_copies(pipeline: &str, targets: &mut [Target], floor: Lsn) -> bool {
    let mut cuts: Option<Vec<String>> = None;
    for t in targets.iter().filter(|t| t.is_up()) {
        let listed = async {
            let client = t.conn.connect().await?;
            progress::cuts(&client, &t.conn, pipeline).await
        }
        .await;
        if let Ok(c) = listed {
            cuts = Some(c.into_iter().map(|c| c.target).collect());
            break;
        }
    }
    let mut restart = false;
    for t in targets.iter_mut() {
        if t.is_up() || !(t.cut_loose || t.joining != join::Joining::No) {
            continue;
        }
        let Ok(row) = joining_row(t).await else {
            continue;
        };
        // A copy whose hold was released waits for setup to begin it anew.
        let copying = row
            .as_ref()
            .is_some_and(|r| r.state == progress::State::Copying && !progress::released(r));
        let streams = row
            .as_ref()
            .is_some_and(|r| r.state == progress::State::Streaming);
        if streams
            && t.joining != join::Joining::No
            && cuts.as_ref().is_some_and(|c| !c.contains(&t.name))
        {
            tracing::info!(pipeline, target = %t.name, "target copied: streaming it from its copy's position");
            t.joining = join::Joining::No;
            t.cut_loose = false;
            restart = true;
        } else if copying {
            if t.joining != join::Joining::Copying {
                tracing::info!(pipeline, target = %t.name, "setup is copying the target: holding the slot for it");
            }
            // From now on this session confirms nothing further (see `confirm_point`): the
            // copy's snapshot, taken after the hold is recorded, is past what it confirmed.
            t.joining = join::Joining::Copying;
            if let Err(e) = hold_for(t, floor).await {
                tracing::warn!(pipeline, target = %t.name, "{e}");
            }
        }
    }
    restart
}

/// Waits until `table`'s copy into `target` is done (or the table left the pipeline); false
/// when `stop` came first.
async fn copy_done(target: &Target, table: &TableName, stop: &mut watch::Receiver<bool>) -> bool {
    loop {
        if let Ok(j) = read_joins(target, target.pipeline()).await {
            if j.get(table).is_none_or(|j| !j.copying) {
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return false,
        }
    }
}

/// The first target (down, not cut loose yet) that holds more WAL, or has been down longer,
/// than the pipeline allows, and why.
fn over_limit(
    p: &PipelineConfig,
    targets: &[Target],
    position: Lsn,
    floor: Lsn,
) -> Option<(usize, String)> {
    targets.iter().enumerate().find_map(|(i, t)| {
        if t.joining == join::Joining::Copying {
            // Held at `floor` for its copy: the WAL limit applies, not the downtime.
            let held = position.0.saturating_sub(floor.0);
            return p.max_retained_wal.filter(|&l| held > l).map(|limit| {
                (
                    i,
                    format!("its copy holds {held} bytes of WAL on the source, over max_retained_wal ({limit} bytes)"),
                )
            });
        }
        if t.is_up() || t.cut_loose || t.joining != join::Joining::No {
            return None;
        }
        let held_from = if t.known { t.durable } else { floor };
        let held = position.0.saturating_sub(held_from.0);
        if let Some(limit) = p.max_retained_wal.filter(|&l| held > l) {
            return Some((
                i,
                format!("it holds {held} bytes of WAL on the source, over max_retained_wal ({limit} bytes)"),
            ));
        }
        let down = t.down_since.map(|d| d.elapsed()).unwrap_or_default();
        p.max_target_downtime.filter(|&l| down > l).map(|l| {
            (
                i,
                format!(
                    "it has been down for {}, over max_target_downtime ({})",
                    humantime::format_duration(Duration::from_secs(down.as_secs())),
                    humantime::format_duration(l)
                ),
            )
        })
    })
}

/// Stops holding the slot for `target`'s copy, once the copy's own row on it records that (so
/// setup cannot mark that copy streaming: [`progress::release_hold`]); the target waits, as a
/// listed one, for setup to copy it anew. When the row cannot be written the hold stays.
async fn release_copy(pipeline: &str, target: &mut Target, reason: String) {
    let released = async {
        let client = target.conn.connect().await?;
        progress::release_hold(&client, &target.conn, pipeline).await
    }
    .await;
    match released {
        Ok(true) => {
            target.joining = join::Joining::Listed;
            tracing::error!(
                pipeline,
                target = %target.name,
                event = "target_copy_released",
                "target {}: no longer holding the slot for its copy: {reason}; the copy will not stream: run `invsync sync setup {pipeline}` again",
                target.name
            );
        }
        // The copy finished first: it streams from its position, which the hold still covers.
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(pipeline, target = %target.name, "cannot release the hold for the copy: {e}")
        }
    }
}

/// Cuts target `i` loose: records it on the targets that are up (the cut one is not
/// reachable), so that no later run streams it again before it is copied anew, and stops
/// holding the slot for it. Without a target to record it on, it is not cut.
async fn cut_loose(pipeline: &str, targets: &mut [Target], i: usize, floor: Lsn, reason: String) {
    let cut = progress::Cut {
        target: targets[i].name.clone(),
        lsn: if targets[i].known {
            targets[i].durable
        } else {
            floor
        },
        at: Utc::now(),
        reason,
    };
    let mut recorded = false;
    for t in targets.iter().filter(|t| t.is_up()) {
        let written = async {
            let client = t.conn.connect().await?;
            progress::record_cut(&client, &t.conn, pipeline, &cut).await
        }
        .await;
        match written {
            Ok(()) => recorded = true,
            Err(e) => {
                tracing::warn!(pipeline, target = %t.name, "cannot record that {} is cut loose: {e}", cut.target)
            }
        }
    }
    if !recorded {
        return;
    }
    targets[i].cut_loose = true;
    tracing::error!(
        pipeline,
        target = %cut.target,
        event = "target_cut_loose",
        "target {} CUT LOOSE: {}; the slot no longer keeps WAL for it and it misses changes from {} on: it needs a new copy:          with the pipeline stopped, run `invsync sync setup {pipeline}`",
        cut.target,
        cut.reason,
        cut.lsn
    );
}

/// Marks the targets that an up target records as cut loose (and takes them down), and
/// clears the mark of those no longer recorded (copied again by setup).
async fn mark_cut(pipeline: &str, targets: &mut [Target]) {
    let mut cut = Vec::new();
    let mut read = false;
    for t in targets.iter().filter(|t| t.is_up()) {
        let listed = async {
            let client = t.conn.connect().await?;
            progress::cuts(&client, &t.conn, pipeline).await
        }
        .await;
        match listed {
            Ok(c) => {
                read = true;
                cut.extend(c.into_iter().map(|c| c.target));
            }
            Err(e) => {
                tracing::warn!(pipeline, target = %t.name, "cannot read the targets cut loose: {e}")
            }
        }
    }
    if !read {
        return;
    }
    for t in targets.iter_mut() {
        t.cut_loose = cut.contains(&t.name);
        if t.cut_loose {
            t.disconnect();
            tracing::error!(pipeline, target = %t.name, event = "target_cut_loose", "target {} was cut loose and needs a new copy: with the pipeline stopped, run `invsync sync setup {pipeline}`", t.name);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Hands one decoded message of the open transaction `txn` to its targets (shared with the
/// archive's [`replay`](super::replay)).
pub(super) async fn apply_message<'r>(
    message: Message,
    txn: &mut Option<Txn>,
    relations: &'r mut HashMap<u32, StreamRelation>,
    targets: &mut [Target],
    joins: &[HashMap<TableName, TableJoin>],
    source: ColumnSource<'_>,
) -> Result<(), SyncError> {
    let source_conn = source;
    let outside = || {
        SyncError::Protocol(format!(
            "{source_conn}: a change arrived outside a transaction"
        ))
    };
    let relation = |relations: &'r HashMap<u32, StreamRelation>,
                    id: u32|
     -> Result<&'r StreamRelation, SyncError> {
        relations.get(&id).ok_or_else(|| {
            SyncError::Protocol(format!(
                "{source_conn}: a change to relation {id} arrived before its description"
            ))
        })
    };
    match message {
        Message::Relation(rel) => {
            for i in 0..targets.len() {
                if let Err(e) = targets[i].end_statements().await {
                    target_failed(targets, i, e)?;
                }
            }
            relations.insert(rel.id, StreamRelation::new(rel));
        }
        Message::Origin { .. } => {
            if let Some(t) = txn.as_mut() {
                t.skip = true;
            }
        }
        Message::Insert { relation: id, .. }
        | Message::Update { relation: id, .. }
        | Message::Delete { relation: id, .. } => {
            let t = txn.as_ref().ok_or_else(outside)?;
            if t.skip || t.targets.is_empty() {
                return Ok(());
            }
            let rel = relation(relations, id)?;
            let change = match message {
                Message::Insert { new, .. } => Change::Insert(new),
                Message::Update { old, new, .. } => Change::Update { old, new },
                Message::Delete { old, .. } => Change::Delete(old),
                _ => return Ok(()),
            };
            let table = rel.table();
            let mut applying = Vec::new();
            for &i in &t.targets {
                match join::turn(&joins[i], &table, t.commit) {
                    join::Turn::Apply => applying.push(i),
                    join::Turn::Skip => {}
                    join::Turn::Wait => return Err(awaiting(targets, i, table)),
                }
            }
            // The last target that is up takes the decoded rows, the others a copy.
            let last = applying.iter().rposition(|&i| targets[i].is_up());
            let mut change = Some(change);
            for (n, &i) in applying.iter().enumerate() {
                if !targets[i].is_up() {
                    continue;
                }
                let taken = if Some(n) == last {
                    change.take()
                } else {
                    change.clone()
                };
                let Some(change) = taken else { continue };
                let r = match targets[i].check_drift(rel, source).await {
                    Ok(()) => targets[i].change(rel, change).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    target_failed(targets, i, e)?;
                }
            }
        }
        Message::Truncate {
            options,
            relations: ids,
        } => {
            let t = txn.as_ref().ok_or_else(outside)?;
            if t.skip || t.targets.is_empty() {
                return Ok(());
            }
            let refs: Vec<&StreamRelation> = ids
                .iter()
                .map(|&id| relation(relations, id))
                .collect::<Result<_, _>>()?;
            for i in t.targets.clone() {
                let mut mine = Vec::new();
                for r in &refs {
                    match join::turn(&joins[i], &r.table(), t.commit) {
                        join::Turn::Apply => mine.push(*r),
                        join::Turn::Skip => {}
                        join::Turn::Wait => return Err(awaiting(targets, i, r.table())),
                    }
                }
                if targets[i].is_up() && !mine.is_empty() {
                    if let Err(e) = targets[i].truncate(&mine, options).await {
                        target_failed(targets, i, e)?;
                    }
                }
            }
        }
        Message::Begin { .. }
        | Message::Commit { .. }
        | Message::Type { .. }
        | Message::LogicalMessage { .. } => {}
    }
    Ok(())
}
