//! cdc: the change stream of a PostgreSQL source as a concept, below the jobs that consume it.
//!
//! A stream is a logical replication slot ([`slot`]) decoding with `pgoutput` the tables of a
//! publication ([`publication`]); its messages are parsed by [`decoder`]; a consumer implements [`sink::ChangeSink`] and is fed by
//! [`sink::drive`]. The objects a pipeline
//! owns on its source are named by [`names`]. Sync applies the stream to targets; verify reads a
//! temporary slot's stream to prove that a target only lags. Neither reaches into the other:
//! what both need lives here.
//!
//! Invariants kept here: the replication connection uses the same host, credentials, TLS and
//! text-form settings as the SQL connections, so a value decoded from the stream reads as the
//! same text as the value selected with `::text`; the decoder never panics on any input.

pub mod decoder;
pub mod names;
pub mod publication;
pub mod sink;
pub mod slot;

use crate::pg::PgError;

/// Everything that can go wrong with a source's change stream. One line each, naming the
/// thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
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
    #[error("slot {slot} on {target} is in use by another process (pid {pid}); stop the other `invsync sync run` first")]
    SlotInUse {
        slot: String,
        target: String,
        pid: i32,
    },
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
    #[error("{0}")]
    Protocol(String),
}

impl CdcError {
    /// True when trying again later may succeed (a database went away, a slot left behind by a
    /// session that just died); false when a person must act (configuration, permissions).
    pub fn is_transient(&self) -> bool {
        match self {
            CdcError::Pg(e) => e.is_transient(),
            CdcError::Replication { transient, .. } => *transient,
            CdcError::SlotInUse { .. } => true,
            _ => false,
        }
    }
}
