//! Table definitions on the targets: creating missing tables from the source's
//! [`TableModel`] (the same model a backup saves and a restore creates), and checking that
//! existing tables can take every column the source sends.
//!
//! A created table is a replica's table, not a promoted copy. It gets what keeps rows and reads
//! on the target as on the source: schemas, the extensions whose members it uses,
//! user-defined types (enum, domain, composite, range) and the functions that they, defaults,
//! generated columns, checks and indexes call, the table with its partitions and their bounds,
//! column types, collations, NOT NULL, generated columns, defaults, identity, sequences with
//! their positions, primary key, unique, check and exclusion constraints, every index, and the
//! replica identity. It gets no foreign keys, triggers or trigger functions, rules, extended
//! statistics, row-level security or policies, comments, owners or grants: changes arrive checked by the source, and on a target without superuser
//! (where `session_replication_role = replica` is unavailable) foreign keys and triggers
//! would fire during the parallel copy and stop apply from folding changes (see
//! `apply::REORDERABLE`); row-level security would hide rows from apply; roles differ between
//! clouds. `invsync restore` creates all of those.
//!
//! Never drops or changes anything on an existing target table: one that lacks a column is
//! reported with the DDL that would fix it, unless invsync is asked to add it (during
//! streaming, when the source gained the column: [`ColumnDef::add_sql`]).

use std::collections::HashSet;

use tokio_postgres::Client;

use super::SyncError;
use crate::pg::schema::{
    create_prerequisites, AccessOptions, ColumnDef, Placement, Plan, TableModel,
};
use crate::pg::{ConnInfo, PgError, TableInfo};

/// What sync creates of a model on a target: no owners or grants (the target's roles are
/// not the source's).
const ACCESS: AccessOptions = AccessOptions {
    no_owner: true,
    no_acl: true,
};

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
            let lacks = |name: &str, generated: bool| !generated && !have.contains(name);
            if !source
                .columns
                .iter()
                .any(|c| lacks(&c.name, c.generated.is_some()))
            {
                return Ok(existing);
            }
            // The DDL to suggest comes from the model, as when the column is added while
            // streaming.
            let model = TableModel::load(source_client, source_conn, &source.name).await?;
            let missing: Vec<&ColumnDef> = model
                .table()
                .columns
                .iter()
                .filter(|c| lacks(&c.name, c.generated.is_some()))
                .collect();
            Err(SyncError::MissingColumns {
                table: source.name.to_string(),
                target: target_conn.to_string(),
                columns: missing
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                ddl: missing
                    .iter()
                    .map(|c| c.add_sql(&source.name))
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        }
        Err(PgError::MissingTable { .. }) if create => {
            let model = TableModel::load(source_client, source_conn, &source.name).await?;
            create_table(target, target_conn, &model).await?;
            tracing::info!(table = %source.name, target = %target_conn, "created table on target");
            Ok(TableInfo::load(target, target_conn, &source.name).await?)
        }
        Err(PgError::MissingTable { table, target }) => Err(SyncError::Config(format!(
            "table {table} does not exist on {target}; create it, or run setup without --no-create"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Creates `model` on the target as the module documentation says: schemas and types in a
/// transaction of their own (a type of the same name that exists is taken as it is), then the
/// table in one transaction; if that fails, the schemas and types created for it are dropped.
async fn create_table(
    target: &Client,
    conn: &ConnInfo,
    model: &TableModel,
) -> Result<(), SyncError> {
    let plan = Plan::new(vec![model], ACCESS).tables_only();
    let created = create_prerequisites(target, conn, &plan, None).await?;
    let statements: Vec<String> = [
        plan.create_tables(0, Placement::Final),
        plan.build_statements(0, Placement::Final),
        plan.column_statements(0),
        plan.replica_identity_statements(0),
    ]
    .concat();
    let sql = format!("BEGIN; {}; COMMIT", statements.join(";\n"));
    if let Err(e) = target.batch_execute(&sql).await {
        let _ = target.batch_execute("ROLLBACK").await;
        created.undo(target).await;
        return Err(PgError::query(
            format!(
                "creating table {} (`{}`)",
                model.name(),
                statements.join("; ")
            ),
            conn,
            e,
        )
        .into());
    }
    Ok(())
}
