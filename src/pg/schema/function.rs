//! The user-defined functions a table needs (called by its column defaults, generated
//! columns, checks, indexes, triggers, rules, policies, or by the checks and defaults of the
//! domains it uses) and the extensions that provide what it uses from outside the user's own
//! objects (a type such as `citext`, a function, an operator class).
//!
//! Found through `pg_depend`, which PostgreSQL fills for every expression it stores, so a
//! function called from a default is found the same way as one a trigger executes. Functions
//! are saved as `pg_get_functiondef` writes them (`CREATE OR REPLACE FUNCTION`). Those that
//! defaults, generated columns, checks, indexes or domains call are created before the types
//! and tables (bodies unchecked, as pg_dump does, since a body may read tables created
//! later); the others, and any that take a restored table's row type, after the tables.
//!
//! A function that belongs to an extension is not saved: the extension is, by name and
//! schema, and must be installed (or installable by the restoring role) on the target.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::acl::{self, Access, AccessOptions};
use crate::pg::{quote_literal, ConnInfo, PgError, TableName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// `schema.name(argument types)`, as `regprocedure` writes it.
    pub signature: String,
    pub definition: String,
    pub access: Access,
    pub comment: Option<String>,
    /// The schema it lives in (empty in manifests written before it was saved).
    #[serde(default)]
    pub schema: String,
    /// `plpgsql`, `sql`, ... (empty in manifests written before it was saved).
    #[serde(default)]
    pub language: String,
    /// User-defined types (and row types of tables) in its arguments and result.
    #[serde(default)]
    pub uses_types: Vec<TableName>,
    /// Called by a column default, generated column, check, index or domain: created with
    /// the types, before the tables.
    #[serde(default)]
    pub before_tables: bool,
}

impl FunctionDef {
    /// Its definition (`CREATE OR REPLACE`), comment, owner and privileges under `opts`.
    pub fn create_statements(&self, opts: AccessOptions) -> Vec<String> {
        let mut out = vec![self.definition.clone()];
        if let Some(c) = &self.comment {
            out.push(format!(
                "COMMENT ON FUNCTION {} IS {}",
                self.signature,
                quote_literal(c)
            ));
        }
        out.extend(self.access.statements("FUNCTION", &self.signature, opts));
        out
    }
}

/// An extension the saved objects use, where it was installed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExtensionDef {
    pub name: String,
    pub schema: String,
    /// Used by what is created before the tables (a column's type, a check, an index, a
    /// function those call), not only by triggers, rules or policies.
    #[serde(default)]
    pub before_tables: bool,
}

impl ExtensionDef {
    /// What an operator runs to install it as the source has it.
    pub fn create_sql(&self) -> String {
        format!(
            "CREATE EXTENSION IF NOT EXISTS {} SCHEMA {} CASCADE",
            crate::pg::quote_ident(&self.name),
            crate::pg::quote_ident(&self.schema)
        )
    }
}

/// The objects a set of relations (`$1`) and saved types (`$2`) and functions (`$3`, of
/// which `$4` are created before the tables) are made of, as `(classid, objid,
/// before_tables)`: what their `pg_depend` rows start from.
const OBJECTS_SQL: &str = "WITH objs(classid, objid, pre) AS ( \
      SELECT 'pg_class'::regclass::oid, o, true FROM unnest($1::oid[]) o \
      UNION ALL SELECT 'pg_attrdef'::regclass::oid, oid, true FROM pg_attrdef WHERE adrelid = ANY($1) \
      UNION ALL SELECT 'pg_constraint'::regclass::oid, oid, contype <> 'f' FROM pg_constraint \
        WHERE conrelid = ANY($1) OR contypid = ANY($2) \
      UNION ALL SELECT 'pg_class'::regclass::oid, indexrelid, true FROM pg_index WHERE indrelid = ANY($1) \
      UNION ALL SELECT 'pg_type'::regclass::oid, o, true FROM unnest($2::oid[]) o \
      UNION ALL SELECT 'pg_class'::regclass::oid, c.oid, true FROM pg_type t \
        JOIN pg_class c ON c.oid = t.typrelid AND c.relkind = 'c' WHERE t.oid = ANY($2) \
      UNION ALL SELECT 'pg_proc'::regclass::oid, o, o = ANY($4::oid[]) FROM unnest($3::oid[]) o \
      UNION ALL SELECT 'pg_policy'::regclass::oid, oid, false FROM pg_policy WHERE polrelid = ANY($1) \
      UNION ALL SELECT 'pg_rewrite'::regclass::oid, oid, false FROM pg_rewrite \
        WHERE ev_class = ANY($1) AND rulename <> '_RETURN' \
      UNION ALL SELECT 'pg_statistic_ext'::regclass::oid, oid, false FROM pg_statistic_ext \
        WHERE stxrelid = ANY($1) \
      UNION ALL SELECT 'pg_trigger'::regclass::oid, oid, false FROM pg_trigger \
        WHERE tgrelid = ANY($1) AND NOT tgisinternal AND tgparentid = 0) ";

/// Whether object `(classid, objid)` of `pg_depend` belongs to an extension.
const MEMBER_SQL: &str = "EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = d.refclassid \
      AND x.objid = d.refobjid AND x.refclassid = 'pg_extension'::regclass AND x.deptype = 'e')";

/// What a model is made of so far, by oid: its relations, the types it saved or met, and the
/// functions it saved. What these depend on is read through `pg_depend`.
#[derive(Default)]
pub(crate) struct Found {
    pub relations: Vec<u32>,
    pub types: Vec<u32>,
    pub functions: Vec<u32>,
    /// Those of `functions` created before the tables.
    pub functions_before_tables: Vec<u32>,
}

impl Found {
    /// Runs `select` (reading `objs o`) over the objects; `what` names it in errors.
    async fn query(
        &self,
        client: &Client,
        conn: &ConnInfo,
        what: String,
        select: &str,
    ) -> Result<Vec<tokio_postgres::Row>, PgError> {
        client
            .query(
                &format!("{OBJECTS_SQL} {select}"),
                &[
                    &self.relations,
                    &self.types,
                    &self.functions,
                    &self.functions_before_tables,
                ],
            )
            .await
            .map_err(|e| PgError::query(what, conn, e))
    }

    /// User-defined functions (not extension members) that the objects call and that are not
    /// saved yet, with whether one of the callers is created before the tables:
    /// `(oid, before_tables)`.
    pub async fn new_functions(
        &self,
        client: &Client,
        conn: &ConnInfo,
        table: &TableName,
    ) -> Result<Vec<(u32, bool)>, PgError> {
        let rows = self
            .query(
                client,
                conn,
                format!("reading the functions {table} calls"),
                &format!(
                    "SELECT d.refobjid, bool_or(o.pre) FROM objs o \
                     JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid \
                     WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid >= 16384 \
                       AND d.deptype = 'n' AND NOT {MEMBER_SQL} \
                       AND d.refobjid <> ALL($3::oid[]) \
                     GROUP BY d.refobjid ORDER BY d.refobjid"
                ),
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The extensions whose members the objects use, each marked when something created
    /// before the tables (a column's type, a check, an index, such a function) uses it.
    pub async fn extensions(
        &self,
        client: &Client,
        conn: &ConnInfo,
        table: &TableName,
    ) -> Result<Vec<ExtensionDef>, PgError> {
        let rows = self
            .query(
                client,
                conn,
                format!("reading the extensions {table} uses"),
                "SELECT e.extname::text, n.nspname::text, bool_or(o.pre) FROM objs o \
                 JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid \
                 JOIN pg_depend x ON x.classid = d.refclassid AND x.objid = d.refobjid \
                   AND x.refclassid = 'pg_extension'::regclass AND x.deptype = 'e' \
                 JOIN pg_extension e ON e.oid = x.refobjid \
                 JOIN pg_namespace n ON n.oid = e.extnamespace GROUP BY 1, 2 ORDER BY 1",
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ExtensionDef {
                name: r.get(0),
                schema: r.get(1),
                before_tables: r.get(2),
            })
            .collect())
    }
}

/// Function `oid` and the oids of the user-defined types in its signature (array types
/// as their elements); `None` for an aggregate, which is not saved (with a warning).
pub(crate) async fn load(
    client: &Client,
    conn: &ConnInfo,
    oid: u32,
    before_tables: bool,
) -> Result<Option<(FunctionDef, Vec<u32>)>, PgError> {
    let q = |e| PgError::query(format!("reading function {oid}"), conn, e);
    let r = client
        .query_one(
            &format!(
                "SELECT p.oid::regprocedure::text, p.prokind::text, n.nspname::text, \
                   l.lanname::text, pg_get_userbyid(p.proowner)::text, {}, \
                   obj_description(p.oid, 'pg_proc'), \
                   ARRAY(SELECT DISTINCT coalesce(e.oid, t.oid) FROM \
                     unnest(p.prorettype || coalesce(p.proallargtypes, p.proargtypes::oid[])) a \
                     JOIN pg_type t ON t.oid = a \
                     LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' \
                     WHERE coalesce(e.oid, t.oid) >= 16384) \
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                 JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = $1",
                acl::select("p.proacl")
            ),
            &[&oid],
        )
        .await
        .map_err(q)?;
    let signature: String = r.get(0);
    if r.get::<_, String>(1) == "a" {
        tracing::warn!(
            "aggregate {signature} is used by a saved table but is not saved with it; \
             create it on the target by hand before restoring"
        );
        return Ok(None);
    }
    let definition: String = client
        .query_one("SELECT pg_get_functiondef($1)", &[&oid])
        .await
        .map_err(q)?
        .get(0);
    let type_oids: Vec<u32> = r.get(7);
    let uses_types = client
        .query(
            "SELECT n.nspname::text, t.typname::text FROM pg_type t \
             JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = ANY($1) ORDER BY 1, 2",
            &[&type_oids],
        )
        .await
        .map_err(q)?
        .iter()
        .map(|t| TableName::new(t.get::<_, String>(0), t.get::<_, String>(1)))
        .collect();
    Ok(Some((
        FunctionDef {
            signature,
            definition,
            access: Access {
                owner: Some(r.get(4)),
                acl: acl::parse(r.get(5)),
            },
            comment: r.get(6),
            schema: r.get(2),
            language: r.get(3),
            uses_types,
            before_tables,
        },
        type_oids,
    )))
}

/// Signatures of the user-defined functions that type `oid`'s checks and default call (a
/// domain's), or that build it (a range's difference function).
pub(crate) async fn called_by_type(
    client: &Client,
    conn: &ConnInfo,
    oid: u32,
) -> Result<Vec<String>, PgError> {
    Ok(client
        .query(
            &format!(
                "SELECT DISTINCT d.refobjid::regprocedure::text FROM pg_depend d \
                 WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid >= 16384 \
                   AND d.deptype = 'n' AND NOT {MEMBER_SQL} \
                   AND ((d.classid = 'pg_type'::regclass AND d.objid = $1) \
                     OR (d.classid = 'pg_constraint'::regclass AND d.objid IN \
                         (SELECT oid FROM pg_constraint WHERE contypid = $1))) ORDER BY 1"
            ),
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the functions type {oid} calls"), conn, e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
