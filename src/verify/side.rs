//! One side of a comparison (the source or the target): a connection whose session renders
//! every value the same way, and the queries verification runs on it.
//!
//! Invariant: both sides' sessions fix every setting that changes a value's text (time zone,
//! date and interval styles, float digits, bytea and money output), so equal rows render to
//! byte-identical text whatever the servers' defaults are.

use std::collections::HashMap;
use std::str::FromStr;

use futures::TryStreamExt;

use tokio_postgres::Client;

use crate::cdc::CdcError;
use crate::pg::keyrange::{BucketSet, Key, KeyRange, Shape};
use crate::pg::settings::set_text_form_sql;
use crate::pg::{ConnInfo, Lsn, PgError, TableInfo, TableName};

/// Settings of a scan besides the text form ([`set_text_form_sql`]): JIT is off, as
/// compiling the checksum expressions costs more than it saves.
const SCAN: &str =
    "SET statement_timeout = 0; SET jit = off; SET application_name = 'invsync verify'";

/// The checksum of one bucket: how many rows and the sum of their 64-bit hashes (exact below
/// 2^63 rows).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Checksum {
    pub rows: i64,
    pub sum: i128,
}

/// Block ranges a table of `pages` blocks is read in for checksums, as conditions on `ctid`
/// (the last one open-ended, as `relpages` is an estimate). Each is read by one process, so
/// there are twice as many as the processes a query may have (`workers` and the leader), for
/// them to share the work evenly and for progress to move, but none smaller than
/// `MIN_BLOCKS`.
fn block_ranges(pages: i32, workers: i32) -> Vec<String> {
    const MIN_BLOCKS: u64 = 256;
    let pages = u64::from(pages.max(0).unsigned_abs());
    let processes = u64::from(workers.clamp(0, 7).unsigned_abs()) + 1;
    let n = (pages / MIN_BLOCKS).clamp(1, 2 * processes.max(2));
    if n == 1 {
        return vec![String::new()];
    }
    let step = pages.div_ceil(n);
    (0..n)
        .map(|i| {
            let lo = format!(" AND ctid >= '({},0)'::tid", i * step);
            if i + 1 < n {
                format!("{lo} AND ctid < '({},0)'::tid", (i + 1) * step)
            } else {
                lo
            }
        })
        .collect()
}

/// A row fetched for comparison: every column as text, `None` for NULL.
pub(crate) type RowText = Vec<Option<String>>;

pub(crate) struct Side {
    client: Client,
    conn: ConnInfo,
}

impl Side {
    /// Connects and fixes the session's rendering settings.
    pub async fn open(conn: &ConnInfo) -> Result<Side, PgError> {
        let client = conn.connect().await?;
        client
            .batch_execute(&format!("{} {SCAN}", set_text_form_sql()))
            .await
            .map_err(|e| PgError::query("fixing the session's output settings", conn, e))?;
        Ok(Side {
            client,
            conn: conn.clone(),
        })
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
        let what = what.into();
        move |e| PgError::query(what, &self.conn, e)
    }

    /// The tables a pattern names on this side.
    pub async fn resolve(
        &self,
        pattern: &crate::config::TablePattern,
    ) -> Result<Vec<TableName>, PgError> {
        crate::pg::resolve_tables(&self.client, &self.conn, std::slice::from_ref(pattern)).await
    }

    /// The tables `publication` streams, or `None` if it does not exist.
    pub async fn published(
        &self,
        publication: &str,
    ) -> Result<Option<Vec<TableName>>, crate::cdc::CdcError> {
        crate::cdc::publication::tables(&self.client, &self.conn, publication).await
    }

    pub async fn describe(&self, table: &TableName) -> Result<TableInfo, PgError> {
        TableInfo::load(&self.client, &self.conn, table).await
    }

    /// Opens a read-only repeatable-read transaction and pins its snapshot. Returns the WAL
    /// position every commit visible in the snapshot precedes (None on a standby).
    pub async fn begin_snapshot(&self) -> Result<Option<Lsn>, PgError> {
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(self.err("starting a snapshot"))?;
        self.current_lsn().await
    }

    /// Opens a read-only repeatable-read transaction on the snapshot another session exported
    /// (a temporary slot's, see [`crate::cdc::slot::TemporarySlot`]).
    pub async fn begin_snapshot_at(&self, snapshot: &str) -> Result<(), PgError> {
        self.client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                crate::pg::quote_literal(snapshot)
            ))
            .await
            .map_err(self.err("importing the source's snapshot"))
    }

    /// The end of the last source commit that `pipeline` has applied to this target, as the
    /// pipeline records it in the same transaction as the applied changes (the `invsync.pipeline`
    /// row of `sync`); None when the pipeline does not stream into this database. Inside a
    /// snapshot, it is the position of exactly the rows the snapshot shows.
    pub async fn applied_position(&self, pipeline: &str) -> Result<Option<Lsn>, PgError> {
        let installed = self
            .client
            .query_one("SELECT to_regclass('invsync.pipeline') IS NOT NULL", &[])
            .await
            .map_err(self.err("looking for the pipeline's progress"))?
            .get::<_, bool>(0);
        if !installed {
            return Ok(None);
        }
        let row = self
            .client
            .query_opt(
                "SELECT applied_lsn::text FROM invsync.pipeline \
                 WHERE pipeline = $1 AND state = 'streaming'",
                &[&pipeline],
            )
            .await
            .map_err(self.err("reading the pipeline's progress"))?;
        Ok(row
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|s| Lsn::from_str(&s).ok()))
    }

    /// Ends the snapshot transaction (it only read).
    pub async fn end_snapshot(&self) -> Result<(), PgError> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(self.err("ending a snapshot"))
    }

    /// The current WAL insert position; None on a standby, where there is none.
    pub async fn current_lsn(&self) -> Result<Option<Lsn>, PgError> {
        let row = self
            .client
            .query_one(
                "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END",
                &[],
            )
            .await
            .map_err(self.err("reading the WAL position"))?;
        Ok(row
            .get::<_, Option<String>>(0)
            .and_then(|s| Lsn::from_str(&s).ok()))
    }

    /// How far the slot named `slot` has been confirmed by its consumer; None when there is no
    /// such slot or it was never confirmed.
    pub async fn slot_confirmed(&self, slot: &str) -> Result<Option<Lsn>, CdcError> {
        Ok(crate::cdc::slot::state(&self.client, &self.conn, slot)
            .await?
            .and_then(|s| s.confirmed_flush))
    }

    /// How far the logical replication slots streaming from this database have been confirmed
    /// (the least of them), i.e. up to where their consumers have durably applied changes.
    /// Slots whose name contains `hint` are preferred; None when no slot is in use.
    pub async fn slots_confirmed(&self, hint: Option<&str>) -> Result<Option<Lsn>, PgError> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(min(confirmed_flush_lsn) FILTER (WHERE slot_name LIKE '%' || $1 || '%'), \
                                 min(confirmed_flush_lsn))::text \
                 FROM pg_replication_slots \
                 WHERE slot_type = 'logical' AND database = current_database() AND active",
                &[&hint.map(|h| h.to_lowercase()).unwrap_or_default()],
            )
            .await
            .map_err(self.err("reading replication slots"))?;
        Ok(row
            .get::<_, Option<String>>(0)
            .and_then(|s| Lsn::from_str(&s).ok()))
    }

    /// What orders each key column's text on this server, in key order: the provider, locale
    /// and recorded version of its collation (the database's for the default one), or None
    /// for a column without collation (numbers, dates). Read from whole catalog rows as JSON,
    /// so the columns' names, which change between PostgreSQL versions, need not be known.
    pub async fn key_collations(&self, shape: &Shape) -> Result<Vec<Option<String>>, PgError> {
        let names: Vec<&str> = shape.key.iter().map(|c| c.name.as_str()).collect();
        let rows = self
            .client
            .query(
                "SELECT CASE WHEN a.attcollation = 0 THEN NULL \
                    WHEN a.attcollation = 'pg_catalog.default'::regcollation THEN \
                      (SELECT string_agg(j.key || '=' || j.value, ' ' ORDER BY j.key) \
                       FROM pg_database d, jsonb_each_text(to_jsonb(d) - 'datacl') j \
                       WHERE d.datname = current_database() AND j.key ~ '^dat(locprovider|collate|ctype|icu|locale|collversion)') \
                    ELSE \
                      (SELECT string_agg(j.key || '=' || j.value, ' ' ORDER BY j.key) \
                       FROM pg_collation c, jsonb_each_text(to_jsonb(c)) j \
                       WHERE c.oid = a.attcollation AND j.key ~ '^coll(provider|isdeterministic|collate|ctype|icu|locale|version)') \
                    END \
                 FROM unnest($2::text[]) WITH ORDINALITY k(name, n) \
                 JOIN pg_attribute a ON a.attrelid = $1::text::regclass AND a.attname = k.name \
                 ORDER BY k.n",
                &[&shape.quoted, &names],
            )
            .await
            .map_err(self.err(format!("reading the key's collations of {}", shape.table)))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The planner's estimate of the table's rows (-1 when never analyzed).
    pub async fn estimated_rows(&self, shape: &Shape) -> Result<f64, PgError> {
        let row = self
            .client
            .query_one(
                "SELECT reltuples::float8 FROM pg_class WHERE oid = $1::text::regclass",
                &[&shape.quoted],
            )
            .await
            .map_err(self.err(format!("estimating the size of {}", shape.table)))?;
        Ok(row.get(0))
    }

    /// The checksum of each of `count` key hash buckets of the table ([`Shape::bucket_of`]), in
    /// bucket order; one scan, costing about what a plain checksum of the whole table costs.
    /// The table is read in a few block ranges, one branch of a UNION ALL each, which the
    /// server may run in parallel workers and whose results arrive as each range is done:
    /// `scanned` is told how many rows each finished range held, so progress moves.
    pub async fn checksums(
        &self,
        shape: &Shape,
        count: u32,
        scanned: &mut dyn FnMut(u64),
    ) -> Result<Vec<Checksum>, PgError> {
        let what = || format!("computing checksums of {}", shape.table);
        let sizes = self
            .client
            .query_one(
                "SELECT relpages, current_setting('max_parallel_workers_per_gather')::int \
                 FROM pg_class WHERE oid = $1::text::regclass",
                &[&shape.quoted],
            )
            .await
            .map_err(self.err(what()))?;
        let branches: Vec<String> = block_ranges(sizes.get(0), sizes.get(1))
            .iter()
            .map(|blocks| {
                format!(
                    "SELECT {bucket}, count(*), coalesce(sum({}), 0)::text FROM {table} WHERE {}{blocks} \
                     GROUP BY 1",
                    shape.row_hash(),
                    shape.range_where(&KeyRange::default()),
                    bucket = shape.bucket_of(count),
                    table = shape.quoted,
                )
            })
            .collect();
        // The planner cannot know how few buckets there are, and would sort every row into
        // its group; hashing them is right, and needs no sort.
        self.client
            .batch_execute("SET LOCAL enable_sort = off")
            .await
            .map_err(self.err(what()))?;
        let rows = self
            .client
            .query_raw(&branches.join(" UNION ALL "), std::iter::empty::<i32>())
            .await
            .map_err(self.err(what()))?;
        futures::pin_mut!(rows);
        let mut out = vec![Checksum::default(); count as usize];
        while let Some(row) = rows.try_next().await.map_err(self.err(what()))? {
            let bucket: i32 = row.get(0);
            let rows: i64 = row.get(1);
            let sum: &str = row.get(2);
            let sum: i128 = sum.parse().map_err(|_| {
                PgError::Invalid(format!(
                    "checksum {sum:?} of {} on {} is not an integer",
                    shape.table, self.conn
                ))
            })?;
            if let Some(slot) = usize::try_from(bucket).ok().and_then(|b| out.get_mut(b)) {
                slot.rows += rows;
                slot.sum = slot.sum.wrapping_add(sum);
            }
            scanned(rows.max(0) as u64);
        }
        self.client
            .batch_execute("RESET enable_sort")
            .await
            .map_err(self.err(what()))?;
        Ok(out)
    }

    /// Keys that cut `range` into about `parts` pieces of equal row count. With `sample_percent`
    /// the keys come from a row sample (one cheap pass, no hashing); without, from every key in the
    /// range (`rows` is its row count), read in key order from the primary key index.
    pub async fn boundaries(
        &self,
        shape: &Shape,
        range: &KeyRange,
        parts: usize,
        rows: i64,
        sample_percent: Option<f64>,
    ) -> Result<Vec<Key>, PgError> {
        if parts < 2 {
            return Ok(Vec::new());
        }
        let what = format!("sampling key boundaries of {}", shape.table);
        let n = shape.key.len();
        let to_key =
            |r: &tokio_postgres::Row| (0..n).map(|i| r.get::<_, String>(i)).collect::<Key>();
        match sample_percent {
            Some(pct) => {
                let sql = format!(
                    "SELECT {} FROM {} TABLESAMPLE BERNOULLI ({pct}) REPEATABLE (0) WHERE {} ORDER BY {}",
                    shape.key_text(),
                    shape.quoted,
                    shape.range_where(range),
                    shape.key_order()
                );
                let keys: Vec<Key> = self
                    .client
                    .query(&sql, &[])
                    .await
                    .map_err(self.err(what))?
                    .iter()
                    .map(to_key)
                    .collect();
                let step = keys.len().div_ceil(parts).max(1);
                Ok(keys.into_iter().skip(step).step_by(step).collect())
            }
            None => {
                let step = (rows.max(1) as u64).div_ceil(parts as u64);
                let sql = shape.boundaries_sql(range, step);
                let rows = self.client.query(&sql, &[]).await.map_err(self.err(what))?;
                Ok(rows.iter().map(to_key).collect())
            }
        }
    }

    /// Every row of `range` whose key falls in `buckets`, as (key, row hash), in key order. The
    /// caller keeps slices small enough for memory.
    pub async fn row_hashes(
        &self,
        shape: &Shape,
        range: &KeyRange,
        buckets: &BucketSet,
    ) -> Result<Vec<(Key, i64)>, PgError> {
        let n = shape.key.len();
        let sql = format!(
            "SELECT {}, {} FROM {} WHERE {} ORDER BY {}",
            shape.key_text(),
            shape.row_hash(),
            shape.quoted,
            shape.slice_where(range, buckets),
            shape.key_order()
        );
        let rows = self
            .client
            .query(&sql, &[])
            .await
            .map_err(self.err(format!("reading row hashes of {}", shape.table)))?;
        Ok(rows
            .iter()
            .map(|r| ((0..n).map(|i| r.get::<_, String>(i)).collect(), r.get(n)))
            .collect())
    }

    /// `keys` in the order of the table's key on this server, each key once under the key
    /// type's own equality: of keys equal but written differently (numeric 1.0 and 1.00), the
    /// first in `keys` stays.
    pub async fn sort_keys(&self, shape: &Shape, keys: &[Key]) -> Result<Vec<Key>, PgError> {
        let n = shape.key.len();
        let order = shape.lookup_key_order();
        let sql = format!(
            "SELECT DISTINCT ON ({order}) {} FROM {} ORDER BY {order}, v.invsync_n",
            shape.lookup_key_text(),
            shape.keys_values(keys),
        );
        let rows = self
            .client
            .query(&sql, &[])
            .await
            .map_err(self.err(format!("sorting keys of {}", shape.table)))?;
        Ok(rows
            .iter()
            .map(|r| (0..n).map(|i| r.get::<_, String>(i)).collect())
            .collect())
    }

    /// `keys` (each column's text) as their types' output functions render them, in order.
    pub async fn output_forms(&self, shape: &Shape, keys: &[Key]) -> Result<Vec<Key>, PgError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let n = shape.key.len();
        let sql = format!(
            "SELECT {} FROM {} ORDER BY v.invsync_n",
            shape.lookup_key_output(),
            shape.keys_values(keys),
        );
        let rows = self
            .client
            .query(&sql, &[])
            .await
            .map_err(self.err(format!("rendering keys of {}", shape.table)))?;
        Ok(rows
            .iter()
            .map(|r| (0..n).map(|i| r.get::<_, String>(i)).collect())
            .collect())
    }

    /// The rows with these keys (that pass the filter), each column as its type's output
    /// function renders it.
    pub async fn fetch_rows(
        &self,
        shape: &Shape,
        keys: &[Key],
    ) -> Result<HashMap<Key, RowText>, PgError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let n = shape.key.len();
        let m = shape.columns.len();
        let key_cols = shape.lookup_key_text();
        let cols: Vec<String> = shape
            .columns
            .iter()
            // The type's output function, as the change stream renders values: a cast to text
            // may differ (`character(n)` drops its padding).
            .map(|c| {
                format!(
                    "CASE WHEN t.{q} IS NOT NULL THEN format('%s', t.{q}) END",
                    q = c.quoted
                )
            })
            .collect();
        let sql = format!(
            "SELECT {}, {} FROM {} AS t {} WHERE TRUE{}",
            key_cols,
            cols.join(", "),
            shape.quoted,
            shape.keys_join(keys),
            shape.filter_and()
        );
        let rows = self
            .client
            .query(&sql, &[])
            .await
            .map_err(self.err(format!("reading rows of {}", shape.table)))?;
        Ok(rows
            .iter()
            .map(|r| {
                let key: Key = (0..n).map(|i| r.get::<_, String>(i)).collect();
                let row: RowText = (n..n + m).map(|i| r.get::<_, Option<String>>(i)).collect();
                (key, row)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::block_ranges;

    #[test]
    fn block_ranges_cover_the_table_and_follow_the_workers() {
        assert_eq!(block_ranges(0, 2), vec![String::new()]);
        assert_eq!(block_ranges(511, 2), vec![String::new()]);
        assert_eq!(
            block_ranges(513, 2),
            vec![
                " AND ctid >= '(0,0)'::tid AND ctid < '(257,0)'::tid".to_string(),
                " AND ctid >= '(257,0)'::tid".to_string(),
            ]
        );
        // Twice as many as the processes, at least four.
        assert_eq!(block_ranges(1_000_000, 2).len(), 6);
        assert_eq!(block_ranges(1_000_000, 0).len(), 4);
    }
}
