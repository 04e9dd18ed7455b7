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
//! The schema saved per table is its [`TableModel`] (see `pg::schema`: the table with its
//! partitions, types, sequences, constraints, indexes, foreign keys, triggers, policies,
//! comments, owners and privileges), read inside the cut, beside the few fields older
//! versions saved (columns, primary key, constraints, indexes, sequence positions), which
//! segments and the dump still read. A partitioned table is read through its parent, its
//! rows routed back to their partitions when restored.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::BackupError;
use crate::pg::schema::constraint::{Constraint, ConstraintKind, Index};
use crate::pg::schema::sequence::SequenceDef;
use crate::pg::schema::table::ReplicaIdentityDef;
use crate::pg::schema::{self, Access, TableDef, TableModel};
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
    /// The whole definition and what it depends on (absent in snapshots of older versions,
    /// which restore from the fields above; see [`TableSchema::model`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<TableModel>,
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

/// Reads `table`'s schema inside the cut: its [`TableModel`], and the fields older versions
/// read, derived from it.
pub async fn load_schema(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
) -> Result<TableSchema, BackupError> {
    let model = TableModel::load(client, conn, table).await?;
    let root = model.table();
    let quoted_name = table.quoted();
    Ok(TableSchema {
        name: table.clone(),
        columns: root
            .columns
            .iter()
            .map(|c| ColumnDef {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                not_null: c.not_null,
                default: c.default.clone(),
                identity: c.identity.clone(),
                generated: c.generated.clone(),
            })
            .collect(),
        primary_key: root.primary_key.clone(),
        constraints: root
            .constraints
            .iter()
            .filter(|c| c.kind != ConstraintKind::ForeignKey)
            .map(|c| (c.name.clone(), c.definition.clone()))
            .collect(),
        indexes: root
            .indexes
            .iter()
            .map(|i| i.create_sql(&quoted_name))
            .collect(),
        sequences: model
            .sequences
            .iter()
            .filter_map(|s| {
                let (_, column) = s.owned_by.as_ref()?;
                Some(SequenceState {
                    column: column.clone(),
                    name: s.name.quoted(),
                    last_value: s.last_value,
                    is_called: s.is_called,
                })
            })
            .collect(),
        model: Some(model),
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

    /// The model to restore this table from: the saved one, or for a schema saved by an
    /// older version (without a model), one made of the fields it has. Such a model knows no
    /// types, owners, privileges, triggers, policies, foreign keys or partitions, which those
    /// versions did not save. A saved model that does not describe this table is an error.
    pub fn model(&self) -> Result<TableModel, BackupError> {
        if let Some(m) = &self.model {
            if m.relations.first().map(|r| &r.name) != Some(&self.name) {
                return Err(BackupError::Invalid(format!(
                    "the snapshot's schema of {} describes another table; the manifest is damaged",
                    self.name
                )));
            }
            return Ok(m.clone());
        }
        let columns = self
            .columns
            .iter()
            .map(|c| schema::ColumnDef {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                type_oid: 0,
                not_null: c.not_null,
                default: c.default.clone(),
                identity: c.identity.clone(),
                generated: c.generated.clone(),
                collation: None,
                comment: None,
                acl: None,
            })
            .collect();
        let constraints = self
            .constraints
            .iter()
            .map(|(name, def)| Constraint {
                name: name.clone(),
                kind: if def.starts_with("PRIMARY KEY") {
                    ConstraintKind::PrimaryKey
                } else if def.starts_with("UNIQUE") {
                    ConstraintKind::Unique
                } else if def.starts_with("EXCLUDE") {
                    ConstraintKind::Exclusion
                } else {
                    ConstraintKind::Check
                },
                definition: def.clone(),
                references: None,
                attach_to: None,
                comment: None,
            })
            .collect();
        let sequences = self
            .sequences
            .iter()
            .map(|s| SequenceDef {
                name: parse_qualified(&s.name).unwrap_or_else(|| self.name.clone()),
                settings: None,
                last_value: s.last_value,
                is_called: s.is_called,
                owned_by: Some((self.name.clone(), s.column.clone())),
                identity: self
                    .columns
                    .iter()
                    .any(|c| c.name == s.column && c.identity.is_some()),
                access: Access::default(),
                comment: None,
            })
            .collect();
        Ok(TableModel {
            relations: vec![TableDef {
                name: self.name.clone(),
                columns,
                primary_key: self.primary_key.clone(),
                partition_key: None,
                partition_of: None,
                options: Vec::new(),
                constraints,
                indexes: self.indexes.iter().filter_map(|d| parse_index(d)).collect(),
                triggers: Vec::new(),
                row_security: false,
                force_row_security: false,
                policies: Vec::new(),
                rules: Vec::new(),
                statistics: Vec::new(),
                replica_identity: ReplicaIdentityDef::Default,
                access: Access::default(),
                comment: None,
            }],
            types: Vec::new(),
            sequences,
            functions: Vec::new(),
            extensions: Vec::new(),
            schemas: Vec::new(),
        })
    }
}

/// Splits a name as PostgreSQL's `quote_ident` writes it (`a`, `"A b"`) off the front of
/// `s`; returns the name and the rest.
fn split_ident(s: &str) -> Option<(String, &str)> {
    if let Some(rest) = s.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c != '"' {
                name.push(c);
            } else if rest[i + 1..].starts_with('"') {
                name.push('"');
                chars.next();
            } else {
                return Some((name, &rest[i + 1..]));
            }
        }
        None
    } else {
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(s.len());
        (end > 0).then(|| (s[..end].to_string(), &s[end..]))
    }
}

/// `schema.name` as PostgreSQL writes it.
fn parse_qualified(s: &str) -> Option<TableName> {
    let (schema, rest) = split_ident(s)?;
    let (name, rest) = split_ident(rest.strip_prefix('.')?)?;
    rest.is_empty().then(|| TableName::new(schema, name))
}

/// A `pg_get_indexdef` statement as saved by older versions.
fn parse_index(def: &str) -> Option<Index> {
    let rest = def.strip_prefix("CREATE ")?;
    let (unique, rest) = match rest.strip_prefix("UNIQUE ") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (name, rest) = split_ident(rest.strip_prefix("INDEX ")?)?;
    let rest = rest.strip_prefix(" ON ")?;
    let (only, rest) = match rest.strip_prefix("ONLY ") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (_, rest) = split_ident(rest)?;
    let rest = rest
        .strip_prefix('.')
        .and_then(split_ident)
        .map_or(rest, |(_, r)| r);
    Some(Index {
        name,
        unique,
        only,
        body: rest.strip_prefix(' ')?.to_string(),
        attach_to: None,
        clustered: false,
        comment: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_of_older_versions_become_models() {
        let old = TableSchema {
            name: TableName::new("public", "user"),
            columns: vec![ColumnDef {
                name: "id".into(),
                type_name: "bigint".into(),
                not_null: true,
                default: None,
                identity: Some("a".into()),
                generated: None,
            }],
            primary_key: vec!["id".into()],
            constraints: vec![("user_pkey".into(), "PRIMARY KEY (id)".into())],
            indexes: vec![
                "CREATE INDEX user_day ON public.\"user\" USING btree (day)".into(),
                "CREATE UNIQUE INDEX \"Odd \"\"x\" ON ONLY \"S\".t USING btree (a) WHERE (a > 0)"
                    .into(),
            ],
            sequences: vec![SequenceState {
                column: "id".into(),
                name: "public.\"user_id_seq\"".into(),
                last_value: 7,
                is_called: true,
            }],
            model: None,
        };
        let m = old.model().unwrap();
        let t = m.table();
        assert_eq!(t.constraints[0].kind, ConstraintKind::PrimaryKey);
        assert_eq!(
            t.indexes[0].create_sql("st.t0_0"),
            "CREATE INDEX \"user_day\" ON st.t0_0 USING btree (day)"
        );
        assert_eq!(
            t.indexes[1].create_sql("x"),
            "CREATE UNIQUE INDEX \"Odd \"\"x\" ON ONLY x USING btree (a) WHERE (a > 0)"
        );
        assert_eq!(m.sequences[0].name, TableName::new("public", "user_id_seq"));
        assert!(m.sequences[0].identity);
        assert_eq!(parse_qualified("a.b.c"), None);
    }
}
