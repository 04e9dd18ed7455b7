//! Sequence positions, as sync brings them to targets and verify checks them: which sequences
//! the tables' serial and identity columns own, and each one's last value
//! (`pg_sequence_last_value`: `None` for a sequence never used, or one that does not exist).
//! Sequences are not transactional: a value read is the one current when read, whatever the
//! session's snapshot.

use tokio_postgres::Client;

use super::{ConnInfo, PgError, TableName};

/// A sequence a table's column owns (serial or identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSequence {
    pub sequence: TableName,
    pub table: TableName,
    pub column: String,
}

/// The sequences owned by columns of `tables`, ordered by name.
pub async fn owned(
    client: &Client,
    conn: &ConnInfo,
    tables: &[TableName],
) -> Result<Vec<OwnedSequence>, PgError> {
    let quoted: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = client
        .query(
            "SELECT sn.nspname::text, s.relname::text, tn.nspname::text, t.relname::text, a.attname::text \
             FROM pg_depend d \
             JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
             JOIN pg_namespace sn ON sn.oid = s.relnamespace \
             JOIN pg_class t ON t.oid = d.refobjid \
             JOIN pg_namespace tn ON tn.oid = t.relnamespace \
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
               AND d.deptype IN ('a', 'i') \
               AND d.refobjid IN (SELECT to_regclass(x)::oid FROM unnest($1::text[]) x) \
             ORDER BY 1, 2",
            &[&quoted],
        )
        .await
        .map_err(|e| PgError::query("listing the tables' sequences", conn, e))?;
    Ok(rows
        .iter()
        .map(|r| OwnedSequence {
            sequence: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            table: TableName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            column: r.get(4),
        })
        .collect())
}

/// What one sequence holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceValue {
    pub exists: bool,
    /// `None`: never used (or missing).
    pub last: Option<i64>,
    /// Counts down (a negative increment): "ahead" means smaller.
    pub descending: bool,
}

impl SequenceValue {
    /// True when this sequence has handed out, or may hand out without colliding, every value
    /// up to `needed` in its direction.
    pub fn covers(&self, needed: i64) -> bool {
        self.last.is_some_and(|last| {
            if self.descending {
                last <= needed
            } else {
                last >= needed
            }
        })
    }
}

/// Each sequence's last value and direction, in the order given, and whether it exists.
pub async fn last_values(
    client: &Client,
    conn: &ConnInfo,
    sequences: &[TableName],
) -> Result<Vec<SequenceValue>, PgError> {
    let quoted: Vec<String> = sequences.iter().map(TableName::quoted).collect();
    let rows = client
        .query(
            "SELECT r IS NOT NULL, pg_sequence_last_value(r), \
                    coalesce((SELECT seqincrement < 0 FROM pg_sequence WHERE seqrelid = r), false) \
             FROM unnest($1::text[]) WITH ORDINALITY AS u(s, i), LATERAL to_regclass(s) AS r \
             ORDER BY i",
            &[&quoted],
        )
        .await
        .map_err(|e| PgError::query("reading sequences", conn, e))?;
    Ok(rows
        .iter()
        .map(|r| SequenceValue {
            exists: r.get(0),
            last: r.get(1),
            descending: r.get(2),
        })
        .collect())
}
