//! A target connection's writer: a task that executes pieces of SQL on the target in the order
//! they are handed over, so that reading the stream and building the next piece overlap the
//! target executing the last one.
//!
//! Invariants: pieces run one at a time, in order, on the one connection; after the first
//! failure nothing more runs (the target transaction is aborted anyway, and a later `COMMIT`
//! must not run) and every later call reports that failure. A piece may be checked (its result
//! must pass a check, e.g. change exactly one row, or the writer fails with the check's error)
//! or answered (its result is handed back), so a batch's fence check, progress record and
//! `COMMIT` are queued like any other piece. Pieces waiting hold at
//! most [`BUDGET`] bytes, so memory stays bounded while the stream is read ahead of the target by
//! a batch or more (a bound of a few pieces would stall reading whenever a batch is handed over
//! while the target still runs the last one). The task is owned by its [`Writer`]:
//! [`Writer::wait`] awaits everything handed over, and dropping the `Writer` aborts the task
//! (its connection is dropped with it, so the server rolls back).
//! The task signals `answered` after each answered piece (a batch's `COMMIT`) and when it
//! stops, so the pipeline can hand over the next batch as soon as the target is free.
//!
//! COPY statements and statements with [`TextArray`] parameters are prepared once per
//! connection, by their SQL, and run over the extended protocol; other pieces are simple queries.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BufMut;
use futures::SinkExt;
use postgres_types::{to_sql_checked, IsNull, ToSql, Type};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};

use super::SyncError;
use crate::pg::{ConnInfo, PgError};

/// Bytes of the pieces handed over and not yet run, at most; a piece counts at least
/// [`PIECE_MIN`], and one larger than the budget waits until the queue is empty.
const BUDGET: usize = 32 << 20;
const PIECE_MIN: usize = 4 << 10;

enum Job {
    /// A piece whose statements should change `expect` rows in all.
    Sql { sql: String, expect: u64 },
    /// Statements whose result must pass `check`; otherwise the writer fails with its error.
    Checked { sql: String, check: Check },
    /// `COPY .. FROM STDIN` with its data in COPY's text format.
    Copy { sql: String, data: Vec<u8> },
    /// A statement with `text[]` parameters `$1, $2, ..` that should change `expect` rows.
    Bind {
        sql: String,
        params: Vec<TextArray>,
        expect: u64,
    },
    /// One statement whose row count `judge` turns into rows found missing, or an error that
    /// stops the writer.
    Row { sql: String, judge: Judge },
    /// Statements built, when their turn comes, from the rows found missing since the last
    /// tally (so a batch's progress record can count its own), and checked like `Checked`.
    Tally {
        build: Box<dyn FnOnce(u64) -> String + Send>,
        check: Check,
    },
    /// A piece whose result is sent back.
    Query(String, oneshot::Sender<Vec<SimpleQueryMessage>>),
    /// Answered once every earlier piece has run.
    Barrier(oneshot::Sender<()>),
}

impl Job {
    /// What the piece counts against [`BUDGET`].
    fn cost(&self) -> u32 {
        let bytes = match self {
            Job::Sql { sql, .. }
            | Job::Checked { sql, .. }
            | Job::Row { sql, .. }
            | Job::Query(sql, _) => sql.len(),
            Job::Copy { sql, data } => sql.len() + data.len(),
            Job::Bind { sql, params, .. } => {
                sql.len() + params.iter().map(|p| p.bytes.len()).sum::<usize>()
            }
            Job::Barrier(_) | Job::Tally { .. } => 0,
        };
        // BUDGET fits in u32.
        bytes.clamp(PIECE_MIN, BUDGET) as u32
    }
}

/// Judges a checked piece's result: `Err` stops the writer with that error.
pub type Check = Box<dyn FnOnce(&[SimpleQueryMessage]) -> Result<(), SyncError> + Send>;

/// Judges a [`Job::Row`] statement's row count: `Ok` with the rows it found missing, or `Err`,
/// which stops the writer with that error.
pub type Judge = Box<dyn FnOnce(u64) -> Result<u64, SyncError> + Send>;

/// A [`Check`] that the piece's first statement changed exactly one row, else `error`.
pub fn one_row(error: SyncError) -> Check {
    Box::new(move |messages| {
        if changed(messages, 0) == Some(1) {
            Ok(())
        } else {
            Err(error)
        }
    })
}

/// The row count of the `n`th statement of a simple query's result.
pub fn changed(messages: &[SimpleQueryMessage], n: usize) -> Option<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .nth(n)
}

/// Why the writer stopped.
enum Failure {
    Pg(tokio_postgres::Error),
    /// A checked piece failed its check.
    Check(SyncError),
}

pub struct Writer {
    /// Pieces with their share of the budget, released once they ran.
    jobs: mpsc::UnboundedSender<(Job, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    task: Option<JoinHandle<Result<(), Failure>>>,
    conn: ConnInfo,
    /// What the pieces do, for the error message.
    what: String,
    /// The reported failure, repeated by later calls.
    failed: Option<String>,
    /// Rows that pieces were expected to change and did not (updates and deletes that found no
    /// row: the target differs from the source).
    missing: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the task on `client`; it signals `answered` as the module documentation says.
    pub fn start(client: Arc<Client>, conn: ConnInfo, what: String, answered: Arc<Notify>) -> Self {
        let (jobs, mut queue) = mpsc::unbounded_channel();
        let missing = Arc::new(AtomicU64::new(0));
        let counter = missing.clone();
        let task = tokio::spawn(async move {
            let ran = run(&client, &mut queue, &counter, &answered).await;
            answered.notify_one();
            ran
        });
        Writer {
            jobs,
            budget: Arc::new(Semaphore::new(BUDGET)),
            task: Some(task),
            conn,
            what,
            failed: None,
            missing,
        }
    }

    /// Hands `sql` over, whose statements should change `expect` rows in all; waits only while
    /// the queue is full.
    pub async fn execute(&mut self, sql: String, expect: u64) -> Result<(), SyncError> {
        self.hand_over(Job::Sql { sql, expect }).await
    }

    /// Hands over a `COPY .. FROM STDIN` statement and its data (text format).
    pub async fn copy(&mut self, sql: String, data: Vec<u8>) -> Result<(), SyncError> {
        self.hand_over(Job::Copy { sql, data }).await
    }

    /// Hands over `sql`, whose parameters `$1, $2, ..` are `params` in order and which should
    /// change `expect` rows.
    pub async fn bind(
        &mut self,
        sql: String,
        params: Vec<TextArray>,
        expect: u64,
    ) -> Result<(), SyncError> {
        self.hand_over(Job::Bind {
            sql,
            params,
            expect,
        })
        .await
    }

    /// Rows the pieces run so far changed fewer than expected.
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Relaxed)
    }

    /// Hands over one statement whose row count `judge` turns into rows found missing; if it
    /// refuses the count, nothing after it runs and the writer fails with its error.
    pub async fn row(&mut self, sql: String, judge: Judge) -> Result<(), SyncError> {
        self.hand_over(Job::Row { sql, judge }).await
    }

    /// Hands over statements that `build` writes, when their turn comes, from the rows found
    /// missing since the last tally, checked by `check` as [`Writer::execute_checked`] does.
    pub async fn tally(
        &mut self,
        build: Box<dyn FnOnce(u64) -> String + Send>,
        check: Check,
    ) -> Result<(), SyncError> {
        self.hand_over(Job::Tally { build, check }).await
    }

    /// Hands over statements whose result must pass `check`; if it does not, nothing after them
    /// runs and the writer fails with the check's error.
    pub async fn execute_checked(&mut self, sql: String, check: Check) -> Result<(), SyncError> {
        self.hand_over(Job::Checked { sql, check }).await
    }

    /// Hands `sql` over; its result arrives on the returned receiver once it has run (the
    /// receiver fails if the writer stopped first).
    pub async fn query(
        &mut self,
        sql: String,
    ) -> Result<oneshot::Receiver<Vec<SimpleQueryMessage>>, SyncError> {
        let (answer, result) = oneshot::channel();
        self.hand_over(Job::Query(sql, answer)).await?;
        Ok(result)
    }

    /// Queues `job` once the budget has room for it; waits only for that.
    async fn hand_over(&mut self, job: Job) -> Result<(), SyncError> {
        if self.failed.is_none() {
            // The semaphore is never closed.
            if let Ok(permit) = self.budget.clone().acquire_many_owned(job.cost()).await {
                if self.jobs.send((job, permit)).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(self.failure().await)
    }

    /// Waits until every piece handed over has run.
    pub async fn wait(&mut self) -> Result<(), SyncError> {
        let (done, ran) = oneshot::channel();
        self.hand_over(Job::Barrier(done)).await?;
        if ran.await.is_ok() {
            return Ok(());
        }
        Err(self.failure().await)
    }

    /// The error that stopped the task (it stops only on one).
    pub async fn failure(&mut self) -> SyncError {
        if let Some(task) = self.task.take() {
            let reason = match task.await {
                Ok(Err(Failure::Pg(e))) => {
                    let e = SyncError::from(PgError::query(self.what.clone(), &self.conn, e));
                    self.failed = Some(e.to_string());
                    return e;
                }
                Ok(Err(Failure::Check(error))) => {
                    self.failed = Some(error.to_string());
                    return error;
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

/// Runs the pieces in order until the queue closes or one fails.
async fn run(
    client: &Client,
    queue: &mut mpsc::UnboundedReceiver<(Job, OwnedSemaphorePermit)>,
    missing: &AtomicU64,
    answered: &Notify,
) -> Result<(), Failure> {
    // Statements by their SQL, prepared once per connection (a COPY or a set-based statement
    // per table per batch would otherwise cost a round trip more each).
    let mut prepared: HashMap<String, Statement> = HashMap::new();
    // What `missing` held at the last tally.
    let mut tallied = 0;
    // Each piece's permit is released when its iteration ends.
    while let Some((job, _permit)) = queue.recv().await {
        match job {
            Job::Sql { sql, expect } => {
                let result = client.simple_query(&sql).await.map_err(Failure::Pg)?;
                let changed: u64 = result
                    .iter()
                    .map(|m| match m {
                        SimpleQueryMessage::CommandComplete(n) => *n,
                        _ => 0,
                    })
                    .sum();
                missing.fetch_add(expect.saturating_sub(changed), Ordering::Relaxed);
            }
            Job::Checked { sql, check } => {
                let result = client.simple_query(&sql).await.map_err(Failure::Pg)?;
                check(&result).map_err(Failure::Check)?;
            }
            Job::Row { sql, judge } => {
                let result = client.simple_query(&sql).await.map_err(Failure::Pg)?;
                let found = judge(changed(&result, 0).unwrap_or(0)).map_err(Failure::Check)?;
                missing.fetch_add(found, Ordering::Relaxed);
            }
            Job::Tally { build, check } => {
                let now = missing.load(Ordering::Relaxed);
                let sql = build(now - tallied);
                let result = client.simple_query(&sql).await.map_err(Failure::Pg)?;
                check(&result).map_err(Failure::Check)?;
                tallied = now;
            }
            Job::Copy { sql, data } => {
                let statement = prepare(client, &mut prepared, sql, 0).await?;
                let sink = client
                    .copy_in::<_, bytes::Bytes>(&statement)
                    .await
                    .map_err(Failure::Pg)?;
                futures::pin_mut!(sink);
                sink.send(bytes::Bytes::from(data))
                    .await
                    .map_err(Failure::Pg)?;
                sink.finish().await.map_err(Failure::Pg)?;
            }
            Job::Bind {
                sql,
                params,
                expect,
            } => {
                let statement = prepare(client, &mut prepared, sql, params.len()).await?;
                let changed = client
                    .execute_raw(&statement, params.iter())
                    .await
                    .map_err(Failure::Pg)?;
                missing.fetch_add(expect.saturating_sub(changed), Ordering::Relaxed);
            }
            Job::Query(sql, answer) => {
                let result = client.simple_query(&sql).await.map_err(Failure::Pg)?;
                let _ = answer.send(result);
                answered.notify_one();
            }
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
    Ok(())
}

/// The statement prepared for `sql` on this connection, preparing it first if needed, with
/// `arrays` parameters of type `text[]`.
async fn prepare(
    client: &Client,
    prepared: &mut HashMap<String, Statement>,
    sql: String,
    arrays: usize,
) -> Result<Statement, Failure> {
    Ok(match prepared.entry(sql) {
        Entry::Occupied(e) => e.get().clone(),
        Entry::Vacant(e) => {
            let types = vec![Type::TEXT_ARRAY; arrays];
            let statement = client
                .prepare_typed(e.key(), &types)
                .await
                .map_err(Failure::Pg)?;
            e.insert(statement).clone()
        }
    })
}

/// A one-dimensional `text[]` parameter in PostgreSQL's binary array format, built element by
/// element. Elements are bytes in the session's encoding (UTF-8); the server checks them.
pub struct TextArray {
    bytes: Vec<u8>,
    len: i32,
    has_null: bool,
}

impl TextArray {
    pub fn new() -> Self {
        TextArray {
            bytes: Vec::new(),
            len: 0,
            has_null: false,
        }
    }

    /// Appends an element, `None` for NULL.
    pub fn push(&mut self, element: Option<&[u8]>) {
        match element {
            None => {
                self.bytes.put_i32(-1);
                self.has_null = true;
            }
            Some(b) => {
                // A value's text is far below 2 GiB (a field's limit is 1 GiB).
                self.bytes.put_i32(b.len() as i32);
                self.bytes.extend_from_slice(b);
            }
        }
        self.len += 1;
    }
}

impl Default for TextArray {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TextArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextArray({} elements)", self.len)
    }
}

impl ToSql for TextArray {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // Dimensions, null flag, element type, then per dimension its length and lower bound
        // (an empty array has no dimension), then the elements.
        let dimensions = i32::from(self.len > 0);
        out.reserve(20 + self.bytes.len());
        out.put_i32(dimensions);
        out.put_i32(i32::from(self.has_null));
        out.put_u32(Type::TEXT.oid());
        if dimensions > 0 {
            out.put_i32(self.len);
            out.put_i32(1);
        }
        out.extend_from_slice(&self.bytes);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arrays_use_postgresql_binary_array_format() {
        let mut a = TextArray::new();
        a.push(Some("a".as_bytes()));
        a.push(None);
        a.push(Some("台".as_bytes()));
        let mut out = bytes::BytesMut::new();
        assert!(matches!(
            a.to_sql(&Type::TEXT_ARRAY, &mut out),
            Ok(IsNull::No)
        ));
        let mut want = Vec::new();
        for n in [1, 1, 25, 3, 1, 1] {
            want.extend_from_slice(&i32::to_be_bytes(n));
        }
        want.push(b'a');
        want.extend_from_slice(&i32::to_be_bytes(-1));
        want.extend_from_slice(&i32::to_be_bytes(3));
        want.extend_from_slice("台".as_bytes());
        assert_eq!(&out[..], &want[..]);

        let mut empty = bytes::BytesMut::new();
        assert!(TextArray::new()
            .to_sql(&Type::TEXT_ARRAY, &mut empty)
            .is_ok());
        assert_eq!(&empty[..], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25]);
        assert!(TextArray::accepts(&Type::TEXT_ARRAY) && !TextArray::accepts(&Type::TEXT));
    }
}
