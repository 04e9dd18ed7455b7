//! What must exist on a target before a plan's tables can be created and loaded elsewhere
//! (roles, schemas, types), checked and created here; and undone when what follows fails.

use tokio_postgres::Client;

use super::Plan;
use crate::pg::{quote_ident, ConnInfo, PgError};

/// Roles the plan needs that the target lacks, by name.
pub async fn missing_roles(
    client: &Client,
    conn: &ConnInfo,
    plan: &Plan<'_>,
) -> Result<Vec<String>, PgError> {
    let wanted: Vec<String> = plan.required_roles().into_iter().collect();
    let rows = client
        .query(
            "SELECT r FROM unnest($1::text[]) r \
             WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) ORDER BY r",
            &[&wanted],
        )
        .await
        .map_err(|e| PgError::query("looking up roles", conn, e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Schemas and types created by [`create_prerequisites`], to drop if the restore fails.
#[derive(Debug, Default)]
pub struct Created {
    /// `DROP` statements, in the order to run them.
    undo: Vec<String>,
}

/// Creates, in one transaction of its own on `client`, the schemas and user-defined types of
/// `plan` that the target lacks. A type that exists under the same name is taken as it is.
pub async fn create_prerequisites(
    client: &Client,
    conn: &ConnInfo,
    plan: &Plan<'_>,
) -> Result<Created, PgError> {
    let q = |what: String| move |e| PgError::query(what, conn, e);
    client
        .batch_execute("BEGIN")
        .await
        .map_err(q("starting to create types".into()))?;
    let mut created = Created::default();
    let result: Result<(), PgError> = async {
        for schema in plan.schemas() {
            let exists: bool = client
                .query_one(
                    "SELECT to_regnamespace($1) IS NOT NULL",
                    &[&quote_ident(&schema)],
                )
                .await
                .map_err(q(format!("looking up schema {schema}")))?
                .get(0);
            if !exists {
                client
                    .batch_execute(&format!("CREATE SCHEMA {}", quote_ident(&schema)))
                    .await
                    .map_err(q(format!("creating schema {schema}")))?;
                created
                    .undo
                    .push(format!("DROP SCHEMA IF EXISTS {}", quote_ident(&schema)));
            }
        }
        for t in plan.types() {
            let exists: bool = client
                .query_one("SELECT to_regtype($1) IS NOT NULL", &[&t.name.quoted()])
                .await
                .map_err(q(format!("looking up type {}", t.name)))?
                .get(0);
            if exists {
                continue;
            }
            for s in plan.type_statements(t) {
                client
                    .batch_execute(&s)
                    .await
                    .map_err(q(format!("creating type {} (`{s}`)", t.name)))?;
            }
            created
                .undo
                .push(format!("DROP TYPE IF EXISTS {}", t.name.quoted()));
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(q("committing the new types".into()))?;
    // Types before the schemas that hold them, later types (built on earlier ones) first.
    created.undo.reverse();
    Ok(created)
}

impl Created {
    /// Drops what was created, in one transaction; a failure is logged, not returned, as
    /// this runs while another error is being reported.
    pub async fn undo(&self, client: &Client) {
        if self.undo.is_empty() {
            return;
        }
        let sql = format!("BEGIN; {}; COMMIT", self.undo.join("; "));
        if let Err(e) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            tracing::warn!(
                "cannot drop the types and schemas the restore created ({}): {}",
                self.undo.join("; "),
                crate::pg::describe(&e)
            );
        }
    }
}
