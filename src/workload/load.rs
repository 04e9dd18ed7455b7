//! The change stream: a steady mix of transactions at a target rate of changed rows, the way the
//! platform's writers change invoices.
//!
//! Each operation is one transaction sent as one round trip: new invoices with their items
//! (numbered after the greatest existing number, so they land at the recent end of the key
//! order), voids (an update of `status`), allowances, item deletions (which also amend the
//! invoice's amounts, keeping `sales_amount` the sum of its items) and carrier registrations.
//! Voids, allowances and item deletions pick recent issued invoices.
//!
//! One or more workers, each on a connection of its own, take the next operation from one
//! shared generator state (serial numbers, carrier indexes, random numbers), so no two workers
//! ever write the same new invoice or carrier; the pace is set by the rows of all workers
//! together. Workers still meet on existing invoices: an allowance locks its invoice before it
//! counts the invoice's allowances, and a transaction that fails because it met another
//! (unique violation, deadlock, serialization failure) rolled back whole, so it is counted as a
//! conflict and the load goes on. The report counts only changes the server confirmed, so the
//! tables change by exactly what it says, provided no one else writes them meanwhile. One load
//! per database at a time: new invoice numbers are taken from the greatest number seen at the
//! start.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::try_join_all;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{watch, Mutex};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::generate::{self, Generator, Plan};
use super::{rows, schema, WorkloadError};
use crate::pg::{quote_literal, ConnInfo, PgError};

/// How hard and how long to drive the change stream.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub seed: u64,
    /// Target changed rows per second.
    pub rate: f64,
    pub duration: Duration,
    pub items_per_invoice: f64,
    pub mix: Mix,
    /// Connections driving the stream at once, each with one transaction in flight.
    pub connections: usize,
}

/// Which writers the change stream plays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    #[default]
    /// The main data center: new invoices, voids, allowances, item deletions and carrier
    /// registrations.
    DataCenter,
    /// A public-cloud database: citizens registering carriers, with keys that never collide
    /// with the data center's, so the two can be replicated into each other.
    Cloud,
}

/// What the change stream did, counted from the server's replies, summed over all connections.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    pub mix: Mix,
    pub connections: usize,
    pub seconds: f64,
    /// Committed transactions that changed at least one row.
    pub transactions: u64,
    /// Rows inserted, updated or deleted, over all tables.
    pub rows: u64,
    pub target_rows_per_second: f64,
    pub rows_per_second: f64,
    pub invoices_inserted: u64,
    pub items_inserted: u64,
    pub invoices_voided: u64,
    pub allowances_inserted: u64,
    pub items_deleted: u64,
    /// Invoices whose amounts were updated after an item deletion.
    pub invoices_amended: u64,
    pub carriers_registered: u64,
    /// Transactions that met another connection's (unique violation, deadlock, serialization
    /// failure) and rolled back, changing nothing.
    pub conflicts: u64,
    /// True when the stop signal ended the run before its duration.
    pub stopped_early: bool,
}

#[derive(Debug, Clone, Copy)]
enum Operation {
    NewInvoice,
    Void,
    Allowance,
    DeleteItem,
    RegisterCarrier,
}

impl Operation {
    /// What the operation does, for errors.
    fn doing(self) -> &'static str {
        match self {
            Operation::NewInvoice => "inserting an invoice",
            Operation::Void => "voiding an invoice",
            Operation::Allowance => "issuing an allowance",
            Operation::DeleteItem => "deleting an item",
            Operation::RegisterCarrier => "registering a carrier",
        }
    }
}

/// The mix, in percent: new invoices dominate, as they do on the platform.
const DATA_CENTER_MIX: &[(Operation, u32)] = &[
    (Operation::NewInvoice, 70),
    (Operation::Void, 8),
    (Operation::Allowance, 7),
    (Operation::DeleteItem, 7),
    (Operation::RegisterCarrier, 8),
];

/// Carrier indexes from here on are registered in the cloud.
const CLOUD_CARRIERS: u64 = 1 << 33;

const ALLOWANCE_REASONS: &[&str] = &["退貨", "商品瑕疵", "價格調整", "return"];

/// The setting through which an allowance's first statement hands the invoice it locked to the
/// second; local to the transaction.
const ALLOWANCE_INVOICE_SETTING: &str = "einvoice_gen.allowance_invoice";

/// Drives the change stream on `opts.connections` connections to `conn` until `opts.duration`
/// passes or `stop` completes. A stop lets every worker finish the transaction it has in
/// flight, so every counted transaction has committed.
pub async fn load(
    conn: &ConnInfo,
    opts: &LoadOptions,
    stop: impl Future<Output = ()>,
) -> Result<LoadReport, WorkloadError> {
    if !(opts.rate > 0.0 && opts.rate.is_finite()) {
        return Err(WorkloadError::Invalid(format!(
            "the rate must be a positive number of rows per second, not {}",
            opts.rate
        )));
    }
    if !(1.0..=100.0).contains(&opts.items_per_invoice) {
        return Err(WorkloadError::Invalid(format!(
            "items per invoice must be between 1 and 100, not {}",
            opts.items_per_invoice
        )));
    }
    if opts.connections == 0 {
        return Err(WorkloadError::Invalid(
            "the load needs at least one connection".to_string(),
        ));
    }
    let clients = try_join_all((0..opts.connections).map(|_| conn.connect())).await?;
    schema::ensure(&clients[0], conn).await?;
    let stream = Mutex::new(Stream::start(&clients[0], conn, opts).await?);
    let tally = Mutex::new(LoadReport {
        mix: opts.mix,
        connections: opts.connections,
        target_rows_per_second: opts.rate,
        ..LoadReport::default()
    });
    let (halt, halted) = watch::channel(false);
    let started = Instant::now();
    let pace = Pace {
        started,
        deadline: started + opts.duration,
        rate: opts.rate,
    };
    let workers = try_join_all(clients.iter().map(|client| {
        Worker {
            client,
            conn,
            stream: &stream,
            tally: &tally,
            pace: &pace,
            halted: halted.clone(),
        }
        .run()
    }));
    let stopped_early = {
        tokio::pin!(workers);
        tokio::pin!(stop);
        tokio::select! {
            biased;
            done = &mut workers => {
                done?;
                false
            }
            _ = &mut stop => {
                halt.send_replace(true);
                workers.await?;
                true
            }
        }
    };
    let mut report = tally.into_inner();
    report.stopped_early = stopped_early;
    report.seconds = started.elapsed().as_secs_f64();
    report.rows_per_second = report.rows as f64 / report.seconds.max(1e-9);
    Ok(report)
}

/// When the run ends, and when the rows counted so far are due at the target rate.
struct Pace {
    started: Instant,
    deadline: Instant,
    rate: f64,
}

impl Pace {
    /// The time by which `rows` rows are due, but no later than the deadline.
    fn due(&self, rows: u64) -> Instant {
        let due = self.started + Duration::from_secs_f64(rows as f64 / self.rate);
        due.min(self.deadline)
    }
}

/// One connection's share of the load: takes the next operation from the shared stream, runs
/// it, counts what the server confirmed, and waits until the rows of all workers are due.
struct Worker<'a> {
    client: &'a Client,
    conn: &'a ConnInfo,
    stream: &'a Mutex<Stream>,
    tally: &'a Mutex<LoadReport>,
    pace: &'a Pace,
    halted: watch::Receiver<bool>,
}

impl Worker<'_> {
    async fn run(mut self) -> Result<(), WorkloadError> {
        while Instant::now() < self.pace.deadline && !*self.halted.borrow() {
            let change = self.stream.lock().await.next();
            let outcome = execute(self.client, &change.sql).await;
            let rows = {
                let mut tally = self.tally.lock().await;
                match outcome {
                    Ok(counts) => tally.record(change.op, &counts),
                    Err(e) if is_conflict(&e) => tally.conflicts += 1,
                    Err(e) => return Err(PgError::query(change.op.doing(), self.conn, e).into()),
                }
                tally.rows
            };
            let until = self.pace.due(rows);
            if until > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {}
                    _ = self.halted.wait_for(|halted| *halted) => break,
                }
            }
        }
        Ok(())
    }
}

/// True for the errors of transactions that met another worker's on the same rows: they rolled
/// back whole, and the next operation may well succeed.
fn is_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        [
            SqlState::UNIQUE_VIOLATION,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
        ]
        .contains(code)
    })
}

/// Runs `sql` (one or more statements, which the server runs as one transaction) and returns
/// each statement's row count.
async fn execute(client: &Client, sql: &str) -> Result<Vec<u64>, tokio_postgres::Error> {
    Ok(client
        .simple_query(sql)
        .await?
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect())
}

impl LoadReport {
    /// Counts a committed `op` from its statements' row counts.
    fn record(&mut self, op: Operation, counts: &[u64]) {
        let changed = match op {
            Operation::NewInvoice => {
                let (invoices, items) = (nth(counts, 0), nth(counts, 1));
                self.invoices_inserted += invoices;
                self.items_inserted += items;
                invoices + items
            }
            Operation::Void => {
                let n = nth(counts, 0);
                self.invoices_voided += n;
                n
            }
            Operation::Allowance => {
                // The first statement locks the invoice, the second inserts.
                let n = nth(counts, 1);
                self.allowances_inserted += n;
                n
            }
            Operation::DeleteItem => {
                // One item per victim invoice, so the invoices updated equal the items deleted.
                let n = nth(counts, 0);
                self.items_deleted += n;
                self.invoices_amended += n;
                2 * n
            }
            Operation::RegisterCarrier => {
                let n = nth(counts, 0);
                self.carriers_registered += n;
                n
            }
        };
        if changed > 0 {
            self.transactions += 1;
            self.rows += changed;
        }
    }
}

/// One operation ready to send: a transaction of one or more statements.
struct Change {
    op: Operation,
    sql: String,
}

/// The generator's state between operations, shared by all workers.
struct Stream {
    rng: ChaCha8Rng,
    generator: Generator,
    /// The oldest and the newest invoice serial (the newest possibly not committed yet).
    first_serial: u64,
    last_serial: u64,
    next_carrier: u64,
    mix: Mix,
}

impl Stream {
    async fn start(
        client: &Client,
        conn: &ConnInfo,
        opts: &LoadOptions,
    ) -> Result<Stream, WorkloadError> {
        let row = client
            .query_one(
                "SELECT min(invoice_number)::text, max(invoice_number)::text, count(*), \
                        (SELECT count(*) FROM public.carrier) FROM public.invoice",
                &[],
            )
            .await
            .map_err(|e| PgError::query("reading the invoice number range", conn, e))?;
        let serial = |col: usize| -> Result<Option<u64>, WorkloadError> {
            let number: Option<String> = row.get(col);
            number
                .map(|n| {
                    generate::invoice_serial(&n).ok_or_else(|| {
                        WorkloadError::Invalid(format!(
                            "public.invoice holds invoice number {n:?}, which is not two capitals \
                             and eight digits; load into a database that einvoice-gen filled"
                        ))
                    })
                })
                .transpose()
        };
        let first = serial(0)?;
        let last = serial(1)?;
        let invoices: i64 = row.get(2);
        let carriers: i64 = row.get(3);
        let plan = Plan {
            seed: opts.seed,
            invoices: invoices.max(1) as u64,
            items_per_invoice: opts.items_per_invoice,
        };
        let start_serial = generate::first_serial() - 1;
        Ok(Stream {
            rng: generate::stream(opts.seed, generate::LOAD_STREAMS),
            generator: Generator::new(plan),
            first_serial: first.unwrap_or(start_serial),
            last_serial: last.unwrap_or(start_serial),
            // Carriers are never deleted, so starting after the current count never reuses an
            // index of an earlier run; the cloud's indexes live in a range of their own.
            next_carrier: carriers as u64
                + match opts.mix {
                    Mix::DataCenter => 0,
                    Mix::Cloud => CLOUD_CARRIERS,
                },
            mix: opts.mix,
        })
    }

    /// The next operation. New invoice numbers and carrier indexes are taken here, once, so no
    /// two workers write the same new row; one whose transaction fails leaves a gap.
    fn next(&mut self) -> Change {
        let mut pick = self.rng.gen_range(0..100);
        let mix = match self.mix {
            Mix::DataCenter => DATA_CENTER_MIX,
            Mix::Cloud => &[(Operation::RegisterCarrier, 100)],
        };
        let op = mix
            .iter()
            .find(|(_, weight)| {
                let hit = pick < *weight;
                pick = pick.saturating_sub(*weight);
                hit
            })
            .map(|(op, _)| *op)
            .unwrap_or(Operation::NewInvoice);
        let now = Utc::now().with_timezone(&generate::taipei());
        let sql = match op {
            Operation::NewInvoice => {
                let serial = generate::next_serial(&mut self.rng, self.last_serial);
                self.last_serial = serial;
                let (invoice, items) = self.generator.invoice(&mut self.rng, serial, now);
                let (mut inv, mut its) = (rows::SqlValues::default(), rows::SqlValues::default());
                rows::invoice(&mut inv, &invoice);
                for item in &items {
                    rows::item(&mut its, &invoice.number, item);
                }
                // Two statements in one query string are one transaction.
                format!(
                    "INSERT INTO public.invoice ({}) VALUES {}; \
                     INSERT INTO public.invoice_item ({}) VALUES {}",
                    rows::INVOICE_COLUMNS,
                    inv.buf,
                    rows::ITEM_COLUMNS,
                    its.buf
                )
            }
            Operation::Void => {
                let from = self.recent_number();
                format!(
                    "UPDATE public.invoice SET status = 'voided', updated_at = now() \
                     WHERE invoice_number = (SELECT invoice_number FROM public.invoice \
                       WHERE invoice_number >= {from} AND status = 'issued' \
                       ORDER BY invoice_number LIMIT 1 FOR UPDATE)"
                )
            }
            Operation::Allowance => {
                let from = self.recent_number();
                let share: f64 = self.rng.gen_range(0.05..1.0);
                let reason = ALLOWANCE_REASONS[self.rng.gen_range(0..ALLOWANCE_REASONS.len())];
                let date = quote_literal(&now.date_naive().to_string());
                // The allowance number counts the invoice's allowances, so it is computed only
                // after the invoice is locked: the first statement locks it, the second (under
                // READ COMMITTED, with a snapshot taken after the lock) sees every allowance
                // committed before and inserts the next one. One statement would count with a
                // snapshot from before its lock wait and could repeat a number.
                format!(
                    "SELECT set_config({setting}, i.invoice_number, true) \
                     FROM (SELECT invoice_number FROM public.invoice \
                           WHERE invoice_number >= {from} AND status = 'issued' \
                           ORDER BY invoice_number LIMIT 1 FOR UPDATE) i; \
                     INSERT INTO public.allowance ({cols}) \
                     SELECT i.invoice_number || '-' || (SELECT count(*) + 1 FROM public.allowance a \
                              WHERE a.invoice_number = i.invoice_number), \
                            i.invoice_number, {date}, a.amount, \
                            CASE i.tax_type WHEN 1 THEN round(a.amount * 0.05) ELSE 0 END, {reason} \
                     FROM public.invoice i, \
                          LATERAL (SELECT greatest(1, floor(i.sales_amount * {share:.4})) AS amount) a \
                     WHERE i.invoice_number = current_setting({setting}, true)::bpchar",
                    setting = quote_literal(ALLOWANCE_INVOICE_SETTING),
                    cols = rows::ALLOWANCE_COLUMNS,
                    reason = quote_literal(reason),
                )
            }
            Operation::DeleteItem => {
                let from = self.recent_number();
                // The bound repeated on the invoice side keeps a merge join from reading every
                // invoice before `from`.
                format!(
                    "WITH victim AS ( \
                       SELECT it.invoice_number, max(it.seq) AS seq FROM public.invoice_item it \
                       WHERE it.invoice_number >= {from} AND EXISTS (SELECT 1 FROM public.invoice i \
                         WHERE i.invoice_number = it.invoice_number AND i.invoice_number >= {from} \
                           AND i.status = 'issued') \
                       GROUP BY it.invoice_number HAVING count(*) > 1 \
                       ORDER BY it.invoice_number LIMIT 1), \
                     gone AS ( \
                       DELETE FROM public.invoice_item it USING victim v \
                       WHERE it.invoice_number = v.invoice_number AND it.seq = v.seq \
                       RETURNING it.invoice_number, it.amount) \
                     UPDATE public.invoice i SET \
                       sales_amount = i.sales_amount - g.amount, \
                       tax_amount = CASE i.tax_type WHEN 1 THEN round((i.sales_amount - g.amount) * 0.05) ELSE 0 END, \
                       total_amount = (i.sales_amount - g.amount) \
                         + CASE i.tax_type WHEN 1 THEN round((i.sales_amount - g.amount) * 0.05) ELSE 0 END, \
                       updated_at = now() \
                     FROM gone g WHERE i.invoice_number = g.invoice_number"
                )
            }
            Operation::RegisterCarrier => {
                let carrier = generate::carrier(
                    &mut self.rng,
                    self.generator.plan().seed,
                    self.next_carrier,
                    now,
                );
                self.next_carrier += 1;
                let mut values = rows::SqlValues::default();
                rows::carrier(&mut values, &carrier);
                format!(
                    "INSERT INTO public.carrier ({}) VALUES {} ON CONFLICT DO NOTHING",
                    rows::CARRIER_COLUMNS,
                    values.buf
                )
            }
        };
        Change { op, sql }
    }

    /// A literal invoice number among the most recent twentieth of the numbers (at least 3000
    /// serials back): voids, allowances and corrections concern recent sales.
    fn recent_number(&mut self) -> String {
        let span = self.last_serial.saturating_sub(self.first_serial);
        let window = (span / 20).max(3000).min(span);
        let serial = self
            .rng
            .gen_range(self.last_serial - window..=self.last_serial);
        quote_literal(&generate::invoice_number(serial))
    }
}

/// The `i`th statement's row count, 0 if the server reported fewer statements.
fn nth(counts: &[u64], i: usize) -> u64 {
    counts.get(i).copied().unwrap_or(0)
}
