//! The privileges a role needs for the part it plays in invsync, checked on its own
//! connection, and the statement that grants each one it lacks. For managed databases (RDS,
//! Cloud SQL, Azure) where no role is superuser: each [`MissingPrivilege`] names what is
//! missing, what needs it, and the exact `GRANT` / `ALTER` to run as an administrator.
//!
//! What each part does that needs a privilege (keep in step with the code that does it):
//! - a pipeline's source: streams from a logical slot (`REPLICATION`, or membership of
//!   `rds_replication`), copies its tables (`USAGE` on their schemas, `SELECT`), and creates or
//!   alters the publication (`CREATE` on the database for a new one, ownership of an existing
//!   one, and ownership of every table in it);
//! - a pipeline's target: keeps its bookkeeping in the `invsync` schema (`CREATE` on the
//!   database, and on that schema if someone else created it), applies with a replication
//!   origin (`EXECUTE` on `pg_replication_origin_create`, `_oid`, `_session_setup`,
//!   `_session_reset` and, for teardown, `_drop`: revoked from `PUBLIC` by default), writes
//!   the tables (`SELECT, INSERT, UPDATE, DELETE, TRUNCATE`, `USAGE` on their schemas, past
//!   row-level security: `BYPASSRLS` or ownership), and creates missing ones (`CREATE` on their
//!   schema);
//! - a restore's target: creates its staging schema (`CREATE` on the database);
//! - either end of a pipeline that lists `application_roles` (a switchover's old or new
//!   primary): sets and resets the roles' `default_transaction_read_only` in the database
//!   (`CREATEROLE`; from PostgreSQL 16 also `ADMIN OPTION` on each role); on the old primary
//!   it also ends the roles' sessions (membership of `pg_signal_backend`) and keeps its record
//!   in the `invsync` schema.
//!
//! A superuser lacks nothing; nothing here needs one.

use serde::Serialize;
use tokio_postgres::Client;

use super::{quote_ident, ConnInfo, PgError, TableName};

/// What a role does on one database.
#[derive(Debug, Clone)]
pub enum Part<'a> {
    /// The source of pipelines: their tables (those that exist) and publication names.
    Source {
        tables: &'a [TableName],
        publications: &'a [String],
    },
    /// A target of pipelines: their tables (created by setup when missing).
    Target { tables: &'a [TableName] },
    /// The database a restore writes into.
    Restore,
    /// An end of a switchover of pipelines listing `roles` as their application roles: the
    /// old primary (`pauses`: makes them read-only, ends their sessions, keeps the record) or
    /// the new one (lets them write).
    Switchover { roles: &'a [String], pauses: bool },
}

impl Part<'_> {
    fn label(&self) -> &'static str {
        match self {
            Part::Source { .. } => "a pipeline source",
            Part::Target { .. } => "a pipeline target",
            Part::Restore => "a restore target",
            Part::Switchover { .. } => "a switchover",
        }
    }
}

/// A privilege the connected role lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingPrivilege {
    /// The connected role.
    pub role: String,
    /// What is missing, e.g. `EXECUTE on pg_replication_origin_create(text)`.
    pub privilege: String,
    /// What needs it, e.g. `sync run`.
    pub needed_for: String,
    /// The statement that gives it, run by an administrator.
    pub grant: String,
}

/// The replication-origin functions apply and teardown call, with what calls them.
const ORIGIN_FUNCTIONS: &[(&str, &str)] = &[
    ("pg_replication_origin_oid(text)", "sync setup and run"),
    ("pg_replication_origin_create(text)", "sync setup and run"),
    (
        "pg_replication_origin_session_setup(text)",
        "sync setup and run",
    ),
    ("pg_replication_origin_session_reset()", "sync setup"),
    ("pg_replication_origin_drop(text)", "sync teardown"),
];

/// Checks, on `client` (connected as the role to check), what the role lacks for `part`.
pub async fn missing(
    client: &Client,
    conn: &ConnInfo,
    part: &Part<'_>,
) -> Result<Vec<MissingPrivilege>, PgError> {
    let q = |e| PgError::query(format!("checking privileges for {}", part.label()), conn, e);
    let me = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication OR EXISTS ( \
               SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication' \
                 AND pg_has_role(current_user, g.oid, 'MEMBER')), \
               rolbypassrls, current_database()::text, \
               has_database_privilege(current_database(), 'CREATE') \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q)?;
    let role: String = me.get(0);
    if me.get::<_, bool>(1) {
        return Ok(Vec::new());
    }
    let (replicates, bypasses_rls, db, create_db): (bool, bool, String, bool) =
        (me.get(2), me.get(3), me.get(4), me.get(5));
    let who = quote_ident(&role);
    let mut out = Vec::new();
    let mut need = |privilege: String, needed_for: &str, grant: String| {
        if !out.iter().any(|m: &MissingPrivilege| m.grant == grant) {
            out.push(MissingPrivilege {
                role: role.clone(),
                privilege,
                needed_for: needed_for.to_string(),
                grant,
            });
        }
    };
    let create_on_db = format!("GRANT CREATE ON DATABASE {} TO {who}", quote_ident(&db));
    match part {
        Part::Source {
            tables,
            publications,
        } => {
            if !replicates {
                need(
                    "REPLICATION".into(),
                    "sync setup and run (the replication slot)",
                    format!("ALTER ROLE {who} REPLICATION"),
                );
            }
            for t in table_facts(client, tables).await.map_err(q)? {
                if !t.exists {
                    continue;
                }
                if !t.schema_usage {
                    need(
                        format!("USAGE on schema {}", t.name.schema),
                        "sync setup (the initial copy)",
                        format!(
                            "GRANT USAGE ON SCHEMA {} TO {who}",
                            quote_ident(&t.name.schema)
                        ),
                    );
                }
                if t.missing.contains(&"SELECT") {
                    need(
                        format!("SELECT on {}", t.name),
                        "sync setup (the initial copy)",
                        format!("GRANT SELECT ON TABLE {} TO {who}", t.name.quoted()),
                    );
                }
                if !t.owned {
                    need(
                        format!("ownership of {}", t.name),
                        "sync setup (the publication)",
                        format!("ALTER TABLE {} OWNER TO {who}", t.name.quoted()),
                    );
                }
            }
            let rows = client
                .query(
                    "SELECT p, pub.oid IS NOT NULL, \
                       coalesce(pg_has_role(pub.pubowner, 'USAGE'), false) \
                     FROM unnest($1::text[]) p LEFT JOIN pg_publication pub ON pub.pubname = p",
                    &[publications],
                )
                .await
                .map_err(q)?;
            for r in rows {
                let (name, exists, owned): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
                if !exists && !create_db {
                    need(
                        format!("CREATE on database {db}"),
                        "sync setup (creating the publication)",
                        create_on_db.clone(),
                    );
                } else if exists && !owned {
                    need(
                        format!("ownership of publication {name}"),
                        "sync setup (altering the publication)",
                        format!("ALTER PUBLICATION {} OWNER TO {who}", quote_ident(&name)),
                    );
                }
            }
        }
        Part::Target { tables } => {
            if !create_db {
                need(
                    format!("CREATE on database {db}"),
                    "sync setup (the invsync schema)",
                    create_on_db.clone(),
                );
            }
            if !bookkeeping_usable(client).await.map_err(q)? {
                need(
                    "CREATE and USAGE on schema invsync".into(),
                    "sync setup and run (the pipeline's bookkeeping)",
                    format!("GRANT CREATE, USAGE ON SCHEMA invsync TO {who}"),
                );
            }
            for (function, needed_for) in ORIGIN_FUNCTIONS {
                let ok: bool = client
                    .query_one(
                        "SELECT has_function_privilege($1, 'EXECUTE')",
                        &[&format!("pg_catalog.{function}")],
                    )
                    .await
                    .map_err(q)?
                    .get(0);
                if !ok {
                    need(
                        format!("EXECUTE on {function}"),
                        needed_for,
                        format!("GRANT EXECUTE ON FUNCTION pg_catalog.{function} TO {who}"),
                    );
                }
            }
            for t in table_facts(client, tables).await.map_err(q)? {
                if !t.exists {
                    if t.schema_exists && !t.schema_create {
                        need(
                            format!("CREATE on schema {}", t.name.schema),
                            "sync setup (creating the table)",
                            format!(
                                "GRANT CREATE ON SCHEMA {} TO {who}",
                                quote_ident(&t.name.schema)
                            ),
                        );
                    } else if !t.schema_exists && !create_db {
                        need(
                            format!("CREATE on database {db}"),
                            "sync setup (creating the table's schema)",
                            create_on_db.clone(),
                        );
                    }
                    continue;
                }
                if !t.schema_usage {
                    need(
                        format!("USAGE on schema {}", t.name.schema),
                        "sync setup and run",
                        format!(
                            "GRANT USAGE ON SCHEMA {} TO {who}",
                            quote_ident(&t.name.schema)
                        ),
                    );
                }
                if !t.missing.is_empty() {
                    need(
                        format!("{} on {}", t.missing.join(", "), t.name),
                        "sync setup and run (copy and apply)",
                        format!(
                            "GRANT {} ON TABLE {} TO {who}",
                            t.missing.join(", "),
                            t.name.quoted()
                        ),
                    );
                }
                if t.row_security && !t.owned && !bypasses_rls {
                    need(
                        format!("BYPASSRLS (row-level security is on for {})", t.name),
                        "sync setup and run (apply sees every row)",
                        format!("ALTER ROLE {who} BYPASSRLS"),
                    );
                }
            }
        }
        Part::Restore => {
            if !create_db {
                need(
                    format!("CREATE on database {db}"),
                    "restore (its staging schema)",
                    create_on_db,
                );
            }
        }
        Part::Switchover { roles, pauses } => {
            let facts = client
                .query_one(
                    "SELECT rolcreaterole, current_setting('server_version_num')::int >= 160000, \
                       pg_has_role(current_user, 'pg_signal_backend', 'USAGE') \
                     FROM pg_roles WHERE rolname = current_user",
                    &[],
                )
                .await
                .map_err(q)?;
            let (creates_roles, admin_needed, signals): (bool, bool, bool) =
                (facts.get(0), facts.get(1), facts.get(2));
            let needed_for = if *pauses {
                "sync switchover (making the application roles read-only here)"
            } else {
                "sync switchover (letting the application roles write here)"
            };
            if !creates_roles {
                need(
                    "CREATEROLE".into(),
                    needed_for,
                    format!("ALTER ROLE {who} CREATEROLE"),
                );
            }
            let others = client
                .query(
                    "SELECT rolname::text, pg_has_role(current_user, oid, 'USAGE WITH ADMIN OPTION'), \
                       pg_has_role(current_user, oid, 'USAGE') \
                     FROM pg_roles WHERE rolname = ANY($1) ORDER BY rolname",
                    &[roles],
                )
                .await
                .map_err(q)?;
            for r in &others {
                let (name, admin, usage): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
                if admin_needed && !admin {
                    need(
                        format!("ADMIN OPTION on role {name}"),
                        needed_for,
                        format!(
                            "GRANT {} TO {who} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE",
                            quote_ident(&name)
                        ),
                    );
                }
                // pg_terminate_backend ends a session of a role whose privileges it has.
                if *pauses && !signals && !usage {
                    need(
                        "membership of pg_signal_backend".into(),
                        "sync switchover (ending the application roles' sessions here)",
                        format!("GRANT pg_signal_backend TO {who}"),
                    );
                }
            }
            if *pauses && !bookkeeping_usable(client).await.map_err(q)? {
                need(
                    "CREATE and USAGE on schema invsync".into(),
                    "sync switchover (its record)",
                    format!("GRANT CREATE, USAGE ON SCHEMA invsync TO {who}"),
                );
            } else if *pauses && !create_db {
                let absent: bool = client
                    .query_one("SELECT to_regnamespace('invsync') IS NULL", &[])
                    .await
                    .map_err(q)?
                    .get(0);
                if absent {
                    need(
                        format!("CREATE on database {db}"),
                        "sync switchover (the invsync schema for its record)",
                        create_on_db,
                    );
                }
            }
        }
    }
    Ok(out)
}

/// True when the `invsync` schema is absent (created by whoever needs it) or the role may
/// create in and use it.
async fn bookkeeping_usable(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT to_regnamespace('invsync') IS NULL \
               OR has_schema_privilege('invsync', 'CREATE, USAGE')",
            &[],
        )
        .await?
        .get(0))
}

/// What the connected role may do with one table.
struct TableFacts {
    name: TableName,
    exists: bool,
    schema_exists: bool,
    schema_usage: bool,
    schema_create: bool,
    owned: bool,
    row_security: bool,
    /// Of `SELECT, INSERT, UPDATE, DELETE, TRUNCATE`, those not granted.
    missing: Vec<&'static str>,
}

const TABLE_PRIVILEGES: [&str; 5] = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"];

async fn table_facts(
    client: &Client,
    tables: &[TableName],
) -> Result<Vec<TableFacts>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for name in tables {
        let r = client
            .query_one(
                "SELECT c.oid IS NOT NULL, n.oid IS NOT NULL, \
                   coalesce(has_schema_privilege(n.oid, 'USAGE'), false), \
                   coalesce(has_schema_privilege(n.oid, 'CREATE'), false), \
                   coalesce(pg_has_role(c.relowner, 'USAGE'), false), \
                   coalesce(c.relrowsecurity, false), \
                   ARRAY(SELECT p FROM unnest($3::text[]) WITH ORDINALITY u(p, i) \
                         WHERE c.oid IS NOT NULL AND NOT has_table_privilege(c.oid, p) \
                         ORDER BY i) \
                 FROM (SELECT 1) one \
                 LEFT JOIN pg_namespace n ON n.nspname = $1 \
                 LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = $2",
                &[
                    &name.schema,
                    &name.name,
                    &TABLE_PRIVILEGES
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>(),
                ],
            )
            .await?;
        let granted_not: Vec<String> = r.get(6);
        out.push(TableFacts {
            name: name.clone(),
            exists: r.get(0),
            schema_exists: r.get(1),
            schema_usage: r.get(2),
            schema_create: r.get(3),
            owned: r.get(4),
            row_security: r.get(5),
            missing: TABLE_PRIVILEGES
                .into_iter()
                .filter(|p| granted_not.iter().any(|g| g == p))
                .collect(),
        });
    }
    Ok(out)
}
