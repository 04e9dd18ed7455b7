//! Faithful restore: a schema with every kind of object the table model saves (two schemas,
//! a table partitioned by month, enum / domain / composite / range types, sequences, identity
//! and generated columns, check / unique / exclusion constraints, partial, expression and
//! opclass indexes, a foreign key from items to invoices, a trigger and its function, row-level
//! security and policies, comments, owners and grants to two roles) is backed up and restored
//! into an empty database of another cluster. `pg_dump --schema-only` of the whole restored
//! database equals the source's, and `verify db` finds every row identical.
//!
//! Values keep their value between servers whose text defaults differ (`lc_monetary`,
//! `TimeZone`, `extra_float_digits`), through backup and restore and through sync.

mod backup_util;
mod support;
mod sync_common;

use std::collections::BTreeMap;
use std::path::Path;

use invsync::backup::repository::Repository;
use invsync::backup::restore::{self, RestoreDbOptions};
use invsync::backup::session::{self, BackupOptions, DatabaseSource, Quiet};
use invsync::backup::snapshot::{self, Snapshot};
use invsync::config::{RepositoryConfig, TablePattern};
use invsync::pg::schema::AccessOptions;
use support::rich_schema::{
    assert_rows_identical, assert_same_dump, rich_schema, schema_dump, schema_dump_with, ROLES,
    TABLE_KINDS,
};
use support::{ClusterOptions, PgCluster};

/// A new repository in `dir`, with its key there too.
async fn repository(dir: &Path) -> Repository {
    let cfg = repo_config(dir);
    Repository::init(&cfg).await.unwrap();
    Repository::open(&cfg).await.unwrap()
}

fn repo_config(dir: &Path) -> RepositoryConfig {
    let (key, recipient) = backup_util::identity(dir, "k");
    RepositoryConfig {
        name: "r".into(),
        url: format!("file://{}", dir.join("repo").display())
            .parse()
            .unwrap(),
        recipients: vec![recipient],
        identity_file: Some(key),
        passphrase: None,
        options: BTreeMap::new(),
    }
}

async fn backup(repo: &Repository, pg: &PgCluster) -> Snapshot {
    backup_tables(repo, pg, &["public.*", "sales.*"]).await
}

async fn backup_tables(repo: &Repository, pg: &PgCluster, tables: &[&str]) -> Snapshot {
    let opts = BackupOptions {
        database: Some(DatabaseSource {
            label: "src".into(),
            conn: pg.conn("einvoice"),
            tables: tables
                .iter()
                .map(|t| TablePattern::parse(t).unwrap())
                .collect(),
            jobs: 2,
        }),
        config_dirs: vec![],
        tags: vec![],
        fence: None,
    };
    let summary = session::backup(repo, &opts, &Quiet).await.unwrap();
    snapshot::find(repo, &summary.snapshot).await.unwrap().1
}

/// Restores all of `snap` into database `restored` of `pg`, with owners and grants.
async fn restore_whole(repo: &Repository, snap: &Snapshot, pg: &PgCluster) {
    restore::restore_db(
        repo,
        snap,
        &pg.conn("restored"),
        &restore_opts(AccessOptions::default()),
        std::future::pending(),
    )
    .await
    .unwrap();
}

fn restore_opts(access: AccessOptions) -> RestoreDbOptions {
    RestoreDbOptions {
        tables: vec![],
        replace: false,
        access,
        lock_wait: std::time::Duration::from_secs(10),
    }
}

/// Names of the user's relations and types in `db`: what a failed restore must not leave.
fn user_objects(pg: &PgCluster, db: &str) -> String {
    pg.psql(
        db,
        "SELECT string_agg(n, ', ' ORDER BY n) FROM ( \
           SELECT c.relname::text AS n FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace \
           WHERE s.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') \
           UNION ALL SELECT t.typname::text FROM pg_type t JOIN pg_namespace s ON s.oid = t.typnamespace \
           WHERE s.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') \
           UNION ALL SELECT nspname::text FROM pg_namespace WHERE nspname NOT LIKE 'pg_%' \
             AND nspname NOT IN ('public', 'information_schema')) o",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rich_schema_restores_as_pg_dump_sees_it() {
    let src = PgCluster::start();
    src.psql("postgres", ROLES);
    rich_schema(&src, "einvoice");
    let dst = PgCluster::start();
    dst.psql("postgres", ROLES);
    dst.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path()).await;
    let snap = backup(&repo, &src).await;

    restore_whole(&repo, &snap, &dst).await;
    let (before, after) = (schema_dump(&src, "einvoice"), schema_dump(&dst, "restored"));
    // The comparison covers every kind of object the schema holds.
    assert_same_dump(
        &before,
        &after,
        &[
            TABLE_KINDS,
            &[
                "ALTER SCHEMA sales OWNER TO app_owner",
                "GRANT USAGE ON SCHEMA sales TO app_reader",
                "COMMENT ON SCHEMA sales IS",
                "CREATE FUNCTION sales.touch()",
                "FOREIGN KEY (invoice_id, issued_at) REFERENCES sales.invoice(id, issued_at)",
                "CREATE TRIGGER invoice_touch",
                "ENABLE ROW LEVEL SECURITY",
                "CREATE POLICY item_lines ON public.item AS RESTRICTIVE",
                "COMMENT ON TABLE sales.invoice",
                "OWNER TO app_owner",
                "GRANT SELECT ON TABLE sales.invoice TO app_reader",
                "GRANT UPDATE(description) ON TABLE public.item TO app_reader",
            ],
        ]
        .concat(),
    );
    assert_rows_identical(&src, &dst, "restored");
    // Items alone: their foreign key to the invoices, not restored, is skipped (with a
    // warning), and everything else about them comes back.
    dst.psql("postgres", "CREATE DATABASE partial");
    let items_only = RestoreDbOptions {
        tables: vec![TablePattern::parse("public.item").unwrap()],
        ..restore_opts(AccessOptions::default())
    };
    restore::restore_db(
        &repo,
        &snap,
        &dst.conn("partial"),
        &items_only,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        dst.psql(
            "partial",
            "SELECT count(*) FILTER (WHERE contype = 'f') || ' ' || count(*) FILTER (WHERE contype = 'x') \
             FROM pg_constraint WHERE conrelid = 'public.item'::regclass"
        ),
        "0 1"
    );
    assert_eq!(
        backup_util::fingerprint(&src, "einvoice", "public.item", "id"),
        backup_util::fingerprint(&dst, "partial", "public.item", "id")
    );
    // Sequences continue where the source's stood.
    assert_eq!(
        src.psql("einvoice", "SELECT last_value FROM sales.invoice_id_seq"),
        dst.psql("restored", "SELECT last_value FROM sales.invoice_id_seq")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_roles_refuse_before_writing_unless_owners_and_grants_are_left_out() {
    let src = PgCluster::start();
    src.psql("postgres", ROLES);
    rich_schema(&src, "einvoice");
    // A managed target: none of the source's roles.
    let dst = PgCluster::start();
    dst.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path()).await;
    let snap = backup(&repo, &src).await;

    let empty = user_objects(&dst, "restored");
    let err = restore::restore_db(
        &repo,
        &snap,
        &dst.conn("restored"),
        &restore_opts(AccessOptions::default()),
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("app_owner, app_reader, app_writer")
            && err.contains("--no-owner --no-acl")
            && err.contains("nothing was restored"),
        "{err}"
    );
    assert_eq!(
        user_objects(&dst, "restored"),
        empty,
        "a refused restore wrote something"
    );

    // Through the command line, as an operator runs it.
    let config = backup_util::write_config(
        dir.path(),
        "invsync.toml",
        &[("dst", dst.url("restored"))],
        &format!("file://{}", dir.path().join("repo").display()),
        &format!("identity_file = \"{}\"", dir.path().join("k.key").display()),
    );
    let out = backup_util::ok(
        &config,
        &[
            "restore",
            "latest",
            "--to-db",
            "dst",
            "--no-owner",
            "--no-acl",
        ],
    );
    assert!(out.contains("restored 3 table(s)"), "{out}");
    assert_rows_identical(&src, &dst, "restored");
    assert_eq!(
        dst.psql("restored", "SELECT pg_get_userbyid(relowner) || ' ' || coalesce(relacl::text, 'default') FROM pg_class WHERE oid = 'public.item'::regclass"),
        "postgres default"
    );
}

/// A snapshot written before manifests carried the model restores from the fields it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_without_a_model_still_restore() {
    let pg = PgCluster::start();
    backup_util::make_tables(&pg, "einvoice", 2000);
    pg.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path()).await;
    let opts = BackupOptions {
        database: Some(DatabaseSource {
            label: "src".into(),
            conn: pg.conn("einvoice"),
            tables: vec![TablePattern::parse("public.*").unwrap()],
            jobs: 2,
        }),
        config_dirs: vec![],
        tags: vec![],
        fence: None,
    };
    let summary = session::backup(&repo, &opts, &Quiet).await.unwrap();
    let (_, mut snap) = snapshot::find(&repo, &summary.snapshot).await.unwrap();
    for t in &mut snap.tables {
        assert!(t.schema.model.is_some());
        t.schema.model = None;
    }
    // Saved as an older version would have written it, and read back.
    let id = snapshot::save(&repo, &snap).await.unwrap();
    let (_, old) = snapshot::find(&repo, &id).await.unwrap();
    assert!(old.tables.iter().all(|t| t.schema.model.is_none()));
    restore_whole(&repo, &old, &pg).await;
    for (table, order) in [("items", "id"), ("tags", "kind, name")] {
        assert_eq!(
            backup_util::fingerprint(&pg, "einvoice", table, order),
            backup_util::fingerprint(&pg, "restored", table, order)
        );
    }
    // Identity and serial sequences continue after the restored rows.
    pg.psql(
        "restored",
        "INSERT INTO items (code) VALUES ('after-restore')",
    );
    assert_eq!(
        pg.psql(
            "restored",
            "SELECT id > 2000 FROM items WHERE code = 'after-restore'"
        ),
        "t"
    );
}

/// A server whose defaults write money, floats and timestamptz in other text forms than C's:
/// Taiwan's monetary locale, Taipei's time zone, floats rounded to 15 digits.
fn taiwanese_server() -> PgCluster {
    let locales = std::process::Command::new("locale")
        .arg("-a")
        .output()
        .expect("run locale -a");
    assert!(
        String::from_utf8_lossy(&locales.stdout)
            .lines()
            .any(|l| l.eq_ignore_ascii_case("zh_TW.utf8")),
        "the zh_TW.UTF-8 locale is missing: run scripts/test.sh, which installs it \
         (Debian's locales-all)"
    );
    PgCluster::start_with(ClusterOptions {
        extra_conf: vec![
            "lc_monetary = 'zh_TW.UTF-8'".into(),
            "timezone = 'Asia/Taipei'".into(),
            "extra_float_digits = 0".into(),
        ],
        ..ClusterOptions::default()
    })
}

/// The values of `public.amounts` in one fixed text form, whatever the server's defaults.
const AMOUNTS: &str = "SET lc_monetary = 'C'; SET TimeZone = 'UTC'; SET extra_float_digits = 3; \
    SELECT string_agg(concat_ws('|', id, price, ratio, share, at), E'\\n' ORDER BY id) \
    FROM public.amounts";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_floats_and_times_keep_their_values_across_servers_text_defaults() {
    let src = taiwanese_server();
    src.psql(
        "einvoice",
        "CREATE TABLE public.amounts (id int PRIMARY KEY, price money, ratio float8, \
           share float4, at timestamptz); \
         INSERT INTO public.amounts VALUES \
           (1, 1234567.89, 0.1 + 0.2, 1::float4 / 3, '2024-03-15 23:30:00.123456+00'), \
           (2, -0.01, 1e-300 / 3, 3.4e38, '1999-12-31 16:00:00+00'), \
           (3, 21474836.47, 'NaN', '-Infinity', 'infinity')",
    );
    // The source writes these in its own forms, so the test means something.
    assert_eq!(
        src.psql(
            "einvoice",
            "SELECT price || ' ' || ratio || ' ' || at FROM public.amounts WHERE id = 1"
        ),
        "NT$1,234,567.89 0.3 2024-03-16 07:30:00.123456+08"
    );
    let expected = src.psql("einvoice", AMOUNTS);
    // A target with C's monetary locale and another time zone.
    let dst = PgCluster::start_with(ClusterOptions {
        extra_conf: vec![
            "lc_monetary = 'C'".into(),
            "timezone = 'America/Los_Angeles'".into(),
        ],
        ..ClusterOptions::default()
    });

    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path()).await;
    let snap = backup_tables(&repo, &src, &["public.amounts"]).await;
    dst.psql("postgres", "CREATE DATABASE restored");
    restore_whole(&repo, &snap, &dst).await;
    assert_eq!(dst.psql("restored", AMOUNTS), expected, "after restore");

    // Copied, then streamed.
    let (_sync_dir, cfg) = sync_common::set_up_pipeline(&src, &dst, &["public.amounts"]);
    assert_eq!(dst.psql("einvoice", AMOUNTS), expected, "after the copy");
    let run = sync_common::Running::start(&sync_common::load(&cfg), "p");
    src.psql(
        "einvoice",
        "INSERT INTO public.amounts SELECT id + 10, price * 3, ratio / 7, share / 7, \
           at + interval '1 microsecond' FROM public.amounts",
    );
    sync_common::wait_same(&src, &dst, AMOUNTS).await;
    run.stop().await;
}

/// Invoices and their items, the tables a live database replaces from a backup.
const INVOICES: &str = "CREATE SCHEMA sales; \
    CREATE TABLE sales.invoice (id int PRIMARY KEY, seller text NOT NULL, amount numeric(12,2) NOT NULL); \
    CREATE TABLE sales.item (id int PRIMARY KEY, invoice_id int NOT NULL REFERENCES sales.invoice (id), qty int NOT NULL); \
    INSERT INTO sales.invoice SELECT g, 'seller' || g % 7, g * 1.5 FROM generate_series(1, 3000) g; \
    INSERT INTO sales.item SELECT g, 1 + g % 3000, g % 5 + 1 FROM generate_series(1, 9000) g";

/// What an application builds on those tables in the live database: another table's foreign
/// key into them, views (one on another, one with a check option), an `INSTEAD OF` trigger, a
/// materialized view with an index, comments and grants, a function taking an invoice row,
/// and another table's policies that read the invoices or call that function, and its rule
/// that reads them.
const DEPENDENTS: &str = r#"
    CREATE TABLE public.payment (id int PRIMARY KEY, invoice_id int NOT NULL, paid numeric(12,2));
    ALTER TABLE public.payment ADD CONSTRAINT payment_invoice_fkey FOREIGN KEY (invoice_id)
        REFERENCES sales.invoice (id) ON DELETE CASCADE DEFERRABLE;
    COMMENT ON CONSTRAINT payment_invoice_fkey ON public.payment IS 'paid what was issued';
    INSERT INTO public.payment SELECT g, g * 3, 1 FROM generate_series(1, 500) g;
    CREATE VIEW public.invoice_totals WITH (security_barrier) AS
        SELECT i.id, i.seller, i.amount, sum(t.qty) AS qty
        FROM sales.invoice i JOIN sales.item t ON t.invoice_id = i.id GROUP BY i.id;
    COMMENT ON VIEW public.invoice_totals IS 'one line per invoice';
    COMMENT ON COLUMN public.invoice_totals.qty IS 'items on it';
    GRANT SELECT ON public.invoice_totals TO app_reader;
    CREATE VIEW public.big_invoices AS SELECT id, seller FROM public.invoice_totals WHERE qty > 10;
    CREATE FUNCTION public.read_only() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN RAISE EXCEPTION 'read only'; END $$;
    CREATE TRIGGER big_invoices_read_only INSTEAD OF INSERT ON public.big_invoices
        FOR EACH ROW EXECUTE FUNCTION public.read_only();
    CREATE VIEW public.many_items AS SELECT id, invoice_id, qty FROM sales.item WHERE qty > 1
        WITH CASCADED CHECK OPTION;
    CREATE MATERIALIZED VIEW public.seller_totals AS
        SELECT seller, sum(amount) AS amount, count(*) AS n FROM sales.invoice GROUP BY seller;
    CREATE UNIQUE INDEX seller_totals_seller ON public.seller_totals (seller);
    COMMENT ON MATERIALIZED VIEW public.seller_totals IS 'for the dashboard';
    GRANT SELECT ON public.seller_totals TO app_reader;
    CREATE FUNCTION public.invoice_label(sales.invoice) RETURNS text LANGUAGE sql STABLE
        AS $$ SELECT $1.seller || ':' || $1.id $$;
    COMMENT ON FUNCTION public.invoice_label(sales.invoice) IS 'how an invoice is named';
    REVOKE EXECUTE ON FUNCTION public.invoice_label(sales.invoice) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION public.invoice_label(sales.invoice) TO app_reader;
    ALTER TABLE public.payment ENABLE ROW LEVEL SECURITY;
    CREATE POLICY payment_issued ON public.payment FOR SELECT TO app_reader
        USING (invoice_id IN (SELECT id FROM sales.invoice));
    CREATE POLICY payment_named ON public.payment FOR SELECT TO app_reader
        USING (public.invoice_label(ROW(invoice_id, 'x', 0)::sales.invoice) IS NOT NULL);
    CREATE RULE payment_of_an_invoice AS ON UPDATE TO public.payment
        WHERE NOT EXISTS (SELECT 1 FROM sales.invoice i WHERE i.id = NEW.invoice_id)
        DO INSTEAD NOTHING;
    COMMENT ON RULE payment_of_an_invoice ON public.payment IS 'no payment without its invoice';
"#;

/// `pg_dump --schema-only` of the objects [`DEPENDENTS`] creates: all of schema `public`.
fn dependents_dump(pg: &PgCluster, db: &str) -> String {
    schema_dump_with(pg, db, &["-n", "public"])
}

/// Row counts and checksums of every table and view of the live database.
fn live_rows(pg: &PgCluster, db: &str) -> Vec<String> {
    [
        ("sales.invoice", "id"),
        ("sales.item", "id"),
        ("public.payment", "id"),
        ("public.invoice_totals", "id"),
        ("public.many_items", "id"),
        ("public.seller_totals", "seller"),
    ]
    .iter()
    .map(|(t, order)| format!("{t} {}", backup_util::fingerprint(pg, db, t, order)))
    .collect()
}

/// `restore --replace` into a database in use, whose tables carry views, a materialized view
/// and another table's foreign key. When the restored rows break that foreign key the restore
/// fails whole, naming it, and the database keeps its rows and objects exactly; once they fit,
/// the restore waits for a reader to finish, replaces the tables, and the dependents are
/// back as they were, working on the restored rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_keeps_what_is_built_on_the_tables_or_changes_nothing() {
    let pg = PgCluster::start();
    pg.psql("postgres", "CREATE ROLE app_reader");
    pg.psql("einvoice", INVOICES);
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path()).await;
    let snap = backup_tables(&repo, &pg, &["sales.*"]).await;
    pg.psql("postgres", "CREATE DATABASE restored");
    restore_whole(&repo, &snap, &pg).await;
    pg.psql("restored", DEPENDENTS);
    // The live database moves on from the snapshot: an invoice issued since, and paid.
    pg.psql(
        "restored",
        "UPDATE sales.invoice SET amount = amount + 1 WHERE id % 3 = 0; \
         DELETE FROM sales.item WHERE id % 10 = 0; \
         INSERT INTO sales.invoice VALUES (5000, 'seller1', 99); \
         INSERT INTO public.payment VALUES (5000, 5000, 99); \
         REFRESH MATERIALIZED VIEW public.seller_totals",
    );
    let replace = RestoreDbOptions {
        replace: true,
        ..restore_opts(AccessOptions::default())
    };
    let (dump, rows) = (schema_dump(&pg, "restored"), live_rows(&pg, "restored"));
    let dependents = dependents_dump(&pg, "restored");
    for kind in [
        "CREATE VIEW public.big_invoices",
        "WITH (security_barrier='true')",
        "WITH CASCADED CHECK OPTION",
        "CREATE TRIGGER big_invoices_read_only INSTEAD OF INSERT",
        "CREATE MATERIALIZED VIEW public.seller_totals",
        "CREATE UNIQUE INDEX seller_totals_seller",
        "COMMENT ON COLUMN public.invoice_totals.qty",
        "GRANT SELECT ON TABLE public.seller_totals TO app_reader",
        "FOREIGN KEY (invoice_id) REFERENCES sales.invoice(id) ON DELETE CASCADE DEFERRABLE",
        "COMMENT ON CONSTRAINT payment_invoice_fkey",
        "CREATE FUNCTION public.invoice_label(sales.invoice)",
        "COMMENT ON FUNCTION public.invoice_label(sales.invoice)",
        "GRANT ALL ON FUNCTION public.invoice_label(sales.invoice) TO app_reader",
        "CREATE POLICY payment_issued ON public.payment",
        "CREATE POLICY payment_named ON public.payment",
        "CREATE RULE payment_of_an_invoice AS",
        "COMMENT ON RULE payment_of_an_invoice",
    ] {
        assert!(dependents.contains(kind), "{kind} not in:\n{dependents}");
    }

    // Invoice 5000 is not in the snapshot, and a payment references it.
    let err = restore::restore_db(
        &repo,
        &snap,
        &pg.conn("restored"),
        &replace,
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("foreign key payment_invoice_fkey of public.payment")
            && err.contains("nothing was restored"),
        "{err}"
    );
    assert_eq!(
        live_rows(&pg, "restored"),
        rows,
        "a failed restore changed rows"
    );
    assert_same_dump(&dump, &schema_dump(&pg, "restored"), &[]);
    assert_eq!(
        pg.psql(
            "restored",
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'invsync\\_restore\\_%'"
        ),
        "0"
    );

    // Without that payment, and with a reader in the middle of a query on a view.
    pg.psql("restored", "DELETE FROM public.payment WHERE id = 5000");
    let payments = backup_util::fingerprint(&pg, "restored", "public.payment", "id");
    let reader = pg.client("restored").await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM public.big_invoices")
        .await
        .unwrap();
    let watch = pg.client("restored").await;
    let target = pg.conn("restored");
    let (restored, ()) = tokio::join!(
        restore::restore_db(&repo, &snap, &target, &replace, std::future::pending()),
        async {
            support::wait_until(
                std::time::Duration::from_secs(60),
                "the restore to queue behind the reader",
                || async {
                    watch
                        .query_one(
                            "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'relation'",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get::<_, i64>(0)
                        > 0
                },
            )
            .await;
            reader.batch_execute("COMMIT").await.unwrap();
        }
    );
    restored.unwrap();
    assert_same_dump(&dependents, &dependents_dump(&pg, "restored"), &[]);
    for (table, order) in [("sales.invoice", "id"), ("sales.item", "id")] {
        assert_eq!(
            backup_util::fingerprint(&pg, "einvoice", table, order),
            backup_util::fingerprint(&pg, "restored", table, order)
        );
    }
    // The views read the restored rows; the materialized view was filled from them.
    assert_eq!(
        backup_util::fingerprint(&pg, "restored", "public.seller_totals", "seller"),
        backup_util::fingerprint(
            &pg,
            "einvoice",
            "(SELECT seller, sum(amount) AS amount, count(*) AS n FROM sales.invoice GROUP BY seller)",
            "seller"
        )
    );
    assert_eq!(
        backup_util::fingerprint(&pg, "restored", "public.invoice_totals", "id"),
        backup_util::fingerprint(
            &pg,
            "einvoice",
            "(SELECT i.id, i.seller, i.amount, sum(t.qty) AS qty FROM sales.invoice i \
              JOIN sales.item t ON t.invoice_id = i.id GROUP BY i.id)",
            "id"
        )
    );
    // The payments are untouched, and their foreign key is back in force.
    assert_eq!(
        backup_util::fingerprint(&pg, "restored", "public.payment", "id"),
        payments
    );
    let refused = watch
        .execute("INSERT INTO public.payment VALUES (9999, 9999, 1)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        refused.as_db_error().and_then(|e| e.constraint()),
        Some("payment_invoice_fkey"),
        "{refused}"
    );
}

/// The types (and schemas) a restore creates before its load are dropped with its staging
/// schema when it does not complete: at once when it fails, and by the next restore into the
/// database when it was killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_a_restore_created_go_when_it_does_not_complete() {
    let src = PgCluster::start();
    src.psql("postgres", ROLES);
    rich_schema(&src, "einvoice");
    let dst = PgCluster::start();
    dst.psql("postgres", ROLES);
    dst.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path()).await;
    let snap = backup(&repo, &src).await;
    // An empty table of the same name, held by a reader: the swap waits behind it, after the
    // types are created.
    dst.psql(
        "restored",
        "CREATE SCHEMA sales; CREATE TABLE sales.invoice (id int)",
    );
    let before = user_objects(&dst, "restored");
    assert!(!before.contains("invoice_status"), "{before}");
    let holder = dst.client("restored").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE sales.invoice IN ACCESS SHARE MODE")
        .await
        .unwrap();

    // Failing: the lock is not let go in time.
    let err = restore::restore_db(
        &repo,
        &snap,
        &dst.conn("restored"),
        &RestoreDbOptions {
            lock_wait: std::time::Duration::from_secs(1),
            ..restore_opts(AccessOptions::default())
        },
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("stayed locked"), "{err}");
    assert_eq!(user_objects(&dst, "restored"), before);

    // Killed while it waits.
    let config = backup_util::write_config(
        dir.path(),
        "invsync.toml",
        &[("dst", dst.url("restored"))],
        &format!("file://{}", dir.path().join("repo").display()),
        &format!("identity_file = \"{}\"", dir.path().join("k.key").display()),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(["--config", config.to_str().unwrap()])
        .args(["restore", "latest", "--to-db", "dst", "--lock-wait", "600"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let watch = dst.client("restored").await;
    support::wait_until(
        std::time::Duration::from_secs(60),
        "the restore to queue behind the reader",
        || async {
            watch
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'sales.invoice'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let left = user_objects(&dst, "restored");
    assert!(
        left.contains("invoice_status") && left.contains("invsync_restore_"),
        "{left}"
    );
    holder.batch_execute("COMMIT").await.unwrap();

    // The next restore, of a table that needs none of those types, drops them.
    src.psql(
        "einvoice",
        "CREATE TABLE public.plain (id int PRIMARY KEY); INSERT INTO public.plain VALUES (1)",
    );
    let plain = backup_tables(&repo, &src, &["public.plain"]).await;
    restore_whole(&repo, &plain, &dst).await;
    let sorted = |list: &str| {
        let mut v: Vec<String> = list.split(", ").map(str::to_string).collect();
        v.sort();
        v
    };
    // What was there, and the new table (its row type and array type, and its key).
    assert_eq!(
        sorted(&user_objects(&dst, "restored")),
        sorted(&format!("{before}, plain, plain, _plain, plain_pkey"))
    );
}

/// What tables carry besides columns and constraints: functions that a domain's check, a
/// default, a generated column, a check, an index, a trigger and a policy call (one taking an
/// enum), rules, extended statistics, and an extension's type (`citext`). Restored, they
/// dump as the source's; set up by sync, the table gets what a replica needs of them.
const OBJECTS: &str = r#"
    CREATE EXTENSION citext;
    CREATE SCHEMA util;
    CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
    CREATE FUNCTION util.is_ban(text) RETURNS boolean LANGUAGE sql IMMUTABLE
        AS $$ SELECT $1 ~ '^[0-9]{8}$' $$;
    COMMENT ON FUNCTION util.is_ban(text) IS 'a business id has 8 digits';
    CREATE DOMAIN public.ban AS text CONSTRAINT ban_valid CHECK (util.is_ban(VALUE));
    CREATE FUNCTION util.weight(public.mood) RETURNS integer LANGUAGE sql IMMUTABLE
        AS $$ SELECT CASE $1 WHEN 'sad' THEN 0 WHEN 'ok' THEN 1 ELSE 2 END $$;
    CREATE FUNCTION util.next_number() RETURNS text LANGUAGE sql
        AS $$ SELECT 'AB' || lpad((floor(random() * 1e8))::bigint::text, 8, '0') $$;
    CREATE FUNCTION util.may_see(public.mood) RETURNS boolean LANGUAGE sql STABLE
        AS $$ SELECT $1 <> 'sad' $$;
    CREATE TABLE public.buyer (
        id bigint PRIMARY KEY,
        email citext NOT NULL UNIQUE,
        ban public.ban,
        mood public.mood NOT NULL DEFAULT 'ok',
        number text NOT NULL DEFAULT util.next_number(),
        weight integer GENERATED ALWAYS AS (util.weight(mood)) STORED,
        city text,
        zip text,
        CONSTRAINT buyer_weight_check CHECK (util.weight(mood) >= 0)
    );
    CREATE INDEX buyer_weight_idx ON public.buyer (util.weight(mood));
    CREATE TABLE public.buyer_log (id bigserial PRIMARY KEY, buyer_id bigint, op text);
    CREATE FUNCTION util.log_buyer() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN INSERT INTO public.buyer_log (buyer_id, op) VALUES (NEW.id, TG_OP); RETURN NEW; END $$;
    CREATE TRIGGER buyer_log AFTER INSERT OR UPDATE ON public.buyer
        FOR EACH ROW EXECUTE FUNCTION util.log_buyer();
    CREATE RULE buyer_keep AS ON DELETE TO public.buyer DO INSTEAD NOTHING;
    COMMENT ON RULE buyer_keep ON public.buyer IS 'buyers are never deleted';
    CREATE RULE buyer_log_frozen AS ON UPDATE TO public.buyer_log DO INSTEAD NOTHING;
    ALTER TABLE public.buyer_log DISABLE RULE buyer_log_frozen;
    CREATE STATISTICS public.buyer_place (dependencies, ndistinct) ON city, zip FROM public.buyer;
    ALTER STATISTICS public.buyer_place SET STATISTICS 500;
    ALTER TABLE public.buyer ENABLE ROW LEVEL SECURITY;
    CREATE POLICY buyer_visible ON public.buyer FOR SELECT USING (util.may_see(mood));
    CREATE EXTENSION moddatetime;
    CREATE TABLE public.stamped (id int PRIMARY KEY, updated_at timestamptz);
    CREATE TRIGGER stamped_touch BEFORE UPDATE ON public.stamped
        FOR EACH ROW EXECUTE FUNCTION moddatetime(updated_at);
    INSERT INTO public.stamped VALUES (1, now());
    INSERT INTO public.buyer (id, email, ban, mood, city, zip)
        SELECT g, 'Buyer' || g || '@Example.tw', lpad(g::text, 8, '0'),
               (ARRAY['sad', 'ok', 'happy'])[g % 3 + 1]::public.mood,
               'city ' || g % 10, 'zip ' || g % 10
        FROM generate_series(1, 500) g;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_rules_statistics_and_extensions_restore_as_pg_dump_sees_them() {
    let src = PgCluster::start();
    src.psql("einvoice", OBJECTS);
    let dst = PgCluster::start();
    dst.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let repo = repository(dir.path()).await;
    let snap = backup_tables(&repo, &src, &["public.*"]).await;

    // The restore creates the extension (it is not installed on the target), the functions
    // the types and columns need before the tables, and everything else after the load.
    restore_whole(&repo, &snap, &dst).await;
    assert_same_dump(
        &schema_dump(&src, "einvoice"),
        &schema_dump(&dst, "restored"),
        &[
            "CREATE EXTENSION IF NOT EXISTS citext",
            "email public.citext NOT NULL",
            "EXECUTE FUNCTION public.moddatetime('updated_at')",
            "CONSTRAINT ban_valid CHECK (util.is_ban(VALUE))",
            "COMMENT ON FUNCTION util.is_ban(text)",
            "CREATE FUNCTION util.weight(public.mood)",
            "DEFAULT util.next_number()",
            "GENERATED ALWAYS AS (util.weight(mood)) STORED",
            "CHECK ((util.weight(mood) >= 0))",
            "USING btree (util.weight(mood))",
            "EXECUTE FUNCTION util.log_buyer()",
            "CREATE RULE buyer_keep AS",
            "COMMENT ON RULE buyer_keep ON public.buyer",
            "DISABLE RULE buyer_log_frozen",
            "CREATE STATISTICS public.buyer_place",
            "ALTER STATISTICS public.buyer_place SET STATISTICS 500",
            "USING (util.may_see(mood))",
        ],
    );
    for (table, order) in [("public.buyer", "id"), ("public.buyer_log", "id")] {
        assert_eq!(
            backup_util::fingerprint(&src, "einvoice", table, order),
            backup_util::fingerprint(&dst, "restored", table, order),
            "{table}"
        );
    }
    // The restored objects work: the default, domain check, trigger and rule fire.
    assert_eq!(
        dst.psql(
            "restored",
            "INSERT INTO public.buyer (id, email) VALUES (501, 'new@example.tw'); \
             DELETE FROM public.buyer WHERE id = 501; \
             SELECT count(*) || ' ' || (SELECT count(*) FROM public.buyer_log WHERE buyer_id = 501) \
             FROM public.buyer WHERE id = 501 AND number ~ '^AB[0-9]{8}$'"
        ),
        "1 1"
    );

    // Sync's setup creates the same table on an empty target from the same model: the
    // extension, the functions the domain, default, generated column, check and index call
    // (not the trigger's, rule's or policy's: a replica gets none of those), and the rows.
    let _pipeline = sync_common::set_up_pipeline(&src, &dst, &["public.buyer", "public.stamped"]);
    let synced = schema_dump(&dst, "einvoice");
    for kind in [
        "CREATE EXTENSION IF NOT EXISTS citext",
        "CONSTRAINT ban_valid CHECK (util.is_ban(VALUE))",
        "DEFAULT util.next_number()",
        "GENERATED ALWAYS AS (util.weight(mood)) STORED",
        "CHECK ((util.weight(mood) >= 0))",
        "USING btree (util.weight(mood))",
    ] {
        assert!(synced.contains(kind), "{kind} not in:\n{synced}");
    }
    assert!(!synced.contains("util.log_buyer"), "{synced}");
    // Nor the extension only a trigger calls.
    assert!(!synced.contains("moddatetime"), "{synced}");
    assert_eq!(
        backup_util::fingerprint(&src, "einvoice", "public.buyer", "id"),
        backup_util::fingerprint(&dst, "einvoice", "public.buyer", "id")
    );

    // A restore that does not complete drops the extension, schema, types and functions it
    // created before its load (here: an empty table of the same name stays locked).
    dst.psql("postgres", "CREATE DATABASE held");
    dst.psql("held", "CREATE TABLE public.buyer (id int)");
    let created = "SELECT (SELECT count(*) FROM pg_extension) || ' ' || \
        (SELECT count(*) FROM pg_proc WHERE pronamespace::regnamespace::text = 'util') || ' ' || \
        (SELECT count(*) FROM pg_namespace WHERE nspname = 'util') || ' ' || \
        (SELECT count(*) FROM pg_type WHERE typname IN ('mood', 'ban'))";
    assert_eq!(dst.psql("held", created), "1 0 0 0");
    let holder = dst.client("held").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE public.buyer IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let err = restore::restore_db(
        &repo,
        &snap,
        &dst.conn("held"),
        &RestoreDbOptions {
            lock_wait: std::time::Duration::from_secs(1),
            ..restore_opts(AccessOptions::default())
        },
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("stayed locked"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(dst.psql("held", created), "1 0 0 0");

    // A language is an extension too: a database without plpgsql gets it back for the
    // trigger's function.
    dst.psql("postgres", "CREATE DATABASE nolanguage");
    dst.psql("nolanguage", "DROP EXTENSION plpgsql");
    restore::restore_db(
        &repo,
        &snap,
        &dst.conn("nolanguage"),
        &restore_opts(AccessOptions::default()),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        dst.psql(
            "nolanguage",
            "SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension"
        ),
        "citext,moddatetime,plpgsql"
    );

    // A role that may not create an untrusted extension the tables use is refused before
    // anything is written, with the statement that installs it.
    let snap = backup_tables(&repo, &src, &["public.stamped"]).await;
    dst.psql("postgres", "CREATE ROLE restorer LOGIN");
    dst.psql("postgres", "CREATE DATABASE managed OWNER restorer");
    let empty_managed = user_objects(&dst, "managed");
    let restorer = invsync::pg::ConnInfo::parse(&dst.url_as("restorer", "managed")).unwrap();
    let managed = restore_opts(AccessOptions {
        no_owner: true,
        no_acl: true,
    });
    let err = restore::restore_db(&repo, &snap, &restorer, &managed, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CREATE EXTENSION IF NOT EXISTS \"moddatetime\" SCHEMA \"public\""),
        "{err}"
    );
    assert_eq!(user_objects(&dst, "managed"), empty_managed);
    assert_eq!(
        dst.psql("managed", "SELECT count(*) FROM pg_extension"),
        "1"
    );
    // Once installed, the same restore completes and the trigger calls the extension.
    dst.psql("managed", "CREATE EXTENSION moddatetime");
    restore::restore_db(&repo, &snap, &restorer, &managed, std::future::pending())
        .await
        .unwrap();
    assert_eq!(
        dst.psql(
            "managed",
            "UPDATE public.stamped SET updated_at = 'epoch' WHERE id = 1 RETURNING updated_at > 'epoch'"
        ),
        "t"
    );
}
