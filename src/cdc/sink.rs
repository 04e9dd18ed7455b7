//! The consumer side of a change stream: a [`ChangeSink`] takes whole transactions in commit
//! order, and [`drive`] feeds it from a slot's stream and confirms the slot only as far as the
//! sink says its data is durable.
//!
//! Contract between the stream and a sink:
//! - **Order**: transactions arrive whole (every message between Begin and Commit) and in
//!   commit order; the raw `pgoutput` bytes of each message are kept, so a sink may store them
//!   and [`decoder::decode`](super::decoder::decode) reads them back.
//! - **Durability**: the slot is confirmed only up to the LSN [`ChangeSink::flush`] returns;
//!   what a sink took but did not flush is streamed again after a restart.
//! - **Idempotency and retry**: after a crash the stream resumes at the slot's confirmed
//!   position (or later, where the sink says it already holds the data), so a sink may see a
//!   transaction again that it stored but could not confirm. Each transaction carries its
//!   commit end LSN; a sink (or its reader) drops a transaction whose `end_lsn` is not past
//!   what it already holds.
//!
//! Sync's apply fits the same shape: its targets take a transaction's changes, its batches
//! are a flush, and it confirms the minimum durable position over its targets.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::ReplicationClient;
use tokio::sync::watch;

use super::{slot, CdcError};
use crate::pg::{ConnInfo, Lsn};

/// One committed transaction as the stream delivered it.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub xid: u32,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: the stream's position once this is applied.
    pub end_lsn: Lsn,
    /// Commit time in PostgreSQL microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// The raw `pgoutput` messages between Begin and Commit, in order.
    pub messages: Vec<Bytes>,
}

/// Where a stream's transactions go. See the module documentation for the contract.
pub trait ChangeSink {
    type Error: From<CdcError>;

    /// Takes one whole transaction (in commit order).
    fn transaction(
        &mut self,
        txn: Transaction,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The stream has shown nothing to take up to `position` (no transaction open).
    fn idle_until(&mut self, position: Lsn);

    /// Whether the sink wants [`ChangeSink::flush`] now (its buffer is full or old).
    fn wants_flush(&self) -> bool;

    /// Makes everything taken so far durable; returns the position up to which the slot may
    /// be confirmed, if it moved.
    fn flush(&mut self) -> impl Future<Output = Result<Option<Lsn>, Self::Error>> + Send;
}

/// How often [`drive`] asks an idle sink whether it wants a flush.
const TICK: Duration = Duration::from_millis(250);

/// Feeds `stream` into `sink` until `stop` turns true (then flushes and confirms once more) or
/// the stream fails. Confirms the slot after each flush that moved.
pub async fn drive<S: ChangeSink>(
    conn: &ConnInfo,
    mut stream: ReplicationClient,
    sink: &mut S,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), S::Error> {
    use pgwire_replication::ReplicationEvent as E;
    let mut open: Option<Transaction> = None;
    let mut tick = tokio::time::interval(TICK);
    let mut stopping = *stop.borrow();
    loop {
        if stopping && open.is_none() {
            if let Some(lsn) = sink.flush().await? {
                stream.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
            }
            // One status interval for the worker to tell the server, then end the stream.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = stream.shutdown().await;
            return Ok(());
        }
        tokio::select! {
            biased;
            changed = stop.changed(), if !stopping => {
                // A dropped sender means nobody can stop us any more: stop now.
                stopping = changed.is_err() || *stop.borrow();
                continue;
            }
            _ = tick.tick(), if open.is_none() => {}
            event = stream.recv() => {
                let event = match event {
                    Ok(Some(ev)) => ev,
                    Ok(None) => return Err(CdcError::Replication {
                        target: conn.to_string(),
                        reason: "the replication stream ended".into(),
                        transient: true,
                    }.into()),
                    Err(e) => return Err(slot::stream_error(conn, e).into()),
                };
                match event {
                    E::Begin { final_lsn, xid, .. } => {
                        open = Some(Transaction {
                            xid,
                            commit_lsn: Lsn(final_lsn.0),
                            end_lsn: Lsn(0),
                            commit_time: 0,
                            messages: Vec::new(),
                        });
                    }
                    E::XLogData { data, .. } => match open.as_mut() {
                        Some(t) => t.messages.push(data),
                        None => return Err(CdcError::Protocol(format!(
                            "{conn}: a change arrived outside a transaction"
                        )).into()),
                    },
                    E::Commit { end_lsn, commit_time_micros, .. } => {
                        let Some(mut t) = open.take() else {
                            return Err(CdcError::Protocol(format!(
                                "{conn}: a commit arrived outside a transaction"
                            )).into());
                        };
                        t.end_lsn = Lsn(end_lsn.0);
                        t.commit_time = commit_time_micros;
                        sink.transaction(t).await?;
                    }
                    E::KeepAlive { wal_end, .. } => {
                        if open.is_none() {
                            sink.idle_until(Lsn(wal_end.0));
                        }
                    }
                    E::Message { .. } | E::StoppedAt { .. } => {}
                }
            }
        }
        if open.is_none() && sink.wants_flush() {
            if let Some(lsn) = sink.flush().await? {
                stream.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
            }
        }
    }
}
