//! The bulk fill: creates the schema and loads a [`Plan`]'s rows with COPY, several segments at
//! once on separate connections.
//!
//! Each worker owns one connection and takes the next segment number from a shared counter;
//! generation runs on the blocking pool so that it does not stall the connections' I/O. The rows
//! depend only on the plan, never on the number of workers or on which worker took a segment.
//! A fill refuses tables that already hold rows unless asked to replace them, so a second fill
//! cannot silently mix two seeds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::SinkExt;
use tokio_postgres::Client;

use super::generate::{Generator, Plan};
use super::{rows, schema, WorkloadError};
use crate::pg::{ConnInfo, PgError};

/// What to fill and how.
#[derive(Debug, Clone)]
pub struct FillOptions {
    pub plan: Plan,
    /// Connections loading at once (at least 1).
    pub jobs: usize,
    /// Empty the tables first instead of refusing to fill tables that hold rows.
    pub replace: bool,
}

/// What a fill wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FillReport {
    pub seed: u64,
    pub invoices: u64,
    pub items: u64,
    pub allowances: u64,
    pub carriers: u64,
    pub rows: u64,
    pub jobs: usize,
    pub seconds: f64,
    pub rows_per_second: f64,
}

#[derive(Default)]
struct Counts {
    invoices: u64,
    items: u64,
    allowances: u64,
    carriers: u64,
}

/// Creates the schema on `conn` and fills it with `opts.plan`'s rows, then analyzes the tables.
pub async fn fill(conn: &ConnInfo, opts: &FillOptions) -> Result<FillReport, WorkloadError> {
    if !(opts.plan.items_per_invoice >= 1.0 && opts.plan.items_per_invoice <= 100.0) {
        return Err(WorkloadError::Invalid(format!(
            "items per invoice must be between 1 and 100, not {}",
            opts.plan.items_per_invoice
        )));
    }
    let started = Instant::now();
    let client = conn.connect().await?;
    schema::ensure(&client, conn).await?;
    let occupied = schema::non_empty(&client, conn).await?;
    if !occupied.is_empty() {
        if !opts.replace {
            return Err(WorkloadError::NotEmpty {
                tables: occupied.join(", "),
                target: conn.to_string(),
            });
        }
        schema::truncate(&client, conn).await?;
    }

    let generator = Arc::new(Generator::new(opts.plan));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.jobs.max(1) {
        let (conn, generator, next) = (conn.clone(), generator.clone(), next.clone());
        workers.spawn(async move { worker(&conn, &generator, &next).await });
    }
    let mut total = Counts::default();
    // The first error ends the fill; dropping the set aborts the other workers.
    while let Some(joined) = workers.join_next().await {
        let c =
            joined.map_err(|e| WorkloadError::Invalid(format!("fill worker failed: {e}")))??;
        total.invoices += c.invoices;
        total.items += c.items;
        total.allowances += c.allowances;
        total.carriers += c.carriers;
    }
    let list: Vec<String> = schema::TABLES
        .iter()
        .map(|t| format!("public.{t}"))
        .collect();
    client
        .batch_execute(&format!("ANALYZE {}", list.join(", ")))
        .await
        .map_err(|e| PgError::query("analyzing the e-invoice tables", conn, e))?;

    let seconds = started.elapsed().as_secs_f64();
    let rows = total.invoices + total.items + total.allowances + total.carriers;
    Ok(FillReport {
        seed: opts.plan.seed,
        invoices: total.invoices,
        items: total.items,
        allowances: total.allowances,
        carriers: total.carriers,
        rows,
        jobs: opts.jobs.max(1),
        seconds,
        rows_per_second: rows as f64 / seconds.max(1e-9),
    })
}

/// Loads segments until none is left: invoice segments first, then carrier segments.
async fn worker(
    conn: &ConnInfo,
    generator: &Arc<Generator>,
    next: &AtomicU64,
) -> Result<Counts, WorkloadError> {
    let client = conn.connect().await?;
    let invoice_segments = generator.plan().invoice_segments();
    let all = invoice_segments + generator.plan().carrier_segments();
    let mut counts = Counts::default();
    loop {
        let unit = next.fetch_add(1, Ordering::Relaxed);
        if unit >= all {
            return Ok(counts);
        }
        let g = generator.clone();
        if unit < invoice_segments {
            let (invoices, items, allowances) = tokio::task::spawn_blocking(move || {
                let seg = g.invoice_segment(unit);
                let (mut inv, mut it, mut al) = (
                    rows::CopyText::default(),
                    rows::CopyText::default(),
                    rows::CopyText::default(),
                );
                for (invoice, items) in &seg.invoices {
                    rows::invoice(&mut inv, invoice);
                    for item in items {
                        rows::item(&mut it, &invoice.number, item);
                    }
                }
                for a in &seg.allowances {
                    rows::allowance(&mut al, a);
                }
                (inv.buf, it.buf, al.buf)
            })
            .await
            .map_err(|e| {
                WorkloadError::Invalid(format!("generating segment {unit} failed: {e}"))
            })?;
            counts.invoices +=
                copy(&client, conn, "invoice", rows::INVOICE_COLUMNS, invoices).await?;
            counts.items += copy(&client, conn, "invoice_item", rows::ITEM_COLUMNS, items).await?;
            counts.allowances += copy(
                &client,
                conn,
                "allowance",
                rows::ALLOWANCE_COLUMNS,
                allowances,
            )
            .await?;
        } else {
            let segment = unit - invoice_segments;
            let carriers = tokio::task::spawn_blocking(move || {
                let mut text = rows::CopyText::default();
                for c in g.carrier_segment(segment) {
                    rows::carrier(&mut text, &c);
                }
                text.buf
            })
            .await
            .map_err(|e| {
                WorkloadError::Invalid(format!("generating carrier segment {segment} failed: {e}"))
            })?;
            counts.carriers +=
                copy(&client, conn, "carrier", rows::CARRIER_COLUMNS, carriers).await?;
        }
    }
}

/// COPYs `text` into `public.table`; returns the rows the server counted.
async fn copy(
    client: &Client,
    conn: &ConnInfo,
    table: &str,
    columns: &str,
    text: String,
) -> Result<u64, WorkloadError> {
    if text.is_empty() {
        return Ok(0);
    }
    let what = || format!("copying into public.{table}");
    let sql = format!("COPY public.{table} ({columns}) FROM STDIN");
    let sink = client
        .copy_in::<_, Bytes>(&sql)
        .await
        .map_err(|e| PgError::query(what(), conn, e))?;
    futures::pin_mut!(sink);
    let mut data = Bytes::from(text);
    // Pieces of 256 KiB let the server start parsing while the rest is still being sent.
    while !data.is_empty() {
        let piece = data.split_to(data.len().min(256 * 1024));
        sink.send(piece)
            .await
            .map_err(|e| PgError::query(what(), conn, e))?;
    }
    let n = sink
        .finish()
        .await
        .map_err(|e| PgError::query(what(), conn, e))?;
    Ok(n)
}
