//! Bookkeeping on each target, in the `invsync` schema: per pipeline its state (copying or
//! streaming) and the source commit LSN applied so far, and per table its phase and the
//! position at which it joined the stream (see [`super::join`]); and the targets of the
//! pipeline that were cut loose for holding too much WAL (kept on the other targets, since the
//! cut one was unreachable).
//!
//! The applied LSN is the end LSN of the last source commit whose changes the target holds. It
//! is written by [`record`] inside the same target transaction as those changes, so it can never
//! disagree with the data: after a crash, resuming from it neither loses nor repeats a change.
//! It only moves forward; an attempt to move it back (a second process applying the same
//! pipeline) is an error.
//!
//! Fencing: a pipeline run by the agent carries its lease's [`Fence`]. The pipeline's row keeps
//! in `fence_epoch` the highest epoch that has committed a batch on this target, and each fenced
//! batch raises it with [`fence`] in the batch's own transaction, just before [`record`]: a batch
//! whose epoch is lower fails (and rolls back) with [`SyncError::Fenced`]. The row lock that
//! statement takes is held until the batch commits, so two holders' batches are serialised and
//! the older one, whichever reaches the row second, is refused. A run without a fence (the
//! command line) neither checks nor raises the epoch.

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, GenericClient};

use super::writer::{changed, one_row, Check};
use super::SyncError;
use crate::pg::{quote_literal, ConnInfo, Fence, Lsn, PgError, TableName};

const INSTALL: &str = "
CREATE SCHEMA IF NOT EXISTS invsync;
CREATE TABLE IF NOT EXISTS invsync.pipeline (
    pipeline text PRIMARY KEY,
    source text NOT NULL,
    slot text NOT NULL,
    state text NOT NULL CHECK (state IN ('copying', 'streaming')),
    applied_lsn pg_lsn,
    applied_commit_time timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    fence_epoch bigint
);
CREATE TABLE IF NOT EXISTS invsync.pipeline_table (
    pipeline text NOT NULL REFERENCES invsync.pipeline ON DELETE CASCADE,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    phase text NOT NULL CHECK (phase IN ('copying', 'streaming')),
    rows_copied bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (pipeline, table_schema, table_name)
);
ALTER TABLE invsync.pipeline ADD COLUMN IF NOT EXISTS fence_epoch bigint;
ALTER TABLE invsync.pipeline ADD COLUMN IF NOT EXISTS missing_rows bigint NOT NULL DEFAULT 0;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'invsync.pipeline_table'::regclass
        AND attname = 'ready_lsn' AND NOT attisdropped) THEN
        ALTER TABLE invsync.pipeline_table ADD COLUMN ready_lsn pg_lsn;
    END IF; END $$;
CREATE TABLE IF NOT EXISTS invsync.target_cut (
    pipeline text NOT NULL,
    target text NOT NULL,
    cut_lsn pg_lsn NOT NULL,
    cut_at timestamptz NOT NULL DEFAULT now(),
    reason text NOT NULL,
    PRIMARY KEY (pipeline, target)
);";

/// Adds the columns newer versions keep (`fence_epoch`, `missing_rows`) to a pipeline table
/// created by an older version, without taking the table's lock when they are there already,
/// and the table of targets cut loose.
const ADD_COLUMNS: &str = "DO $$ BEGIN \
    IF (SELECT count(*) FROM pg_attribute WHERE attrelid = 'invsync.pipeline'::regclass \
        AND attname IN ('fence_epoch', 'missing_rows') AND NOT attisdropped) < 2 THEN \
        ALTER TABLE invsync.pipeline ADD COLUMN IF NOT EXISTS fence_epoch bigint, \
            ADD COLUMN IF NOT EXISTS missing_rows bigint NOT NULL DEFAULT 0; \
    END IF; END $$; \
    CREATE TABLE IF NOT EXISTS invsync.target_cut (pipeline text NOT NULL, target text NOT NULL, \
        cut_lsn pg_lsn NOT NULL, cut_at timestamptz NOT NULL DEFAULT now(), reason text NOT NULL, \
        PRIMARY KEY (pipeline, target))";

/// Where a pipeline stands on one target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The initial copy has started and not finished.
    Copying,
    /// The copy is done; changes stream from `applied`.
    Streaming,
}

/// The pipeline's row on a target.
#[derive(Debug, Clone)]
pub struct TargetProgress {
    pub state: State,
    /// The source database's name in the configuration that set the pipeline up.
    pub source: String,
    /// End LSN of the last applied source commit.
    pub applied: Lsn,
    pub applied_commit_time: Option<DateTime<Utc>>,
    /// Updates and deletes whose row was not on the target, applied since setup (0 on a target
    /// set up by a version that did not count them).
    pub missing_rows: i64,
}

/// One table's phase on a target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TablePhase {
    pub table: String,
    /// `copying`, `catching up` or `streaming`.
    pub phase: String,
    pub rows_copied: i64,
    /// For a table added to a streaming pipeline: the stream position its copy was read at;
    /// its changes committed before it are in the copy, later ones are applied.
    pub ready_lsn: Option<Lsn>,
}

/// How a table takes part in the stream on one target (see [`super::join`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableJoin {
    /// The table's copy has not finished on this target.
    pub copying: bool,
    /// Changes committed before this position are in the table's copy (`None`: the table was
    /// copied with the pipeline's first setup, at the slot's own start).
    pub ready: Option<Lsn>,
}

/// A target cut loose for holding too much WAL: it misses changes and needs a new copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cut {
    pub target: String,
    /// What the target held when it was cut.
    pub lsn: Lsn,
    pub at: DateTime<Utc>,
    pub reason: String,
}

fn q<'a>(conn: &'a ConnInfo, what: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError + 'a {
    let what = what.to_string();
    move |e| PgError::query(what, conn, e)
}

/// Creates the `invsync` schema and its tables if missing.
pub async fn install(client: &Client, conn: &ConnInfo) -> Result<(), SyncError> {
    client
        .batch_execute(INSTALL)
        .await
        .map_err(q(conn, "creating the invsync schema"))?;
    Ok(())
}

/// Whether the bookkeeping table `relation` exists (a target never set up, or set up by an
/// older version, lacks it).
async fn exists(client: &Client, conn: &ConnInfo, relation: &str) -> Result<bool, SyncError> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&relation])
        .await
        .map_err(q(conn, &format!("looking for {relation}")))?
        .get::<_, bool>(0))
}

/// The pipeline's row, or `None` when it was never set up on this target (or the schema is
/// missing).
pub async fn load(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<Option<TargetProgress>, SyncError> {
    if !exists(client, conn, "invsync.pipeline").await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            // Through jsonb, so that a table without `missing_rows` (an older version's, read
            // by `status`, which changes nothing) reads as 0.
            "SELECT state, COALESCE(applied_lsn, '0/0')::text, applied_commit_time, \
             COALESCE((to_jsonb(p) ->> 'missing_rows')::bigint, 0), source \
             FROM invsync.pipeline p WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .map_err(q(conn, "reading pipeline progress"))?;
    Ok(row.map(|r| TargetProgress {
        state: if r.get::<_, String>(0) == "streaming" {
            State::Streaming
        } else {
            State::Copying
        },
        applied: r.get::<_, String>(1).parse().unwrap_or_default(),
        applied_commit_time: r.get(2),
        missing_rows: r.get(3),
        source: r.get(4),
    }))
}

/// Marks the start of an initial copy of `tables`.
pub async fn begin_copy(
    client: &mut Client,
    conn: &ConnInfo,
    pipeline: &str,
    source: &str,
    slot: &str,
    tables: &[TableName],
    copy: bool,
) -> Result<(), SyncError> {
    let tx = client
        .transaction()
        .await
        .map_err(q(conn, "starting a transaction"))?;
    tx.execute(
        "INSERT INTO invsync.pipeline (pipeline, source, slot, state) VALUES ($1, $2, $3, 'copying') \
         ON CONFLICT (pipeline) DO UPDATE SET source = $2, slot = $3, state = 'copying', \
             applied_lsn = NULL, applied_commit_time = NULL, updated_at = now()",
        &[&pipeline, &source, &slot],
    )
    .await
    .map_err(q(conn, "recording the pipeline"))?;
    tx.execute(
        "DELETE FROM invsync.pipeline_table WHERE pipeline = $1",
        &[&pipeline],
    )
    .await
    .map_err(q(conn, "recording the pipeline's tables"))?;
    let phase = if copy { "copying" } else { "streaming" };
    for t in tables {
        tx.execute(
            "INSERT INTO invsync.pipeline_table (pipeline, table_schema, table_name, phase) VALUES ($1, $2, $3, $4)",
            &[&pipeline, &t.schema, &t.name, &phase],
        )
        .await
        .map_err(q(conn, "recording the pipeline's tables"))?;
    }
    tx.commit()
        .await
        .map_err(q(conn, "recording the pipeline"))?;
    Ok(())
}

/// The tables this pipeline was copying into on this target when a copy was interrupted.
pub async fn copying_tables(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<Vec<TableName>, SyncError> {
    let rows = client
        .query(
            "SELECT table_schema, table_name FROM invsync.pipeline_table WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .map_err(q(conn, "reading the pipeline's tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The pipeline's tables on this target and how each joins the stream; empty when the target
/// keeps no table list (then every streamed table is applied).
pub async fn table_joins(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<std::collections::HashMap<TableName, TableJoin>, SyncError> {
    // Through jsonb, so that a table list without `ready_lsn` (an older version's) reads.
    let rows = client
        .query(
            "SELECT table_schema, table_name, phase, to_jsonb(t) ->> 'ready_lsn' \
             FROM invsync.pipeline_table t WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .map_err(q(conn, "reading the pipeline's tables"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                TableJoin {
                    copying: r.get::<_, String>(2) == "copying",
                    ready: r.get::<_, Option<String>>(3).and_then(|l| l.parse().ok()),
                },
            )
        })
        .collect())
}

/// Lists `tables` as being copied into this target for the streaming pipeline (their join
/// position not known yet), replacing what an interrupted copy recorded.
pub async fn add_tables(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    tables: &[TableName],
) -> Result<(), SyncError> {
    for t in tables {
        client
            .execute(
                "INSERT INTO invsync.pipeline_table (pipeline, table_schema, table_name, phase) \
                 VALUES ($1, $2, $3, 'copying') ON CONFLICT (pipeline, table_schema, table_name) \
                 DO UPDATE SET phase = 'copying', rows_copied = 0, ready_lsn = NULL",
                &[&pipeline, &t.schema, &t.name],
            )
            .await
            .map_err(q(conn, "recording a table joining the pipeline"))?;
    }
    Ok(())
}

/// Records where the copy of `tables` is read (still copying): the stream applies their
/// changes committed from `lsn` on, once the copy is done.
pub async fn set_ready(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    tables: &[TableName],
    lsn: Lsn,
) -> Result<(), SyncError> {
    set_tables(
        client,
        conn,
        pipeline,
        tables,
        &format!("ready_lsn = '{lsn}'"),
    )
    .await
}

/// Records that the copy of `tables` is complete: the stream takes them over.
pub async fn tables_copied(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    tables: &[TableName],
) -> Result<(), SyncError> {
    set_tables(client, conn, pipeline, tables, "phase = 'streaming'").await
}

async fn set_tables(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    tables: &[TableName],
    set: &str,
) -> Result<(), SyncError> {
    let (schemas, names): (Vec<&str>, Vec<&str>) = tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .unzip();
    client
        .execute(
            &format!(
                "UPDATE invsync.pipeline_table SET {set} WHERE pipeline = $1 \
                 AND (table_schema, table_name) IN (SELECT * FROM unnest($2::text[], $3::text[]))"
            ),
            &[&pipeline, &schemas, &names],
        )
        .await
        .map_err(q(conn, "recording the phase of joining tables"))?;
    Ok(())
}

/// Takes `tables` off the pipeline's list on this target (their rows stay).
pub async fn remove_tables(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    tables: &[TableName],
) -> Result<(), SyncError> {
    for t in tables {
        client
            .execute(
                "DELETE FROM invsync.pipeline_table WHERE pipeline = $1 AND table_schema = $2 AND table_name = $3",
                &[&pipeline, &t.schema, &t.name],
            )
            .await
            .map_err(q(conn, "removing a table from the pipeline"))?;
    }
    Ok(())
}

/// The targets of `pipeline` recorded on this target as cut loose.
pub async fn cuts(client: &Client, conn: &ConnInfo, pipeline: &str) -> Result<Vec<Cut>, SyncError> {
    if !exists(client, conn, "invsync.target_cut").await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT target, cut_lsn::text, cut_at, reason FROM invsync.target_cut WHERE pipeline = $1 ORDER BY target",
            &[&pipeline],
        )
        .await
        .map_err(q(conn, "reading the targets cut loose"))?;
    Ok(rows
        .iter()
        .map(|r| Cut {
            target: r.get(0),
            lsn: r.get::<_, String>(1).parse().unwrap_or_default(),
            at: r.get(2),
            reason: r.get(3),
        })
        .collect())
}

/// Records on this target that `cut.target` was cut loose.
pub async fn record_cut(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    cut: &Cut,
) -> Result<(), SyncError> {
    client
        .batch_execute(ADD_COLUMNS)
        .await
        .map_err(q(conn, "creating invsync.target_cut"))?;
    client
        .execute(
            "INSERT INTO invsync.target_cut (pipeline, target, cut_lsn, cut_at, reason) \
             VALUES ($1, $2, $3::text::pg_lsn, $4, $5) ON CONFLICT (pipeline, target) DO NOTHING",
            &[
                &pipeline,
                &cut.target,
                &cut.lsn.to_string(),
                &cut.at,
                &cut.reason,
            ],
        )
        .await
        .map_err(q(conn, "recording a target cut loose"))?;
    Ok(())
}

/// Forgets that `target` was cut loose (it was copied again, or left the pipeline).
pub async fn clear_cut(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    target: &str,
) -> Result<(), SyncError> {
    if !cuts(client, conn, pipeline).await?.is_empty() {
        client
            .execute(
                "DELETE FROM invsync.target_cut WHERE pipeline = $1 AND target = $2",
                &[&pipeline, &target],
            )
            .await
            .map_err(q(conn, "forgetting a target cut loose"))?;
    }
    Ok(())
}

/// Adds `rows` copied into `table`, in the transaction that copied them.
pub async fn table_copied(
    client: &impl GenericClient,
    conn: &ConnInfo,
    pipeline: &str,
    table: &TableName,
    rows: i64,
) -> Result<(), SyncError> {
    client
        .execute(
            "UPDATE invsync.pipeline_table SET rows_copied = rows_copied + $4 \
             WHERE pipeline = $1 AND table_schema = $2 AND table_name = $3",
            &[&pipeline, &table.schema, &table.name, &rows],
        )
        .await
        .map_err(q(conn, "recording copy progress"))?;
    Ok(())
}

/// Records, on a target whose copy has begun, the position a running pipeline holds its slot at
/// until the copy is done: nothing after it is confirmed, so the copy's snapshot (taken after
/// this is recorded) can stream from its own position. While the target is copying, its
/// `applied_lsn` holds this position (it has applied nothing yet). Kept when already recorded; true when
/// recorded now.
pub async fn record_hold(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    at: Lsn,
) -> Result<bool, SyncError> {
    let n = client
        .execute(
            "UPDATE invsync.pipeline SET applied_lsn = $2::text::pg_lsn, updated_at = now() \
             WHERE pipeline = $1 AND state = 'copying' AND applied_lsn IS NULL",
            &[&pipeline, &at.to_string()],
        )
        .await
        .map_err(q(
            conn,
            "recording where the running pipeline holds its slot",
        ))?;
    Ok(n > 0)
}

/// The position a running pipeline holds its slot at for this target's copy
/// ([`record_hold`]), if one is recorded (and not released).
pub fn held(row: &TargetProgress) -> Option<Lsn> {
    (row.state == State::Copying && row.applied > Lsn(0) && !released(row)).then_some(row.applied)
}

/// What a released hold records in place of the held position: past every snapshot, so the
/// copy can never be marked streaming ([`finish_copy`]).
const RELEASED: Lsn = Lsn(u64::MAX);

/// The running pipeline gave up holding its slot for this target's copy ([`release_hold`]).
pub fn released(row: &TargetProgress) -> bool {
    row.state == State::Copying && row.applied == RELEASED
}

/// Records that the running pipeline no longer holds its slot for this target's copy (it kept
/// more WAL than the pipeline allows): true when the target was still being copied, so the
/// copy will not be marked streaming and the slot may move on; false when the copy had
/// finished first (then it streams, and the hold must stay until the session restarts).
pub async fn release_hold(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<bool, SyncError> {
    let n = client
        .execute(
            "UPDATE invsync.pipeline SET applied_lsn = $2::text::pg_lsn, updated_at = now() \
             WHERE pipeline = $1 AND state = 'copying'",
            &[&pipeline, &RELEASED.to_string()],
        )
        .await
        .map_err(q(
            conn,
            "recording that the slot is no longer held for the copy",
        ))?;
    Ok(n > 0)
}

/// Ends the copy: every table is complete and changes stream from `lsn` on. Fails, changing
/// nothing, when the running pipeline released its hold for the copy meanwhile
/// ([`release_hold`]): the slot may have moved past `lsn`.
pub async fn finish_copy(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
    lsn: Lsn,
) -> Result<(), SyncError> {
    let fail = || q(conn, "recording the end of the copy");
    client.batch_execute("BEGIN").await.map_err(fail())?;
    let finished = client
        .execute(
            "UPDATE invsync.pipeline SET state = 'streaming', applied_lsn = $2::text::pg_lsn, updated_at = now() \
             WHERE pipeline = $1 AND (applied_lsn IS NULL OR applied_lsn <= $2::text::pg_lsn)",
            &[&pipeline, &lsn.to_string()],
        )
        .await
        .map_err(fail())?;
    if finished == 0 {
        client.batch_execute("ROLLBACK").await.map_err(fail())?;
        return Err(SyncError::Config(format!(
            "{conn}: the running pipeline {pipeline} stopped holding its slot for this copy (it kept more WAL than max_retained_wal allows), so the copy cannot stream from where it was taken; run `invsync sync setup {pipeline}` again to copy the target anew, at a quieter time or with a larger max_retained_wal"
        )));
    }
    client
        .execute(
            "UPDATE invsync.pipeline_table SET phase = 'streaming' WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .map_err(fail())?;
    client.batch_execute("COMMIT").await.map_err(fail())?;
    Ok(())
}

/// Makes sure the pipeline table can record fences and missing rows (a target set up by an
/// older version lacks their columns). Called once per apply session.
pub async fn upgrade(client: &Client, conn: &ConnInfo) -> Result<(), SyncError> {
    client
        .batch_execute(ADD_COLUMNS)
        .await
        .map_err(q(conn, "adding columns to invsync.pipeline"))?;
    Ok(())
}

/// The statements that raise the pipeline's `fence_epoch` to `fence`'s epoch in the batch being
/// committed, and their check: it fails with [`SyncError::Fenced`] when a newer epoch wrote the
/// target already (then the batch must not commit). The second statement reads the epoch again
/// in a fresh snapshot, so the error names the epoch that won.
pub fn fence(conn: &ConnInfo, target: &str, pipeline: &str, fence: &Fence) -> (String, Check) {
    let p = quote_literal(pipeline);
    let epoch = fence.epoch;
    let sql = format!(
        "UPDATE invsync.pipeline SET fence_epoch = {epoch} \
         WHERE pipeline = {p} AND COALESCE(fence_epoch, 0) <= {epoch}; \
         SELECT COALESCE(fence_epoch, 0)::text FROM invsync.pipeline WHERE pipeline = {p}"
    );
    let (pipeline, target, fence) = (pipeline.to_string(), target.to_string(), fence.clone());
    let conn = conn.to_string();
    let check: Check = Box::new(move |messages| {
        if changed(messages, 0) == Some(1) {
            return Ok(());
        }
        let newer = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        });
        match newer {
            Some(newer) => Err(SyncError::Fenced {
                pipeline,
                target,
                lease: fence.lease,
                epoch: fence.epoch,
                newer,
            }),
            None => Err(SyncError::NotSetUp {
                pipeline,
                target: conn,
            }),
        }
    });
    (sql, check)
}

/// The statement that records `end_lsn` as applied in the batch being committed, written when
/// its turn comes with the rows the batch found missing (see [`Writer::tally`]), and its check:
/// it must change exactly one row, or the batch must not commit.
///
/// [`Writer::tally`]: super::writer::Writer::tally
pub fn record(
    conn: &ConnInfo,
    pipeline: &str,
    end_lsn: Lsn,
    commit_time: Option<DateTime<Utc>>,
) -> (Box<dyn FnOnce(u64) -> String + Send>, Check) {
    let lsn = quote_literal(&end_lsn.to_string());
    let time = commit_time.map_or("NULL".to_string(), |t| quote_literal(&t.to_rfc3339()));
    let p = quote_literal(pipeline);
    (
        Box::new(move |missing| {
            format!(
                "UPDATE invsync.pipeline SET applied_lsn = {lsn}::pg_lsn, applied_commit_time = {time}::timestamptz, \
                 missing_rows = missing_rows + {missing}, updated_at = now() \
                 WHERE pipeline = {p} AND state = 'streaming' AND applied_lsn < {lsn}::pg_lsn"
            )
        }),
        one_row(SyncError::Protocol(format!(
            "{conn}: pipeline {pipeline} is already applied past {end_lsn} or not set up; is another `invsync sync run {pipeline}` running?"
        ))),
    )
}

/// The tables' phases on this target.
pub async fn tables(
    client: &Client,
    conn: &ConnInfo,
    pipeline: &str,
) -> Result<Vec<TablePhase>, SyncError> {
    let rows = client
        .query(
            "SELECT table_schema || '.' || table_name, phase, rows_copied, to_jsonb(t) ->> 'ready_lsn' \
             FROM invsync.pipeline_table t WHERE pipeline = $1 ORDER BY 1",
            &[&pipeline],
        )
        .await
        .map_err(q(conn, "reading the pipeline's tables"))?;
    Ok(rows
        .iter()
        .map(|r| TablePhase {
            table: r.get(0),
            phase: r.get(1),
            rows_copied: r.get(2),
            ready_lsn: r.get::<_, Option<String>>(3).and_then(|l| l.parse().ok()),
        })
        .collect())
}

/// Removes the pipeline's bookkeeping (not the data).
pub async fn forget(client: &Client, conn: &ConnInfo, pipeline: &str) -> Result<(), SyncError> {
    if load(client, conn, pipeline).await?.is_some() {
        client
            .execute(
                "DELETE FROM invsync.pipeline WHERE pipeline = $1",
                &[&pipeline],
            )
            .await
            .map_err(q(conn, "removing the pipeline's bookkeeping"))?;
        if !cuts(client, conn, pipeline).await?.is_empty() {
            client
                .execute(
                    "DELETE FROM invsync.target_cut WHERE pipeline = $1",
                    &[&pipeline],
                )
                .await
                .map_err(q(conn, "removing the pipeline's bookkeeping"))?;
        }
    }
    Ok(())
}

/// Creates the replication origin `name` if missing.
pub async fn ensure_origin(client: &Client, conn: &ConnInfo, name: &str) -> Result<(), SyncError> {
    client
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE pg_replication_origin_oid($1) IS NULL",
            &[&name],
        )
        .await
        .map_err(q(conn, "creating the replication origin"))?;
    Ok(())
}

/// Drops those of the replication origins `names` that exist.
pub async fn drop_origins(
    client: &Client,
    conn: &ConnInfo,
    names: &[String],
) -> Result<(), SyncError> {
    client
        .execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = ANY($1)",
            &[&names],
        )
        .await
        .map_err(q(conn, "dropping replication origins"))?;
    Ok(())
}
