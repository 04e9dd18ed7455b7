//! Triggers of a relation and the functions they call.
//!
//! A trigger defined on a partitioned table has a clone on each partition that PostgreSQL
//! creates by itself; only the parent's is saved. Functions are saved as `pg_get_functiondef`
//! writes them (`CREATE OR REPLACE FUNCTION`), so a restore replaces a function of the same
//! signature on the target with the source's, inside the restore's transaction.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::acl::{self, Access};
use crate::pg::{ConnInfo, PgError, TableName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub name: String,
    /// As `pg_get_triggerdef` writes it.
    pub definition: String,
    /// `pg_trigger.tgenabled`: `O` fires normally, `D` disabled, `R` replica, `A` always.
    pub enabled: String,
    pub comment: Option<String>,
}

impl Trigger {
    /// `ALTER TABLE ... DISABLE/ENABLE REPLICA/ENABLE ALWAYS TRIGGER` when it does not fire
    /// normally.
    pub fn state_sql(&self, table: &str) -> Option<String> {
        let how = match self.enabled.as_str() {
            "D" => "DISABLE",
            "R" => "ENABLE REPLICA",
            "A" => "ENABLE ALWAYS",
            _ => return None,
        };
        Some(format!(
            "ALTER TABLE {table} {how} TRIGGER {}",
            crate::pg::quote_ident(&self.name)
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// `schema.name(argument types)`, as `regprocedure` writes it.
    pub signature: String,
    pub definition: String,
    pub access: Access,
    pub comment: Option<String>,
}

/// The triggers of relation `oid`, and the user-defined functions they call.
pub(crate) async fn load(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    oid: u32,
) -> Result<(Vec<Trigger>, Vec<FunctionDef>), PgError> {
    let q = |e| PgError::query(format!("reading the triggers of {table}"), conn, e);
    let rows = client
        .query(
            &format!(
                "SELECT t.tgname::text, pg_get_triggerdef(t.oid), t.tgenabled::text, \
                   obj_description(t.oid, 'pg_trigger'), \
                   CASE WHEN p.oid >= 16384 AND NOT EXISTS (SELECT 1 FROM pg_depend d \
                     WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') \
                   THEN p.oid::regprocedure::text END, \
                   pg_get_functiondef(p.oid), pg_get_userbyid(p.proowner)::text, {}, \
                   obj_description(p.oid, 'pg_proc') \
                 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
                 WHERE t.tgrelid = $1 AND NOT t.tgisinternal AND t.tgparentid = 0 \
                 ORDER BY t.tgname",
                acl::select("p.proacl")
            ),
            &[&oid],
        )
        .await
        .map_err(q)?;
    let mut triggers = Vec::new();
    let mut functions: Vec<FunctionDef> = Vec::new();
    for r in rows {
        triggers.push(Trigger {
            name: r.get(0),
            definition: r.get(1),
            enabled: r.get(2),
            comment: r.get(3),
        });
        if let Some(signature) = r.get::<_, Option<String>>(4) {
            if !functions.iter().any(|f| f.signature == signature) {
                functions.push(FunctionDef {
                    signature,
                    definition: r.get(5),
                    access: Access {
                        owner: Some(r.get(6)),
                        acl: acl::parse(r.get(7)),
                    },
                    comment: r.get(8),
                });
            }
        }
    }
    Ok((triggers, functions))
}
