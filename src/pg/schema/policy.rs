//! Row-level security policies of a relation, as `pg_policies` shows them.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::pg::{quote_ident, ConnInfo, PgError, TableName};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub permissive: bool,
    /// `ALL`, `SELECT`, `INSERT`, `UPDATE` or `DELETE`.
    pub command: String,
    /// Role names; `public` stands for PUBLIC.
    pub roles: Vec<String>,
    pub using: Option<String>,
    pub with_check: Option<String>,
}

impl Policy {
    pub fn create_sql(&self, table: &str) -> String {
        let roles: Vec<String> = self
            .roles
            .iter()
            .map(|r| {
                if r == "public" {
                    "PUBLIC".to_string()
                } else {
                    quote_ident(r)
                }
            })
            .collect();
        let mut s = format!(
            "CREATE POLICY {} ON {table} AS {} FOR {} TO {}",
            quote_ident(&self.name),
            if self.permissive {
                "PERMISSIVE"
            } else {
                "RESTRICTIVE"
            },
            self.command,
            roles.join(", ")
        );
        if let Some(u) = &self.using {
            s.push_str(&format!(" USING ({u})"));
        }
        if let Some(c) = &self.with_check {
            s.push_str(&format!(" WITH CHECK ({c})"));
        }
        s
    }

    /// Roles the policy names (not PUBLIC).
    pub fn roles(&self) -> impl Iterator<Item = &String> {
        self.roles.iter().filter(|r| *r != "public")
    }
}

/// The policies of `table`.
pub(crate) async fn load(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
) -> Result<Vec<Policy>, PgError> {
    load_named(client, conn, table, None).await
}

/// The policies of `table`, or only the one called `name`.
pub(crate) async fn load_named(
    client: &Client,
    conn: &ConnInfo,
    table: &TableName,
    name: Option<&str>,
) -> Result<Vec<Policy>, PgError> {
    Ok(client
        .query(
            "SELECT policyname::text, permissive = 'PERMISSIVE', cmd, roles::text[], qual, with_check \
             FROM pg_policies WHERE schemaname = $1 AND tablename = $2 \
               AND ($3::text IS NULL OR policyname = $3) ORDER BY policyname",
            &[&table.schema, &table.name, &name],
        )
        .await
        .map_err(|e| PgError::query(format!("reading the policies of {table}"), conn, e))?
        .iter()
        .map(|r| Policy {
            name: r.get(0),
            permissive: r.get(1),
            command: r.get(2),
            roles: r.get(3),
            using: r.get(4),
            with_check: r.get(5),
        })
        .collect())
}
