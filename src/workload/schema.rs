//! The e-invoice schema: four tables in `public`, created if missing.
//!
//! There are no foreign keys: the platform keeps items, allowances and carrier registrations in
//! stores that are loaded, replicated and restored independently, and so do the fill's parallel
//! COPYs. Every table has a primary key, so it can be replicated without REPLICA IDENTITY FULL.
//!
//! Codes (invoice, allowance and business numbers, carrier types and ids) use the "C" collation:
//! they compare byte by byte, so key order does not depend on the server's locale (two clusters
//! with different locales order rows alike), and key comparisons are cheap (the fill's COPY into
//! `invoice_item` runs about three times faster than under C.UTF-8).

use tokio_postgres::Client;

use super::WorkloadError;
use crate::pg::{ConnInfo, PgError};

/// The tables, in the order they are reported.
pub const TABLES: [&str; 4] = ["invoice", "invoice_item", "allowance", "carrier"];

const DDL: &str = r#"
CREATE TABLE IF NOT EXISTS public.invoice (
    invoice_number char(10) COLLATE "C" PRIMARY KEY,
    invoice_date   date NOT NULL,
    invoice_time   time NOT NULL,
    seller_id      char(8) COLLATE "C" NOT NULL,
    buyer_id       char(8) COLLATE "C",
    sales_amount   numeric(14,2) NOT NULL,
    tax_amount     numeric(14,2) NOT NULL,
    total_amount   numeric(14,2) NOT NULL,
    tax_type       smallint NOT NULL CHECK (tax_type IN (1, 2, 3)),
    carrier_type   varchar(6) COLLATE "C",
    carrier_id     varchar(64) COLLATE "C",
    donation_code  varchar(7),
    random_number  char(4) NOT NULL,
    status         text NOT NULL DEFAULT 'issued' CHECK (status IN ('issued', 'voided')),
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
COMMENT ON TABLE public.invoice IS 'uniform invoices (統一發票); tax_type 1 taxable, 2 zero-rated, 3 exempt';
CREATE TABLE IF NOT EXISTS public.invoice_item (
    invoice_number char(10) COLLATE "C" NOT NULL,
    seq            integer NOT NULL,
    description    text NOT NULL,
    quantity       numeric(12,2) NOT NULL,
    unit_price     numeric(14,2) NOT NULL,
    amount         numeric(14,2) NOT NULL,
    PRIMARY KEY (invoice_number, seq)
);
CREATE TABLE IF NOT EXISTS public.allowance (
    allowance_number varchar(16) COLLATE "C" PRIMARY KEY,
    invoice_number   char(10) COLLATE "C" NOT NULL,
    allowance_date   date NOT NULL,
    amount           numeric(14,2) NOT NULL,
    tax_amount       numeric(14,2) NOT NULL,
    reason           text NOT NULL
);
COMMENT ON TABLE public.allowance IS 'allowances (折讓) issued against invoices';
CREATE INDEX IF NOT EXISTS allowance_invoice_number_idx ON public.allowance (invoice_number);
CREATE TABLE IF NOT EXISTS public.carrier (
    carrier_type  varchar(6) COLLATE "C" NOT NULL,
    carrier_id    varchar(64) COLLATE "C" NOT NULL,
    registered_at timestamptz NOT NULL,
    phone_hash    char(64) NOT NULL,
    email_hash    char(64),
    PRIMARY KEY (carrier_type, carrier_id)
);
COMMENT ON TABLE public.carrier IS 'carrier registrations (載具歸戶), written by citizens in the public cloud; 3J0002 mobile barcode, CQ0001 citizen certificate';
"#;

/// Creates the tables that are missing. Safe to run again; existing tables are left as they are,
/// and when all exist nothing is run, so a role that may only write them (an application role
/// without `CREATE` on the schema) can drive the load.
pub async fn ensure(client: &Client, conn: &ConnInfo) -> Result<(), WorkloadError> {
    let all_there: bool = client
        .query_one(
            "SELECT bool_and(to_regclass('public.' || t) IS NOT NULL) FROM unnest($1::text[]) t",
            &[&TABLES.to_vec()],
        )
        .await
        .map_err(|e| PgError::query("looking up the e-invoice tables", conn, e))?
        .get(0);
    if all_there {
        return Ok(());
    }
    // Serialised so that two generators starting at once do not race on CREATE TABLE.
    let ddl = format!("BEGIN; SELECT pg_advisory_xact_lock(7734); {DDL} COMMIT;");
    client
        .batch_execute(&ddl)
        .await
        .map_err(|e| PgError::query("creating the e-invoice schema", conn, e))?;
    Ok(())
}

/// The tables among [`TABLES`] that hold rows.
pub async fn non_empty(client: &Client, conn: &ConnInfo) -> Result<Vec<String>, WorkloadError> {
    let mut found = Vec::new();
    for table in TABLES {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM public.{table})");
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| PgError::query(format!("reading public.{table}"), conn, e))?;
        if row.get::<_, bool>(0) {
            found.push(format!("public.{table}"));
        }
    }
    Ok(found)
}

/// Empties every table of the schema.
pub async fn truncate(client: &Client, conn: &ConnInfo) -> Result<(), WorkloadError> {
    let list: Vec<String> = TABLES.iter().map(|t| format!("public.{t}")).collect();
    client
        .batch_execute(&format!("TRUNCATE {}", list.join(", ")))
        .await
        .map_err(|e| PgError::query("emptying the e-invoice tables", conn, e))?;
    Ok(())
}
