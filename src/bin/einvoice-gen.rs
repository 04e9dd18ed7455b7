//! `einvoice-gen`: creates the e-invoice schema, fills it deterministically from a seed, and
//! drives a steady change stream, for demos, tests and benchmarks. The work happens in
//! `invsync::workload`; this file parses options and prints the results.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use invsync::pg::ConnInfo;
use invsync::workload::{
    self, schema, FillOptions, FillReport, LoadOptions, LoadReport, Mix, Plan,
};

#[derive(Parser)]
#[command(
    name = "einvoice-gen",
    version,
    about = "Creates, fills and changes a realistic e-invoice database",
    long_about = "Creates a realistic e-invoice schema (public.invoice, invoice_item, allowance, \
carrier), fills it with invoices generated deterministically from a seed (the same seed gives \
the same rows), and drives a steady stream of changes: new invoices, voids, allowances, item \
deletions and carrier registrations."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Target {
    /// The database, as postgres://USER[:PASSWORD]@HOST:PORT/DATABASE[?sslmode=...]
    #[arg(long, env = "EINVOICE_URL", value_name = "URL")]
    url: String,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Create the e-invoice tables that are missing
    Schema(Target),
    /// Create the schema and fill it with N invoices and their items, allowances and carriers
    ///
    /// Loads with COPY on several connections at once. Refuses tables that already hold rows
    /// unless --replace is given.
    Fill {
        #[command(flatten)]
        target: Target,
        /// How many invoices
        #[arg(long, value_name = "N")]
        invoices: u64,
        /// The seed: the same seed and sizes give the same rows
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The mean number of items per invoice
        #[arg(long, default_value_t = 3.0, value_name = "AVG")]
        items_per_invoice_avg: f64,
        /// Connections loading at once [default: the number of CPUs]
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Empty the e-invoice tables first
        #[arg(long)]
        replace: bool,
    },
    /// Drive a steady change stream at a target rate of changed rows per second
    ///
    /// Each transaction is one of: a new invoice with its items, a void, an allowance, an item
    /// deletion (which amends the invoice's amounts), a carrier registration. The summary counts
    /// only committed changes. Ctrl-C stops early (each connection finishes the transaction it
    /// has in flight) and still prints the summary.
    Load {
        #[command(flatten)]
        target: Target,
        /// Target changed rows per second
        #[arg(long, value_name = "ROWS_PER_S")]
        rate: f64,
        /// How long to run, in seconds
        #[arg(long, value_name = "SECS")]
        duration: f64,
        /// The seed for the choice of operations and generated values
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The mean number of items per new invoice
        #[arg(long, default_value_t = 3.0, value_name = "AVG")]
        items_per_invoice_avg: f64,
        /// Whose writes to play: the data center's mix, or the cloud's carrier registrations
        #[arg(long, value_enum, default_value_t = MixArg::Datacenter)]
        mix: MixArg,
        /// Connections driving the stream at once
        ///
        /// One connection runs one transaction per round trip, which bounds its rate; several
        /// share one generator (new invoice numbers and carriers never collide) and one pace.
        /// Transactions that meet another connection's on the same rows (unique violation,
        /// deadlock, serialization failure) roll back and are counted as conflicts.
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        connections: u16,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum MixArg {
    /// New invoices with items, voids, allowances, item deletions, carrier registrations
    Datacenter,
    /// Carrier registrations only, with keys that never collide with the data center's
    Cloud,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn connection(url: &str) -> anyhow::Result<ConnInfo> {
    ConnInfo::parse(url).map_err(|e| anyhow::anyhow!("--url: {e}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Schema(target) => {
            let conn = connection(&target.url)?;
            let client = conn.connect().await?;
            schema::ensure(&client, &conn).await?;
            if target.json {
                println!("{}", serde_json::json!({ "tables": schema::TABLES }));
            } else {
                println!(
                    "schema ready on {conn}: public.{}",
                    schema::TABLES.join(", public.")
                );
            }
        }
        Command::Fill {
            target,
            invoices,
            seed,
            items_per_invoice_avg,
            jobs,
            replace,
        } => {
            let conn = connection(&target.url)?;
            let jobs =
                jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let opts = FillOptions {
                plan: Plan {
                    seed,
                    invoices,
                    items_per_invoice: items_per_invoice_avg,
                },
                jobs,
                replace,
            };
            let report = workload::fill(&conn, &opts).await?;
            if target.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("rendering JSON")?
                );
            } else {
                print_fill(&conn, &report);
            }
        }
        Command::Load {
            target,
            rate,
            duration,
            seed,
            items_per_invoice_avg,
            mix,
            connections,
        } => {
            let conn = connection(&target.url)?;
            let duration = Duration::try_from_secs_f64(duration).map_err(|_| {
                anyhow::anyhow!("--duration must be a non-negative number of seconds")
            })?;
            let opts = LoadOptions {
                seed,
                rate,
                duration,
                items_per_invoice: items_per_invoice_avg,
                mix: match mix {
                    MixArg::Datacenter => Mix::DataCenter,
                    MixArg::Cloud => Mix::Cloud,
                },
                connections: connections.into(),
            };
            let stop = async {
                // If the handler cannot be installed, run for the whole duration.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let report = workload::load(&conn, &opts, stop).await?;
            if target.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("rendering JSON")?
                );
            } else {
                print_load(&conn, &report);
            }
        }
    }
    Ok(())
}

fn print_fill(conn: &ConnInfo, r: &FillReport) {
    println!(
        "filled {conn} (seed {}): {} invoices, {} items, {} allowances, {} carriers",
        r.seed, r.invoices, r.items, r.allowances, r.carriers
    );
    println!(
        "{} rows in {:.1} s ({:.0} rows/s, {} connections)",
        r.rows, r.seconds, r.rows_per_second, r.jobs
    );
}

fn print_load(conn: &ConnInfo, r: &LoadReport) {
    println!(
        "load on {conn}: {} transactions, {} rows changed in {:.1} s ({:.0} rows/s, target {:.0}) \
         on {} connection{}, {} conflict{}{}",
        r.transactions,
        r.rows,
        r.seconds,
        r.rows_per_second,
        r.target_rows_per_second,
        r.connections,
        if r.connections == 1 { "" } else { "s" },
        r.conflicts,
        if r.conflicts == 1 { "" } else { "s" },
        if r.stopped_early {
            ", stopped early"
        } else {
            ""
        }
    );
    for (what, n) in [
        ("invoices inserted", r.invoices_inserted),
        ("items inserted", r.items_inserted),
        ("invoices voided", r.invoices_voided),
        ("allowances inserted", r.allowances_inserted),
        ("items deleted", r.items_deleted),
        ("invoices amended", r.invoices_amended),
        ("carriers registered", r.carriers_registered),
    ] {
        println!("  {what:<20} {n:>9}");
    }
}
