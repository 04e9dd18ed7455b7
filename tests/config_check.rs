//! `invsync init` and `invsync config check` against real clusters and a real S3 server:
//! each kind of problem is reported on one line and makes the exit status non-zero.

mod support;

use support::config_file::ConfigFile;
use support::{invsync, ClusterOptions, PgCluster, S3Server};

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("invsync.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn check_json(config: &str) -> (i32, serde_json::Value, String) {
    let (code, out, err) = invsync(&["--config", config, "config", "check", "--json"]);
    let json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (code, json, out)
}

fn database<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap()
}

#[test]
fn healthy_setup_passes_and_problems_are_named() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    let s3 = S3Server::start();
    src.psql(
        "einvoice",
        "CREATE TABLE invoice (invoice_number char(10) PRIMARY KEY)",
    );
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    std::fs::create_dir(&repo_dir).unwrap();
    let text = format!(
        r#"
[databases.maindc]
url = "{}"
[databases.cloud_a]
url = "{}"
[pipelines.p]
source = "maindc"
targets = ["cloud_a"]
tables = ["public.invoice"]
[repositories.local]
url = "file://{}"
[repositories.s3]
url = "{}"
options = {}
"#,
        src.url("einvoice"),
        dst.url("einvoice"),
        repo_dir.display(),
        s3.url("backups"),
        s3.options_toml()
    );
    let config = write_config(dir.path(), &text);
    let (code, report, out) = check_json(&config);
    assert_eq!(code, 0, "{out}");
    let maindc = database(&report, "maindc");
    assert_eq!(maindc["wal_level"], "logical");
    assert_eq!(maindc["can_replicate"], true);
    assert!(maindc["server_version"].as_str().unwrap().starts_with("15"));
    // A missing table on a target is only a note: setup creates it.
    let cloud = database(&report, "cloud_a");
    assert_eq!(cloud["missing_tables"][0], "public.invoice");
    assert!(cloud["problems"].as_array().unwrap().is_empty());
    for r in report["repositories"].as_array().unwrap() {
        assert_eq!(r["reachable"], true, "{r}");
    }

    // A missing source table.
    let (code, report, _) = check_json(&write_config(
        dir.path(),
        &text.replace("public.invoice\"]", "public.invoice\", \"public.carrier\"]"),
    ));
    assert_eq!(code, 1);
    let problems = database(&report, "maindc")["problems"].to_string();
    assert!(problems.contains("public.carrier is missing"), "{problems}");

    // A role without REPLICATION.
    src.psql("einvoice", "CREATE ROLE app LOGIN");
    let (code, report, _) = check_json(&write_config(
        dir.path(),
        &text.replace(&src.url("einvoice"), &src.url_as("app", "einvoice")),
    ));
    assert_eq!(code, 1);
    let problems = database(&report, "maindc")["problems"].to_string();
    assert!(
        problems.contains("ALTER ROLE \\\"app\\\" REPLICATION"),
        "{problems}"
    );

    // A database that is down, and a repository that does not exist: human output, one line each.
    dst.stop();
    let missing_repo = dir.path().join("nope");
    let (code, out, _) = invsync(&[
        "--config",
        &write_config(
            dir.path(),
            &text.replace(
                &repo_dir.display().to_string(),
                &missing_repo.display().to_string(),
            ),
        ),
        "config",
        "check",
    ]);
    assert_eq!(code, 1);
    let down = out
        .lines()
        .find(|l| l.contains("problem: cannot connect"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(down.contains(&format!("127.0.0.1:{}", dst.port)), "{down}");
    assert!(out.contains("run `invsync repo init` first"), "{out}");
    dst.start_again();
}

#[test]
fn wal_level_replica_is_reported() {
    let src = PgCluster::start_with(ClusterOptions {
        wal_level: "replica",
        ..Default::default()
    });
    let dst = PgCluster::start();
    src.psql("einvoice", "CREATE TABLE carrier (carrier_type text, carrier_id text, PRIMARY KEY (carrier_type, carrier_id))");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[databases.a]\nurl = \"{}\"\n[databases.b]\nurl = \"{}\"\n\
             [pipelines.p]\nsource = \"a\"\ntargets = [\"b\"]\ntables = [\"public.*\"]\n",
            src.url("einvoice"),
            dst.url("einvoice")
        ),
    );
    let (code, report, _) = check_json(&config);
    assert_eq!(code, 1);
    let problems = database(&report, "a")["problems"].to_string();
    assert!(
        problems.contains("wal_level is replica") && problems.contains("wal_level = logical"),
        "{problems}"
    );
}

#[test]
fn config_errors_are_one_line_and_hide_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[databases.a]\nurl = \"postgres://u:hunter2@127.0.0.1:1/db?sslmode=bogus\"\n",
    );
    let (code, out, err) = invsync(&["--config", &config, "config", "check"]);
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("invsync.toml:2: databases.a.url") && err.contains("sslmode"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    // An unreachable database with a password: the password is never printed.
    let config = write_config(
        dir.path(),
        "[databases.a]\nurl = \"postgres://u:hunter2@127.0.0.1:1/db?sslmode=disable\"\n",
    );
    let (code, out, err) = invsync(&["--config", &config, "config", "check", "--json"]);
    assert_eq!(code, 1);
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
    assert!(out.contains("u:***@127.0.0.1:1"), "{out}");

    let (code, _, err) = invsync(&["--config", "/nonexistent/invsync.toml", "config", "check"]);
    assert_eq!(code, 1);
    assert!(err.contains("invsync init"), "{err}");
}

#[test]
fn init_writes_example_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.toml");
    let p = path.to_str().unwrap();
    let (code, _, err) = invsync(&["init", p]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("[pipelines.invoices_to_cloud]"));
    std::fs::write(&path, "# mine").unwrap();
    let (code, _, err) = invsync(&["init", p]);
    assert_eq!(code, 1);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "# mine");
}

/// Two pipelines whose names would give one replication origin (`a_b` to `c`, `a` to `b_c`)
/// are refused before anything connects or is created.
#[test]
fn pipelines_sharing_an_origin_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let unreachable = "postgres://nobody@127.0.0.1:1/none";
    let config = ConfigFile::new()
        .database("a", unreachable)
        .database("c", unreachable)
        .database("b_c", unreachable)
        .pipeline("a_b", "a", &["c"], &["public.t"])
        .pipeline("a", "c", &["b_c"], &["public.t"])
        .write(&dir.path().join("invsync.toml"));
    let (code, out, err) = invsync(&["--config", config.to_str().unwrap(), "sync", "setup", "a"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("would share the replication origin `invsync_a_b_c`")
            && err.contains("rename one"),
        "{err}"
    );
}

/// A reader that goes away (`invsync ... | head -1`) neither panics a command nor changes its
/// exit status, and the command's work is done.
#[test]
fn output_into_a_closed_pipe_is_dropped_and_the_exit_status_kept() {
    let run = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
            .args(args)
            .env_remove("INVSYNC_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        (out.status.code(), err)
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.toml");
    let (code, err) = run(&["init", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("[pipelines.invoices_to_cloud]"));
    // A check that finds a problem still says so by its status.
    let config = ConfigFile::new()
        .database("gone", "postgres://nobody@127.0.0.1:1/none")
        .write(&dir.path().join("gone.toml"));
    let (code, err) = run(&["--config", config.to_str().unwrap(), "config", "check"]);
    assert_eq!(code, Some(1), "{err}");
}

/// Tables named in PostgreSQL's quoted form (spaces, quotes and `.` inside names), in a
/// pipeline's `tables` and in `--tables` of backup, restore and verify.
#[test]
fn quoted_identifiers_name_existing_tables() {
    let pg = PgCluster::start();
    let schema_sql = r#"
        CREATE SCHEMA "Sales Data";
        CREATE TABLE "Sales Data"."Order" (id int PRIMARY KEY, note text);
        CREATE SCHEMA "odd.""s";
        CREATE TABLE "odd.""s"."a.b ""c""" (id int PRIMARY KEY, v text);
    "#;
    pg.psql("postgres", "CREATE DATABASE copy");
    pg.psql("postgres", "CREATE DATABASE restored");
    pg.psql("einvoice", schema_sql);
    pg.psql(
        "einvoice",
        r#"INSERT INTO "Sales Data"."Order" SELECT g, 'n' || g FROM generate_series(1, 50) g;
           INSERT INTO "odd.""s"."a.b ""c""" SELECT g, 'v' || g FROM generate_series(1, 50) g;"#,
    );
    let order = r#""Sales Data"."Order""#;
    let odd_table = r#""odd.""s"."a.b ""c""""#;
    let odd_schema = r#""odd.""s".*"#;
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let toml_string = |s: &str| toml::Value::String(s.to_string()).to_string();
    let config = write_config(
        dir.path(),
        &format!(
            "[databases.src]\nurl = \"{}\"\n[databases.dst]\nurl = \"{}\"\n\
             [databases.restored]\nurl = \"{}\"\n\
             [pipelines.p]\nsource = \"src\"\ntargets = [\"dst\"]\ntables = [{}, {}, {}]\n\
             [repositories.local]\nurl = \"file://{}\"\npassphrase = \"test pass\"\n",
            pg.url("einvoice"),
            pg.url("copy"),
            pg.url("restored"),
            toml_string(order),
            toml_string(odd_table),
            toml_string(odd_schema),
            repo_dir.display(),
        ),
    );
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        invsync(&all)
    };
    let ok = |args: &[&str]| {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        out
    };
    ok(&["repo", "init"]);
    let (code, report, out) = check_json(&config);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        database(&report, "src")["missing_tables"],
        serde_json::json!([])
    );
    assert_eq!(
        database(&report, "dst")["missing_tables"],
        serde_json::json!(["Sales Data.Order", odd_table]),
        "{out}"
    );

    ok(&[
        "backup", "--db", "src", "--tables", order, "--tables", odd_schema,
    ]);
    ok(&[
        "restore", "latest", "--to-db", "restored", "--tables", odd_table,
    ]);
    ok(&[
        "verify", "db", "--source", "src", "--target", "restored", "--tables", odd_schema,
    ]);
    // Only the named table was restored.
    let (code, out, err) = run(&[
        "verify", "db", "--source", "src", "--target", "restored", "--tables", order,
    ]);
    assert_ne!(code, 0, "{out}{err}");

    pg.psql(
        "restored",
        r#"UPDATE "odd.""s"."a.b ""c""" SET v = 'changed' WHERE id = 7"#,
    );
    let (code, out, err) = run(&[
        "verify", "db", "--source", "src", "--target", "restored", "--tables", odd_table, "--json",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let table = &report["tables"][0];
    assert_eq!(table["differences_found"], 1, "{out}");
    assert!(table.to_string().contains("changed"), "{out}");
}

/// An unset `${VAR}` only fails the commands that use the value holding it, and says which
/// variable, which key and line, and what needed it.
#[test]
fn unset_variable_fails_only_what_uses_it() {
    let pg = PgCluster::start();
    pg.psql("einvoice", "CREATE TABLE t (id int PRIMARY KEY)");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[databases.src]\nurl = \"{}\"\n\
             [databases.cloud]\nurl = \"${{INVSYNC_TEST_UNSET_URL}}\"\n\
             [repositories.local]\nurl = \"file://{}\"\npassphrase = \"test pass\"\n\
             [repositories.offsite]\nurl = \"file://{}\"\npassphrase = \"${{INVSYNC_TEST_UNSET_PASS}}\"\n",
            pg.url("einvoice"),
            dir.path().join("local").display(),
            dir.path().join("offsite").display(),
        ),
    );
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        invsync(&all)
    };
    for args in [
        &["repo", "init", "--repo", "local"][..],
        &[
            "backup", "--repo", "local", "--db", "src", "--tables", "public.t",
        ],
        &[
            "verify",
            "db",
            "--source",
            "src",
            "--target",
            &pg.url("einvoice"),
        ],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    let (code, _, err) = run(&["snapshots", "--repo", "offsite"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("invsync.toml:10: repositories.offsite.passphrase: environment variable INVSYNC_TEST_UNSET_PASS is not set")
            && err.contains("opening repository `offsite` needs it"),
        "{err}"
    );
    let (code, _, err) = run(&["verify", "db", "--source", "src", "--target", "cloud"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invsync.toml:4: databases.cloud.url: environment variable INVSYNC_TEST_UNSET_URL is not set")
            && err.contains("connecting to database `cloud` needs it"),
        "{err}"
    );
    let (code, report, out) = check_json(&config);
    assert_eq!(code, 1, "{out}");
    assert!(
        database(&report, "cloud")["problems"]
            .to_string()
            .contains("INVSYNC_TEST_UNSET_URL"),
        "{out}"
    );
    assert!(
        database(&report, "src")["problems"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{out}"
    );
    assert!(out.contains("INVSYNC_TEST_UNSET_PASS"), "{out}");
}
