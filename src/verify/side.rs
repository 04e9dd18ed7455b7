//! One side of a comparison (the source or the target): a connection whose session renders
//! every value the same way, and the queries verification runs on it.
//!
//! Invariant: both sides' sessions fix every setting that changes a value's text (time zone,
//! date and interval styles, float digits, bytea and money output), so equal rows render to
//! byte-identical text whatever the servers' defaults are.

use std::collections::HashMap;
use std::str::FromStr;

use tokio_postgres::Client;

use super::keyrange::{BucketSet, Key, KeyRange, Shape};
use crate::pg::{ConnInfo, Lsn, PgError, TableInfo, TableName};

/// Settings that fix how values are written as text. `extra_float_digits = 3` gives the
/// shortest exact form of floats; `ISO, YMD` and `UTC` make dates and timestamptz absolute.
/// JIT is off: compiling the checksum expressions costs more than it saves.
const SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET lc_monetary = 'C'; SET standard_conforming_strings = on; SET xmloption = content; \
     SET statement_timeout = 0; SET jit = off; SET application_name = 'invsync verify'";

/// The checksum of one bucket: how many rows and the exact sum of their hashes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Checksum {
    pub rows: i64,
    pub sum: String,
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
            .batch_execute(SESSION)
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
    /// bucket order; one scan. It costs about what a plain checksum of the whole table costs,
    /// and says where the differences are.
    pub async fn checksums(&self, shape: &Shape, count: u32) -> Result<Vec<Checksum>, PgError> {
        // Joining the bucket number to a VALUES list (rather than grouping by the expression)
        // tells the planner how few groups there are, so it aggregates inside parallel
        // workers as a plain count/sum would, instead of sorting or funnelling every row.
        let buckets: Vec<String> = (0..count).map(|b| format!("({b})")).collect();
        let sql = format!(
            "SELECT v.invsync_bucket, count(*), coalesce(sum({}), 0)::text FROM {} \
             JOIN (VALUES {}) AS v(invsync_bucket) ON v.invsync_bucket = {} \
             WHERE {} GROUP BY v.invsync_bucket",
            shape.row_hash(),
            shape.quoted,
            buckets.join(", "),
            shape.bucket_of(count),
            shape.range_where(&KeyRange::default())
        );
        let rows = self
            .client
            .query(&sql, &[])
            .await
            .map_err(self.err(format!("computing checksums of {}", shape.table)))?;
        let mut out = vec![
            Checksum {
                rows: 0,
                sum: "0".into()
            };
            count as usize
        ];
        for r in rows {
            let b: i32 = r.get(0);
            if let Some(slot) = usize::try_from(b).ok().and_then(|b| out.get_mut(b)) {
                *slot = Checksum {
                    rows: r.get(1),
                    sum: r.get(2),
                };
            }
        }
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
                let step = (rows.max(1) as u64).div_ceil(parts as u64).max(1) as i64;
                let sql = format!(
                    "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS rn FROM {} WHERE {}) s \
                     WHERE rn > 1 AND rn % {step} = 1 ORDER BY rn",
                    shape.key_text(),
                    shape.key_order(),
                    shape.key_order(),
                    shape.quoted,
                    shape.range_where(range)
                );
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

    /// The rows with these keys (that pass the filter), each column as text.
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
            .map(|c| format!("t.{}::text", c.quoted))
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
