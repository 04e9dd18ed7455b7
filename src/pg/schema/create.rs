//! What must exist on a target before a plan's tables can be created and loaded elsewhere
//! (roles, schemas, types), checked and created here; and undone when what follows fails.
//!
//! What was created is also recorded, in the same transaction, in the comment of a schema the
//! caller names (a restore's staging schema), as names only: whoever finds that schema left
//! behind by a process that died reads the record back ([`Created::recorded`]) and undoes it.
//! Nothing in the record is run as SQL; the `DROP`s are written from the names, without
//! `CASCADE`, so an object someone has started using since is kept.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::Plan;
use crate::pg::{quote_ident, quote_literal, ConnInfo, PgError, TableName};

/// Roles the plan needs that the target lacks, by name (a schema's only if the target lacks
/// the schema, which the plan then creates).
pub async fn missing_roles(
    client: &Client,
    conn: &ConnInfo,
    plan: &Plan<'_>,
) -> Result<Vec<String>, PgError> {
    let mut wanted = plan.required_roles();
    let absent = client
        .query(
            "SELECT s FROM unnest($1::text[]) s WHERE to_regnamespace(quote_ident(s)) IS NULL",
            &[&plan.schemas()],
        )
        .await
        .map_err(|e| PgError::query("looking up schemas", conn, e))?;
    for r in absent {
        wanted.extend(plan.schema_roles(r.get(0)));
    }
    let wanted: Vec<String> = wanted.into_iter().collect();
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

/// One object created by [`create_prerequisites`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CreatedObject {
    Schema(String),
    Type(TableName),
}

impl CreatedObject {
    fn drop_sql(&self) -> String {
        match self {
            CreatedObject::Schema(s) => format!("DROP SCHEMA IF EXISTS {}", quote_ident(s)),
            CreatedObject::Type(t) => format!("DROP TYPE IF EXISTS {}", t.quoted()),
        }
    }
}

/// Schemas and types created by [`create_prerequisites`] (or read back from its record), to
/// drop if what they were created for does not complete.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Created {
    /// In the order to drop them: later types (built on earlier ones) first, schemas last.
    objects: Vec<CreatedObject>,
}

/// Creates, in one transaction of its own on `client`, the schemas and user-defined types of
/// `plan` that the target lacks, and records them in the comment of schema `record_in` (which
/// exists) when given. A type that exists under the same name is taken as it is.
pub async fn create_prerequisites(
    client: &Client,
    conn: &ConnInfo,
    plan: &Plan<'_>,
    record_in: Option<&str>,
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
                created.objects.push(CreatedObject::Schema(schema));
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
            created.objects.push(CreatedObject::Type(t.name.clone()));
        }
        // Types before the schemas that hold them, later types (built on earlier ones) first.
        created.objects.reverse();
        if let Some(record_in) = record_in.filter(|_| !created.objects.is_empty()) {
            let record = serde_json::to_string(&created.objects).unwrap_or_default();
            client
                .batch_execute(&format!(
                    "COMMENT ON SCHEMA {} IS {}",
                    quote_ident(record_in),
                    quote_literal(&format!("{RECORD_PREFIX}{record}"))
                ))
                .await
                .map_err(q(format!("recording the new types in schema {record_in}")))?;
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
    Ok(created)
}

/// What a record in a schema's comment starts with.
const RECORD_PREFIX: &str = "invsync created: ";

impl Created {
    /// The schemas among what was created.
    pub fn schemas(&self) -> Vec<String> {
        self.objects
            .iter()
            .filter_map(|o| match o {
                CreatedObject::Schema(s) => Some(s.clone()),
                CreatedObject::Type(_) => None,
            })
            .collect()
    }

    /// What [`create_prerequisites`] recorded in a schema's `comment`; nothing for a comment
    /// it did not write.
    pub fn recorded(comment: Option<&str>) -> Created {
        let objects = comment
            .and_then(|c| c.strip_prefix(RECORD_PREFIX))
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default();
        Created { objects }
    }

    /// Drops what was created, each on its own (one in use since is kept, and the schema
    /// holding it with it); a failure is logged, not returned, as this runs while another
    /// error is being reported or while cleaning up.
    pub async fn undo(&self, client: &Client) {
        for o in &self.objects {
            if let Err(e) = client.batch_execute(&o.drop_sql()).await {
                tracing::warn!(
                    "cannot drop what a restore created ({}): {}",
                    o.drop_sql(),
                    crate::pg::describe(&e)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_read_back_as_names_and_nothing_else_is() {
        let created = Created {
            objects: vec![
                CreatedObject::Type(TableName::new("sales", "mood")),
                CreatedObject::Schema("sales".into()),
            ],
        };
        let comment = format!(
            "{RECORD_PREFIX}{}",
            serde_json::to_string(&created.objects).unwrap()
        );
        assert_eq!(Created::recorded(Some(&comment)), created);
        assert_eq!(
            created
                .objects
                .iter()
                .map(CreatedObject::drop_sql)
                .collect::<Vec<_>>(),
            vec![
                "DROP TYPE IF EXISTS \"sales\".\"mood\"",
                "DROP SCHEMA IF EXISTS \"sales\""
            ]
        );
        // Someone else's comment, or SQL, is never a record.
        for other in [None, Some("staging"), Some("invsync created: DROP TABLE t")] {
            assert_eq!(Created::recorded(other), Created::default());
        }
    }
}
