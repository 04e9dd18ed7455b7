//! sync: change-data-capture pipelines from one PostgreSQL source to one or more targets.
//!
//! A pipeline owns one publication and one logical slot on its source (names derived from the
//! pipeline, see [`names`]), and an `invsync` schema on each target that records, in the same
//! transaction as the applied changes, the source commit LSN applied so far ([`progress`]).
//!
//! Invariants kept by this module tree:
//! - a source transaction is applied whole or not at all, in source commit order ([`apply`]);
//! - the slot is confirmed only up to what every target has durably applied, or up to the
//!   keepalive's WAL end when nothing is pending anywhere ([`pipeline`]);
//! - transactions that carry a replication origin (changes some replicator applied, invsync
//!   included) are dropped, so pipelines in opposite directions do not echo ([`decoder`]);
//! - the initial copy reads the snapshot the slot exported, so streaming starts exactly where
//!   the copy ends ([`copy`]).

pub mod apply;
pub mod copy;
pub mod decoder;
pub mod names;
mod net;
pub mod pipeline;
pub mod progress;
pub mod publication;
pub mod schema;
pub mod slot;
pub mod status;
mod writer;

pub use copy::{CopyProgress, NoCopyProgress};
pub use pipeline::{
    run, run_observed, setup, teardown, Observer, SetupOptions, SetupOutcome, TeardownReport,
};
pub use status::{status, PipelineStatus};

use crate::pg::PgError;

/// Everything that can stop a sync command. One line each, naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("replication connection to {target}: {reason}")]
    Replication {
        target: String,
        reason: String,
        transient: bool,
    },
    #[error("{target}: wal_level is `{level}`, logical decoding needs `logical`; run ALTER SYSTEM SET wal_level = logical and restart the server")]
    WalLevel { target: String, level: String },
    #[error("{target}: role `{role}` may not replicate; run ALTER ROLE {role} REPLICATION (or connect as a superuser)")]
    NoReplicationRole { target: String, role: String },
    #[error("cannot replicate updates and deletes of {tables} (no primary key and no replica identity); add a primary key, or run ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX a unique index)")]
    NoReplicaIdentity { tables: String },
    #[error("pipeline `{pipeline}` is not set up on {target}; run `invsync sync setup {pipeline}` first")]
    NotSetUp { pipeline: String, target: String },
    #[error("slot {slot} on {target} is in use by another process (pid {pid}); stop the other `invsync sync run` first")]
    SlotInUse {
        slot: String,
        target: String,
        pid: i32,
    },
    #[error("replication origin {origin} on {target} is in use by another session; stop the other `invsync sync run` of this pipeline")]
    OriginInUse { origin: String, target: String },
    #[error("pipeline `{pipeline}` is not set up: slot {slot} does not exist on {target}; run `invsync sync setup {pipeline}`")]
    SlotMissing {
        slot: String,
        target: String,
        pipeline: String,
    },
    #[error("malformed pgoutput message from {target}: {error}")]
    Decode {
        target: String,
        error: decoder::DecodeError,
    },
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
    #[error("{0}")]
    Protocol(String),
}

impl SyncError {
    /// True when trying again later may succeed (a database went away); false when a person must
    /// act (configuration, schema, permissions).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Pg(e) => e.is_transient(),
            SyncError::Replication { transient, .. } => *transient,
            // Also left for a moment by a session of ours that just died.
            SyncError::SlotInUse { .. } | SyncError::OriginInUse { .. } => true,
            _ => false,
        }
    }
}
