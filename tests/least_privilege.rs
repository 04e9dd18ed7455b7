//! Managed databases give no superuser. A pipeline (setup, copy, streaming), `verify db`, a
//! backup and a restore run entirely as roles created `NOSUPERUSER` with only the grants the
//! README's "Least-privilege roles" lists; `config check` passes with them and names the exact
//! `GRANT` or `ALTER` when one of them is taken away. A target with foreign keys of its own,
//! which fire without superuser, is copied parents first; a cycle of them is refused.

mod backup_util;
mod support;
mod sync_common;

use std::path::Path;

use support::{invsync, PgCluster};

/// The source's role: may replicate, owns the pipeline's tables, may create the publication.
const SOURCE_ROLE: &str = "CREATE ROLE replicator LOGIN REPLICATION NOSUPERUSER; \
    GRANT CREATE ON DATABASE einvoice TO replicator";

/// The functions a target's role calls to apply with a replication origin (and teardown).
const ORIGIN_FUNCTIONS: &str = "pg_catalog.pg_replication_origin_oid(text), \
    pg_catalog.pg_replication_origin_create(text), \
    pg_catalog.pg_replication_origin_session_setup(text), \
    pg_catalog.pg_replication_origin_session_reset(), \
    pg_catalog.pg_replication_origin_drop(text)";

/// The target's role: the database's `invsync` schema, the replication-origin functions, and
/// `CREATE` on the schema where setup creates the tables.
fn target_role() -> String {
    format!(
        "CREATE ROLE applier LOGIN NOSUPERUSER; \
         GRANT CREATE ON DATABASE einvoice TO applier; \
         GRANT CREATE ON SCHEMA public TO applier; \
         GRANT EXECUTE ON FUNCTION {ORIGIN_FUNCTIONS} TO applier"
    )
}

/// Invoices and items (with a foreign key and a trigger on the source), owned by the
/// source's role.
const TABLES: &str = "CREATE TABLE public.invoice (id int PRIMARY KEY, seller text NOT NULL, \
      amount numeric(12,2) NOT NULL, updated_at timestamptz); \
    CREATE TABLE public.item (id int PRIMARY KEY, invoice_id int NOT NULL REFERENCES public.invoice, \
      qty int NOT NULL); \
    CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql \
      AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$; \
    CREATE TRIGGER invoice_touch BEFORE UPDATE ON public.invoice FOR EACH ROW \
      EXECUTE FUNCTION public.touch(); \
    INSERT INTO public.invoice SELECT g, 'seller' || g % 7, g * 1.5 FROM generate_series(1, 2000) g; \
    INSERT INTO public.item SELECT g, 1 + g % 2000, g % 5 + 1 FROM generate_series(1, 5000) g; \
    ALTER TABLE public.invoice OWNER TO replicator; ALTER TABLE public.item OWNER TO replicator; \
    ALTER FUNCTION public.touch() OWNER TO replicator";

const ROWS: &str = "SELECT string_agg(concat_ws('|', id, seller, amount), ',' ORDER BY id) \
    FROM public.invoice";

fn clusters() -> (PgCluster, PgCluster) {
    let src = PgCluster::start();
    src.psql("einvoice", SOURCE_ROLE);
    src.psql("einvoice", TABLES);
    let dst = PgCluster::start();
    dst.psql("einvoice", &target_role());
    (src, dst)
}

fn pipeline_config(dir: &Path, src: &PgCluster, dst: &PgCluster) -> std::path::PathBuf {
    sync_common::write_config(
        dir,
        &[
            ("maindc", src.url_as("replicator", "einvoice")),
            ("cloud", dst.url_as("applier", "einvoice")),
        ],
        &[(
            "p",
            "maindc",
            &["cloud"],
            &["public.invoice", "public.item"],
        )],
    )
}

/// Pipeline `p` of `tables` as the source's and the target's roles, set up with the copy
/// spread over several sessions; returns its configuration file.
fn set_up_in_parallel(
    dir: &Path,
    src: &PgCluster,
    dst: &PgCluster,
    tables: &[&str],
) -> std::path::PathBuf {
    let cfg = sync_common::write_config(
        dir,
        &[
            ("maindc", src.url_as("replicator", "einvoice")),
            ("cloud", dst.url_as("applier", "einvoice")),
        ],
        &[("p", "maindc", &["cloud"], tables)],
    );
    let (code, out, err) = invsync(&[
        "--config",
        cfg.to_str().unwrap(),
        "sync",
        "setup",
        "p",
        "--jobs",
        "4",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    cfg
}

/// `verify db` of `tables`, reading the source as its role and the target as the apply's:
/// every table identical.
fn verify_as_pipeline_roles(src: &PgCluster, dst: &PgCluster, tables: &str) {
    let (code, out, err) = invsync(&[
        "verify",
        "db",
        "--source",
        &src.url_as("replicator", "einvoice"),
        "--target",
        &dst.url_as("applier", "einvoice"),
        "--tables",
        tables,
        "--json",
    ]);
    assert_eq!(code, 0, "verify db: {out}{err}");
}

/// `config check --json`: exit code and the grants it says are missing, per database.
fn missing_grants(cfg: &Path) -> (i32, Vec<String>, String) {
    let (code, out, err) = invsync(&[
        "--config",
        cfg.to_str().unwrap(),
        "config",
        "check",
        "--json",
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let grants = report["databases"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["missing_privileges"].as_array().unwrap().iter())
        .map(|m| m["grant"].as_str().unwrap().to_string())
        .collect();
    (code, grants, out)
}

#[test]
fn config_check_names_each_missing_grant() {
    let (src, dst) = clusters();
    let dir = tempfile::tempdir().unwrap();
    let cfg = pipeline_config(dir.path(), &src, &dst);
    let (code, grants, out) = missing_grants(&cfg);
    assert_eq!((code, grants), (0, vec![]), "{out}");

    // One privilege taken away at a time, on the source or on the target.
    let cases: &[(&PgCluster, &str, &str, &[&str])] = &[
        (
            &src,
            "ALTER ROLE replicator NOREPLICATION",
            "ALTER ROLE replicator REPLICATION",
            &[r#"ALTER ROLE "replicator" REPLICATION"#],
        ),
        (
            &src,
            "REVOKE CREATE ON DATABASE einvoice FROM replicator",
            "GRANT CREATE ON DATABASE einvoice TO replicator",
            &[r#"GRANT CREATE ON DATABASE "einvoice" TO "replicator""#],
        ),
        (
            &src,
            "ALTER TABLE public.item OWNER TO postgres",
            "ALTER TABLE public.item OWNER TO replicator",
            &[
                r#"GRANT SELECT ON TABLE "public"."item" TO "replicator""#,
                r#"ALTER TABLE "public"."item" OWNER TO "replicator""#,
            ],
        ),
        (
            &dst,
            "REVOKE CREATE ON DATABASE einvoice FROM applier",
            "GRANT CREATE ON DATABASE einvoice TO applier",
            &[r#"GRANT CREATE ON DATABASE "einvoice" TO "applier""#],
        ),
        (
            &dst,
            "REVOKE CREATE ON SCHEMA public FROM applier",
            "GRANT CREATE ON SCHEMA public TO applier",
            &[r#"GRANT CREATE ON SCHEMA "public" TO "applier""#],
        ),
        (
            &dst,
            "REVOKE EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) FROM applier",
            "GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO applier",
            &[
                r#"GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_setup(text) TO "applier""#,
            ],
        ),
        (
            &dst,
            "REVOKE EXECUTE ON FUNCTION pg_replication_origin_create(text) FROM applier",
            "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text) TO applier",
            &[
                r#"GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_create(text) TO "applier""#,
            ],
        ),
    ];
    for (pg, revoke, regrant, expected) in cases {
        pg.psql("einvoice", revoke);
        let (code, grants, out) = missing_grants(&cfg);
        assert_eq!(code, 1, "{revoke}: {out}");
        assert_eq!(&grants, expected, "{revoke}: {out}");
        pg.psql("einvoice", regrant);
    }
    // The human form says the same, with what needs it.
    dst.psql(
        "einvoice",
        "CREATE TABLE public.invoice (id int PRIMARY KEY, seller text NOT NULL, \
           amount numeric(12,2) NOT NULL, updated_at timestamptz); \
         GRANT SELECT, INSERT ON public.invoice TO applier",
    );
    let (code, out, _) = invsync(&["--config", cfg.to_str().unwrap(), "config", "check"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            r#"problem: role applier lacks UPDATE, DELETE, TRUNCATE on public.invoice, which sync setup and run (copy and apply) needs; run as an administrator: GRANT UPDATE, DELETE, TRUNCATE ON TABLE "public"."invoice" TO "applier""#
        ),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_verify_backup_and_restore_run_without_superuser() {
    let (src, dst) = clusters();
    for (pg, role) in [(&src, "replicator"), (&dst, "applier")] {
        assert_eq!(
            pg.psql(
                "einvoice",
                &format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'")
            ),
            "f"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = pipeline_config(dir.path(), &src, &dst);
    // Each grant matters: without one of the origin functions, setup stops (and is redone
    // once it is granted).
    dst.psql(
        "einvoice",
        "REVOKE EXECUTE ON FUNCTION pg_replication_origin_create(text) FROM applier",
    );
    let (code, out, err) = invsync(&["--config", cfg.to_str().unwrap(), "sync", "setup", "p"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("permission denied for function pg_replication_origin_create"),
        "{err}"
    );
    dst.psql(
        "einvoice",
        "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text) TO applier",
    );
    let (code, out, err) = invsync(&["--config", cfg.to_str().unwrap(), "sync", "setup", "p"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        dst.psql(
            "einvoice",
            "SELECT string_agg(DISTINCT pg_get_userbyid(relowner), ',') FROM pg_class \
             WHERE oid IN ('public.invoice'::regclass, 'public.item'::regclass)"
        ),
        "applier"
    );
    let run = sync_common::Running::start(&sync_common::load(&cfg), "p");
    src.psql(
        "einvoice",
        "INSERT INTO public.invoice SELECT g, 'late', g FROM generate_series(2001, 2100) g; \
         UPDATE public.invoice SET amount = amount * 2 WHERE id % 9 = 0; \
         DELETE FROM public.item WHERE id % 11 = 0",
    );
    sync_common::wait_same(&src, &dst, ROWS).await;
    sync_common::wait_same(
        &src,
        &dst,
        "SELECT string_agg(concat_ws('|', id, invoice_id, qty), ',' ORDER BY id) FROM public.item",
    )
    .await;
    run.stop().await;

    // verify db reads both sides as the same roles.
    verify_as_pipeline_roles(&src, &dst, "public.*");

    // A backup read by the source's role, restored by a role that may only create in the
    // database it restores into (as a managed database's administrator gives it).
    dst.psql("postgres", "CREATE ROLE restorer LOGIN NOSUPERUSER");
    dst.psql("postgres", "CREATE DATABASE standby");
    dst.psql("postgres", "GRANT CREATE ON DATABASE standby TO restorer");
    dst.psql("standby", "GRANT CREATE ON SCHEMA public TO restorer");
    let backup_cfg = backup_util::write_config(
        dir.path(),
        "backup.toml",
        &[
            ("maindc", src.url_as("replicator", "einvoice")),
            ("standby", dst.url_as("restorer", "standby")),
        ],
        &format!("file://{}", dir.path().join("repo").display()),
        &{
            let (key, recipient) = backup_util::identity(dir.path(), "k");
            format!(
                "recipients = [\"{recipient}\"]\nidentity_file = \"{}\"",
                key.display()
            )
        },
    );
    backup_util::ok(&backup_cfg, &["repo", "init"]);
    backup_util::ok(
        &backup_cfg,
        &["backup", "--db", "maindc", "--tables", "public.*"],
    );
    // The source's owner does not exist on the standby's cluster.
    let (code, _, err) =
        backup_util::run(&backup_cfg, &["restore", "latest", "--to-db", "standby"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("--no-owner --no-acl"), "{err}");
    let out = backup_util::ok(
        &backup_cfg,
        &[
            "restore",
            "latest",
            "--to-db",
            "standby",
            "--no-owner",
            "--no-acl",
        ],
    );
    assert!(out.contains("restored 2 table(s)"), "{out}");
    for (table, order) in [("public.invoice", "id"), ("public.item", "id")] {
        assert_eq!(
            backup_util::fingerprint(&src, "einvoice", table, order),
            backup_util::fingerprint(&dst, "standby", table, order)
        );
    }
    // With its foreign key and trigger, owned by the restoring role.
    assert_eq!(
        dst.psql(
            "standby",
            "SELECT (SELECT count(*) FROM pg_constraint WHERE conrelid = 'public.item'::regclass AND contype = 'f') \
               || ' ' || (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.invoice'::regclass AND NOT tgisinternal) \
               || ' ' || pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'public.item'::regclass"
        ),
        "1 1 restorer"
    );
}

/// The role invsync uses on both ends of a pipeline it switches over: the source's and the
/// target's grants (each end is the source of one direction and the target of the other),
/// and those that pause and release the application's role and end its sessions.
fn switching_role() -> String {
    format!(
        "CREATE ROLE operator LOGIN REPLICATION CREATEROLE NOSUPERUSER; \
         GRANT pg_signal_backend TO operator; \
         GRANT CREATE ON DATABASE einvoice TO operator; \
         GRANT CREATE ON SCHEMA public TO operator; \
         GRANT EXECUTE ON FUNCTION {ORIGIN_FUNCTIONS} TO operator; \
         CREATE ROLE app LOGIN NOSUPERUSER"
    )
}

/// A switchover and the way back, run as a role without superuser on both ends. `config
/// check` names the switchover's own grants when one is missing, and a switchover that lacks
/// one rolls back and says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_and_back_run_without_superuser() {
    let (a, b) = (PgCluster::start(), PgCluster::start());
    for pg in [&a, &b] {
        pg.psql("einvoice", &switching_role());
    }
    a.psql("einvoice", &TABLES.replace("replicator", "operator"));
    // Without superuser the way back's apply fires A's own triggers: this one would stamp its
    // own time on the rows B updated, and the switchover back would (rightly) refuse them as
    // different.
    a.psql("einvoice", "DROP TRIGGER invoice_touch ON public.invoice");
    a.psql(
        "einvoice",
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO app",
    );
    let dir = tempfile::tempdir().unwrap();
    let tables: &[&str] = &["public.invoice", "public.item"];
    let cfg = support::config_file::ConfigFile::new()
        .database("a", &a.url_as("operator", "einvoice"))
        .database("b", &b.url_as("operator", "einvoice"))
        .pipeline("p", "a", &["b"], tables)
        .toml("application_roles = [\"app\"]")
        .pipeline("p_back", "b", &["a"], tables)
        .toml("application_roles = [\"app\"]")
        .write(&dir.path().join("invsync.toml"));
    let cfg_arg = cfg.to_str().unwrap().to_string();
    // Set up first: B's tables, which the way back reads, are created by the setup.
    let (code, out, err) = invsync(&["--config", &cfg_arg, "sync", "setup", "p"]);
    assert_eq!(code, 0, "{out}{err}");
    b.psql(
        "einvoice",
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO app",
    );
    let (code, grants, out) = missing_grants(&cfg);
    assert_eq!((code, grants), (0, vec![]), "{out}");
    for (revoke, regrant, expected) in [
        (
            "ALTER ROLE operator NOCREATEROLE",
            "ALTER ROLE operator CREATEROLE",
            r#"ALTER ROLE "operator" CREATEROLE"#,
        ),
        (
            "REVOKE pg_signal_backend FROM operator",
            "GRANT pg_signal_backend TO operator",
            r#"GRANT pg_signal_backend TO "operator""#,
        ),
    ] {
        a.psql("einvoice", revoke);
        let (code, grants, out) = missing_grants(&cfg);
        assert_eq!((code, grants), (1, vec![expected.to_string()]), "{out}");
        a.psql("einvoice", regrant);
    }

    let switch = |pipeline: &'static str| {
        let cfg = cfg_arg.clone();
        tokio::task::spawn_blocking(move || {
            invsync(&["--config", &cfg, "sync", "switchover", pipeline, "--json"])
        })
    };
    // A session of the application is open on A: ending it needs pg_signal_backend. Without
    // it the switchover rolls back, and the application still writes on A.
    let session = invsync::pg::ConnInfo::parse(&a.url_as("app", "einvoice"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    a.psql("einvoice", "REVOKE pg_signal_backend FROM operator");
    let (code, out, err) = switch("p").await.unwrap();
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("pg_signal_backend"), "{err}");
    assert!(
        sync_common::app_may_write(&a, "public.invoice").await,
        "rolled back: A takes writes again"
    );
    session
        .execute("INSERT INTO public.invoice VALUES (9001, 'kept', 1)", &[])
        .await
        .unwrap();
    a.psql("einvoice", "GRANT pg_signal_backend TO operator");

    let (code, out, err) = switch("p").await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        session.is_closed(),
        "the application's session on A was ended"
    );
    assert!(
        !sync_common::app_may_write(&a, "public.invoice").await,
        "A is paused after the switchover"
    );
    assert!(
        sync_common::app_may_write(&b, "public.invoice").await,
        "B takes the writes"
    );
    let app_b = invsync::pg::ConnInfo::parse(&b.url_as("app", "einvoice"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    app_b
        .batch_execute(
            "INSERT INTO public.invoice VALUES (9002, 'on b', 2); \
             UPDATE public.invoice SET amount = amount + 1 WHERE id <= 10",
        )
        .await
        .unwrap();
    drop(app_b);

    let (code, out, err) = switch("p_back").await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        sync_common::app_may_write(&a, "public.invoice").await,
        "A takes the writes again"
    );
    assert!(
        !sync_common::app_may_write(&b, "public.invoice").await,
        "B is paused after the way back"
    );
    assert_eq!(
        a.psql(
            "einvoice",
            "SELECT string_agg(seller, ',' ORDER BY id) FROM public.invoice WHERE id > 9000"
        ),
        "kept,on b"
    );
    assert_eq!(a.psql("einvoice", ROWS), b.psql("einvoice", ROWS));
}

/// A target whose tables exist with their own foreign key (items to invoices): without
/// superuser the key fires during the copy, so invoices are copied before their items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_s_own_foreign_keys_are_respected_by_the_copy() {
    let (src, dst) = clusters();
    dst.psql(
        "einvoice",
        "CREATE TABLE public.invoice (id int PRIMARY KEY, seller text NOT NULL, \
           amount numeric(12,2) NOT NULL, updated_at timestamptz); \
         CREATE TABLE public.item (id int PRIMARY KEY, \
           invoice_id int NOT NULL REFERENCES public.invoice, qty int NOT NULL); \
         ALTER TABLE public.invoice OWNER TO applier; ALTER TABLE public.item OWNER TO applier",
    );
    let dir = tempfile::tempdir().unwrap();
    // Items first in the configuration.
    let cfg = set_up_in_parallel(dir.path(), &src, &dst, &["public.item", "public.invoice"]);
    sync_common::wait_same(&src, &dst, ROWS).await;
    sync_common::wait_same(
        &src,
        &dst,
        "SELECT count(*) || ':' || sum(qty) FROM public.item",
    )
    .await;
    // Streaming with the key firing: parents and children written together, and removed
    // children first, as the source committed them.
    let run = sync_common::Running::start(&sync_common::load(&cfg), "p");
    src.psql(
        "einvoice",
        "BEGIN; INSERT INTO public.invoice SELECT g, 'new', g FROM generate_series(3001, 3200) g;          INSERT INTO public.item SELECT g, g - 3000, 1 FROM generate_series(6001, 6200) g; COMMIT;          BEGIN; DELETE FROM public.item WHERE invoice_id BETWEEN 100 AND 199;          DELETE FROM public.invoice WHERE id BETWEEN 100 AND 199;          UPDATE public.item SET invoice_id = 3001 WHERE id BETWEEN 6100 AND 6150; COMMIT",
    );
    sync_common::wait_same(&src, &dst, ROWS).await;
    sync_common::wait_same(
        &src,
        &dst,
        "SELECT string_agg(concat_ws('|', id, invoice_id, qty), ',' ORDER BY id) FROM public.item",
    )
    .await;
    run.stop().await;
    // A cycle of foreign keys cannot be loaded in any order: refused, saying what to do.
    dst.psql(
        "einvoice",
        "ALTER TABLE public.invoice ADD COLUMN first_item int REFERENCES public.item",
    );
    src.psql(
        "einvoice",
        "ALTER TABLE public.invoice ADD COLUMN first_item int",
    );
    let (code, out, err) = invsync(&[
        "--config",
        cfg.to_str().unwrap(),
        "sync",
        "teardown",
        "p",
        "--yes",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    dst.psql("einvoice", "TRUNCATE public.item, public.invoice");
    let (code, out, err) = invsync(&["--config", cfg.to_str().unwrap(), "sync", "setup", "p"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("cycle") && err.contains("public.invoice") && err.contains("public.item"),
        "{err}"
    );
}

/// Runs `pgbench` (PostgreSQL's own client) against `db` of `pg` as its superuser.
fn pgbench(pg: &PgCluster, db: &str, args: &[&str]) {
    let out = std::process::Command::new(support::pg_bin("pgbench"))
        .args(args)
        .arg(pg.url(db))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An audit trigger on pgbench's accounts: one row per update, with the role that made it.
const AUDIT: &str = "CREATE TABLE public.balance_audit (aid int NOT NULL, old_balance int, \
      new_balance int, by_role text NOT NULL); \
    CREATE FUNCTION public.audit_balance() RETURNS trigger LANGUAGE plpgsql AS $$ \
      BEGIN INSERT INTO public.balance_audit \
        VALUES (NEW.aid, OLD.abalance, NEW.abalance, current_user); RETURN NEW; END $$; \
    CREATE TRIGGER accounts_audit AFTER UPDATE ON public.pgbench_accounts \
      FOR EACH ROW EXECUTE FUNCTION public.audit_balance()";

/// pgbench's history has no key: its rows in one order.
const HISTORY: &str = "SELECT count(*) || ':' || coalesce(md5(string_agg(h::text, '|' \
    ORDER BY tid, bid, aid, delta, mtime)), '') FROM public.pgbench_history h";

/// pgbench's schema with `--foreign-keys` on both sides, under pgbench's own load, into a
/// target whose role is not a superuser and whose tables carry the target's own audit
/// trigger. Without `session_replication_role = replica` the target's foreign keys and
/// triggers fire during the copy and the apply, as the README says: the copy loads parents
/// first, the apply writes change by change in source order, and the target's audit trigger
/// writes as many rows as the same trigger on the source did. `verify db` finds the tables
/// identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_foreign_keys_streams_into_a_target_with_its_own_triggers() {
    let src = PgCluster::start();
    src.psql("einvoice", SOURCE_ROLE);
    pgbench(&src, "einvoice", &["-i", "--foreign-keys", "-s", "1", "-q"]);
    src.psql(
        "einvoice",
        "ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL; \
         ALTER TABLE public.pgbench_branches OWNER TO replicator; \
         ALTER TABLE public.pgbench_tellers OWNER TO replicator; \
         ALTER TABLE public.pgbench_accounts OWNER TO replicator; \
         ALTER TABLE public.pgbench_history OWNER TO replicator",
    );
    let dst = PgCluster::start();
    dst.psql("einvoice", &target_role());
    // The target's tables: pgbench's, empty, with keys and foreign keys, owned by the
    // target's role, which audits every change to an account balance. The source audits its
    // own the same way (its audit table is not replicated), to count what the target's must.
    pgbench(&dst, "einvoice", &["-i", "--foreign-keys", "-I", "dtpf"]);
    src.psql("einvoice", AUDIT);
    dst.psql(
        "einvoice",
        &format!(
            "{AUDIT}; ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL; \
             ALTER FUNCTION public.audit_balance() OWNER TO applier; \
             ALTER TABLE public.balance_audit OWNER TO applier; \
             ALTER TABLE public.pgbench_branches OWNER TO applier; \
             ALTER TABLE public.pgbench_tellers OWNER TO applier; \
             ALTER TABLE public.pgbench_accounts OWNER TO applier; \
             ALTER TABLE public.pgbench_history OWNER TO applier"
        ),
    );
    let tables = [
        "public.pgbench_history",
        "public.pgbench_accounts",
        "public.pgbench_tellers",
        "public.pgbench_branches",
    ];
    let dir = tempfile::tempdir().unwrap();
    let cfg = set_up_in_parallel(dir.path(), &src, &dst, &tables);
    // The copy inserted and updated nothing through the trigger.
    assert_eq!(
        dst.psql("einvoice", "SELECT count(*) FROM public.balance_audit"),
        "0"
    );
    let run = sync_common::Running::start(&sync_common::load(&cfg), "p");
    // pgbench's TPC-B-like transaction beside one that updates one of five hot accounts
    // twice, so that the apply sees several updates of one row close together: each must
    // reach the trigger.
    let hot = dir.path().join("hot.sql");
    std::fs::write(
        &hot,
        "\\set aid random(1, 5)\n\\set delta random(1, 5000)\nBEGIN;\n\
         UPDATE pgbench_accounts SET abalance = abalance - :delta WHERE aid = :aid;\n\
         UPDATE pgbench_accounts SET abalance = abalance + 2 * :delta WHERE aid = :aid;\n\
         END;\n",
    )
    .unwrap();
    pgbench(
        &src,
        "einvoice",
        &[
            "-b",
            "tpcb-like",
            "-f",
            hot.to_str().unwrap(),
            "-c",
            "2",
            "-j",
            "2",
            "-T",
            "5",
            "-n",
        ],
    );
    sync_common::wait_same(&src, &dst, HISTORY).await;
    sync_common::wait_same(
        &src,
        &dst,
        "SELECT sum(abalance) || ':' || count(*) FROM public.pgbench_accounts",
    )
    .await;
    run.stop().await;
    verify_as_pipeline_roles(
        &src,
        &dst,
        "public.pgbench_accounts,public.pgbench_tellers,public.pgbench_branches",
    );
    // The history, keyless, compared whole.
    assert_eq!(
        sync_common::dump(&src, HISTORY),
        sync_common::dump(&dst, HISTORY)
    );
    // As many audit rows as the source's trigger wrote, by the apply's role: the target's
    // trigger fired for each change, none folded away.
    let updates = src.psql("einvoice", "SELECT count(*) FROM public.balance_audit");
    assert!(updates.parse::<u64>().unwrap() > 100, "{updates}");
    assert_eq!(
        dst.psql(
            "einvoice",
            "SELECT count(*) || ' ' || string_agg(DISTINCT by_role, ',') FROM public.balance_audit"
        ),
        format!("{updates} applier")
    );
}
