//! Tables and targets that join or leave a pipeline that is set up and streaming.
//!
//! A table added to the configuration joins the stream the way PostgreSQL's table-sync workers
//! do it: setup lists it on each target as copying, adds it to the publication, takes a
//! snapshot of the source from a temporary slot, records the snapshot's position (the table's
//! *ready* LSN) and copies the table in that snapshot. The running pipeline applies a change to
//! the table on a target exactly when its transaction commits at or after the ready LSN: the
//! ones before are in the copy. A change that is due while the copy is still running waits for
//! it (see [`turn`]), so nothing is skipped that the copy does not hold and nothing is applied
//! twice. Tables already streaming are never copied again.
//!
//! A target added to the configuration (or one cut loose for holding too much WAL) is copied
//! whole in such a snapshot and streams from its position; the other targets keep streaming
//! meanwhile. The design is the per-target start position (not a catch-up stream beside the
//! main one): the copy's changes are all in the slot's stream, provided the slot is not
//! confirmed past the snapshot before the target streams. So:
//! 1. setup lists the target as copying (its tables created or emptied);
//! 2. the running pipeline, which reads its configuration and its targets every 2 s (and when
//!    a session takes the slot), sees the copy begin ([`Joining::Copying`]), stops confirming
//!    the slot further, and records that on the target ([`progress::record_hold`]); setup,
//!    when it finds the slot in use after recording the copy, waits for it (a slot not in use
//!    holds still, and a session that takes it later sees the copy from its start);
//! 3. setup takes the snapshot (at or after the held position: it is the source's current
//!    one), copies, and records the target as streaming from the snapshot's position;
//! 4. the pipeline sees it and starts a new session from the oldest target position: the
//!    joining target applies the transactions committed after its copy's position, the others
//!    skip what they hold (only the WAL written during the copy is read again, not applied).
//!
//! Exactly once: what committed before the snapshot is in the copy, what committed after is
//! streamed (the slot still holds it), and every target skips what it holds. While a target
//! is being copied the slot keeps the WAL written meanwhile, up to the pipeline's
//! `max_retained_wal`: past it the running pipeline releases the hold on the target's own row
//! ([`progress::release_hold`]) and setup cannot mark that copy streaming (it fails, saying to
//! run it again). A setup that dies midway leaves the hold until then, or until setup is run
//! again or the target leaves the configuration.
//!
//! A table or target removed from the configuration leaves the publication and the targets'
//! bookkeeping; its rows on the targets stay unless setup is told `--drop`.

use std::collections::{BTreeSet, HashMap};

use tokio_postgres::Client;

use super::copy::{self, CopyProgress, CopyStats, TableCopy};
use super::pipeline::{SetupOptions, SetupOutcome};
use super::progress::{self, State, TableJoin, TargetProgress};
use super::{schema, sequences, SyncError};
use crate::cdc::{names, publication, slot};
use crate::config::{Config, PipelineConfig};
use crate::pg::{ConnInfo, Lsn, PgError, TableInfo, TableName};

/// Where a target stands in a running pipeline that did not start with it streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joining {
    /// Streams (or is retried when it goes away) as usual.
    No,
    /// Listed in the configuration but not set up yet: neither streamed nor waited for.
    Listed,
    /// Setup is copying it: the slot is held where the session started (see
    /// [`progress::record_hold`]) until the copy is done and the target streams from its end.
    Copying,
}

/// What a streamed change to one table does on one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Apply,
    /// The table's copy holds it, or the table is not the pipeline's on this target.
    Skip,
    /// The table's copy has not finished (or not recorded its position): apply only after it.
    Wait,
}

/// The turn of a change to `table`, in the source transaction that commits at `commit`, on a
/// target whose table list is `joins`. A target that keeps no list applies everything.
pub fn turn(joins: &HashMap<TableName, TableJoin>, table: &TableName, commit: Lsn) -> Turn {
    if joins.is_empty() {
        return Turn::Apply;
    }
    match joins.get(table) {
        None => Turn::Skip,
        Some(j) if j.ready.is_some_and(|r| commit < r) => Turn::Skip,
        Some(j) if j.copying => Turn::Wait,
        Some(_) => Turn::Apply,
    }
}

/// A target of a set-up pipeline, as setup found it.
pub struct SetupTarget<'a> {
    pub name: &'a str,
    pub conn: &'a ConnInfo,
    pub client: Client,
    pub state: Option<TargetProgress>,
}

/// What setup changed on a pipeline that was streaming.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Changes {
    pub added_tables: Vec<String>,
    pub removed_tables: Vec<String>,
    /// Targets copied whole: new ones, and those that had been cut loose.
    pub added_targets: Vec<String>,
    /// Targets no longer in the configuration whose bookkeeping was removed.
    pub removed_targets: Vec<String>,
    /// The source position the copies were read at.
    pub join_point: Option<Lsn>,
    pub copied: Vec<CopyStats>,
    /// Whether the removed tables were dropped on the targets (`--drop`).
    pub dropped: bool,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.added_tables.is_empty()
            && self.removed_tables.is_empty()
            && self.added_targets.is_empty()
            && self.removed_targets.is_empty()
    }
}

/// Setup of a pipeline whose slot exists and which streams to at least one target: brings its
/// tables and targets to what the configuration lists (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub async fn change(
    config: &Config,
    p: &PipelineConfig,
    source: &Client,
    source_conn: &ConnInfo,
    tables: &[TableInfo],
    targets: &mut [SetupTarget<'_>],
    slot_active: Option<i32>,
    opts: &SetupOptions,
    progress: &dyn CopyProgress,
) -> Result<SetupOutcome, SyncError> {
    let pipeline = p.name.as_str();
    let pub_name = names::publication(pipeline);
    let configured: Vec<TableName> = tables.iter().map(|t| t.name.clone()).collect();
    let published = publication::tables(source, source_conn, &pub_name)
        .await?
        .unwrap_or_default();

    let mut cut = BTreeSet::new();
    for t in targets.iter() {
        for c in progress::cuts(&t.client, t.conn, pipeline).await? {
            cut.insert(c.target);
        }
    }
    let streams = |t: &SetupTarget| {
        matches!(&t.state, Some(s) if s.state == State::Streaming) && !cut.contains(t.name)
    };

    let mut changes = Changes::default();
    // Per streaming target, the configured tables it does not hold yet.
    let mut joining_tables: Vec<Vec<&TableInfo>> = Vec::new();
    let mut removed = BTreeSet::new();
    for t in targets.iter() {
        let joins = if streams(t) {
            progress::table_joins(&t.client, t.conn, pipeline).await?
        } else {
            HashMap::new()
        };
        let new: Vec<&TableInfo> = if streams(t) {
            tables
                .iter()
                .filter(|i| joins.get(&i.name).is_none_or(|j| j.copying))
                .collect()
        } else {
            Vec::new()
        };
        for i in &new {
            if !changes.added_tables.contains(&i.name.to_string()) {
                changes.added_tables.push(i.name.to_string());
            }
        }
        removed.extend(joins.into_keys().filter(|n| !configured.contains(n)));
        joining_tables.push(new);
    }
    removed.extend(
        published
            .iter()
            .filter(|n| !configured.contains(n))
            .cloned(),
    );
    changes.removed_tables = removed.iter().map(|t| t.to_string()).collect();
    changes.added_targets = targets
        .iter()
        .filter(|t| !streams(t))
        .map(|t| t.name.to_string())
        .collect();
    let gone = former_targets(config, p).await?;
    changes.removed_targets = gone.iter().map(|(n, _, _)| n.clone()).collect();
    if changes.is_empty() {
        return Ok(SetupOutcome::AlreadySetUp {
            pipeline: pipeline.to_string(),
            slot: names::slot(pipeline),
        });
    }
    let joining = !changes.added_tables.is_empty() || !changes.added_targets.is_empty();
    if !opts.copy && joining {
        return Err(SyncError::Config(format!(
            "pipeline {pipeline} streams already: a table or target joining it is copied from a snapshot, so that it \
             joins the stream exactly where the copy ends; run setup without --no-copy"
        )));
    }

    // Targets and tables to copy, listed as copying before the publication streams them.
    let mut copies = Vec::new();
    for (t, new) in targets.iter_mut().zip(&joining_tables) {
        if streams(t) {
            let names: Vec<TableName> = new.iter().map(|i| i.name.clone()).collect();
            let partial = progress::table_joins(&t.client, t.conn, pipeline).await?;
            for i in new {
                let interrupted = partial.get(&i.name).is_some_and(|j| j.copying);
                copies.push(
                    prepare_table(source, source_conn, t, i, opts.create, interrupted).await?,
                );
            }
            progress::add_tables(&t.client, t.conn, pipeline, &names).await?;
        } else {
            // A new target, one whose copy was interrupted, or one cut loose: its rows are
            // replaced by a new copy.
            let replace = t.state.is_some();
            for i in tables {
                copies.push(prepare_table(source, source_conn, t, i, opts.create, replace).await?);
            }
            progress::ensure_origin(&t.client, t.conn, &names::origin(pipeline, t.name)).await?;
            progress::begin_copy(
                &mut t.client,
                t.conn,
                pipeline,
                &p.source,
                &names::slot(pipeline),
                &configured,
                true,
            )
            .await?;
        }
    }

    publication::ensure(source, source_conn, &pub_name, tables).await?;
    let removed: Vec<TableName> = removed.into_iter().collect();
    for t in targets.iter().filter(|t| streams(t)) {
        progress::remove_tables(&t.client, t.conn, pipeline, &removed).await?;
    }
    if opts.drop && !removed.is_empty() {
        // A running pipeline may still apply changes it received before the publication
        // changed: drop the tables once it is past them.
        if slot_active.is_some() && !slot_past_now(source, source_conn, pipeline).await? {
            tracing::warn!(pipeline, "the running pipeline did not get past the change within {DROP_WAIT:?}: removed tables are kept; drop them by hand");
        } else {
            for t in targets.iter().filter(|t| streams(t)) {
                drop_tables(&t.client, t.conn, &removed).await?;
            }
            changes.dropped = true;
        }
    }

    // The running pipeline must not confirm its slot past the copy's snapshot before the
    // target streams: it records where it holds the slot, and the snapshot comes after. Read
    // now, after the copy is recorded as begun: a session that takes the slot later sees it
    // and holds for it from its start.
    let in_use = slot::state(source, source_conn, &names::slot(pipeline))
        .await?
        .and_then(|s| s.active_pid)
        .is_some();
    if in_use && !changes.added_targets.is_empty() {
        for t in targets.iter().filter(|t| !streams(t)) {
            await_hold(t, pipeline, &config.path).await?;
        }
    }
    if !copies.is_empty() {
        let snapshot =
            slot::create_temporary(source_conn, &names::slot(pipeline), &pub_name).await?;
        let at = snapshot.consistent_point;
        for (t, new) in targets.iter().zip(&joining_tables) {
            if streams(t) && !new.is_empty() {
                let names: Vec<TableName> = new.iter().map(|i| i.name.clone()).collect();
                progress::set_ready(&t.client, t.conn, pipeline, &names, at).await?;
            }
        }
        changes.copied = copy::copy_all(
            source_conn,
            &snapshot.snapshot,
            pipeline,
            copies,
            opts.jobs,
            progress,
        )
        .await?;
        let seqs =
            super::sequences::of_tables(source, source_conn, &configured, &p.sequences).await?;
        for (t, new) in targets.iter().zip(&joining_tables) {
            if streams(t) {
                let names: Vec<TableName> = new.iter().map(|i| i.name.clone()).collect();
                progress::tables_copied(&t.client, t.conn, pipeline, &names).await?;
            } else {
                progress::finish_copy(&t.client, t.conn, pipeline, at).await?;
                sequences::bring(source, source_conn, &t.client, t.conn, &seqs).await?;
            }
        }
        snapshot.release();
        changes.join_point = Some(at);
    }
    for added in &changes.added_targets {
        for t in targets.iter() {
            progress::clear_cut(&t.client, t.conn, pipeline, added).await?;
        }
    }
    for (name, conn, client) in &gone {
        if opts.drop {
            let listed = progress::table_joins(client, conn, pipeline).await?;
            drop_tables(client, conn, &listed.into_keys().collect::<Vec<_>>()).await?;
        }
        progress::forget(client, conn, pipeline).await?;
        progress::drop_origins(client, conn, &names::all_origins(pipeline, name)).await?;
        for t in targets.iter() {
            progress::clear_cut(&t.client, t.conn, pipeline, name).await?;
        }
    }
    tracing::info!(
        pipeline,
        added_tables = ?changes.added_tables,
        removed_tables = ?changes.removed_tables,
        added_targets = ?changes.added_targets,
        removed_targets = ?changes.removed_targets,
        "pipeline changed"
    );
    Ok(SetupOutcome::Changed {
        pipeline: pipeline.to_string(),
        changes,
    })
}

/// Makes `table` ready to be copied into `t`: created if missing (and allowed), emptied when
/// `replace` (rows of an interrupted or outdated copy), else checked to be empty.
async fn prepare_table(
    source: &Client,
    source_conn: &ConnInfo,
    t: &SetupTarget<'_>,
    table: &TableInfo,
    create: bool,
    replace: bool,
) -> Result<TableCopy, SyncError> {
    let target =
        schema::ensure_table(source, source_conn, &t.client, t.conn, table, create).await?;
    let name = table.name.quoted();
    if replace {
        tracing::info!(target = %t.name, "emptying {} for a new copy", table.name);
        t.client
            .batch_execute(&format!("TRUNCATE {name}"))
            .await
            .map_err(|e| {
                PgError::query(format!("emptying {} for a new copy", table.name), t.conn, e)
            })?;
    } else {
        let has_rows: bool = t
            .client
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {name})"), &[])
            .await
            .map_err(|e| {
                PgError::query(format!("checking that {} is empty", table.name), t.conn, e)
            })?
            .get(0);
        if has_rows {
            return Err(SyncError::TargetNotEmpty {
                table: table.name.to_string(),
                target: t.conn.to_string(),
            });
        }
    }
    Ok(TableCopy {
        source: table.clone(),
        target,
        target_name: t.name.to_string(),
        target_conn: t.conn.clone(),
    })
}

/// How long setup waits for a running pipeline to hold its slot for a joining target (it
/// reads its configuration and its targets every 2 s).
const HOLD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits until the running pipeline records on `t` where it holds the slot for its copy.
async fn await_hold(
    t: &SetupTarget<'_>,
    pipeline: &str,
    config_path: &std::path::Path,
) -> Result<(), SyncError> {
    let deadline = std::time::Instant::now() + HOLD_WAIT;
    loop {
        let row = progress::load(&t.client, t.conn, pipeline).await?;
        if let Some(at) = row.as_ref().and_then(progress::held) {
            tracing::info!(pipeline, target = %t.name, "the running pipeline holds its slot at {at}: copying");
            return Ok(());
        }
        if row.as_ref().is_some_and(progress::released) {
            return Err(SyncError::Config(format!(
                "the running pipeline {pipeline} stopped holding its slot for the copy of target {} (it kept more WAL than max_retained_wal allows); run `invsync sync setup {pipeline}` again to copy the target anew",
                t.name
            )));
        }
        if std::time::Instant::now() > deadline {
            return Err(SyncError::Config(format!(
                "pipeline {pipeline} is streaming but did not take target {} in within {HOLD_WAIT:?}: the running `invsync sync run {pipeline}` \
                 (or agent) reads its targets from {}; run it with this configuration (or stop it), then run setup again",
                t.name,
                config_path.display()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// How long `--drop` waits for a running pipeline to get past the publication's change.
const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until the pipeline's slot is confirmed past the source's current position (every
/// target holds, or does not need, what came before), up to [`DROP_WAIT`]; false if it is not.
async fn slot_past_now(
    source: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<bool, SyncError> {
    let now: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| PgError::query("reading the WAL position", conn, e))?
        .get(0);
    let now: Lsn = now.parse().unwrap_or_default();
    let deadline = std::time::Instant::now() + DROP_WAIT;
    while std::time::Instant::now() < deadline {
        let state = slot::state(source, conn, &names::slot(pipeline)).await?;
        if state
            .and_then(|s| s.confirmed_flush)
            .is_some_and(|c| c >= now)
        {
            return Ok(true);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(false)
}

async fn drop_tables(
    client: &Client,
    conn: &ConnInfo,
    tables: &[TableName],
) -> Result<(), SyncError> {
    for t in tables {
        tracing::info!("dropping {t} on {conn}");
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", t.quoted()))
            .await
            .map_err(|e| PgError::query(format!("dropping {t}"), conn, e))?;
    }
    Ok(())
}

/// Databases of the configuration, other than the pipeline's source and targets, that keep the
/// pipeline's bookkeeping from this source: targets removed from it. One that cannot be
/// reached is named in the log and left alone.
async fn former_targets(
    config: &Config,
    p: &PipelineConfig,
) -> Result<Vec<(String, ConnInfo, Client)>, SyncError> {
    let mut out = Vec::new();
    for (name, db) in &config.databases {
        let Ok(db) = db else { continue };
        if *name == p.source || p.targets.contains(name) {
            continue;
        }
        let client = match db.conn.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(database = %name, "not checked for a former target of {}: {e}", p.name);
                continue;
            }
        };
        if let Some(row) = progress::load(&client, &db.conn, &p.name).await? {
            if row.source == p.source {
                out.push((name.clone(), db.conn.clone(), client));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joins(list: &[(&str, bool, Option<u64>)]) -> HashMap<TableName, TableJoin> {
        list.iter()
            .map(|&(n, copying, ready)| {
                (
                    TableName::new("public", n),
                    TableJoin {
                        copying,
                        ready: ready.map(Lsn),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_joining_table_takes_changes_from_its_copy_point_on() {
        let j = joins(&[
            ("invoice", false, None),
            ("item", true, None),
            ("carrier", true, Some(100)),
            ("donation", false, Some(100)),
        ]);
        let t = |n: &str, at: u64| turn(&j, &TableName::new("public", n), Lsn(at));
        assert_eq!(t("invoice", 5), Turn::Apply);
        // Position not recorded yet: nothing can be decided.
        assert_eq!(t("item", 5), Turn::Wait);
        // Before the copy's snapshot: the copy holds it.
        assert_eq!(t("carrier", 99), Turn::Skip);
        assert_eq!(t("donation", 99), Turn::Skip);
        // After: applied, once the copy is done.
        assert_eq!(t("carrier", 100), Turn::Wait);
        assert_eq!(t("donation", 100), Turn::Apply);
        // Not the pipeline's table on this target (removed, or never added).
        assert_eq!(t("audit", 500), Turn::Skip);
        // A target that keeps no list applies all.
        assert_eq!(
            turn(&HashMap::new(), &TableName::new("public", "x"), Lsn(1)),
            Turn::Apply
        );
    }
}
