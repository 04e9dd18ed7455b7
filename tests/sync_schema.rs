//! `sync setup` creates missing target tables from the same table model that backup saves
//! and restore recreates: the rich schema, set up into an empty target, has the source's
//! `pg_dump --schema-only` for everything sync documents it creates (all but foreign keys,
//! triggers and their functions, row-level security and policies, comments, owners and
//! grants), and its rows arrive, copied and streamed, as `verify db` proves.

mod support;
mod sync_common;

use support::rich_schema::{
    assert_rows_identical, assert_same_dump, rich_schema, schema_dump_with, ROLES, TABLE_KINDS,
};
use support::PgCluster;
use sync_common::{load, set_up_pipeline, wait_same, Running};

/// Entries of a `pg_dump` that sync does not create on a target, by the `Type:` of their
/// header (comments, owners and privileges are left out of both dumps by pg_dump itself).
const NOT_CREATED_BY_SYNC: &[&str] = &[
    "FK CONSTRAINT",
    "TRIGGER",
    "FUNCTION",
    "ROW SECURITY",
    "POLICY",
    "PUBLICATION",
    "PUBLICATION TABLE",
];

/// `pg_dump --schema-only` of the rich schema's two schemas without owners, privileges and
/// comments, and without the entries sync does not create, pg_dump's `SET` lines and its
/// trailer.
fn replica_schema(pg: &PgCluster) -> String {
    let dump = schema_dump_with(
        pg,
        "einvoice",
        &[
            "-n",
            "public",
            "-n",
            "sales",
            "--no-owner",
            "--no-privileges",
            "--no-comments",
        ],
    );
    // The trailer ends the last entry, which may be one left out.
    let entries = dump
        .split("\n--\n-- PostgreSQL database dump complete")
        .next()
        .unwrap_or_default();
    entries
        .split("\n--\n-- Name: ")
        .filter(|entry| {
            let header = entry.lines().next().unwrap_or_default();
            !NOT_CREATED_BY_SYNC
                .iter()
                .any(|t| header.contains(&format!("; Type: {t};")))
        })
        .collect::<Vec<_>>()
        .join("\n--\n-- Name: ")
        .lines()
        // pg_dump's session settings and blank lines, which stand where the dump first
        // needs them: after entries that may have been left out.
        .filter(|l| !l.is_empty() && !l.starts_with("SET "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rich_schema_is_set_up_on_an_empty_target_from_the_model() {
    let src = PgCluster::start();
    src.psql("postgres", ROLES);
    rich_schema(&src, "einvoice");
    // A target without the source's roles: sync creates no owners or grants.
    let dst = PgCluster::start();

    let (_dir, cfg) = set_up_pipeline(&src, &dst, &["public.*", "sales.*"]);
    let (before, after) = (replica_schema(&src), replica_schema(&dst));
    // What sync documents it creates is all in the comparison.
    assert_same_dump(&before, &after, TABLE_KINDS);
    // And what it leaves out is not there.
    assert_eq!(
        dst.psql(
            "einvoice",
            "SELECT (SELECT count(*) FROM pg_constraint WHERE contype = 'f' \
                       AND connamespace IN ('public'::regnamespace, 'sales'::regnamespace)) || ' ' || \
             (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal \
                AND tgrelid::regclass::text NOT LIKE 'invsync.%') || ' ' || \
             (SELECT count(*) FROM pg_policy) || ' ' || \
             (SELECT count(*) FROM pg_proc WHERE pronamespace = 'sales'::regnamespace)"
        ),
        "0 0 0 0"
    );

    // Rows arrive: the copy's, and those streamed into a partition, a serial and an identity.
    let run = Running::start(&load(&cfg), "p");
    src.psql(
        "einvoice",
        // Foreign key checks run as the invoices' owner.
        "GRANT USAGE ON SCHEMA sales TO app_owner; \
         INSERT INTO public.seller (ban, name) VALUES ('99999999', 'late seller'); \
         INSERT INTO sales.invoice (number, issued_at, seller, status, amounts, band) \
           VALUES ('ZZ00000001', '2024-02-10 08:00:00+00', '99999999', 'void', ROW(5, 0.25), \
                   public.amount_range(1, 2)); \
         INSERT INTO public.item (invoice_id, issued_at, line, quantity) \
           SELECT id, issued_at, 1, 2 FROM sales.invoice WHERE number = 'ZZ00000001'; \
         UPDATE sales.invoice SET status = 'paid' WHERE number = 'AB00000007'",
    );
    wait_same(
        &src,
        &dst,
        "SELECT count(*), max(id), sum(total) FROM sales.invoice_2024_02",
    )
    .await;
    wait_same(&src, &dst, "SELECT count(*), max(id) FROM public.item").await;
    run.stop().await;
    assert_rows_identical(&src, &dst, "einvoice");
}
