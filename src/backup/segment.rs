//! Table segments: a table's data as key ranges, and the rule that lets a backup take a
//! segment over from the previous snapshot of the same database (its *parent*) without
//! reading the segment's rows.
//!
//! A table with a primary key is stored as segments `lo <= key < hi` under the server's
//! ordering of the key (bounds as the text of each key column, see `pg::keyrange`), in
//! key order, covering the whole key space: the first has no `lo`, the last no `hi`, and each
//! `lo` is the previous `hi`. A table without a primary key is one unbounded segment. Each
//! segment is dumped with a chunker of its own, so its chunks hold exactly its rows and a
//! table's chunk list is its segments' chunk lists one after the other (what restore reads).
//!
//! # Reuse
//!
//! A segment of the parent is reused (its chunk list copied, its rows not read) iff, in the
//! new cut, (a) no visible row in its range has an inserting transaction (`xmin`) that may be
//! newer than the parent's cut, and (b) it holds as many rows as it did then. Why that proves
//! the rows are the same: a visible row whose `xmin` is older than the parent snapshot's xmin
//! was committed before the parent's cut, and was not deleted as of it (a deletion committed
//! by then would hide it now too), so it was visible in the parent's cut, in the same range
//! (a key change is a new row version with a new `xmin`) and with the same content. So the
//! rows now form a subset of the parent's, and equal counts make them equal.
//!
//! `xmin` is the raw inserting xid: freezing (VACUUM, `VACUUM FREEZE`, `COPY FREEZE`) only
//! sets a flag and leaves it readable (PostgreSQL 9.4 and later), and VACUUM FULL / CLUSTER
//! copy it. It is 32 bits; `age(xmin)` (its distance below the reader transaction's next xid)
//! places it in the full xid space: exactly for every row newer than the parent's cut, as long
//! as fewer than 2^30 xids separate the two cuts, and only ever too new for rows frozen long
//! ago, which costs a re-read, never a wrong reuse (see [`Since::newer_rows`]).
//!
//! What else must hold, checked before any segment of a table is reused (otherwise the table
//! is read whole, still within the same cut):
//! - the same transaction history: same cluster (system identifier), same timeline (a
//!   point-in-time restore starts a new one and may hand out xids again), the cut's WAL
//!   position and next xid not before the parent's, and fewer than 2^31 xids between them;
//! - the same rows' source: the relation and every partition or inheritance child read through
//!   it have the same oids (a table renamed into place, `ATTACH PARTITION` of old rows);
//! - the same text for the same tuples: same copied columns and types, same key, same labels
//!   of the enums the columns use (`ALTER TYPE .. RENAME VALUE` changes no tuple), and the
//!   readers' session settings that shape COPY text are fixed (see
//!   [`TEXT_FORM`](crate::pg::settings::TEXT_FORM));
//! - the same order of text keys: a range `lo <= key < hi` over a collatable key column holds
//!   the rows its collation puts there, so each such column must compare under the same
//!   collation at the same version, both the version the catalog records
//!   (`pg_collation.collversion`, or `pg_database.datcollversion` for the database's own) and
//!   the one its library reports now (an operating system or ICU upgrade changes that one
//!   first) (see [`KeyCollation`]); a parent that did not record them is not trusted for a
//!   table with such a key;
//! - every chunk of the segment is still listed in the repository's index.
//!
//! A table whose parent segments cannot be reused is read whole, and the backup says why
//! ([`Reread`]).
//!
//! A segment that is read again keeps its bounds; one grown past [`SPLIT_ROWS`] (where new
//! keys land, usually the last) is cut into pieces of [`SEGMENT_ROWS`] rows.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::dump::TableSchema;
use super::snapshot::TableSnapshot;
use super::BackupError;
use crate::pg::keyrange::{Col, Key, KeyRange, Shape};
use crate::pg::{ConnInfo, Lsn, PgError, TableName};

/// Rows per segment when a range is cut.
pub const SEGMENT_ROWS: u64 = 65_536;
/// A segment read again is cut when it holds more rows than this.
pub const SPLIT_ROWS: u64 = 2 * SEGMENT_ROWS;

/// Where a cut lies in the source's transaction history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutPoint {
    /// `pg_control_system().system_identifier`, as text.
    pub system: String,
    pub timeline: u32,
    /// The cut snapshot's xmin and xmax (`pg_current_snapshot()`), as full 64-bit xids.
    pub xmin: u64,
    pub xmax: u64,
    /// The xids in progress at the cut (`pg_snapshot_xip`): with `xmax`, which committed
    /// transactions the cut sees ([`CutPoint::sees`]). `None` in snapshots written before it
    /// was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xip: Option<Vec<u64>>,
}

impl CutPoint {
    /// Whether the cut sees the committed transaction `xid` (32-bit, as the change stream
    /// sends it); `None` when the cut's in-progress list was not recorded.
    pub fn sees(&self, xid: u32) -> Option<bool> {
        let xip = self.xip.as_ref()?;
        // The full xid is the one within 2^31 of xmax (xids are compared modulo 2^32).
        let diff = xid.wrapping_sub(self.xmax as u32) as i32 as i64;
        let full = (self.xmax as i64 + diff) as u64;
        Some(full < self.xmax && !xip.contains(&full))
    }
}

/// One table's data as key-range segments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Segments {
    /// Oids of the relation and of every partition or inheritance child its rows come from,
    /// ascending.
    pub relations: Vec<u32>,
    /// What the rows' text depends on besides the tuples ([`text_shape`]).
    pub text_shape: String,
    /// The collations of the collatable key columns, in key order ([`key_collations`]);
    /// `None` in snapshots written before they were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_collations: Option<Vec<KeyCollation>>,
    /// In key order, covering the key space.
    pub list: Vec<Segment>,
}

/// One key range of a table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Segment {
    pub lo: Option<Vec<String>>,
    pub hi: Option<Vec<String>>,
    pub rows: u64,
    /// Bytes of COPY text.
    pub bytes: u64,
    /// How many of the table's chunks, after those of the segments before it, hold it.
    pub chunks: usize,
}

impl Segment {
    pub(crate) fn range(&self) -> KeyRange {
        KeyRange {
            lo: self.lo.clone(),
            hi: self.hi.clone(),
        }
    }
}

/// The cut point of the transaction begun by `dump::begin_cut` on `client`; `None` when the
/// server cannot tell (before PostgreSQL 13, or the control functions are not granted), and
/// then no later backup reuses this one's segments.
pub async fn cut_point(client: &Client, conn: &ConnInfo) -> Result<Option<CutPoint>, BackupError> {
    let q = |e| {
        BackupError::Db(PgError::query(
            "reading the cut's transaction position",
            conn,
            e,
        ))
    };
    // Asked first, since a failing statement would end the cut's transaction.
    let able: bool = client
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 130000 \
             AND has_function_privilege('pg_control_system()', 'EXECUTE') \
             AND has_function_privilege('pg_control_checkpoint()', 'EXECUTE')",
            &[],
        )
        .await
        .map_err(q)?
        .get(0);
    if !able {
        return Ok(None);
    }
    // The timeline WAL is written on now; a standby's is its last restartpoint's.
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
               CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint()) \
                 ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
               pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text, \
               ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x) \
             FROM pg_current_snapshot() s",
            &[],
        )
        .await
        .map_err(q)?;
    let xid = |i: usize| {
        row.get::<_, String>(i)
            .parse::<u64>()
            .map_err(|e| BackupError::Invalid(format!("the server reported a bad xid: {e}")))
    };
    Ok(Some(CutPoint {
        system: row.get(0),
        timeline: row.get::<_, i32>(1) as u32,
        xmin: xid(2)?,
        xmax: xid(3)?,
        xip: Some(
            row.get::<_, Vec<String>>(4)
                .iter()
                .map(|x| {
                    x.parse::<u64>().map_err(|e| {
                        BackupError::Invalid(format!("the server reported a bad xid: {e}"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    }))
}

/// The transactions between a parent's cut and the new one, as far as the new cut may
/// reuse the parent's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// The parent's snapshot xmin: every xid below it had ended at the parent's cut.
    parent_xmin: u64,
    /// The new snapshot's xmax: every visible row's xmin is below it.
    now_xmax: u64,
}

/// How the cut `now` follows the parent's cut; `None` when it does not continue the parent's
/// history (see the module documentation), and then nothing may be reused.
pub fn since(parent: (&CutPoint, Lsn), now: (&CutPoint, Lsn)) -> Option<Since> {
    let ((p, p_lsn), (n, n_lsn)) = (parent, now);
    if p.system != n.system || p.timeline != n.timeline || n_lsn < p_lsn || n.xmax < p.xmin {
        return None;
    }
    // Rows newer than the parent's cut must lie less than 2^31 xids below the next xid for
    // the 32-bit xmin to place them.
    (n.xmax - p.xmin < 1 << 30).then_some(Since {
        parent_xmin: p.xmin,
        now_xmax: n.xmax,
    })
}

/// The low 32 bits of the xid `age(xid)` counts from in the transaction on `client` (the next
/// xid when it first asked, fixed for the rest of the transaction, at or after the cut's
/// xmax). `age(xid)` is parallel restricted, so parallel workers never count from another.
pub async fn age_base(client: &Client, conn: &ConnInfo) -> Result<u32, BackupError> {
    let age: i32 = client
        .query_one("SELECT age('3'::xid)", &[])
        .await
        .map_err(|e| PgError::query("reading the transaction counter", conn, e))?
        .get(0);
    Ok((age as u32).wrapping_add(3))
}

impl Since {
    /// The SQL condition true for every visible row whose `xmin` may be newer than the
    /// parent's cut, in a transaction whose [`age_base`] is `base`. A row newer than the
    /// parent's cut has `0 < age(xmin) <= base - parent xmin < 2^31` exactly; rows older
    /// than 2^31 xids may wrap into that window too (a needless re-read, never a wrong
    /// reuse); the special xids (frozen before 9.4, bootstrap) have an age of `INT_MAX`.
    pub fn newer_rows(&self, base: u32) -> String {
        let base = self.now_xmax + (u64::from(base).wrapping_sub(self.now_xmax) & 0xffff_ffff);
        let window = base - self.parent_xmin;
        if window >= i32::MAX as u64 {
            return "TRUE".into();
        }
        format!("age(xmin) <= {window}")
    }
}

/// Oids of `table` and of every partition or inheritance child below it, ascending.
pub async fn relations(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
) -> Result<Vec<u32>, BackupError> {
    let rows = client
        .query(
            "WITH RECURSIVE r(oid) AS (SELECT $1::text::regclass::oid \
               UNION SELECT i.inhrelid FROM pg_inherits i JOIN r ON i.inhparent = r.oid) \
             SELECT oid FROM r ORDER BY 1",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the partitions of {table}"), conn, e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What the COPY text of `schema`'s rows depends on besides the stored tuples: the copied
/// columns and their types, the key, and the labels of every enum a column's type is, is a
/// domain over, or an array of.
pub async fn text_shape(
    client: &Client,
    conn: &ConnInfo,
    schema: &TableSchema,
) -> Result<String, BackupError> {
    let enums: String = client
        .query_one(
            "WITH RECURSIVE ty(oid) AS (SELECT atttypid FROM pg_attribute \
               WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
               UNION SELECT unnest(ARRAY[t.typbasetype, t.typelem]) FROM pg_type t JOIN ty ON t.oid = ty.oid) \
             SELECT coalesce(string_agg(format('%s:%s', e.enumtypid, e.enumlabel), ',' \
               ORDER BY e.enumtypid, e.enumsortorder), '') \
             FROM pg_enum e WHERE e.enumtypid IN (SELECT oid FROM ty)",
            &[&schema.name.quoted()],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the enum types of {}", schema.name), conn, e))?
        .get(0);
    let columns: Vec<String> = schema
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .map(|c| format!("{} {}", c.name, c.type_name))
        .collect();
    Ok(format!(
        "columns ({}) key ({}) enums ({enums})",
        columns.join(", "),
        schema.primary_key.join(", ")
    ))
}

/// The collation a collatable key column compares under, with what tells whether its order
/// may have changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCollation {
    pub column: String,
    /// Schema-qualified and quoted (`pg_catalog."default"` for the database's own).
    pub collation: String,
    /// `c` (libc), `i` (ICU) or `b` (builtin); the database's provider for its own collation.
    pub provider: String,
    /// The version the catalog records: `pg_collation.collversion`, or the database's
    /// `datcollversion` for its own collation (PostgreSQL 15 and later).
    pub recorded: Option<String>,
    /// The version of the collation library the server uses now.
    pub actual: Option<String>,
}

impl std::fmt::Display for KeyCollation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        write!(
            f,
            "{} (provider {}, version {} recorded, {} in use)",
            self.collation,
            self.provider,
            v(&self.recorded),
            v(&self.actual)
        )
    }
}

/// Per collatable key column in key order: its collation, provider, recorded and actual
/// version; for the database's own collation (oid 100) the database's. Before PostgreSQL 15
/// the database records no version of its collation (always libc then): the version of
/// libc's collations stands in for it, unless the database sorts as `C`/`POSIX`, which never
/// changes.
fn key_collations_sql(server_version: i32) -> String {
    let (provider, recorded, actual) = match server_version >= 150000 {
        true => (
            "d.datlocprovider::text",
            "d.datcollversion",
            "pg_database_collation_actual_version(d.oid)",
        ),
        false => (
            "'c'",
            "NULL",
            "CASE WHEN d.datcollate IN ('C', 'POSIX') THEN NULL \
               ELSE (SELECT pg_collation_actual_version(l.oid) FROM pg_collation l \
                 WHERE l.collprovider = 'c' AND l.collcollate NOT IN ('C', 'POSIX') \
                 ORDER BY l.oid LIMIT 1) END",
        ),
    };
    format!(
        "SELECT k.col, format('%I.%I', n.nspname, c.collname), \
           CASE WHEN c.oid = 100 THEN {provider} ELSE c.collprovider::text END, \
           CASE WHEN c.oid = 100 THEN {recorded} ELSE c.collversion END, \
           CASE WHEN c.oid = 100 THEN {actual} ELSE pg_collation_actual_version(c.oid) END \
         FROM unnest($2::text[]) WITH ORDINALITY k(col, i) \
         JOIN pg_attribute a ON a.attrelid = $1::text::regclass AND a.attname = k.col \
         JOIN pg_collation c ON c.oid = a.attcollation \
         JOIN pg_namespace n ON n.oid = c.collnamespace \
         CROSS JOIN pg_database d WHERE d.datname = current_database() \
         ORDER BY k.i"
    )
}

/// The collations of `schema`'s collatable key columns (text, varchar, domains and arrays of
/// them), in key order, as the server has them now.
pub async fn key_collations(
    client: &Client,
    conn: &ConnInfo,
    schema: &TableSchema,
) -> Result<Vec<KeyCollation>, BackupError> {
    let err = |e| {
        PgError::query(
            format!("reading the key collations of {}", schema.name),
            conn,
            e,
        )
    };
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(err)?
        .get(0);
    let rows = client
        .query(
            &key_collations_sql(version),
            &[&schema.name.quoted(), &schema.primary_key],
        )
        .await
        .map_err(err)?;
    Ok(rows
        .iter()
        .map(|r| KeyCollation {
            column: r.get(0),
            collation: r.get(1),
            provider: r.get(2),
            recorded: r.get(3),
            actual: r.get(4),
        })
        .collect())
}

/// Why a table was read whole although a parent snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reread {
    /// The parent stored the table as one piece, or as segments that do not cover its key
    /// space.
    NotSegmented,
    /// The name now reads other relations (a table renamed into place, partitions attached
    /// or detached).
    OtherRelations,
    /// Columns, their types, the key or an enum's labels changed.
    OtherText,
    /// The parent did not record the collation of this key column.
    CollationUnrecorded { column: String },
    /// The key column compares under another collation, or another version of it.
    CollationChanged {
        column: String,
        before: Box<KeyCollation>,
        now: Box<KeyCollation>,
    },
}

impl std::fmt::Display for Reread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reread::NotSegmented => write!(f, "the previous snapshot does not hold it as key-range segments"),
            Reread::OtherRelations => write!(f, "its name now reads other relations (renamed, or partitions attached or detached)"),
            Reread::OtherText => write!(f, "its columns, key or enum labels changed"),
            Reread::CollationUnrecorded { column } => write!(
                f,
                "the previous snapshot did not record the collation of key column {column}"
            ),
            Reread::CollationChanged { column, before, now } => write!(
                f,
                "key column {column} compared under {before} and now under {now}, which may order keys differently; if the collation library was upgraded, rebuild the indexes using it and run ALTER COLLATION .. REFRESH VERSION (or ALTER DATABASE .. REFRESH COLLATION VERSION)"
            ),
        }
    }
}

impl Reread {
    /// Whether the reason concerns key order, which may also affect the table's indexes.
    pub fn is_collation(&self) -> bool {
        matches!(
            self,
            Reread::CollationUnrecorded { .. } | Reread::CollationChanged { .. }
        )
    }
}

/// Rows and pages of `relations` by the planner's statistics; `None` when one of them was
/// never analyzed.
pub async fn estimate(
    client: &Client,
    conn: &ConnInfo,
    relations: &[u32],
) -> Result<Option<(f64, f64)>, BackupError> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(reltuples), 0)::float8, coalesce(sum(relpages), 0)::float8, \
               coalesce(bool_or(reltuples < 0), false) \
             FROM pg_class WHERE oid = ANY($1::oid[]) AND relkind <> 'p'",
            &[&relations],
        )
        .await
        .map_err(|e| PgError::query("reading table statistics", conn, e))?;
    Ok((!row.get::<_, bool>(2)).then(|| (row.get(0), row.get(1))))
}

/// Keys cutting a table of about `rows` rows on `pages` pages into pieces of about
/// [`SEGMENT_ROWS`] rows, from a block sample (about ten blocks per piece): one cheap pass
/// over a few pages instead of every key. The pieces are only roughly equal; any keys would
/// do, since segments need not be of equal size to be correct.
pub(crate) fn sample_sql(shape: &Shape, rows: f64, pages: f64) -> (String, usize) {
    let parts = (rows / SEGMENT_ROWS as f64).ceil().max(1.0);
    let percent = (100.0 * parts * 10.0 / pages.max(1.0)).clamp(0.001, 100.0);
    (
        format!(
            "SELECT {} FROM {} TABLESAMPLE SYSTEM ({percent:.4}) ORDER BY {}",
            shape.key_text(),
            shape.quoted,
            shape.key_order()
        ),
        parts as usize,
    )
}

/// `parts - 1` keys spread evenly over `sample` (ascending, distinct), fewer if it is short.
pub fn evenly(sample: Vec<Key>, parts: usize) -> Vec<Key> {
    let n = sample.len();
    let mut picks: Vec<usize> = (1..parts.max(1)).map(|i| i * n / parts).collect();
    picks.dedup();
    picks.retain(|&i| i > 0 && i < n);
    picks.into_iter().map(|i| sample[i].clone()).collect()
}

/// The key-range view of `schema`: `None` without a primary key.
pub(crate) fn key_shape(schema: &TableSchema) -> Option<Shape> {
    if schema.primary_key.is_empty() {
        return None;
    }
    let columns = schema
        .columns
        .iter()
        .map(|c| Col {
            name: c.name.clone(),
            quoted: crate::pg::quote_ident(&c.name),
            type_name: c.type_name.clone(),
            generated: c.generated.is_some(),
        })
        .collect();
    Some(Shape::new(&schema.name, columns, &schema.primary_key, None))
}

/// `SELECT count(*), count(*) FILTER (WHERE newer)` over `range`: the check of a parent's
/// segment.
pub(crate) fn check_sql(
    schema: &TableSchema,
    shape: Option<&Shape>,
    range: &KeyRange,
    newer: &str,
) -> String {
    let filter = shape
        .map(|s| s.range_where(range))
        .unwrap_or_else(|| "TRUE".into());
    format!(
        "SELECT count(*), count(*) FILTER (WHERE {newer}) FROM {} WHERE {filter}",
        schema.name.quoted()
    )
}

/// The parent's segments of a table, with each segment's chunk list, when they may be
/// reused: the parent holds the table as well-formed segments with the same relations, text
/// shape and key collations (see the module documentation); otherwise why not.
pub fn parent_segments<'a>(
    parent: &'a TableSnapshot,
    relations: &[u32],
    text_shape: &str,
    collations: &[KeyCollation],
) -> Result<Vec<(&'a Segment, &'a [super::crypto::BlobId])>, Reread> {
    let segs = parent.segments.as_ref().ok_or(Reread::NotSegmented)?;
    if segs.relations != relations {
        return Err(Reread::OtherRelations);
    }
    if segs.text_shape != text_shape {
        return Err(Reread::OtherText);
    }
    same_collations(segs.key_collations.as_deref(), collations)?;
    let mut out = Vec::with_capacity(segs.list.len());
    let mut at = 0usize;
    let mut prev_hi: Option<&Key> = None;
    for (i, s) in segs.list.iter().enumerate() {
        // Covering the key space: no gap, no overlap, nothing beyond either end.
        let starts_right = if i == 0 {
            s.lo.is_none()
        } else {
            s.lo.is_some() && s.lo.as_ref() == prev_hi
        };
        if !starts_right {
            return Err(Reread::NotSegmented);
        }
        prev_hi = s.hi.as_ref();
        let chunks = at
            .checked_add(s.chunks)
            .and_then(|end| parent.chunks.get(at..end))
            .ok_or(Reread::NotSegmented)?;
        at += s.chunks;
        out.push((s, chunks));
    }
    match !out.is_empty() && prev_hi.is_none() && at == parent.chunks.len() {
        true => Ok(out),
        false => Err(Reread::NotSegmented),
    }
}

/// Whether the key collations recorded with a parent (`None`: not recorded) are `now`'s.
fn same_collations(before: Option<&[KeyCollation]>, now: &[KeyCollation]) -> Result<(), Reread> {
    let Some(before) = before else {
        return match now.first() {
            Some(k) => Err(Reread::CollationUnrecorded {
                column: k.column.clone(),
            }),
            None => Ok(()),
        };
    };
    for k in now {
        match before.iter().find(|b| b.column == k.column) {
            Some(b) if b == k => {}
            Some(b) => {
                return Err(Reread::CollationChanged {
                    column: k.column.clone(),
                    before: Box::new(b.clone()),
                    now: Box::new(k.clone()),
                })
            }
            None => {
                return Err(Reread::CollationUnrecorded {
                    column: k.column.clone(),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(timeline: u32, xmin: u64, xmax: u64) -> CutPoint {
        CutPoint {
            system: "7".into(),
            timeline,
            xmin,
            xmax,
            xip: None,
        }
    }

    #[test]
    fn a_cut_sees_what_committed_before_it() {
        let mut c = cut(1, 100, 105);
        assert_eq!(
            c.sees(99),
            None,
            "without the in-progress list nobody can tell"
        );
        c.xip = Some(vec![100, 103]);
        assert_eq!(c.sees(99), Some(true));
        assert_eq!(c.sees(101), Some(true));
        assert_eq!(c.sees(103), Some(false));
        assert_eq!(c.sees(105), Some(false));
        // Across the 32-bit wrap: xmax in epoch 1.
        let mut w = cut(1, (1 << 32) + 2, (1 << 32) + 5);
        w.xip = Some(Vec::new());
        assert_eq!(w.sees(u32::MAX), Some(true));
        assert_eq!(w.sees(4), Some(true));
        assert_eq!(w.sees(5), Some(false));
    }

    #[test]
    fn history_must_continue() {
        let lsn = |n: u64| Lsn(n);
        let p = cut(1, 1000, 1010);
        assert!(since((&p, lsn(5)), (&cut(1, 2000, 2005), lsn(9))).is_some());
        // A new timeline, an earlier WAL position or xid counter, another cluster, too far.
        assert!(since((&p, lsn(5)), (&cut(2, 2000, 2005), lsn(9))).is_none());
        assert!(since((&p, lsn(5)), (&cut(1, 2000, 2005), lsn(4))).is_none());
        assert!(since((&p, lsn(5)), (&cut(1, 900, 999), lsn(9))).is_none());
        let mut other = cut(1, 2000, 2005);
        other.system = "8".into();
        assert!(since((&p, lsn(5)), (&other, lsn(9))).is_none());
        assert!(since((&p, lsn(5)), (&cut(1, 1 << 31, 1000 + (1 << 31)), lsn(9))).is_none());
    }

    #[test]
    fn newer_rows_across_an_epoch() {
        // Parent xmin just below 2^32; the reader's age base 7 xids after the new cut's xmax,
        // past the wrap of the 32-bit counter.
        let p = cut(1, (1 << 32) - 10, (1 << 32) - 5);
        let now = cut(1, (1 << 32) + 3, (1 << 32) + 5);
        let s = since((&p, Lsn(1)), (&now, Lsn(1))).unwrap();
        assert_eq!(s.newer_rows(12), "age(xmin) <= 22");
        // Right at the cut.
        assert_eq!(s.newer_rows(5), "age(xmin) <= 15");
    }

    #[test]
    fn key_collations_must_match() {
        let k = |column: &str, recorded: &str| KeyCollation {
            column: column.into(),
            collation: "pg_catalog.\"en-US-x-icu\"".into(),
            provider: "i".into(),
            recorded: Some(recorded.into()),
            actual: Some("153.120".into()),
        };
        let now = [k("code", "153.120")];
        assert_eq!(same_collations(Some(&now), &now), Ok(()));
        // Neither before nor now a collatable key.
        assert_eq!(same_collations(None, &[]), Ok(()));
        assert!(matches!(
            same_collations(None, &now),
            Err(Reread::CollationUnrecorded { column }) if column == "code"
        ));
        assert!(matches!(
            same_collations(Some(&[k("code", "x")]), &now),
            Err(Reread::CollationChanged { column, .. }) if column == "code"
        ));
        let mut other = now[0].clone();
        other.actual = Some("154.1".into());
        assert!(same_collations(Some(&now), &[other.clone()]).is_err());
        other.actual = now[0].actual.clone();
        other.collation = "pg_catalog.\"C\"".into();
        assert!(same_collations(Some(&now), &[other]).is_err());
    }

    #[test]
    fn boundaries_from_a_sample() {
        let keys: Vec<Key> = (0..10).map(|i| vec![i.to_string()]).collect();
        assert_eq!(evenly(keys.clone(), 2), vec![vec!["5".to_string()]]);
        assert_eq!(evenly(keys.clone(), 1), Vec::<Key>::new());
        // More pieces than sampled keys: every key once, never the first.
        assert_eq!(evenly(keys[..3].to_vec(), 8).len(), 2);
        assert!(evenly(Vec::new(), 4).is_empty());
    }
}
