//! The pipeline's publication on the source: which tables are streamed.
//!
//! Setup refuses tables whose updates and deletes cannot be replicated (no primary key and no
//! replica identity) before creating anything, and keeps the publication's table list equal to
//! the pipeline's: re-running setup after the configuration changed adds and removes tables.

use tokio_postgres::Client;

use super::CdcError;
use crate::pg::{ConnInfo, PgError, ReplicaIdentity, TableInfo, TableName};

/// Refuses the tables that have neither a primary key nor a replica identity, naming each.
pub fn check_identity(tables: &[TableInfo]) -> Result<(), CdcError> {
    let bad: Vec<String> = tables
        .iter()
        .filter(|t| t.replica_identity == ReplicaIdentity::Nothing)
        .map(|t| t.name.to_string())
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CdcError::NoReplicaIdentity {
            tables: bad.join(", "),
        })
    }
}

/// Creates the publication for `tables`, or sets its table list if it exists.
pub async fn ensure(
    client: &Client,
    conn: &ConnInfo,
    name: &str,
    tables: &[TableInfo],
) -> Result<(), CdcError> {
    let names: Vec<TableName> = tables.iter().map(|t| t.name.clone()).collect();
    ensure_for(client, conn, name, &names).await
}

/// [`ensure`] for tables known by name only.
pub async fn ensure_for(
    client: &Client,
    conn: &ConnInfo,
    name: &str,
    tables: &[TableName],
) -> Result<(), CdcError> {
    let list: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(|e| PgError::query("reading publications", conn, e))?
        .is_some();
    let ident = crate::pg::quote_ident(name);
    // Partitioned tables are published under their own name, not their partitions', so the
    // targets need only the table the configuration names.
    let sql = if exists {
        format!(
            "ALTER PUBLICATION {ident} SET TABLE {}; ALTER PUBLICATION {ident} SET (publish_via_partition_root = true)",
            list.join(", ")
        )
    } else {
        format!(
            "CREATE PUBLICATION {ident} FOR TABLE {} WITH (publish_via_partition_root = true)",
            list.join(", ")
        )
    };
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| PgError::query(format!("creating publication {name}"), conn, e))?;
    Ok(())
}

/// Drops the publication if it exists.
pub async fn drop(client: &Client, conn: &ConnInfo, name: &str) -> Result<(), CdcError> {
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            crate::pg::quote_ident(name)
        ))
        .await
        .map_err(|e| PgError::query(format!("dropping publication {name}"), conn, e))?;
    Ok(())
}

/// The tables the publication streams, or `None` if it does not exist.
pub async fn tables(
    client: &Client,
    conn: &ConnInfo,
    name: &str,
) -> Result<Option<Vec<TableName>>, CdcError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(|e| PgError::query("reading publications", conn, e))?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&name],
        )
        .await
        .map_err(|e| PgError::query("reading the publication's tables", conn, e))?;
    Ok(Some(
        rows.iter()
            .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect(),
    ))
}
