//! What must exist on a target before a plan's tables can be created and loaded elsewhere
//! (roles, extensions, procedural languages, schemas, types and the functions they, defaults
//! and checks call), checked and created here; and undone when what follows fails.
//!
//! An extension the target lacks is created when the role may (a trusted extension, by a
//! role with CREATE on the database); otherwise nothing is written and the error names the
//! `CREATE EXTENSION` to run. A procedural language installed by an extension is one of the
//! model's extensions; one that is not (or a manifest that predates saved extensions) is
//! checked by name, and a function in a language the target lacks is refused the same way,
//! before anything is written.
//!
//! What was created is also recorded, in the same transaction, in the comment of a schema the
//! caller names (a restore's staging schema), as names only: whoever finds that schema left
//! behind by a process that died reads the record back ([`Created::recorded`]) and undoes it.
//! Nothing in the record is run as SQL; the `DROP`s are written from the names, without
//! `CASCADE`, so an object someone has started using since is kept.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::function::ExtensionDef;
use super::{Plan, Prerequisite};
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
    /// By signature: `schema.name(argument types)`.
    Function(TableName, Vec<String>),
    Extension(String),
}

impl CreatedObject {
    fn drop_sql(&self) -> String {
        match self {
            CreatedObject::Schema(s) => format!("DROP SCHEMA IF EXISTS {}", quote_ident(s)),
            CreatedObject::Type(t) => format!("DROP TYPE IF EXISTS {}", t.quoted()),
            // The argument types are quoted as identifiers so that nothing recorded in a
            // comment is ever run as SQL; PostgreSQL's own type names need none.
            CreatedObject::Function(f, args) => format!(
                "DROP FUNCTION IF EXISTS {}({})",
                f.quoted(),
                args.iter()
                    .map(|a| quote_type(a))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            CreatedObject::Extension(e) => format!("DROP EXTENSION IF EXISTS {}", quote_ident(e)),
        }
    }
}

/// A type name as `format_type` writes it (`integer`, `character varying`, `public.ban[]`),
/// made safe to splice: each dotted part quoted unless it is plain lower-case words.
fn quote_type(t: &str) -> String {
    let plain = |p: &str| {
        p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ' ')
    };
    let (base, arrays) = match t.find("[]") {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let arrays = if arrays.chars().all(|c| c == '[' || c == ']') {
        arrays
    } else {
        ""
    };
    let parts: Vec<String> = base
        .split('.')
        .map(
            |p| match p.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                Some(quoted) => quote_ident(&quoted.replace("\"\"", "\"")),
                None if plain(p) => p.to_string(),
                None => quote_ident(p),
            },
        )
        .collect();
    format!("{}{arrays}", parts.join("."))
}

/// Extensions, schemas, types and functions created by [`create_prerequisites`] (or read back from its record), to
/// drop if what they were created for does not complete.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Created {
    /// In the order to drop them: later types (built on earlier ones) first, schemas last.
    objects: Vec<CreatedObject>,
}

/// Creates, in one transaction of its own on `client`, the extensions, schemas, user-defined
/// types and functions created before the tables of `plan` that the target lacks, and records
/// them in the comment of schema `record_in` (which exists) when given. A type or function
/// that exists under the same name (and signature) is taken as it is.
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
        for e in plan.extensions() {
            create_extension(client, conn, e, &mut created).await?;
        }
        check_languages(client, conn, plan).await?;
        // Function bodies may read tables that do not exist yet (pg_dump does the same).
        client
            .batch_execute("SET LOCAL check_function_bodies = off")
            .await
            .map_err(q("preparing to create functions".into()))?;
        for p in plan.prerequisites() {
            match p {
                Prerequisite::Type(t) => {
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
                Prerequisite::Function(f) => {
                    let exists: bool = client
                        .query_one("SELECT to_regprocedure($1) IS NOT NULL", &[&f.signature])
                        .await
                        .map_err(q(format!("looking up function {}", f.signature)))?
                        .get(0);
                    if exists {
                        continue;
                    }
                    for s in plan.function_create_statements(f) {
                        client
                            .batch_execute(&s)
                            .await
                            .map_err(q(format!("creating function {} (`{s}`)", f.signature)))?;
                    }
                    let made = client
                        .query_one(
                            "SELECT n.nspname::text, p.proname::text, \
                               ARRAY(SELECT format_type(a, NULL) FROM unnest(p.proargtypes) a) \
                             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                             WHERE p.oid = to_regprocedure($1)",
                            &[&f.signature],
                        )
                        .await
                        .map_err(q(format!("looking up function {}", f.signature)))?;
                    created.objects.push(CreatedObject::Function(
                        TableName::new(made.get::<_, String>(0), made.get::<_, String>(1)),
                        made.get(2),
                    ));
                }
            }
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

/// Makes extension `e` available: present already (in the schema the tables name its
/// members by), or created now if the role may; otherwise an error naming the statement.
async fn create_extension(
    client: &Client,
    conn: &ConnInfo,
    e: &ExtensionDef,
    created: &mut Created,
) -> Result<(), PgError> {
    let q = |e| PgError::query("looking up extensions", conn, e);
    let row = client
        .query_opt(
            "SELECT n.nspname::text FROM pg_extension x JOIN pg_namespace n \
             ON n.oid = x.extnamespace WHERE x.extname = $1",
            &[&e.name],
        )
        .await
        .map_err(q)?;
    if let Some(row) = row {
        let schema: String = row.get(0);
        if schema == e.schema {
            return Ok(());
        }
        return Err(PgError::Invalid(format!(
            "extension {} is installed in schema {schema} on {conn}, but the saved tables use \
             it from schema {}: move it there (`ALTER EXTENSION {} SET SCHEMA {}`) and try again",
            e.name,
            e.schema,
            quote_ident(&e.name),
            quote_ident(&e.schema)
        )));
    }
    let sql = e.create_sql();
    client
        .batch_execute(&format!(
            "SAVEPOINT extension; {sql}; RELEASE SAVEPOINT extension"
        ))
        .await
        .map_err(|err| {
            PgError::Invalid(format!(
                "the saved tables use extension {}, which {conn} lacks, and this role cannot \
                 create it ({}): run `{sql}` there as a superuser (or a role allowed to), then \
                 try again",
                e.name,
                crate::pg::describe(&err)
            ))
        })?;
    created
        .objects
        .push(CreatedObject::Extension(e.name.clone()));
    Ok(())
}

/// Refuses functions whose language the target lacks, naming what would install it.
async fn check_languages(client: &Client, conn: &ConnInfo, plan: &Plan<'_>) -> Result<(), PgError> {
    let functions = plan.functions();
    let mut languages: Vec<String> = functions
        .iter()
        .map(|f| f.language.clone())
        .filter(|l| !l.is_empty())
        .collect();
    languages.sort();
    languages.dedup();
    let missing = client
        .query(
            "SELECT l FROM unnest($1::text[]) l \
             WHERE NOT EXISTS (SELECT 1 FROM pg_language WHERE lanname = l) ORDER BY l",
            &[&languages],
        )
        .await
        .map_err(|e| PgError::query("looking up procedural languages", conn, e))?;
    if let Some(r) = missing.first() {
        let language: String = r.get(0);
        let users: Vec<&str> = functions
            .iter()
            .filter(|f| f.language == language)
            .map(|f| f.signature.as_str())
            .collect();
        return Err(PgError::Invalid(format!(
            "function(s) {} are written in {language}, which {conn} lacks: run \
             `CREATE EXTENSION {}` there as a superuser, then try again",
            users.join(", "),
            quote_ident(&language)
        )));
    }
    Ok(())
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
                _ => None,
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
                CreatedObject::Function(
                    TableName::new("util", "ok"),
                    vec![
                        "public.\"Mood\"[]".into(),
                        "character varying".into(),
                        "text); DROP TABLE t; --".into(),
                    ],
                ),
                CreatedObject::Type(TableName::new("sales", "mood")),
                CreatedObject::Extension("citext".into()),
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
                // Argument types as PostgreSQL writes them, anything else quoted as a name.
                "DROP FUNCTION IF EXISTS \"util\".\"ok\"(public.\"Mood\"[], character varying, \
                 \"text); DROP TABLE t; --\")",
                "DROP TYPE IF EXISTS \"sales\".\"mood\"",
                "DROP EXTENSION IF EXISTS \"citext\"",
                "DROP SCHEMA IF EXISTS \"sales\""
            ]
        );
        // Someone else's comment, or SQL, is never a record.
        for other in [None, Some("staging"), Some("invsync created: DROP TABLE t")] {
            assert_eq!(Created::recorded(other), Created::default());
        }
    }
}
