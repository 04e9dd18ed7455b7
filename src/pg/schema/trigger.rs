//! Triggers and rules of a relation (the functions triggers call are in [`super::function`]).
//!
//! A trigger defined on a partitioned table has a clone on each partition that PostgreSQL
//! creates by itself; only the parent's is saved.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

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
        let how = enabled_keyword(&self.enabled)?;
        Some(format!(
            "ALTER TABLE {table} {how} TRIGGER {}",
            crate::pg::quote_ident(&self.name)
        ))
    }
}

/// The triggers of relation `oid`.
pub(crate) async fn load(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    oid: u32,
) -> Result<Vec<Trigger>, PgError> {
    let q = |e| PgError::query(format!("reading the triggers of {table}"), conn, e);
    let rows = client
        .query(
            "SELECT t.tgname::text, pg_get_triggerdef(t.oid), t.tgenabled::text, \
               obj_description(t.oid, 'pg_trigger') \
             FROM pg_trigger t WHERE t.tgrelid = $1 AND NOT t.tgisinternal AND t.tgparentid = 0 \
             ORDER BY t.tgname",
            &[&oid],
        )
        .await
        .map_err(q)?;
    Ok(rows
        .iter()
        .map(|r| Trigger {
            name: r.get(0),
            definition: r.get(1),
            enabled: r.get(2),
            comment: r.get(3),
        })
        .collect())
}

/// A rule on a relation (not a view's `_RETURN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    /// As `pg_get_ruledef` writes it, without the final `;`.
    pub definition: String,
    /// `pg_rewrite.ev_enabled`, as for triggers.
    pub enabled: String,
    pub comment: Option<String>,
}

impl Rule {
    /// `ALTER TABLE ... DISABLE/ENABLE REPLICA/ENABLE ALWAYS RULE` when it does not fire
    /// normally.
    pub fn state_sql(&self, table: &str) -> Option<String> {
        let how = enabled_keyword(&self.enabled)?;
        Some(format!(
            "ALTER TABLE {table} {how} RULE {}",
            crate::pg::quote_ident(&self.name)
        ))
    }
}

fn enabled_keyword(enabled: &str) -> Option<&'static str> {
    match enabled {
        "D" => Some("DISABLE"),
        "R" => Some("ENABLE REPLICA"),
        "A" => Some("ENABLE ALWAYS"),
        _ => None,
    }
}

/// The rules of relation `oid`.
pub(crate) async fn load_rules(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    oid: u32,
) -> Result<Vec<Rule>, PgError> {
    Ok(client
        .query(
            "SELECT rulename::text, rtrim(pg_get_ruledef(oid), ';'), ev_enabled::text, \
               obj_description(oid, 'pg_rewrite') \
             FROM pg_rewrite WHERE ev_class = $1 AND rulename <> '_RETURN' ORDER BY rulename",
            &[&oid],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the rules of {table}"), conn, e))?
        .iter()
        .map(|r| Rule {
            name: r.get(0),
            definition: r.get(1),
            enabled: r.get(2),
            comment: r.get(3),
        })
        .collect())
}
