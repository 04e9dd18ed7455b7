//! Table definitions on the targets: creating missing tables (and the enum, domain and composite
//! types their columns use) from the source's definitions, and checking that existing tables can
//! take every column the source sends.
//!
//! Never drops or changes anything on a target: a table that lacks a column is reported with
//! the DDL that would fix it, unless invsync is asked to add it ([`add_column_sql`] during
//! streaming, when the source gained the column).

use std::collections::HashSet;

use tokio_postgres::Client;

use super::SyncError;
use crate::pg::{quote_ident, quote_literal, Column, ConnInfo, PgError, TableInfo};

/// The column definition for CREATE TABLE / ADD COLUMN.
fn column_sql(c: &Column) -> String {
    let mut s = format!("{} {}", quote_ident(&c.name), c.type_name);
    if let Some(g) = &c.generated {
        s.push_str(&format!(" GENERATED ALWAYS AS ({g}) STORED"));
    } else if let Some(d) = &c.default {
        s.push_str(&format!(" DEFAULT {d}"));
    }
    if c.not_null {
        s.push_str(" NOT NULL");
    }
    s
}

/// `ALTER TABLE ... ADD COLUMN` for a column the target lacks. NOT NULL is left out: the target's
/// existing rows could not satisfy it unless the default fills them.
pub fn add_column_sql(table: &TableInfo, column: &Column) -> String {
    let mut c = column.clone();
    c.not_null = c.not_null && c.default.is_some();
    format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {}",
        table.name.quoted(),
        column_sql(&c)
    )
}

/// The sequence a `nextval('name'::regclass)` default uses, so the target can have it too.
fn default_sequence(default: &str) -> Option<&str> {
    default
        .strip_prefix("nextval('")?
        .strip_suffix("'::regclass)")
}

/// Creates `source`'s table on the target when missing (if `create`), else checks that every
/// column the source streams exists there. Returns the target's description.
pub async fn ensure_table(
    source_client: &Client,
    source_conn: &ConnInfo,
    target: &Client,
    target_conn: &ConnInfo,
    source: &TableInfo,
    create: bool,
) -> Result<TableInfo, SyncError> {
    match TableInfo::load(target, target_conn, &source.name).await {
        Ok(existing) => {
            let have: HashSet<&str> = existing.columns.iter().map(|c| c.name.as_str()).collect();
            let missing: Vec<&Column> = source
                .columns
                .iter()
                .filter(|c| c.generated.is_none() && !have.contains(c.name.as_str()))
                .collect();
            if !missing.is_empty() {
                return Err(SyncError::MissingColumns {
                    table: source.name.to_string(),
                    target: target_conn.to_string(),
                    columns: missing
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    ddl: missing
                        .iter()
                        .map(|c| add_column_sql(source, c))
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
            Ok(existing)
        }
        Err(PgError::MissingTable { .. }) if create => {
            let mut seen = HashSet::new();
            for c in &source.columns {
                ensure_type(
                    source_client,
                    source_conn,
                    target,
                    target_conn,
                    c.type_oid,
                    &mut seen,
                )
                .await?;
            }
            let schema_exists: bool = target
                .query_one(
                    "SELECT to_regnamespace($1) IS NOT NULL",
                    &[&quote_ident(&source.name.schema)],
                )
                .await
                .map_err(|e| PgError::query("looking up the schema", target_conn, e))?
                .get(0);
            let mut sql = String::new();
            if !schema_exists {
                sql.push_str(&format!(
                    "CREATE SCHEMA {};\n",
                    quote_ident(&source.name.schema)
                ));
            }
            for c in &source.columns {
                if let Some(seq) = c.default.as_deref().and_then(default_sequence) {
                    sql.push_str(&format!("CREATE SEQUENCE IF NOT EXISTS {seq};\n"));
                }
            }
            let mut items: Vec<String> = source.columns.iter().map(column_sql).collect();
            if !source.primary_key.is_empty() {
                let key: Vec<String> = source.primary_key.iter().map(|c| quote_ident(c)).collect();
                items.push(format!("PRIMARY KEY ({})", key.join(", ")));
            }
            sql.push_str(&format!(
                "CREATE TABLE {} (\n    {}\n);\n",
                source.name.quoted(),
                items.join(",\n    ")
            ));
            if let crate::pg::ReplicaIdentity::Index(cols) = &source.replica_identity {
                if source.primary_key.is_empty() {
                    let cols: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
                    sql.push_str(&format!(
                        "CREATE UNIQUE INDEX ON {} ({});\n",
                        source.name.quoted(),
                        cols.join(", ")
                    ));
                }
            }
            target.batch_execute(&sql).await.map_err(|e| {
                PgError::query(
                    format!(
                        "creating table {} (`{}`)",
                        source.name,
                        sql.replace('\n', " ")
                    ),
                    target_conn,
                    e,
                )
            })?;
            tracing::info!(table = %source.name, target = %target_conn, "created table on target");
            Ok(TableInfo::load(target, target_conn, &source.name).await?)
        }
        Err(PgError::MissingTable { table, target }) => Err(SyncError::Config(format!(
            "table {table} does not exist on {target}; create it, or run setup without --no-create"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Creates the user-defined type `oid` of the source (enum, domain, composite, or an array of
/// one) on the target if no type of that name exists there. Built-in types exist everywhere.
fn ensure_type<'a>(
    source: &'a Client,
    source_conn: &'a ConnInfo,
    target: &'a Client,
    target_conn: &'a ConnInfo,
    oid: u32,
    seen: &'a mut HashSet<u32>,
) -> futures::future::BoxFuture<'a, Result<(), SyncError>> {
    Box::pin(async move {
        // Below FirstNormalObjectId: built in.
        if oid < 16384 || !seen.insert(oid) {
            return Ok(());
        }
        let q = |what: &str| {
            let what = format!("reading type {oid} ({what})");
            move |e| PgError::query(what, source_conn, e)
        };
        let row = source
            .query_one(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(t.typname), t.typtype::text, \
                        t.typelem, t.typbasetype, format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typrelid, \
                        quote_ident(n.nspname) \
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
                &[&oid],
            )
            .await
            .map_err(q("name"))?;
        let name: String = row.get(0);
        let kind: String = row.get(1);
        let elem: u32 = row.get(2);
        let base: u32 = row.get(3);
        let relid: u32 = row.get(6);
        let schema: String = row.get(7);
        if elem != 0 && kind == "b" {
            return ensure_type(source, source_conn, target, target_conn, elem, seen).await;
        }
        let exists: bool = target
            .query_one("SELECT to_regtype($1) IS NOT NULL", &[&name])
            .await
            .map_err(|e| PgError::query(format!("looking for type {name}"), target_conn, e))?
            .get(0);
        if exists {
            return Ok(());
        }
        let body = match kind.as_str() {
            "e" => {
                let labels: Vec<String> = source
                    .query(
                        "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                        &[&oid],
                    )
                    .await
                    .map_err(q("labels"))?
                    .iter()
                    .map(|r| quote_literal(&r.get::<_, String>(0)))
                    .collect();
                format!("CREATE TYPE {name} AS ENUM ({})", labels.join(", "))
            }
            "d" => {
                ensure_type(source, source_conn, target, target_conn, base, seen).await?;
                let checks: Vec<String> = source
                    .query(
                        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = $1 ORDER BY conname",
                        &[&oid],
                    )
                    .await
                    .map_err(q("constraints"))?
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect();
                let not_null = if row.get::<_, bool>(5) { " NOT NULL" } else { "" };
                format!(
                    "CREATE DOMAIN {name} AS {}{not_null} {}",
                    row.get::<_, String>(4),
                    checks.join(" ")
                )
            }
            "c" => {
                let attrs = source
                    .query(
                        "SELECT quote_ident(attname), format_type(atttypid, atttypmod), atttypid FROM pg_attribute \
                         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                        &[&relid],
                    )
                    .await
                    .map_err(q("attributes"))?;
                let mut fields = Vec::new();
                for a in &attrs {
                    ensure_type(source, source_conn, target, target_conn, a.get(2), seen).await?;
                    fields.push(format!("{} {}", a.get::<_, String>(0), a.get::<_, String>(1)));
                }
                format!("CREATE TYPE {name} AS ({})", fields.join(", "))
            }
            _ => {
                return Err(SyncError::Config(format!(
                    "type {name} used by a replicated column does not exist on {target_conn}; create it there first"
                )))
            }
        };
        let schema_exists: bool = target
            .query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&schema])
            .await
            .map_err(|e| PgError::query("looking up the schema", target_conn, e))?
            .get(0);
        let sql = if schema_exists {
            body.clone()
        } else {
            format!("CREATE SCHEMA {schema}; {body}")
        };
        target.batch_execute(&sql).await.map_err(|e| {
            PgError::query(format!("creating type {name} (`{body}`)"), target_conn, e)
        })?;
        Ok(())
    })
}
