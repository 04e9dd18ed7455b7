//! The one model of a table and what it depends on: loaded from the catalogs, saved with a
//! backup, and turned back into DDL by restore and by sync's setup.
//!
//! A [`TableModel`] is one table as a user names it (a partitioned table with all its
//! partitions, or a plain table) together with what it needs to exist: the user-defined types
//! its columns use, the sequences its columns own or call, the functions its defaults,
//! checks, indexes, domains, triggers, rules and policies call, the extensions it uses
//! members of, and the schemas all of these live in (with owners, privileges and comments, given to a
//! schema only where a restore creates it). It is read in whatever transaction the caller holds, so a backup reads it at its
//! cut. Definitions are kept as PostgreSQL itself writes them (`format_type`,
//! `pg_get_constraintdef`, `pg_get_indexdef`, `pg_get_triggerdef`, `pg_get_functiondef`,
//! `pg_get_expr`, `pg_get_partkeydef`), read with only `pg_catalog` on the search path so that
//! every name in them is schema-qualified and means the same on another database.
//!
//! [`Plan`] turns several models into DDL in pg_dump's phases: pre-data (extensions, schemas,
//! types and the functions they, defaults and checks call; tables), the data, post-data
//! (constraints and indexes, then sequences, defaults and identity, functions, foreign keys,
//! triggers, rules, row-level security and policies, extended statistics, comments, owners
//! and privileges). Foreign keys are added only between tables of the plan; one to a
//! table outside it is reported by [`Plan::skipped_foreign_keys`]. [`Dependents`] are the
//! other side: what a database built on tables that a plan is about to replace.
//!
//! Not modelled (recreate them by hand): column statistics targets and storage modes,
//! publications, comments on policies, functions that saved functions call only from their
//! bodies (PostgreSQL does not record those), and aggregates.

pub mod acl;
pub mod constraint;
mod create;
pub mod dependents;
pub mod function;
mod phases;
pub mod policy;
pub mod sequence;
pub mod statistics;
pub mod table;
pub mod trigger;
pub mod types;

pub use acl::{Access, AccessOptions};
pub use create::{create_prerequisites, missing_roles, Created};
pub use dependents::Dependents;
pub use phases::{Placement, Plan, Prerequisite, SkippedForeignKey};
pub use table::{ColumnDef, TableDef};

use std::future::Future;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::{ConnInfo, PgError, TableName};

/// One table with its partitions and everything they depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableModel {
    /// The table, then its partitions, each after its parent.
    pub relations: Vec<TableDef>,
    /// User-defined types, each after the types it is built from.
    pub types: Vec<types::TypeDef>,
    pub sequences: Vec<sequence::SequenceDef>,
    pub functions: Vec<function::FunctionDef>,
    /// Extensions whose types, functions or operator classes the tables use (none in
    /// manifests written before they were saved).
    #[serde(default)]
    pub extensions: Vec<function::ExtensionDef>,
    /// The schemas all of these live in (none in manifests written before schemas were
    /// saved: a restore then creates them owned by the restoring role, with default privileges).
    #[serde(default)]
    pub schemas: Vec<SchemaDef>,
}

/// A schema with its owner, privileges and comment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaDef {
    pub name: String,
    pub comment: Option<String>,
    pub access: Access,
}

impl TableModel {
    /// The table itself (not a partition).
    pub fn table(&self) -> &TableDef {
        &self.relations[0]
    }

    pub fn name(&self) -> &TableName {
        &self.table().name
    }

    /// Reads `table` and its dependencies in the caller's current transaction, if any.
    /// `MissingTable` when it does not exist.
    pub async fn load(
        client: &Client,
        conn: &ConnInfo,
        table: &TableName,
    ) -> Result<TableModel, PgError> {
        read_qualified(
            client,
            conn,
            &format!("reading the catalog for {table}"),
            Self::load_qualified(client, conn, table),
        )
        .await
    }

    async fn load_qualified(
        client: &Client,
        conn: &ConnInfo,
        table: &TableName,
    ) -> Result<TableModel, PgError> {
        let rows = client
            .query(
                // pg_partition_tree lists nothing for a table that is not partitioned.
                "SELECT c.oid, n.nspname::text, c.relname::text FROM ( \
                   SELECT to_regclass($1) AS relid, 0 AS level \
                   UNION ALL SELECT relid, level FROM pg_partition_tree(to_regclass($1)) \
                   WHERE level > 0) p \
                 JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') ORDER BY p.level, n.nspname, c.relname",
                &[&table.quoted()],
            )
            .await
            .map_err(|e| PgError::query(format!("reading the partitions of {table}"), conn, e))?;
        if rows.is_empty() {
            return Err(PgError::MissingTable {
                table: table.to_string(),
                target: conn.to_string(),
            });
        }
        let mut model = TableModel {
            relations: Vec::new(),
            types: Vec::new(),
            sequences: Vec::new(),
            functions: Vec::new(),
            extensions: Vec::new(),
            schemas: Vec::new(),
        };
        // What the model is made of so far, by oid (types met, saved or not).
        let mut found = function::Found::default();
        for r in rows {
            let oid: u32 = r.get(0);
            let name = TableName::new(r.get::<_, String>(1), r.get::<_, String>(2));
            let mut rel = table::load(client, conn, &name, oid).await?;
            for c in &rel.columns {
                types::load_into(client, conn, c.type_oid, &mut model.types, &mut found.types)
                    .await?;
            }
            rel.constraints = constraint::load_constraints(client, conn, &name, oid).await?;
            rel.indexes = constraint::load_indexes(client, conn, &name, oid).await?;
            rel.triggers = trigger::load(client, conn, &name, oid).await?;
            rel.rules = trigger::load_rules(client, conn, &name, oid).await?;
            rel.statistics = statistics::load(client, conn, &name, oid).await?;
            rel.policies = policy::load(client, conn, &name).await?;
            for s in sequence::load(client, conn, &name, oid).await? {
                if !model.sequences.iter().any(|t| t.name == s.name) {
                    model.sequences.push(s);
                }
            }
            model.relations.push(rel);
            found.relations.push(oid);
        }
        // Functions lead to the types in their signatures, and domains to the functions
        // their checks call: read until nothing new turns up.
        loop {
            let new = found.new_functions(client, conn, table).await?;
            if new.is_empty() {
                break;
            }
            for (oid, before_tables) in new {
                found.functions.push(oid);
                if before_tables {
                    found.functions_before_tables.push(oid);
                }
                let Some((f, type_oids)) = function::load(client, conn, oid, before_tables).await?
                else {
                    continue;
                };
                for t in type_oids {
                    types::load_into(client, conn, t, &mut model.types, &mut found.types).await?;
                }
                model.functions.push(f);
            }
        }
        model.extensions = found.extensions(client, conn, table).await?;
        let mut names: Vec<String> = model
            .relations
            .iter()
            .map(|r| r.name.schema.clone())
            .chain(model.types.iter().flat_map(types::TypeDef::schemas))
            .chain(model.sequences.iter().map(|s| s.name.schema.clone()))
            .chain(model.functions.iter().map(|f| f.schema.clone()))
            .chain(model.extensions.iter().map(|e| e.schema.clone()))
            .chain(
                model
                    .relations
                    .iter()
                    .flat_map(|r| r.statistics.iter().map(|s| s.name.schema.clone())),
            )
            .collect();
        names.sort();
        names.dedup();
        let rows = client
            .query(
                &format!(
                    "SELECT nspname::text, obj_description(oid, 'pg_namespace'), \
                       pg_get_userbyid(nspowner)::text, {} \
                     FROM pg_namespace WHERE nspname = ANY($1) ORDER BY 1",
                    acl::select("nspacl")
                ),
                &[&names],
            )
            .await
            .map_err(|e| PgError::query(format!("reading the schemas of {table}"), conn, e))?;
        model.schemas = rows
            .iter()
            .map(|r| SchemaDef {
                name: r.get(0),
                comment: r.get(1),
                access: Access {
                    owner: Some(r.get(2)),
                    acl: acl::parse(r.get(3)),
                },
            })
            .collect();
        Ok(model)
    }
}

/// Runs `read` with only `pg_catalog` on `client`'s search path, so that the definitions
/// PostgreSQL writes for it (`pg_get_viewdef`, `format_type`, ...) name everything with its
/// schema; the caller's path is set back afterwards. `what` names the reading in errors.
pub async fn read_qualified<T>(
    client: &Client,
    conn: &ConnInfo,
    what: &str,
    read: impl Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    let q = |e| PgError::query(what, conn, e);
    let previous: String = client
        .query_one("SELECT current_setting('search_path')", &[])
        .await
        .map_err(q)?
        .get(0);
    client
        .query_one("SELECT set_config('search_path', 'pg_catalog', false)", &[])
        .await
        .map_err(q)?;
    let read = read.await;
    let restored = client
        .query_one("SELECT set_config('search_path', $1, false)", &[&previous])
        .await
        .map_err(q);
    let value = read?;
    restored?;
    Ok(value)
}
