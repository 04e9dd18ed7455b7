//! Sequences brought from a pipeline's source to its targets: those the replicated tables'
//! serial and identity columns own, and those the pipeline's `sequences` key lists.
//!
//! Logical decoding does not carry sequences, so a promoted target would hand out ids the source
//! already used. `sync setup` brings them once after the initial copy and `sync run` every
//! `sequence_interval`. Invariants:
//! - a target's sequence only moves forward: `setval` runs only when the source's value is
//!   ahead of the target's in the sequence's direction (up, or down for a negative
//!   increment; one set ahead by hand is left alone);
//! - the source's value is `pg_sequence_last_value`, which is WAL-logged up to 32 values ahead
//!   of what was handed out, so the target ends at or ahead of every id the source used (a gap,
//!   never a collision);
//! - a sequence never used on the source (no value yet) is left alone.

use tokio_postgres::Client;

use super::SyncError;
use crate::pg::{self, ConnInfo, PgError, TableName};

/// The sequences owned by `tables` (serial and identity columns) and the `listed` ones, each once,
/// by name.
pub async fn of_tables(
    source: &Client,
    conn: &ConnInfo,
    tables: &[TableName],
    listed: &[TableName],
) -> Result<Vec<TableName>, SyncError> {
    let mut out: Vec<TableName> = Vec::new();
    for o in pg::sequences::owned(source, conn, tables).await? {
        if !out.contains(&o.sequence) {
            out.push(o.sequence);
        }
    }
    for s in listed {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

/// The last value of each of `sequences` on one database (`None`: never used, or missing when
/// `missing_ok`; otherwise a missing one is an error naming it).
pub async fn last_values(
    client: &Client,
    conn: &ConnInfo,
    sequences: &[TableName],
    missing_ok: bool,
) -> Result<Vec<Option<i64>>, SyncError> {
    let values = pg::sequences::last_values(client, conn, sequences).await?;
    let missing: Vec<String> = sequences
        .iter()
        .zip(&values)
        .filter(|(_, v)| !v.exists)
        .map(|(s, _)| s.to_string())
        .collect();
    if !missing_ok && !missing.is_empty() {
        return Err(SyncError::Config(format!(
            "{conn}: sequence(s) {} do not exist; fix `sequences` in the pipeline's configuration",
            missing.join(", ")
        )));
    }
    Ok(values.into_iter().map(|v| v.last).collect())
}

/// The statement that moves each target sequence forward to its source value (see the module
/// documentation); `values` are the source's, in the order of `sequences`. Returns a row per
/// sequence moved. `None` when no source sequence has a value.
pub fn advance_sql(sequences: &[TableName], values: &[Option<i64>]) -> Option<String> {
    let pairs: Vec<String> = sequences
        .iter()
        .zip(values)
        .filter_map(|(s, v)| {
            v.map(|v| format!("({}, {v}::bigint)", crate::pg::quote_literal(&s.quoted())))
        })
        .collect();
    if pairs.is_empty() {
        return None;
    }
    // A sequence missing on the target (no pg_sequence row) is skipped; setval runs only when
    // behind in the sequence's direction (a descending one moves forward by going down).
    Some(format!(
        "SELECT s, setval(q.seqrelid, v) FROM (VALUES {}) AS src(s, v) \
         JOIN pg_sequence q ON q.seqrelid = to_regclass(s) \
         WHERE pg_sequence_last_value(q.seqrelid) IS NULL \
            OR CASE WHEN q.seqincrement < 0 THEN pg_sequence_last_value(q.seqrelid) > v \
                    ELSE pg_sequence_last_value(q.seqrelid) < v END",
        pairs.join(", ")
    ))
}

/// Brings `sequences` from `source` to one target now; returns how many moved.
pub async fn bring(
    source: &Client,
    source_conn: &ConnInfo,
    target: &Client,
    target_conn: &ConnInfo,
    sequences: &[TableName],
) -> Result<usize, SyncError> {
    let values = last_values(source, source_conn, sequences, false).await?;
    let Some(sql) = advance_sql(sequences, &values) else {
        return Ok(0);
    };
    let moved = target
        .query(&sql, &[])
        .await
        .map_err(|e| PgError::query("bringing sequences forward", target_conn, e))?;
    Ok(moved.len())
}
