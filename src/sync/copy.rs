//! The initial copy: every table's rows as of the slot's exported snapshot, piped from the
//! source's `COPY TO` into each target's `COPY FROM`.
//!
//! Every source session imports the snapshot the slot exported (`SET TRANSACTION SNAPSHOT`), so
//! the copy holds exactly the transactions committed before the slot's consistent point, and
//! streaming from that point continues without a gap or an overlap. Work is spread over
//! `jobs` concurrent sessions, across tables and, for large tables, across ranges of pages
//! (`ctid` ranges, which PostgreSQL scans directly). Values go in binary when every column has a
//! built-in type on both sides (binary values of user types embed their OIDs, which differ
//! between clusters), else in text. Each piece commits on its own; an interrupted copy is redone
//! from the start by setup, which empties the tables it was filling. Copy sessions carry
//! replication origins like apply sessions, so a pipeline in the opposite direction does not
//! stream the copied rows back.
//!
//! A target role that is not superuser cannot turn off the target's own foreign keys
//! (`session_replication_role`), so they check every piece as it commits: the copy then runs
//! in waves, each table after the tables it references among those copied ([`waves`]), and a
//! table that references itself in one piece. A cycle of such keys cannot be loaded in any
//! order and is refused before anything is copied.

use std::collections::HashMap;

use futures::{SinkExt, StreamExt, TryStreamExt};

use super::{progress, SyncError};
use crate::cdc::names;
use crate::pg::settings::set_text_form_sql;
use crate::pg::{quote_ident, ConnInfo, PgError, TableInfo};

/// Bytes gathered from the source before they are sent to the target.
const COPY_BUFFER: usize = 128 * 1024;

/// Tables larger than this many pages (8 KiB each) are copied in pieces of this size.
const PIECE_PAGES: i64 = 16384;

/// One table to copy into one target.
pub struct TableCopy {
    pub source: TableInfo,
    pub target: TableInfo,
    pub target_name: String,
    pub target_conn: ConnInfo,
}

/// What the copy did for one table on one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyStats {
    pub table: String,
    pub target: String,
    pub rows: u64,
    pub bytes: u64,
    pub binary: bool,
}

/// Streamed columns: all but generated ones, which the target computes itself.
fn copied_columns(t: &TableInfo) -> Vec<&crate::pg::Column> {
    t.columns.iter().filter(|c| c.generated.is_none()).collect()
}

fn binary_ok(job: &TableCopy) -> bool {
    copied_columns(&job.source).iter().all(|c| {
        c.type_oid < 16384
            && job
                .target
                .columns
                .iter()
                .any(|t| t.name == c.name && t.type_oid == c.type_oid && t.type_name == c.type_name)
    })
}

/// Replication origins for the copy sessions, so rows copied into a target are recognisable as
/// invsync's like streamed ones (a pipeline in the opposite direction does not send them back).
/// One per concurrent session and target: PostgreSQL lets one session at a time use an origin.
struct Origins {
    free: std::sync::Mutex<HashMap<String, Vec<String>>>,
}

/// An origin taken from [`Origins`], given back when dropped.
struct Lease<'a> {
    pool: &'a Origins,
    target: String,
    name: Option<String>,
}

impl Origins {
    fn take(&self, target: &str) -> Lease<'_> {
        let name = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.get_mut(target).and_then(Vec::pop));
        Lease {
            pool: self,
            target: target.to_string(),
            name,
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(name), Ok(mut free)) = (self.name.take(), self.pool.free.lock()) {
            free.entry(self.target.clone()).or_default().push(name);
        }
    }
}

struct Piece {
    job: usize,
    /// Page range `[from, to)`; `to == None` means to the end of the table.
    pages: Option<(i64, Option<i64>)>,
}

/// Told how the initial copy advances, for progress bars. Calls come from the copy sessions,
/// several at once; they must be cheap and must not block.
pub trait CopyProgress: Send + Sync {
    /// Table number `index` (counted from 0, each announced once, in order) is copied from
    /// `table` into `target`; it holds about `bytes` bytes on the source.
    fn table(&self, index: usize, table: &str, target: &str, bytes: u64);
    /// `bytes` more of table number `index` were copied.
    fn copied(&self, index: usize, bytes: u64);
    /// Every table is copied.
    fn finished(&self);
}

/// No progress reporting.
pub struct NoCopyProgress;

impl CopyProgress for NoCopyProgress {
    fn table(&self, _: usize, _: &str, _: &str, _: u64) {}
    fn copied(&self, _: usize, _: u64) {}
    fn finished(&self) {}
}

/// Copies every table in `jobs` concurrent sessions, reading the snapshot `snapshot`.
pub async fn copy_all(
    source_conn: &ConnInfo,
    snapshot: &str,
    pipeline: &str,
    tables: Vec<TableCopy>,
    jobs: usize,
    progress: &dyn CopyProgress,
) -> Result<Vec<CopyStats>, SyncError> {
    let source = source_conn.connect().await?;
    let order = CopyOrder::load(&tables).await?;
    let mut pieces = Vec::new();
    let mut stats = Vec::new();
    for (i, job) in tables.iter().enumerate() {
        let size: i64 = source
            .query_one(
                "SELECT pg_relation_size($1::text::regclass)",
                &[&job.source.name.quoted()],
            )
            .await
            .map_err(|e| PgError::query(format!("sizing {}", job.source.name), source_conn, e))?
            .get(0);
        let pages = size / 8192;
        if pages > PIECE_PAGES && !order.whole[i] {
            let mut from = 0;
            while from < pages {
                let to = from + PIECE_PAGES;
                pieces.push(Piece {
                    job: i,
                    pages: Some((from, (to < pages).then_some(to))),
                });
                from = to;
            }
        } else {
            pieces.push(Piece {
                job: i,
                pages: None,
            });
        }
        progress.table(
            i,
            &job.source.name.to_string(),
            &job.target_name,
            size.max(0) as u64,
        );
        stats.push(CopyStats {
            table: job.source.name.to_string(),
            target: job.target_name.clone(),
            rows: 0,
            bytes: 0,
            binary: binary_ok(job),
        });
    }
    drop(source);

    let jobs = jobs.clamp(1, names::MAX_COPY_JOBS);
    let mut targets: Vec<(&str, &ConnInfo)> = Vec::new();
    for t in &tables {
        if !targets.iter().any(|(n, _)| *n == t.target_name) {
            targets.push((&t.target_name, &t.target_conn));
        }
    }
    let origin_names = |target: &str| -> Vec<String> {
        (0..jobs)
            .map(|k| names::copy_origin(pipeline, target, k))
            .collect()
    };
    let mut free = HashMap::new();
    for (name, conn) in &targets {
        let client = conn.connect().await?;
        for origin in origin_names(name) {
            progress::ensure_origin(&client, conn, &origin).await?;
        }
        free.insert(name.to_string(), origin_names(name));
    }
    let origins = Origins {
        free: std::sync::Mutex::new(free),
    };
    let from = Snapshot {
        conn: source_conn,
        name: snapshot,
        pipeline,
    };

    let mut results: Vec<(usize, u64, u64)> = Vec::new();
    for wave in 0..=order.waves.iter().copied().max().unwrap_or(0) {
        let this_wave = pieces.iter().filter(|p| order.waves[p.job] == wave);
        let done: Vec<(usize, u64, u64)> = futures::stream::iter(this_wave)
            .map(|piece| {
                let job = &tables[piece.job];
                let binary = stats[piece.job].binary;
                let origins = &origins;
                let from = &from;
                async move {
                    let origin = origins.take(&job.target_name);
                    let (rows, bytes) = copy_piece(
                        from,
                        job,
                        piece.pages,
                        binary,
                        (progress, piece.job),
                        origin.name.as_deref(),
                    )
                    .await?;
                    Ok::<_, SyncError>((piece.job, rows, bytes))
                }
            })
            .buffer_unordered(jobs)
            .try_collect()
            .await?;
        results.extend(done);
    }
    for (job, rows, bytes) in results {
        stats[job].rows += rows;
        stats[job].bytes += bytes;
    }
    progress.finished();
    for (name, conn) in &targets {
        let client = conn.connect().await?;
        progress::drop_origins(&client, conn, &origin_names(name)).await?;
    }
    Ok(stats)
}

/// In which order the tables are copied: all at once where each target's foreign keys are
/// off during the copy (a superuser's session), else in [`waves`].
struct CopyOrder {
    /// Per table (index into the copy's tables): its wave, from 0.
    waves: Vec<usize>,
    /// Per table: copied in one piece (it references itself and its keys fire).
    whole: Vec<bool>,
}

impl CopyOrder {
    async fn load(tables: &[TableCopy]) -> Result<CopyOrder, SyncError> {
        let mut order = CopyOrder {
            waves: vec![0; tables.len()],
            whole: vec![false; tables.len()],
        };
        let mut targets: Vec<&str> = tables.iter().map(|t| t.target_name.as_str()).collect();
        targets.sort_unstable();
        targets.dedup();
        for target in targets {
            let jobs: Vec<usize> = (0..tables.len())
                .filter(|&i| tables[i].target_name == target)
                .collect();
            let conn = &tables[jobs[0]].target_conn;
            let client = conn.connect().await?;
            let q = |e| PgError::query("reading the target's foreign keys", conn, e);
            let superuser: bool = client
                .query_one(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                    &[],
                )
                .await
                .map_err(q)?
                .get(0);
            if superuser {
                continue;
            }
            let names: Vec<String> = jobs
                .iter()
                .map(|&i| tables[i].target.name.quoted())
                .collect();
            let rows = client
                .query(
                    "SELECT a.i::int, b.i::int FROM pg_constraint k \
                     JOIN unnest($1::text[]) WITH ORDINALITY a(t, i) ON k.conrelid = to_regclass(a.t) \
                     JOIN unnest($1::text[]) WITH ORDINALITY b(t, i) ON k.confrelid = to_regclass(b.t) \
                     WHERE k.contype = 'f' AND k.conparentid = 0",
                    &[&names],
                )
                .await
                .map_err(q)?;
            // Positions in `jobs`, from SQL's 1-based ordinality.
            let edges: Vec<(usize, usize)> = rows
                .iter()
                .map(|r| {
                    (
                        r.get::<_, i32>(0) as usize - 1,
                        r.get::<_, i32>(1) as usize - 1,
                    )
                })
                .collect();
            for &(child, parent) in &edges {
                if child == parent {
                    order.whole[jobs[child]] = true;
                }
            }
            match waves(jobs.len(), &edges) {
                Ok(w) => {
                    for (k, &i) in jobs.iter().enumerate() {
                        order.waves[i] = w[k];
                    }
                }
                Err(cycle) => {
                    let names: Vec<String> = cycle
                        .iter()
                        .map(|&k| tables[jobs[k]].target.name.to_string())
                        .collect();
                    return Err(SyncError::Config(format!(
                        "foreign keys on {conn} form a cycle among {}: without superuser they \
                         are checked during the initial copy, and no order of the tables \
                         satisfies them; drop one of them on the target until setup is done \
                         and add it back then, or run setup as a superuser",
                        names.join(", ")
                    )));
                }
            }
        }
        Ok(order)
    }
}

/// The wave of each of `n` tables, given foreign keys as (referencing, referenced): every table
/// in a later wave than those it references (a table referencing itself is no constraint on
/// order). Err with the tables on or behind a cycle.
fn waves(n: usize, edges: &[(usize, usize)]) -> Result<Vec<usize>, Vec<usize>> {
    let mut wave = vec![0; n];
    for _ in 0..=n {
        let mut changed = false;
        for &(child, parent) in edges {
            if child != parent && wave[child] <= wave[parent] {
                wave[child] = wave[parent] + 1;
                changed = true;
            }
        }
        if !changed {
            return Ok(wave);
        }
    }
    Err((0..n).filter(|&i| wave[i] >= n).collect())
}

/// Where pieces are read from: the source and the snapshot its slot exported.
struct Snapshot<'a> {
    conn: &'a ConnInfo,
    name: &'a str,
    pipeline: &'a str,
}

async fn copy_piece(
    from: &Snapshot<'_>,
    job: &TableCopy,
    pages: Option<(i64, Option<i64>)>,
    binary: bool,
    (progress, index): (&dyn CopyProgress, usize),
    origin: Option<&str>,
) -> Result<(u64, u64), SyncError> {
    let (source_conn, snapshot, pipeline) = (from.conn, from.name, from.pipeline);
    let table = job.source.name.to_string();
    let fail = |reason: String| SyncError::Copy {
        table: table.clone(),
        target: job.target_conn.to_string(),
        reason,
    };
    let cols: Vec<String> = copied_columns(&job.source)
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let cols = cols.join(", ");
    let range = match pages {
        None => String::new(),
        Some((from, None)) => format!(" WHERE ctid >= '({from},0)'::tid"),
        Some((from, Some(to))) => {
            format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
        }
    };
    let format = if binary { "binary" } else { "text" };

    let mut src = source_conn.connect().await?;
    src.batch_execute(&set_text_form_sql())
        .await
        .map_err(|e| PgError::query("setting session formats", source_conn, e))?;
    let src_tx = src
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| PgError::query("starting the copy transaction", source_conn, e))?;
    src_tx
        .batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            crate::pg::quote_literal(snapshot)
        ))
        .await
        .map_err(|e| PgError::query("importing the slot's snapshot", source_conn, e))?;

    let mut dst = job.target_conn.connect().await?;
    dst.batch_execute(&set_text_form_sql())
        .await
        .map_err(|e| PgError::query("setting session formats", &job.target_conn, e))?;
    if let Some(origin) = origin {
        dst.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
            .map_err(|e| {
                PgError::query(
                    "taking a replication origin for the copy",
                    &job.target_conn,
                    e,
                )
            })?;
    }
    // Like PostgreSQL's own apply workers: no user triggers or foreign-key checks while copying,
    // so tables can be filled in any order. Needs superuser; without it they stay on.
    if let Err(e) = dst
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        tracing::debug!(
            "session_replication_role not set on {}: {}",
            job.target_conn,
            crate::pg::describe(&e)
        );
    }
    let dst_tx = dst
        .transaction()
        .await
        .map_err(|e| PgError::query("starting the copy transaction", &job.target_conn, e))?;

    let out = src_tx
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {}{range}) TO STDOUT (FORMAT {format})",
            job.source.name.quoted()
        ))
        .await
        .map_err(|e| fail(crate::pg::describe(&e)))?;
    let sink = dst_tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY {} ({cols}) FROM STDIN (FORMAT {format})",
            job.target.name.quoted()
        ))
        .await
        .map_err(|e| fail(crate::pg::describe(&e)))?;
    futures::pin_mut!(out);
    futures::pin_mut!(sink);
    // COPY OUT yields one message per row; gather them so the target gets few large messages.
    let mut bytes = 0u64;
    let mut buf = bytes::BytesMut::with_capacity(COPY_BUFFER);
    while let Some(chunk) = out
        .try_next()
        .await
        .map_err(|e| fail(format!("reading: {}", crate::pg::describe(&e))))?
    {
        bytes += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
        if buf.len() >= COPY_BUFFER {
            progress.copied(index, buf.len() as u64);
            sink.feed(buf.split().freeze())
                .await
                .map_err(|e| fail(format!("writing: {}", crate::pg::describe(&e))))?;
        }
    }
    if !buf.is_empty() {
        progress.copied(index, buf.len() as u64);
        sink.feed(buf.freeze())
            .await
            .map_err(|e| fail(format!("writing: {}", crate::pg::describe(&e))))?;
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(|e| fail(format!("writing: {}", crate::pg::describe(&e))))?;
    progress::table_copied(
        &dst_tx,
        &job.target_conn,
        pipeline,
        &job.source.name,
        rows as i64,
    )
    .await?;
    dst_tx
        .commit()
        .await
        .map_err(|e| fail(format!("committing: {}", crate::pg::describe(&e))))?;
    // Release the origin before returning: a dropped client's backend exits only later, and
    // setup drops the copy origins as soon as every piece is done.
    if origin.is_some() {
        dst.batch_execute("SELECT pg_replication_origin_session_reset()")
            .await
            .map_err(|e| {
                PgError::query(
                    "releasing the copy's replication origin",
                    &job.target_conn,
                    e,
                )
            })?;
    }
    src_tx
        .commit()
        .await
        .map_err(|e| PgError::query("ending the copy transaction", source_conn, e))?;
    Ok((rows, bytes))
}

#[cfg(test)]
mod tests {
    use super::waves;

    #[test]
    fn tables_come_after_those_they_reference_and_cycles_are_named() {
        // 0 items -> 1 invoices -> 2 sellers; 3 references itself; 4 stands alone.
        assert_eq!(
            waves(5, &[(0, 1), (1, 2), (0, 2), (3, 3)]),
            Ok(vec![2, 1, 0, 0, 0])
        );
        assert_eq!(waves(3, &[(0, 1), (1, 0), (2, 0)]), Err(vec![0, 1, 2]));
    }
}
