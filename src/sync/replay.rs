//! Replaying a stored change stream (the archive's transactions) into one database through the
//! same apply engine as a pipeline's targets ([`Target`], fed by the pipeline's own message
//! handling), as a [`ChangeSink`].
//!
//! Contract:
//! - Transactions are applied whole and in the order given; batches group several of them
//!   and commit asynchronously, and [`Replay::finish`] commits the last one durably.
//! - The target is [`Bookkeeping::Unrecorded`](super::apply::Bookkeeping): no replication
//!   origin, no progress row, so the database carries no trace that a later `sync setup`
//!   would read as a pipeline's position. Whoever feeds the replay decides which
//!   transactions it needs (a replay does not skip what the database already holds).
//! - Transactions that carried a replication origin on the source are applied like any
//!   other: they are the source's data (a pipeline drops them only to avoid echoes).
//! - Columns the stream sends and the database lacks (added on the source meanwhile) are
//!   added with the built-in type the stream names ([`ColumnSource::Stream`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::apply::{ColumnSource, StreamRelation, Target};
use super::pipeline::{apply_message, Txn, BATCH_ROWS};
use super::SyncError;
use crate::cdc::decoder::{self, Message};
use crate::cdc::sink::{ChangeSink, Transaction};
use crate::cdc::CdcError;
use crate::pg::{pg_time, ConnInfo, Lsn, TableName};

/// What a replay applied.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplayStats {
    pub transactions: u64,
    /// Row changes and TRUNCATEs applied.
    pub changes: u64,
    /// Updates and deletes that found no row (0 when the database held exactly the state the
    /// replay starts from).
    pub missing_rows: u64,
    /// The end LSN and commit time of the last transaction applied.
    pub last_end: Option<Lsn>,
    pub last_commit: Option<DateTime<Utc>>,
}

/// A database being replayed into. See the module documentation.
pub struct Replay {
    label: String,
    target: Target,
    relations: HashMap<u32, StreamRelation>,
    /// Only changes to these tables are applied (all with `None`).
    tables: Option<HashSet<TableName>>,
    stats: ReplayStats,
}

impl Replay {
    /// Connects to `conn`; `label` names the stream's database in messages.
    pub async fn start(
        label: &str,
        conn: ConnInfo,
        tables: Option<HashSet<TableName>>,
    ) -> Result<Replay, SyncError> {
        let mut target = Target::unrecorded(label, conn, Arc::new(Notify::new()));
        target.connect().await?;
        Ok(Replay {
            label: label.to_string(),
            target,
            relations: HashMap::new(),
            tables,
            stats: ReplayStats::default(),
        })
    }

    /// Commits what is left, durably, and returns what was applied.
    pub async fn finish(mut self) -> Result<ReplayStats, SyncError> {
        self.target.flush(true).await?;
        self.stats.missing_rows = self.target.missing_rows_seen();
        self.target.disconnect();
        Ok(self.stats)
    }

    /// Takes in the table descriptions (raw Relation messages) of a transaction the replay
    /// leaves out because the database already holds it: a later transaction may rely on a
    /// description its source carried only once.
    pub async fn describe(&mut self, descriptions: Vec<Bytes>) -> Result<(), SyncError> {
        for raw in descriptions {
            let message = decoder::decode(&raw).map_err(|error| CdcError::Decode {
                target: self.label.clone(),
                error,
            })?;
            if matches!(message, Message::Relation(_)) {
                apply_message(
                    message,
                    &mut None,
                    &mut self.relations,
                    std::slice::from_mut(&mut self.target),
                    &[HashMap::new()],
                    ColumnSource::Stream { label: &self.label },
                )
                .await?;
            }
        }
        Ok(())
    }

    fn wanted(&self, id: u32) -> bool {
        match (&self.tables, self.relations.get(&id)) {
            (None, _) => true,
            (Some(set), Some(rel)) => set.contains(&rel.table()),
            // Unknown relation: apply_message reports it.
            (Some(_), None) => true,
        }
    }
}

impl ChangeSink for Replay {
    type Error = SyncError;

    async fn transaction(&mut self, txn: Transaction) -> Result<(), SyncError> {
        let mut open = Some(Txn {
            commit: txn.commit_lsn,
            skip: false,
            targets: vec![0],
        });
        for raw in &txn.messages {
            let message = decoder::decode(raw).map_err(|error| CdcError::Decode {
                target: self.label.clone(),
                error,
            })?;
            let message = match message {
                // The source's data, whoever wrote it (see the module documentation).
                Message::Origin { .. } => continue,
                Message::Insert { relation, .. }
                | Message::Update { relation, .. }
                | Message::Delete { relation, .. }
                    if !self.wanted(relation) =>
                {
                    continue
                }
                Message::Truncate { options, relations } => {
                    let relations: Vec<u32> =
                        relations.into_iter().filter(|&r| self.wanted(r)).collect();
                    if relations.is_empty() {
                        continue;
                    }
                    Message::Truncate { options, relations }
                }
                m => m,
            };
            if matches!(
                message,
                Message::Insert { .. }
                    | Message::Update { .. }
                    | Message::Delete { .. }
                    | Message::Truncate { .. }
            ) {
                self.stats.changes += 1;
            }
            let source = ColumnSource::Stream { label: &self.label };
            apply_message(
                message,
                &mut open,
                &mut self.relations,
                std::slice::from_mut(&mut self.target),
                // Every change is applied: no table of a replay joins late.
                &[HashMap::new()],
                source,
            )
            .await?;
        }
        let time = pg_time(txn.commit_time);
        self.target.end_source_transaction(txn.end_lsn, time);
        self.stats.transactions += 1;
        self.stats.last_end = Some(txn.end_lsn);
        self.stats.last_commit = time;
        Ok(())
    }

    fn idle_until(&mut self, _position: Lsn) {}

    fn wants_flush(&self) -> bool {
        self.target.batch_rows() >= BATCH_ROWS
    }

    async fn flush(&mut self) -> Result<Option<Lsn>, SyncError> {
        self.target.flush(false).await?;
        Ok(Some(self.target.applied))
    }
}
