//! `einvoice-gen` against real clusters: the fill is deterministic for a seed (and independent
//! of the number of connections), its rows keep the model's invariants, and the change stream
//! changes the tables by exactly what it reports.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::PgCluster;

const KEYS: [(&str, &str); 4] = [
    ("invoice", "invoice_number"),
    ("invoice_item", "invoice_number, seq"),
    ("allowance", "allowance_number"),
    ("carrier", "carrier_type, carrier_id"),
];

/// Runs the real `einvoice-gen`; returns (exit code, stdout, stderr).
fn gen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(args)
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run einvoice-gen");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn gen_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = gen(&all);
    assert_eq!(code, 0, "einvoice-gen {args:?} failed: {out} {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// One md5 per table over all rows in key order.
fn fingerprints(c: &PgCluster) -> Vec<String> {
    KEYS.iter()
        .map(|(table, key)| {
            c.psql(
                "einvoice",
                &format!(
                    "SELECT md5(string_agg(t::text, ',' ORDER BY {key})) FROM public.{table} t"
                ),
            )
        })
        .collect()
}

fn count(c: &PgCluster, sql: &str) -> i64 {
    let text = c.psql("einvoice", sql);
    text.parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}: {text:?}"))
}

#[test]
fn same_seed_gives_same_tables_and_another_seed_differs() {
    let a = PgCluster::start();
    let b = PgCluster::start();
    let report = gen_json(&[
        "fill",
        "--url",
        &a.url("einvoice"),
        "--invoices",
        "2000",
        "--seed",
        "7",
        "--jobs",
        "3",
    ]);
    // One connection on the other cluster: the rows must not depend on how the work was split.
    gen_json(&[
        "fill",
        "--url",
        &b.url("einvoice"),
        "--invoices",
        "2000",
        "--seed",
        "7",
        "--jobs",
        "1",
    ]);

    assert_eq!(report["invoices"], 2000);
    for (field, table) in [
        ("invoices", "invoice"),
        ("items", "invoice_item"),
        ("allowances", "allowance"),
        ("carriers", "carrier"),
    ] {
        let n = count(&a, &format!("SELECT count(*) FROM public.{table}"));
        assert_eq!(report[field].as_i64(), Some(n), "{field}");
        assert!(n > 0, "{table} is empty");
    }
    let fa = fingerprints(&a);
    assert_eq!(fa, fingerprints(&b), "same seed, different tables");

    // A second fill must not mix seeds silently.
    let (code, _, err) = gen(&[
        "fill",
        "--url",
        &b.url("einvoice"),
        "--invoices",
        "2000",
        "--seed",
        "8",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("already hold rows") && err.contains("--replace"),
        "{err}"
    );

    gen_json(&[
        "fill",
        "--url",
        &b.url("einvoice"),
        "--invoices",
        "2000",
        "--seed",
        "8",
        "--replace",
    ]);
    let fb = fingerprints(&b);
    for (i, (table, _)) in KEYS.iter().enumerate() {
        assert_ne!(fa[i], fb[i], "{table} is the same for seeds 7 and 8");
    }
}

#[test]
fn filled_rows_keep_the_model_invariants() {
    let c = PgCluster::start();
    gen_json(&[
        "fill",
        "--url",
        &c.url("einvoice"),
        "--invoices",
        "3000",
        "--seed",
        "11",
    ]);
    let zero = [
        // Numbers like AB12345678.
        "SELECT count(*) FROM public.invoice WHERE invoice_number !~ '^[A-Z]{2}[0-9]{8}$'",
        // Number order is time order: recent invoices sit at the recent end of the key order.
        "SELECT count(*) FROM (SELECT created_at, lag(created_at) OVER (ORDER BY invoice_number) AS prev \
         FROM public.invoice) x WHERE created_at < prev",
        // Amounts add up.
        "SELECT count(*) FROM public.invoice i WHERE sales_amount IS DISTINCT FROM \
         (SELECT sum(amount) FROM public.invoice_item it WHERE it.invoice_number = i.invoice_number)",
        "SELECT count(*) FROM public.invoice WHERE total_amount <> sales_amount + tax_amount \
         OR tax_amount <> CASE tax_type WHEN 1 THEN round(sales_amount * 0.05) ELSE 0 END",
        "SELECT count(*) FROM public.invoice_item WHERE amount <> quantity * unit_price",
        // Allowances reference invoices and never exceed them.
        "SELECT count(*) FROM public.allowance a LEFT JOIN public.invoice i USING (invoice_number) \
         WHERE i.invoice_number IS NULL OR a.amount > i.sales_amount",
        // A carrier or a donation, not both.
        "SELECT count(*) FROM public.invoice WHERE carrier_id IS NOT NULL AND donation_code IS NOT NULL",
        "SELECT count(*) FROM public.invoice WHERE carrier_type = '3J0002' AND carrier_id !~ '^/[0-9A-Z+.-]{7}$'",
    ];
    for sql in zero {
        assert_eq!(count(&c, sql), 0, "{sql}");
    }
    let some = [
        "SELECT count(*) FROM public.invoice WHERE status = 'voided'",
        "SELECT count(*) FROM public.invoice WHERE carrier_type = 'CQ0001'",
        "SELECT count(*) FROM public.invoice WHERE donation_code IS NOT NULL",
        "SELECT count(*) FROM public.invoice WHERE buyer_id <> '00000000'",
        "SELECT count(*) FROM public.invoice_item WHERE description ~ '[^\\x01-\\x7f]'",
    ];
    for sql in some {
        assert!(count(&c, sql) > 0, "{sql}");
    }
    let avg: f64 = c
        .psql("einvoice", "SELECT count(*)::float8 / (SELECT count(*) FROM public.invoice) FROM public.invoice_item")
        .parse()
        .unwrap();
    assert!((2.7..3.3).contains(&avg), "items per invoice {avg}");
}

struct Snapshot {
    invoices: i64,
    items: i64,
    voided: i64,
    allowances: i64,
    carriers: i64,
}

fn snapshot(c: &PgCluster) -> Snapshot {
    Snapshot {
        invoices: count(c, "SELECT count(*) FROM public.invoice"),
        items: count(c, "SELECT count(*) FROM public.invoice_item"),
        voided: count(
            c,
            "SELECT count(*) FROM public.invoice WHERE status = 'voided'",
        ),
        allowances: count(c, "SELECT count(*) FROM public.allowance"),
        carriers: count(c, "SELECT count(*) FROM public.carrier"),
    }
}

fn field(r: &serde_json::Value, name: &str) -> i64 {
    r[name]
        .as_i64()
        .unwrap_or_else(|| panic!("no {name} in {r}"))
}

/// Checks that the tables changed from `before` by exactly what load report `r` says, that new
/// invoices continue the numbering densely after `old_max`, and that amounts and allowance
/// numbers still add up.
fn assert_load_matches_tables(
    c: &PgCluster,
    before: &Snapshot,
    old_max: &str,
    r: &serde_json::Value,
) {
    let after = snapshot(c);
    assert_eq!(
        after.invoices - before.invoices,
        field(r, "invoices_inserted")
    );
    assert_eq!(
        after.items - before.items,
        field(r, "items_inserted") - field(r, "items_deleted")
    );
    assert_eq!(after.voided - before.voided, field(r, "invoices_voided"));
    assert_eq!(
        after.allowances - before.allowances,
        field(r, "allowances_inserted")
    );
    assert_eq!(
        after.carriers - before.carriers,
        field(r, "carriers_registered")
    );
    assert_eq!(field(r, "items_deleted"), field(r, "invoices_amended"));
    assert_eq!(
        field(r, "rows"),
        LOAD_PARTS.iter().map(|p| field(r, p)).sum::<i64>()
    );
    for p in LOAD_PARTS {
        assert!(field(r, p) > 0, "no {p} in the run: {r}");
    }

    // New invoices continue the numbering; amended invoices still add up.
    let newer = count(
        c,
        &format!("SELECT count(*) FROM public.invoice WHERE invoice_number > '{old_max}'"),
    );
    assert_eq!(newer, field(r, "invoices_inserted"));
    let wrong = count(
        c,
        "SELECT count(*) FROM public.invoice i WHERE sales_amount IS DISTINCT FROM \
         (SELECT sum(amount) FROM public.invoice_item it WHERE it.invoice_number = i.invoice_number) \
         OR total_amount <> sales_amount + tax_amount",
    );
    assert_eq!(wrong, 0);
    // An invoice's allowances are numbered 1, 2, ... without gaps or repeats.
    let gaps = count(
        c,
        "SELECT count(*) FROM (SELECT invoice_number, count(*) AS n, \
           max(split_part(allowance_number, '-', 2)::int) AS last \
         FROM public.allowance GROUP BY invoice_number) a WHERE n <> last",
    );
    assert_eq!(gaps, 0);
}

const LOAD_PARTS: [&str; 7] = [
    "invoices_inserted",
    "items_inserted",
    "invoices_voided",
    "allowances_inserted",
    "items_deleted",
    "invoices_amended",
    "carriers_registered",
];

#[test]
fn load_changes_the_tables_by_what_it_reports() {
    let c = PgCluster::start();
    let url = c.url("einvoice");
    gen_json(&["fill", "--url", &url, "--invoices", "2000", "--seed", "3"]);
    let before = snapshot(&c);
    let old_max = c.psql("einvoice", "SELECT max(invoice_number) FROM public.invoice");

    let r = gen_json(&[
        "load",
        "--url",
        &url,
        "--rate",
        "400",
        "--duration",
        "3",
        "--seed",
        "5",
    ]);
    assert_load_matches_tables(&c, &before, &old_max, &r);
    assert_eq!(field(&r, "connections"), 1);
    assert_eq!(field(&r, "conflicts"), 0, "one connection met another: {r}");
    // At 400 rows/s for 3 s; allow for a slow, shared machine but not for no pacing at all.
    let rows = field(&r, "rows");
    assert!((300..=1300).contains(&rows), "{rows} rows changed");

    let changed_old = count(
        &c,
        &format!("SELECT count(*) FROM public.invoice WHERE invoice_number <= '{old_max}' AND updated_at > created_at + interval '30 days'"),
    );
    assert!(
        changed_old > 0,
        "voids and amendments touched no filled invoice"
    );
}

#[test]
fn load_on_several_connections_changes_the_tables_by_what_it_reports() {
    let c = PgCluster::start();
    let url = c.url("einvoice");
    // With every filled invoice voided, the voids, allowances and item deletions that look for
    // the first issued invoice from a recent number mostly land on the same one (the oldest
    // new invoice still issued), so the connections keep meeting on it.
    gen_json(&["fill", "--url", &url, "--invoices", "300", "--seed", "4"]);
    c.psql("einvoice", "UPDATE public.invoice SET status = 'voided'");
    let before = snapshot(&c);
    let old_max = c.psql("einvoice", "SELECT max(invoice_number) FROM public.invoice");

    let r = gen_json(&[
        "load",
        "--url",
        &url,
        "--rate",
        "3000",
        "--duration",
        "3",
        "--seed",
        "6",
        "--connections",
        "4",
    ]);
    assert_eq!(field(&r, "connections"), 4);
    // Allowances lock their invoice before numbering, and the operations take their locks in
    // one order, so under READ COMMITTED the connections wait for each other but never collide.
    assert_eq!(field(&r, "conflicts"), 0, "{r}");
    assert_load_matches_tables(&c, &before, &old_max, &r);
    // Paced by the rows of all connections together: each may overshoot by its last
    // transaction, no more.
    let rows = field(&r, "rows");
    assert!((1..=9000 + 4 * 20).contains(&rows), "{rows} rows changed");

    let (code, _, err) = gen(&[
        "load",
        "--url",
        &url,
        "--rate",
        "10",
        "--duration",
        "1",
        "--connections",
        "0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--connections"), "{err}");
}

#[test]
fn a_stopped_load_on_several_connections_counts_what_committed() {
    let c = PgCluster::start();
    let url = c.url("einvoice");
    gen_json(&["fill", "--url", &url, "--invoices", "1000", "--seed", "8"]);
    let before = snapshot(&c);
    let old_max = c.psql("einvoice", "SELECT max(invoice_number) FROM public.invoice");

    let load = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(["load", "--url", &url, "--rate", "2000", "--duration", "120"])
        .args(["--connections", "3", "--json"])
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run einvoice-gen");
    // Stop it once it is well under way, as Ctrl-C would.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&c, "SELECT count(*) FROM public.invoice") < before.invoices + 300 {
        assert!(
            Instant::now() < deadline,
            "the load inserted too little in 60 s"
        );
    }
    let kill = Command::new("kill")
        .args(["-INT", &load.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let out = load.wait_with_output().expect("wait for einvoice-gen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    assert_eq!(r["stopped_early"], true, "{r}");
    assert!(r["seconds"].as_f64().is_some_and(|s| s < 60.0), "{r}");
    assert_eq!(field(&r, "connections"), 3);
    assert_load_matches_tables(&c, &before, &old_max, &r);
}

/// The application's own role may write the tables but not create any: the load runs as it
/// once the tables exist.
#[test]
fn load_runs_as_a_role_that_may_only_write_the_tables() {
    let c = PgCluster::start();
    gen_json(&["fill", "--url", &c.url("einvoice"), "--invoices", "200"]);
    c.psql(
        "einvoice",
        "CREATE ROLE einvoice_app LOGIN NOSUPERUSER; \
         GRANT USAGE ON SCHEMA public TO einvoice_app; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO einvoice_app; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO einvoice_app",
    );
    let before = count(&c, "SELECT count(*) FROM public.invoice");
    let url = c.url_as("einvoice_app", "einvoice");
    let r = gen_json(&["load", "--url", &url, "--rate", "200", "--duration", "1"]);
    assert!(field(&r, "invoices_inserted") > 0, "{r}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM public.invoice"),
        before + field(&r, "invoices_inserted")
    );
}

#[test]
fn schema_is_idempotent_and_load_starts_on_an_empty_database() {
    let c = PgCluster::start();
    let url = c.url("einvoice");
    for _ in 0..2 {
        let (code, out, err) = gen(&["schema", "--url", &url]);
        assert_eq!(code, 0, "{out} {err}");
    }
    let r = gen_json(&["load", "--url", &url, "--rate", "200", "--duration", "1"]);
    assert!(field(&r, "invoices_inserted") > 0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM public.invoice"),
        field(&r, "invoices_inserted")
    );
    // The numbering starts at the first track even without a fill.
    assert_eq!(
        c.psql(
            "einvoice",
            "SELECT min(invoice_number) >= 'AB10000000' FROM public.invoice"
        ),
        "t"
    );

    // The cloud's writers register carriers only, with keys apart from the data center's.
    let before = count(&c, "SELECT count(*) FROM public.carrier");
    let r = gen_json(&[
        "load",
        "--url",
        &url,
        "--rate",
        "200",
        "--duration",
        "1",
        "--mix",
        "cloud",
    ]);
    assert!(field(&r, "carriers_registered") > 0, "{r}");
    assert_eq!(field(&r, "rows"), field(&r, "carriers_registered"));
    assert_eq!(
        count(&c, "SELECT count(*) FROM public.carrier") - before,
        field(&r, "carriers_registered")
    );

    let (code, _, err) = gen(&["fill", "--url", "mysql://x/y", "--invoices", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("postgres://"), "{err}");
}
