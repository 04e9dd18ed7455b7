//! Constraints and indexes of one relation, as `pg_get_constraintdef` and `pg_get_indexdef`
//! write them.
//!
//! On a partitioned table, a constraint or index of the parent has a twin on each partition.
//! As pg_dump does, the parent's is created `ONLY` on the parent, each partition's under its
//! own name, and the two are then attached ([`Index::attach_to`], [`Constraint::attach_to`]),
//! so every name comes back as it was. Twins that PostgreSQL creates by itself (CHECK and
//! foreign keys, which recurse) are not saved.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::pg::{ConnInfo, PgError, TableName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConstraintKind {
    PrimaryKey,
    Unique,
    Exclusion,
    Check,
    ForeignKey,
}

impl ConstraintKind {
    /// Constraints backed by an index: built with the indexes, right after the data.
    pub fn has_index(self) -> bool {
        matches!(
            self,
            ConstraintKind::PrimaryKey | ConstraintKind::Unique | ConstraintKind::Exclusion
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    pub name: String,
    pub kind: ConstraintKind,
    /// As `pg_get_constraintdef` writes it (`NOT VALID` included when it is not validated).
    pub definition: String,
    /// The table a foreign key references.
    pub references: Option<TableName>,
    /// On a partition: the index of the parent's constraint this one's index attaches to.
    pub attach_to: Option<String>,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub unique: bool,
    /// `ON ONLY`: the index of a partitioned table, whose partitions' indexes attach to it.
    pub only: bool,
    /// Everything after the table in `pg_get_indexdef`: `USING btree (a) WHERE ...`.
    pub body: String,
    /// On a partition: the parent's index this one attaches to.
    pub attach_to: Option<String>,
    pub clustered: bool,
    pub comment: Option<String>,
}

impl Index {
    /// `CREATE INDEX` of this index on the relation `at`.
    pub fn create_sql(&self, at: &str) -> String {
        format!(
            "CREATE {}INDEX {} ON {}{at} {}",
            if self.unique { "UNIQUE " } else { "" },
            crate::pg::quote_ident(&self.name),
            if self.only { "ONLY " } else { "" },
            self.body
        )
    }
}

/// The constraints of relation `oid`, index-backed ones first, then checks, then foreign keys.
pub(crate) async fn load_constraints(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    oid: u32,
) -> Result<Vec<Constraint>, PgError> {
    let rows = client
        .query(
            "SELECT c.conname::text, c.contype::text, pg_get_constraintdef(c.oid), \
               rn.nspname::text, r.relname::text, \
               (SELECT pi.relname::text FROM pg_constraint p JOIN pg_class pi ON pi.oid = p.conindid \
                WHERE p.oid = c.conparentid), \
               obj_description(c.oid, 'pg_constraint') \
             FROM pg_constraint c \
             LEFT JOIN pg_class r ON r.oid = c.confrelid \
             LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             WHERE c.conrelid = $1 AND c.contype IN ('p', 'u', 'x', 'c', 'f') \
               AND (c.conparentid = 0 OR c.contype IN ('p', 'u', 'x')) \
               AND (c.contype <> 'c' OR c.conislocal) \
             ORDER BY position(c.contype::text in 'puxcf'), c.conname",
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the constraints of {table}"), conn, e))?;
    Ok(rows
        .iter()
        .map(|r| Constraint {
            name: r.get(0),
            kind: match r.get::<_, String>(1).as_str() {
                "p" => ConstraintKind::PrimaryKey,
                "u" => ConstraintKind::Unique,
                "x" => ConstraintKind::Exclusion,
                "c" => ConstraintKind::Check,
                _ => ConstraintKind::ForeignKey,
            },
            definition: r.get(2),
            references: r
                .get::<_, Option<String>>(3)
                .map(|s| TableName::new(s, r.get::<_, String>(4))),
            attach_to: r.get(5),
            comment: r.get(6),
        })
        .collect())
}

/// The indexes of relation `oid` that back no constraint.
pub(crate) async fn load_indexes(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    oid: u32,
) -> Result<Vec<Index>, PgError> {
    let rows = client
        .query(
            "SELECT ic.relname::text, pg_get_indexdef(i.indexrelid), i.indisunique, \
               quote_ident(ic.relname) , quote_ident(n.nspname) || '.' || quote_ident(t.relname), \
               (SELECT pi.relname::text FROM pg_inherits h JOIN pg_class pi ON pi.oid = h.inhparent \
                WHERE h.inhrelid = i.indexrelid), \
               i.indisclustered, obj_description(i.indexrelid, 'pg_class') \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE i.indrelid = $1 AND NOT EXISTS (SELECT 1 FROM pg_constraint c \
               WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x')) \
             ORDER BY ic.relname",
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the indexes of {table}"), conn, e))?;
    rows.iter()
        .map(|r| {
            let def: String = r.get(1);
            let unique: bool = r.get(2);
            let head = format!(
                "CREATE {}INDEX {} ON ",
                if unique { "UNIQUE " } else { "" },
                r.get::<_, String>(3)
            );
            let rel: String = r.get(4);
            let rest = def.strip_prefix(&head);
            let (only, body) = match rest {
                Some(rest) => match rest.strip_prefix("ONLY ") {
                    Some(after) => (true, after.strip_prefix(&format!("{rel} "))),
                    None => (false, rest.strip_prefix(&format!("{rel} "))),
                },
                None => (false, None),
            };
            let body = body.ok_or_else(|| {
                PgError::Invalid(format!(
                    "cannot read the definition of index {} on {table}: `{def}`",
                    r.get::<_, String>(0)
                ))
            })?;
            Ok(Index {
                name: r.get(0),
                unique,
                only,
                body: body.to_string(),
                attach_to: r.get(5),
                clustered: r.get(6),
                comment: r.get(7),
            })
        })
        .collect()
}
