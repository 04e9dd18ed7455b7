//! Catalog queries: which tables a pattern names, and what a table looks like (columns, types,
//! primary key, replica identity). Sync, backup and verify all describe tables this way.

use tokio_postgres::Client;

use super::{ConnInfo, PgError, TableName, TablePattern};

/// One column of a table, in `attnum` order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Column {
    pub name: String,
    /// The type as `format_type` writes it, e.g. `numeric(12,2)` or `public.invoice_status`.
    pub type_name: String,
    pub type_oid: u32,
    pub not_null: bool,
    /// The default expression, if any (not for generated columns).
    pub default: Option<String>,
    /// The generation expression of a `GENERATED ALWAYS AS (...) STORED` column.
    pub generated: Option<String>,
}

/// How a table identifies the old row of an UPDATE or DELETE in the WAL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplicaIdentity {
    /// The primary key (`REPLICA IDENTITY DEFAULT` with a primary key).
    PrimaryKey,
    /// `REPLICA IDENTITY USING INDEX`: these columns.
    Index(Vec<String>),
    /// `REPLICA IDENTITY FULL`.
    Full,
    /// No usable identity: updates and deletes cannot be replicated.
    Nothing,
}

/// What invsync needs to know about a table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableInfo {
    pub name: TableName,
    pub oid: u32,
    pub columns: Vec<Column>,
    /// Primary key columns in key order; empty when there is none.
    pub primary_key: Vec<String>,
    pub replica_identity: ReplicaIdentity,
}

impl TableInfo {
    /// Reads the table's description; `MissingTable` if it does not exist.
    pub async fn load(
        client: &Client,
        conn: &ConnInfo,
        table: &TableName,
    ) -> Result<TableInfo, PgError> {
        let row = client
            .query_opt(
                "SELECT c.oid, c.relreplident::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(|e| PgError::query(format!("reading the catalog for {table}"), conn, e))?
            .ok_or_else(|| PgError::MissingTable {
                table: table.to_string(),
                target: conn.to_string(),
            })?;
        let oid: u32 = row.get(0);
        let ident: String = row.get(1);

        let columns = client
            .query(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull, \
                        CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END, \
                        CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END \
                 FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&oid],
            )
            .await
            .map_err(|e| PgError::query(format!("reading the columns of {table}"), conn, e))?
            .into_iter()
            .map(|r| Column {
                name: r.get(0),
                type_name: r.get(1),
                type_oid: r.get(2),
                not_null: r.get(3),
                default: r.get(4),
                generated: r.get(5),
            })
            .collect();

        let index_columns = |flag: &'static str| {
            format!(
                "SELECT a.attname FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND i.{flag} ORDER BY k.ord"
            )
        };
        let primary_key: Vec<String> = client
            .query(&index_columns("indisprimary"), &[&oid])
            .await
            .map_err(|e| PgError::query(format!("reading the primary key of {table}"), conn, e))?
            .into_iter()
            .map(|r| r.get(0))
            .collect();

        let replica_identity = match ident.as_str() {
            "f" => ReplicaIdentity::Full,
            "i" => {
                let cols: Vec<String> = client
                    .query(&index_columns("indisreplident"), &[&oid])
                    .await
                    .map_err(|e| {
                        PgError::query(format!("reading the replica identity of {table}"), conn, e)
                    })?
                    .into_iter()
                    .map(|r| r.get(0))
                    .collect();
                if cols.is_empty() {
                    ReplicaIdentity::Nothing
                } else {
                    ReplicaIdentity::Index(cols)
                }
            }
            "d" if !primary_key.is_empty() => ReplicaIdentity::PrimaryKey,
            _ => ReplicaIdentity::Nothing,
        };

        Ok(TableInfo {
            name: table.clone(),
            oid,
            columns,
            primary_key,
            replica_identity,
        })
    }

    /// The columns that identify a row: the primary key, else the replica identity index.
    /// Empty when neither exists.
    pub fn key_columns(&self) -> Vec<String> {
        if !self.primary_key.is_empty() {
            return self.primary_key.clone();
        }
        match &self.replica_identity {
            ReplicaIdentity::Index(cols) => cols.clone(),
            _ => Vec::new(),
        }
    }
}

/// Expands patterns (`schema.table`, `schema.*`) into the ordinary and partitioned tables that
/// exist. A named table that does not exist is an error; an empty `schema.*` is an error too,
/// so a typo never silently selects nothing.
pub async fn resolve_tables(
    client: &Client,
    conn: &ConnInfo,
    patterns: &[TablePattern],
) -> Result<Vec<TableName>, PgError> {
    let mut out: Vec<TableName> = Vec::new();
    for p in patterns {
        let rows = client
            .query(
                "SELECT n.nspname, c.relname FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND ($2::text IS NULL OR c.relname = $2) \
                   AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
                 ORDER BY c.relname",
                &[&p.schema, &p.table],
            )
            .await
            .map_err(|e| PgError::query(format!("looking up tables {p}"), conn, e))?;
        if rows.is_empty() {
            return Err(match &p.table {
                Some(_) => PgError::MissingTable {
                    table: p.to_string(),
                    target: conn.to_string(),
                },
                None => PgError::Invalid(format!(
                    "{p} matches no table on {conn}; check the schema name"
                )),
            });
        }
        for r in rows {
            let t = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    Ok(out)
}
