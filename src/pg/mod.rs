//! PostgreSQL plumbing shared by sync, backup and verify: connection settings with TLS,
//! LSNs, identifier quoting, the catalog queries that describe a table, and the one model of
//! a table with what it depends on ([`schema`]), which backup saves and restore recreates, and
//! the session settings that fix how values are written as text ([`settings`]), and the fencing
//! token that sync and backup check before a write becomes durable ([`Fence`]), and clients kept
//! open for callers that read the same databases repeatedly ([`Sessions`]).
//!
//! A [`ConnInfo`] never shows its password: its `Display` and `Debug` print `***` in its place,
//! and errors built from it use that form.

mod catalog;
mod conn;
mod conninfo;
mod fence;
pub(crate) mod keyrange;
mod lsn;
mod pattern;
pub mod privilege;
pub mod schema;
pub mod sequences;
mod sessions;
pub mod settings;

pub use catalog::{resolve_tables, Column, ReplicaIdentity, TableInfo};
pub use conn::{ConnInfo, SslMode};
pub use fence::Fence;
pub use lsn::{pg_time, Lsn, PG_EPOCH_MICROS};
pub use pattern::TablePattern;
pub use sessions::Sessions;

use std::fmt;

/// A failure talking to PostgreSQL, with what invsync was doing and on which database.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("{what} on {target}: {reason}")]
    Query {
        what: String,
        target: String,
        reason: String,
        /// SQLSTATE, when the server sent one.
        code: Option<String>,
    },
    #[error(
        "table {table} does not exist on {target}; create it or remove it from the configuration"
    )]
    MissingTable { table: String, target: String },
    #[error("{0}")]
    Invalid(String),
}

impl PgError {
    /// Wraps a driver error for `what` on `target`, keeping the server's message, detail and hint.
    pub fn query(what: impl Into<String>, target: &ConnInfo, e: tokio_postgres::Error) -> Self {
        PgError::Query {
            what: what.into(),
            target: target.to_string(),
            code: e.code().map(|c| c.code().to_string()),
            reason: describe(&e),
        }
    }

    /// True when retrying later may succeed (connection lost, server shutting down, serialization
    /// failure), false for errors that need a person (syntax, permissions, missing objects).
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. } => true,
            PgError::Query { code, .. } => match code.as_deref() {
                None => true,
                Some(c) => {
                    c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01"
                }
            },
            PgError::MissingTable { .. } | PgError::Invalid(_) => false,
        }
    }
}

/// One line describing a driver error: the server's message with its detail and hint, or the
/// I/O cause. Never includes connection parameters.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s.replace('\n', " ")
}

/// Quotes an identifier for SQL: `invoice` stays readable as `"invoice"`, embedded quotes double.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A schema-qualified table name.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema"."name"`, for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// `schema.name`, for people.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            TableName::new("public", "Invoice").quoted(),
            "\"public\".\"Invoice\""
        );
    }
}
