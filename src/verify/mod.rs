//! Verification: proof that two databases hold the same rows ([`db`]), naming every row that
//! differs. (The proof that a backup repository is whole is built from the repository's own
//! structures, so it lives in the backup area: `backup::check`.)
//!
//! Invariant kept by everything here: a difference is reported only with proof: against the
//! source's change stream when a pipeline feeds the target ([`replay`]: the source read at a
//! cut, the target at its pipeline's position past it, the changes in between replayed), or
//! else after it has been seen on fresh reads of both sides ([`recheck`]), never from one stale
//! snapshot alone; a row that can be decided neither way is reported as undecided, never as a
//! difference; and a table that could not be compared is reported as such, never as identical.

pub mod db;
mod recheck;
mod repair;
mod replay;
mod side;
pub mod touched;

pub use db::{
    verify_db, DbReport, DbVerifyOptions, Difference, DifferenceKind, Progress, TableReport,
    TableStatus,
};

use crate::cdc::CdcError;
use crate::pg::PgError;

/// Everything that can go wrong while verifying.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Cdc(#[from] CdcError),
    #[error("table {table} has no primary key on {side}; add one (ALTER TABLE {table} ADD PRIMARY KEY (...)) so rows can be matched")]
    NoPrimaryKey { table: String, side: &'static str },
    #[error("table {table} does not exist on the {side} ({conn}); create it or leave it out with --tables")]
    MissingTable {
        table: String,
        side: &'static str,
        conn: String,
    },
    #[error("table {table} differs in shape between source and target: {detail}; make the target's columns match the source's")]
    ShapeMismatch { table: String, detail: String },
    #[error("{0}")]
    Options(String),
    #[error("creating a temporary slot on {conn} took longer than {waited:?}: a long transaction on the source holds it back; end it, or run verify again later")]
    CutTimeout {
        conn: String,
        waited: std::time::Duration,
    },
    #[error(
        "cannot write repair SQL to {path}: {reason}; check the directory exists and is writable"
    )]
    RepairFile { path: String, reason: String },
}

impl VerifyError {
    /// True when running the verification again later may succeed (lost connection, server
    /// restarting); false for problems that need a person (no primary key, shape mismatch).
    pub fn is_transient(&self) -> bool {
        match self {
            VerifyError::Pg(e) => e.is_transient(),
            VerifyError::Cdc(e) => e.is_transient(),
            VerifyError::CutTimeout { .. } => true,
            _ => false,
        }
    }
}
