//! Table dumps: a consistent cut of several tables, and the schema needed to recreate them.
//!
//! All tables of a backup are read at one instant: a `REPEATABLE READ READ ONLY` transaction
//! takes the cut ([`begin_cut`]) and exports its snapshot ([`export_snapshot`]); each reader
//! connection imports it ([`join_cut`]), so tables read at once on several connections still
//! show the very same database state. The exporting transaction stays open until every
//! reader is done (an exported snapshot lives only as long as it). Each table is read in key
//! ranges (its segments, see `segment`) with `COPY (SELECT cols FROM t WHERE range ORDER BY
//! pk) TO STDOUT` (text format, portable across server versions); ordering by the primary key
//! makes unchanged key ranges produce the same bytes, hence the same chunks, every day.
//!
//! The recorded LSN is read by the transaction's first statement, which also takes its
//! snapshot: every transaction visible in the cut committed at or before that LSN. (A commit
//! racing that statement may sit just below the LSN without being visible; replaying the WAL
//! archive from this LSN must therefore be idempotent, as sync's apply is.)
//!
//! The schema saved per table: columns (type, NOT NULL, default, identity, generation
//! expression), primary key, unique / check / exclusion constraints, other indexes, and the
//! state of the sequences its columns own. Not saved: foreign keys (restore loads tables in
//! any order), triggers, policies, grants, user-defined types (they must exist on the target).
//! A partitioned table is saved through its parent and restored as one plain table.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::BackupError;
use crate::pg::{quote_ident, ConnInfo, Lsn, PgError, TableName};

/// What restore needs to recreate one table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableSchema {
    pub name: TableName,
    pub columns: Vec<ColumnDef>,
    pub primary_key: Vec<String>,
    /// `(name, definition)` as `pg_get_constraintdef` writes it (primary key first).
    pub constraints: Vec<(String, String)>,
    /// `CREATE INDEX` statements of indexes that back no constraint.
    pub indexes: Vec<String>,
    pub sequences: Vec<SequenceState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    pub type_name: String,
    pub not_null: bool,
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT) for identity columns.
    pub identity: Option<String>,
    /// Expression of a `GENERATED ALWAYS AS (...) STORED` column (not dumped, recomputed).
    pub generated: Option<String>,
}

/// A sequence owned by a column (serial or identity) and its position at the cut.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SequenceState {
    pub column: String,
    /// Qualified and quoted, as `pg_get_serial_sequence` returns it.
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// Starts the cut on `client`; returns its LSN. End it with `COMMIT`.
pub async fn begin_cut(client: &Client, conn: &ConnInfo) -> Result<Lsn, BackupError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| PgError::query("starting the backup transaction", conn, e))?;
    let row = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(|e| PgError::query("reading the WAL position of the cut", conn, e))?;
    let text: String = row.get(0);
    text.parse().map_err(|e: String| BackupError::Invalid(e))
}

/// Exports the snapshot of the cut begun on `client` by [`begin_cut`], for [`join_cut`].
pub async fn export_snapshot(client: &Client, conn: &ConnInfo) -> Result<String, BackupError> {
    let row = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| PgError::query("exporting the snapshot of the backup", conn, e))?;
    Ok(row.get(0))
}

/// Starts a transaction on `client` that sees exactly the cut `snapshot` exported; end it
/// with `COMMIT`. Fails if the exporting transaction has ended.
pub async fn join_cut(client: &Client, conn: &ConnInfo, snapshot: &str) -> Result<(), BackupError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::pg::quote_literal(snapshot)
        ))
        .await
        .map_err(|e| PgError::query("joining the snapshot of the backup", conn, e).into())
}

/// `tables` in the order to read them: largest first (by size on disk), so that parallel
/// readers finish close together rather than one reading the biggest table alone at the end.
pub async fn largest_first(
    client: &Client,
    conn: &ConnInfo,
    tables: &[TableName],
) -> Result<Vec<usize>, BackupError> {
    let mut sizes = Vec::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        let size: i64 = client
            .query_one(
                "SELECT coalesce(pg_total_relation_size($1::text::regclass), 0)",
                &[&t.quoted()],
            )
            .await
            .map_err(|e| PgError::query(format!("reading the size of {t}"), conn, e))?
            .get(0);
        sizes.push((std::cmp::Reverse(size), i));
    }
    sizes.sort();
    Ok(sizes.into_iter().map(|(_, i)| i).collect())
}

/// Reads `table`'s schema inside the cut.
pub async fn load_schema(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
) -> Result<TableSchema, BackupError> {
    let q = |what: &str, e| BackupError::Db(PgError::query(format!("{what} of {table}"), conn, e));
    let rel = table.quoted();
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
               CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END, \
               NULLIF(a.attidentity::text, ''), \
               CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END, \
               pg_get_serial_sequence($1::text, a.attname) \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&rel],
        )
        .await
        .map_err(|e| q("reading the columns", e))?;
    let mut columns = Vec::new();
    let mut sequences = Vec::new();
    for r in &cols {
        let name: String = r.get(0);
        if let Some(seq) = r.get::<_, Option<String>>(6) {
            let row = client
                .query_one(&format!("SELECT last_value, is_called FROM {seq}"), &[])
                .await
                .map_err(|e| q("reading a sequence", e))?;
            sequences.push(SequenceState {
                column: name.clone(),
                name: seq,
                last_value: row.get(0),
                is_called: row.get(1),
            });
        }
        columns.push(ColumnDef {
            name,
            type_name: r.get(1),
            not_null: r.get(2),
            default: r.get(3),
            identity: r.get(4),
            generated: r.get(5),
        });
    }
    let cons = client
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid), contype::text FROM pg_constraint \
             WHERE conrelid = $1::text::regclass AND contype IN ('p', 'u', 'c', 'x') \
             ORDER BY contype <> 'p', conname",
            &[&rel],
        )
        .await
        .map_err(|e| q("reading the constraints", e))?;
    let constraints = cons.iter().map(|r| (r.get(0), r.get(1))).collect();
    let pk = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY k.ord",
            &[&rel],
        )
        .await
        .map_err(|e| q("reading the primary key", e))?;
    let idx = client
        .query(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = $1::text::regclass \
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid) \
             ORDER BY 1",
            &[&rel],
        )
        .await
        .map_err(|e| q("reading the indexes", e))?;
    Ok(TableSchema {
        name: table.clone(),
        columns,
        primary_key: pk.iter().map(|r| r.get(0)).collect(),
        constraints,
        indexes: idx.iter().map(|r| r.get(0)).collect(),
        sequences,
    })
}

impl TableSchema {
    /// The columns COPY carries: all but generated ones.
    fn copied_columns(&self) -> String {
        self.columns
            .iter()
            .filter(|c| c.generated.is_none())
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `COPY (SELECT ... WHERE filter ORDER BY pk) TO STDOUT`.
    pub fn copy_out_sql(&self, filter: &str) -> String {
        let order = if self.primary_key.is_empty() {
            String::new()
        } else {
            format!(
                " ORDER BY {}",
                self.primary_key
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        format!(
            "COPY (SELECT {} FROM {} WHERE {filter}{order}) TO STDOUT",
            self.copied_columns(),
            self.name.quoted()
        )
    }

    /// `COPY staging (cols) FROM STDIN` into the staging table `staging` (see `restore`).
    pub fn copy_in_sql(&self, staging: &str) -> String {
        // FREEZE: the table was created in the same transaction, so rows can be written
        // frozen and need no later vacuum pass to set hint bits.
        format!(
            "COPY {staging} ({}) FROM STDIN WITH (FREEZE)",
            self.copied_columns()
        )
    }

    /// The bare table under the name `staging`, for loading: columns, types, NOT NULL and
    /// generated columns (computed while loading); defaults, identity, constraints and
    /// indexes come after the data ([`TableSchema::finish_statements`]).
    pub fn staging_create_sql(&self, staging: &str) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let mut d = format!("{} {}", quote_ident(&c.name), c.type_name);
                if let Some(g) = &c.generated {
                    d.push_str(&format!(" GENERATED ALWAYS AS ({g}) STORED"));
                }
                if c.not_null {
                    d.push_str(" NOT NULL");
                }
                d
            })
            .collect();
        format!("CREATE TABLE {staging} ({})", cols.join(", "))
    }

    fn is_identity(&self, column: &str) -> bool {
        self.columns
            .iter()
            .any(|c| c.name == column && c.identity.is_some())
    }

    /// Constraints (primary key, unique, check, exclusion) and indexes, built on the loaded
    /// table while it is still called `on`: the costly part of a restore after the data,
    /// which restore runs on the loading connections, in parallel. `pg_name` is the table's
    /// name as the server's `quote_ident` writes it (index definitions name their table that
    /// way). `None` when an index definition does not name the table as expected; then
    /// `index_statements(&self.name.quoted(), ..)` must run once the table has its final name.
    pub fn index_statements(&self, on: &str, pg_name: &str) -> Option<Vec<String>> {
        let mut out: Vec<String> = self
            .constraints
            .iter()
            .map(|(name, def)| {
                format!(
                    "ALTER TABLE {on} ADD CONSTRAINT {} {def}",
                    quote_ident(name)
                )
            })
            .collect();
        for def in &self.indexes {
            let target = format!(" ON {pg_name} ");
            let only = format!(" ON ONLY {pg_name} ");
            if def.contains(&target) {
                out.push(def.replacen(&target, &format!(" ON {on} "), 1));
            } else if def.contains(&only) {
                out.push(def.replacen(&only, &format!(" ON ONLY {on} "), 1));
            } else if on == self.name.quoted() {
                out.push(def.clone());
            } else {
                return None;
            }
        }
        Some(out)
    }

    /// Statements that complete a loaded table once it has its final name (after
    /// [`TableSchema::index_statements`]): serial sequences and defaults, identity, sequence
    /// positions.
    pub fn finish_statements(&self) -> Vec<String> {
        let table = self.name.quoted();
        let mut out = Vec::new();
        for s in &self.sequences {
            if !self.is_identity(&s.column) {
                out.push(format!("CREATE SEQUENCE IF NOT EXISTS {}", s.name));
            }
        }
        for c in &self.columns {
            if let Some(def) = &c.default {
                out.push(format!(
                    "ALTER TABLE {table} ALTER COLUMN {} SET DEFAULT {def}",
                    quote_ident(&c.name)
                ));
            }
            let kind = match c.identity.as_deref() {
                Some("a") => "ALWAYS",
                Some("d") => "BY DEFAULT",
                _ => continue,
            };
            out.push(format!(
                "ALTER TABLE {table} ALTER COLUMN {} ADD GENERATED {kind} AS IDENTITY",
                quote_ident(&c.name)
            ));
        }
        for s in &self.sequences {
            if !self.is_identity(&s.column) {
                out.push(format!(
                    "ALTER SEQUENCE {} OWNED BY {table}.{}",
                    s.name,
                    quote_ident(&s.column)
                ));
            }
            // Looked up by column: an identity column's new sequence may be named differently.
            out.push(format!(
                "SELECT setval(pg_get_serial_sequence({}, {}), {}, {})",
                crate::pg::quote_literal(&table),
                crate::pg::quote_literal(&s.column),
                s.last_value,
                s.is_called
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(indexes: &[&str]) -> TableSchema {
        TableSchema {
            name: TableName {
                schema: "public".into(),
                name: "user".into(),
            },
            columns: vec![],
            primary_key: vec!["id".into()],
            constraints: vec![("user_pkey".into(), "PRIMARY KEY (id)".into())],
            indexes: indexes.iter().map(|s| s.to_string()).collect(),
            sequences: vec![],
        }
    }

    #[test]
    fn indexes_are_pointed_at_the_staging_table() {
        let s = schema(&["CREATE INDEX user_day ON public.\"user\" USING btree (day)"]);
        assert_eq!(
            s.index_statements("st.t0", "public.\"user\"").unwrap(),
            vec![
                "ALTER TABLE st.t0 ADD CONSTRAINT \"user_pkey\" PRIMARY KEY (id)".to_string(),
                "CREATE INDEX user_day ON st.t0 USING btree (day)".to_string(),
            ]
        );
        // A definition that does not name the table as expected is left for the final name.
        let odd = schema(&["CREATE INDEX user_day ON other.\"user\" USING btree (day)"]);
        assert!(odd.index_statements("st.t0", "public.\"user\"").is_none());
        let final_name = odd.name.quoted();
        assert_eq!(
            odd.index_statements(&final_name, &final_name).unwrap()[1],
            "CREATE INDEX user_day ON other.\"user\" USING btree (day)"
        );
    }
}
