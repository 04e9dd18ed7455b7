//! A target connection's writer: a task that executes pieces of SQL on the target in the order
//! they are handed over, so that reading the stream and building the next piece overlap the
//! target executing the last one.
//!
//! Invariants: pieces run one at a time, in order, on the one connection; after the first
//! failure nothing more runs (the target transaction is aborted anyway) and every later call
//! reports that failure. At most [`QUEUE`] pieces wait, so memory stays bounded. The task is
//! owned by its [`Writer`]: [`Writer::wait`] awaits everything handed over, and dropping the
//! `Writer` aborts the task (its connection is dropped with it, so the server rolls back).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::SyncError;
use crate::pg::{ConnInfo, PgError};

/// Pieces waiting for the target besides the one it executes.
const QUEUE: usize = 2;

enum Job {
    Sql(String),
    /// Answered once every earlier piece has run.
    Barrier(oneshot::Sender<()>),
}

pub struct Writer {
    jobs: mpsc::Sender<Job>,
    task: Option<JoinHandle<Result<(), tokio_postgres::Error>>>,
    conn: ConnInfo,
    /// What the pieces do, for the error message.
    what: String,
    /// The reported failure, repeated by later calls.
    failed: Option<String>,
}

impl Writer {
    pub fn start(client: Arc<Client>, conn: ConnInfo, what: String) -> Self {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE);
        let task = tokio::spawn(async move {
            while let Some(job) = queue.recv().await {
                match job {
                    Job::Sql(sql) => client.batch_execute(&sql).await?,
                    Job::Barrier(done) => {
                        let _ = done.send(());
                    }
                }
            }
            Ok(())
        });
        Writer {
            jobs,
            task: Some(task),
            conn,
            what,
            failed: None,
        }
    }

    /// Hands `sql` over; waits only while the queue is full.
    pub async fn execute(&mut self, sql: String) -> Result<(), SyncError> {
        if self.failed.is_none() && self.jobs.send(Job::Sql(sql)).await.is_ok() {
            return Ok(());
        }
        Err(self.failure().await)
    }

    /// Waits until every piece handed over has run.
    pub async fn wait(&mut self) -> Result<(), SyncError> {
        let (done, ran) = oneshot::channel();
        if self.failed.is_none()
            && self.jobs.send(Job::Barrier(done)).await.is_ok()
            && ran.await.is_ok()
        {
            return Ok(());
        }
        Err(self.failure().await)
    }

    /// The error that stopped the task (it stops only on one).
    async fn failure(&mut self) -> SyncError {
        if let Some(task) = self.task.take() {
            let reason = match task.await {
                Ok(Err(e)) => {
                    let e = SyncError::from(PgError::query(self.what.clone(), &self.conn, e));
                    self.failed = Some(e.to_string());
                    return e;
                }
                Ok(Ok(())) => "the writer stopped".to_string(),
                Err(e) => format!("the writer failed: {e}"),
            };
            self.failed = Some(reason);
        }
        SyncError::Pg(PgError::Connect {
            target: self.conn.to_string(),
            reason: self
                .failed
                .clone()
                .unwrap_or_else(|| "the connection was closed".into()),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
