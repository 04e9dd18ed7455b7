//! One relation of a saved table: the table itself or one of its partitions, with its columns,
//! partitioning, storage options, row-level security and replica identity.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::acl::{self, Access};
use super::constraint::{Constraint, Index};
use super::policy::Policy;
use super::statistics::StatisticsDef;
use super::trigger::{Rule, Trigger};
use crate::pg::{quote_ident, ConnInfo, PgError, TableName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    /// As `format_type` writes it with only `pg_catalog` on the search path (user types
    /// qualified).
    pub type_name: String,
    pub type_oid: u32,
    pub not_null: bool,
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT) for identity columns.
    pub identity: Option<String>,
    /// Expression of a `GENERATED ALWAYS AS (...) STORED` column.
    pub generated: Option<String>,
    /// `COLLATE` clause when it differs from the type's.
    pub collation: Option<String>,
    pub comment: Option<String>,
    /// Column privileges (never `None`-vs-default relevant: empty means none granted).
    pub acl: Option<Vec<acl::Grant>>,
}

impl ColumnDef {
    /// The column as CREATE TABLE names it: type, collation, generation and NOT NULL, without
    /// its default and identity (those come after a data load, see `Plan::column_statements`).
    pub fn create_sql(&self) -> String {
        let mut d = format!("{} {}", quote_ident(&self.name), self.type_name);
        if let Some(coll) = &self.collation {
            d.push_str(&format!(" COLLATE {coll}"));
        }
        if let Some(g) = &self.generated {
            d.push_str(&format!(" GENERATED ALWAYS AS ({g}) STORED"));
        }
        if self.not_null {
            d.push_str(" NOT NULL");
        }
        d
    }

    /// `ALTER TABLE ... ADD COLUMN` of this column on `table`, which has rows: NOT NULL only
    /// when the default fills them.
    pub fn add_sql(&self, table: &TableName) -> String {
        let mut c = self.clone();
        c.not_null &= c.default.is_some();
        let mut s = format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {}",
            table.quoted(),
            c.create_sql()
        );
        if let Some(d) = &c.default {
            s.push_str(&format!(" DEFAULT {d}"));
        }
        s
    }
}

/// How rows of a partition are chosen: `FOR VALUES ...` or `DEFAULT`, under `parent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOf {
    pub parent: TableName,
    pub bound: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaIdentityDef {
    Default,
    Full,
    Nothing,
    /// `USING INDEX name`.
    Index(String),
}

/// One relation: a table, a partitioned table, or a partition of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    pub name: TableName,
    /// Columns in `attnum` order (a partition's are its parent's and are not repeated).
    pub columns: Vec<ColumnDef>,
    /// Primary key columns in key order; empty when there is none.
    pub primary_key: Vec<String>,
    /// `PARTITION BY ...` key of a partitioned table, as `pg_get_partkeydef` writes it.
    pub partition_key: Option<String>,
    pub partition_of: Option<PartitionOf>,
    /// Storage parameters (`fillfactor=70`).
    pub options: Vec<String>,
    pub constraints: Vec<Constraint>,
    pub indexes: Vec<Index>,
    pub triggers: Vec<Trigger>,
    pub row_security: bool,
    pub force_row_security: bool,
    pub policies: Vec<Policy>,
    /// Rules (none in manifests written before rules were saved).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Extended statistics (none in manifests written before they were saved).
    #[serde(default)]
    pub statistics: Vec<StatisticsDef>,
    pub replica_identity: ReplicaIdentityDef,
    pub access: Access,
    pub comment: Option<String>,
}

impl TableDef {
    /// The columns COPY carries: all but generated ones.
    pub fn copied_columns(&self) -> Vec<&str> {
        self.columns
            .iter()
            .filter(|c| c.generated.is_none())
            .map(|c| c.name.as_str())
            .collect()
    }

    /// `CREATE TABLE` under the name `at`, with columns, types, collations, NOT NULL and
    /// generated columns; a partition names its parent as `parent_at`. Defaults and identity
    /// come after the data load, so the loaded rows keep their values and no sequence moves.
    pub fn create_sql(&self, at: &str, parent_at: Option<&str>) -> String {
        let mut s = match (&self.partition_of, parent_at) {
            (Some(p), Some(parent)) => {
                format!("CREATE TABLE {at} PARTITION OF {parent} {}", p.bound)
            }
            _ => {
                let cols: Vec<String> = self.columns.iter().map(ColumnDef::create_sql).collect();
                format!("CREATE TABLE {at} ({})", cols.join(", "))
            }
        };
        if let Some(k) = &self.partition_key {
            s.push_str(&format!(" PARTITION BY {k}"));
        }
        if !self.options.is_empty() {
            s.push_str(&format!(" WITH ({})", self.options.join(", ")));
        }
        s
    }
}

/// Reads relation `oid` (named `name`) without its constraints, indexes, triggers and
/// policies, which the callers add.
pub(crate) async fn load(
    client: &Client,
    conn: &ConnInfo,
    name: &TableName,
    oid: u32,
) -> Result<TableDef, PgError> {
    let q = |what: &str| {
        let what = format!("reading the {what} of {name}");
        move |e| PgError::query(what, conn, e)
    };
    let r = client
        .query_one(
            &format!(
                "SELECT c.relkind::text, CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END, \
                   CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END, \
                   (SELECT pn.nspname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                      JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE i.inhrelid = c.oid AND c.relispartition), \
                   (SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                      WHERE i.inhrelid = c.oid AND c.relispartition), \
                   coalesce(c.reloptions::text[], '{{}}'), c.relrowsecurity, c.relforcerowsecurity, \
                   c.relreplident::text, \
                   (SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                      WHERE i.indrelid = c.oid AND i.indisreplident), \
                   pg_get_userbyid(c.relowner)::text, {}, obj_description(c.oid, 'pg_class') \
                 FROM pg_class c WHERE c.oid = $1",
                acl::select("c.relacl")
            ),
            &[&oid],
        )
        .await
        .map_err(q("definition"))?;
    let partition_of = match (r.get::<_, Option<String>>(2), r.get::<_, Option<String>>(3)) {
        (Some(bound), Some(schema)) => Some(PartitionOf {
            parent: TableName::new(schema, r.get::<_, String>(4)),
            bound,
        }),
        _ => None,
    };
    let columns = if partition_of.is_some() {
        Vec::new()
    } else {
        client
            .query(
                &format!(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull, \
                       CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END, \
                       NULLIF(a.attidentity::text, ''), \
                       CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END, \
                       CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 THEN \
                         (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname) \
                          FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace \
                          WHERE co.oid = a.attcollation) END, \
                       col_description(a.attrelid, a.attnum), {} \
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    acl::select("a.attacl")
                ),
                &[&oid],
            )
            .await
            .map_err(q("columns"))?
            .iter()
            .map(|c| ColumnDef {
                name: c.get(0),
                type_name: c.get(1),
                type_oid: c.get(2),
                not_null: c.get(3),
                default: c.get(4),
                identity: c.get(5),
                generated: c.get(6),
                collation: c.get(7),
                comment: c.get(8),
                acl: acl::parse(c.get(9)),
            })
            .collect()
    };
    let primary_key = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(q("primary key"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let replica_identity = match r.get::<_, String>(8).as_str() {
        "f" => ReplicaIdentityDef::Full,
        "n" => ReplicaIdentityDef::Nothing,
        "i" => match r.get::<_, Option<String>>(9) {
            Some(index) => ReplicaIdentityDef::Index(index),
            None => ReplicaIdentityDef::Default,
        },
        _ => ReplicaIdentityDef::Default,
    };
    Ok(TableDef {
        name: name.clone(),
        columns,
        primary_key,
        partition_key: r.get(1),
        partition_of,
        options: r.get(5),
        constraints: Vec::new(),
        indexes: Vec::new(),
        triggers: Vec::new(),
        row_security: r.get(6),
        force_row_security: r.get(7),
        policies: Vec::new(),
        rules: Vec::new(),
        statistics: Vec::new(),
        replica_identity,
        access: Access {
            owner: Some(r.get(10)),
            acl: acl::parse(r.get(11)),
        },
        comment: r.get(12),
    })
}
