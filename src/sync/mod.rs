//! sync: change-data-capture pipelines from one PostgreSQL source to one or more targets.
//!
//! A pipeline owns one publication and one logical slot on its source (names derived from the
//! pipeline, see [`crate::cdc::names`]), and an `invsync` schema on each target that records, in the same
//! transaction as the applied changes, the source commit LSN applied so far ([`progress`]).
//!
//! Invariants kept by this module tree:
//! - a source transaction is applied whole or not at all, in source commit order ([`apply`]);
//! - the slot is confirmed only up to what every target has durably applied, or up to the
//!   keepalive's WAL end when nothing is pending anywhere ([`pipeline`]);
//! - transactions that carry a replication origin (changes some replicator applied, invsync
//!   included) are dropped, so pipelines in opposite directions do not echo ([`crate::cdc::decoder`]);
//! - the initial copy reads the snapshot the slot exported, so streaming starts exactly where
//!   the copy ends ([`copy`]);
//! - a target's sequences only move forward, to at or past the source's ([`sequences`]);
//! - a table that joins a streaming pipeline takes the stream's changes from exactly the
//!   position its copy was read at ([`join`]);
//! - a target down longer than the pipeline's limits is cut loose: it no longer holds WAL on
//!   the source, and it is marked as needing a new copy rather than silently missing changes
//!   ([`pipeline`]).

pub mod apply;
pub mod copy;
pub mod join;
mod net;
pub mod pipeline;
pub mod progress;
mod reconnect;
pub mod replay;
pub mod schema;
pub mod sequences;
pub mod status;
mod writer;

pub use copy::{CopyProgress, NoCopyProgress};
pub use pipeline::{
    run, run_observed, setup, teardown, Observer, SetupOptions, SetupOutcome, TeardownReport,
};
pub use status::{status, status_in, PipelineStatus};

use crate::cdc::CdcError;
use crate::pg::PgError;

/// Everything that can stop a sync command. One line each, naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Cdc(#[from] CdcError),
    #[error("pipeline `{pipeline}` is not set up on {target}; run `invsync sync setup {pipeline}` first")]
    NotSetUp { pipeline: String, target: String },
    #[error("replication origin {origin} on {target} is in use by another session; stop the other `invsync sync run` of this pipeline")]
    OriginInUse { origin: String, target: String },
    #[error("schema drift on {table}: {reason}; run on {target}: {ddl}")]
    SchemaDrift {
        table: String,
        target: String,
        ddl: String,
        reason: String,
    },
    #[error("table {table} on {target} is not empty; the initial copy needs empty tables: TRUNCATE it, or pass --no-copy if it already holds the source's rows")]
    TargetNotEmpty { table: String, target: String },
    #[error("table {table} on {target} lacks column(s) {columns} that the source has; run: {ddl}")]
    MissingColumns {
        table: String,
        target: String,
        columns: String,
        ddl: String,
    },
    #[error("initial copy of {table} into {target}: {reason}")]
    Copy {
        table: String,
        target: String,
        reason: String,
    },
    #[error("pipeline `{pipeline}` on {target}: fenced: this agent holds {lease} with epoch {epoch}, but epoch {newer} has written the target since (another agent runs the pipeline now); nothing was committed")]
    Fenced {
        pipeline: String,
        target: String,
        lease: String,
        epoch: i64,
        newer: i64,
    },
    #[error(transparent)]
    MissingRow(Box<MissingRow>),
    /// A change to a table joining the pipeline is due on a target before the table's copy
    /// there has finished: `run` waits for the copy and streams again.
    #[error("a change to {table} is due on {target} while `invsync sync setup {pipeline}` still copies it there; if no setup is running, run it again to finish the copy")]
    AwaitingCopy {
        pipeline: String,
        table: crate::pg::TableName,
        target: String,
    },
    #[error("{0}")]
    Protocol(String),
}

impl SyncError {
    /// True when trying again later may succeed (a database went away); false when a person must
    /// act (configuration, schema, permissions).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Pg(e) => e.is_transient(),
            SyncError::Cdc(e) => e.is_transient(),
            // Also left for a moment by a session of ours that just died.
            SyncError::OriginInUse { .. } => true,
            _ => false,
        }
    }
}

/// An update or delete whose row is not on a target, under the `stop` policy (or `apply` with a
/// change that does not carry the whole row).
#[derive(Debug, thiserror::Error)]
#[error("pipeline `{pipeline}` on {target}: {change} of {table} {key} finds no row there; stopped before committing the batch (missing_rows = \"{policy}\"{why}): put the row back on the target (`invsync verify db` names the rows that differ), or set missing_rows = \"warn\" or \"apply\" in [pipelines.{pipeline}]")]
pub struct MissingRow {
    pub pipeline: String,
    pub target: String,
    /// `UPDATE` or `DELETE`.
    pub change: &'static str,
    pub table: String,
    /// `(a, b) = (1, 2)`, or what finds the row without a key.
    pub key: String,
    pub policy: &'static str,
    /// Why `apply` could not insert the row, with a leading `; `.
    pub why: String,
}
