//! The change stream: a steady mix of transactions at a target rate of changed rows, the way the
//! platform's writers change invoices.
//!
//! Each operation is one transaction sent as one round trip: new invoices with their items
//! (numbered after the greatest existing number, so they land at the recent end of the key
//! order), voids (an update of `status`), allowances, item deletions (which also amend the
//! invoice's amounts, keeping `sales_amount` the sum of its items) and carrier registrations.
//! Voids, allowances and item deletions pick recent issued invoices. The report counts only
//! changes the server confirmed, so the tables change by exactly what it says, provided no one
//! else writes them meanwhile. One load per database at a time: new invoice numbers are taken
//! from the greatest number seen at the start.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
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

/// What the change stream did, counted from the server's replies.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    pub mix: Mix,
    pub seconds: f64,
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

/// Drives the change stream on `conn` until `opts.duration` passes or `stop` completes
/// (checked between transactions, so every counted transaction has committed).
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
    let client = conn.connect().await?;
    schema::ensure(&client, conn).await?;
    let mut stream = Stream::start(&client, conn, opts).await?;

    let mut report = LoadReport {
        mix: opts.mix,
        target_rows_per_second: opts.rate,
        ..LoadReport::default()
    };
    let started = Instant::now();
    let deadline = started + opts.duration;
    tokio::pin!(stop);
    while Instant::now() < deadline {
        if (&mut stop).now_or_never().is_some() {
            report.stopped_early = true;
            break;
        }
        let changed = stream.step(&mut report).await?;
        if changed > 0 {
            report.transactions += 1;
            report.rows += changed;
        }
        // Pace by rows: the time by which this many rows are due at the target rate.
        let due = started + Duration::from_secs_f64(report.rows as f64 / opts.rate);
        let until = due.min(deadline);
        if until > Instant::now() {
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = &mut stop => { report.stopped_early = true; break; }
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.rows_per_second = report.rows as f64 / report.seconds.max(1e-9);
    Ok(report)
}

/// The generator's state between transactions.
struct Stream<'a> {
    client: &'a Client,
    conn: &'a ConnInfo,
    rng: ChaCha8Rng,
    generator: Generator,
    /// The oldest and the newest invoice serial.
    first_serial: u64,
    last_serial: u64,
    next_carrier: u64,
    mix: Mix,
}

impl<'a> Stream<'a> {
    async fn start(
        client: &'a Client,
        conn: &'a ConnInfo,
        opts: &LoadOptions,
    ) -> Result<Stream<'a>, WorkloadError> {
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
            client,
            conn,
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

    /// Runs one operation; returns the rows it changed (0 when it found nothing to change).
    async fn step(&mut self, report: &mut LoadReport) -> Result<u64, WorkloadError> {
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
        match op {
            Operation::NewInvoice => {
                let serial = generate::next_serial(&mut self.rng, self.last_serial);
                let (invoice, items) = self.generator.invoice(&mut self.rng, serial, now);
                let (mut inv, mut its) = (rows::SqlValues::default(), rows::SqlValues::default());
                rows::invoice(&mut inv, &invoice);
                for item in &items {
                    rows::item(&mut its, &invoice.number, item);
                }
                let sql = format!(
                    "BEGIN; INSERT INTO public.invoice ({}) VALUES {}; \
                     INSERT INTO public.invoice_item ({}) VALUES {}; COMMIT",
                    rows::INVOICE_COLUMNS,
                    inv.buf,
                    rows::ITEM_COLUMNS,
                    its.buf
                );
                let counts = self.run("inserting an invoice", &sql).await?;
                self.last_serial = serial;
                // BEGIN, INSERT, INSERT, COMMIT.
                let (i, it) = (nth(&counts, 1), nth(&counts, 2));
                report.invoices_inserted += i;
                report.items_inserted += it;
                Ok(i + it)
            }
            Operation::Void => {
                let from = self.recent_number();
                let sql = format!(
                    "UPDATE public.invoice SET status = 'voided', updated_at = now() \
                     WHERE invoice_number = (SELECT invoice_number FROM public.invoice \
                       WHERE invoice_number >= {from} AND status = 'issued' \
                       ORDER BY invoice_number LIMIT 1 FOR UPDATE)"
                );
                let n = nth(&self.run("voiding an invoice", &sql).await?, 0);
                report.invoices_voided += n;
                Ok(n)
            }
            Operation::Allowance => {
                let from = self.recent_number();
                let share: f64 = self.rng.gen_range(0.05..1.0);
                let reason = ALLOWANCE_REASONS[self.rng.gen_range(0..ALLOWANCE_REASONS.len())];
                let date = quote_literal(&now.date_naive().to_string());
                let sql = format!(
                    "INSERT INTO public.allowance ({cols}) \
                     SELECT i.invoice_number || '-' || (SELECT count(*) + 1 FROM public.allowance a \
                              WHERE a.invoice_number = i.invoice_number), \
                            i.invoice_number, {date}, a.amount, \
                            CASE i.tax_type WHEN 1 THEN round(a.amount * 0.05) ELSE 0 END, {reason} \
                     FROM (SELECT invoice_number, sales_amount, tax_type FROM public.invoice \
                           WHERE invoice_number >= {from} AND status = 'issued' \
                           ORDER BY invoice_number LIMIT 1 FOR UPDATE) i, \
                          LATERAL (SELECT greatest(1, floor(i.sales_amount * {share:.4})) AS amount) a",
                    cols = rows::ALLOWANCE_COLUMNS,
                    reason = quote_literal(reason),
                );
                let n = nth(&self.run("issuing an allowance", &sql).await?, 0);
                report.allowances_inserted += n;
                Ok(n)
            }
            Operation::DeleteItem => {
                let from = self.recent_number();
                let sql = format!(
                    "WITH victim AS ( \
                       SELECT it.invoice_number, max(it.seq) AS seq FROM public.invoice_item it \
                       WHERE it.invoice_number >= {from} AND EXISTS (SELECT 1 FROM public.invoice i \
                         WHERE i.invoice_number = it.invoice_number AND i.status = 'issued') \
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
                );
                // One item per victim invoice, so the invoices updated equal the items deleted.
                let n = nth(&self.run("deleting an item", &sql).await?, 0);
                report.items_deleted += n;
                report.invoices_amended += n;
                Ok(2 * n)
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
                let sql = format!(
                    "INSERT INTO public.carrier ({}) VALUES {} ON CONFLICT DO NOTHING",
                    rows::CARRIER_COLUMNS,
                    values.buf
                );
                let n = nth(&self.run("registering a carrier", &sql).await?, 0);
                report.carriers_registered += n;
                Ok(n)
            }
        }
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

    /// Runs `sql` (one or more statements) and returns each statement's row count.
    async fn run(&self, what: &str, sql: &str) -> Result<Vec<u64>, WorkloadError> {
        let messages = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| PgError::query(what, self.conn, e))?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            })
            .collect())
    }
}

/// The `i`th statement's row count, 0 if the server reported fewer statements.
fn nth(counts: &[u64], i: usize) -> u64 {
    counts.get(i).copied().unwrap_or(0)
}
