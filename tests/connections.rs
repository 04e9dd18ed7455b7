//! Connections as users configure them: TLS under each `sslmode`, and a unix-socket host.

mod support;

use std::path::Path;
use std::process::Command;

use invsync::pg::ConnInfo;
use support::config_file::ConfigFile;
use support::{ClusterOptions, PgCluster};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for IP 127.0.0.1 only, readable by the server user.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=other-ca",
            "-keyout",
            "other.key",
            "-out",
            "other.pem",
        ],
    );
    for f in ["server.key", "server.pem"] {
        Command::new("chmod")
            .args(["600", dir.join(f).to_str().unwrap()])
            .status()
            .unwrap();
        Command::new("chown")
            .args(["postgres:", dir.join(f).to_str().unwrap()])
            .status()
            .ok();
    }
}

async fn uses_tls(url: &str) -> Result<bool, String> {
    let conn = ConnInfo::parse(url)?;
    let client = conn.connect().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmodes_behave_like_libpq() {
    let certs = support::server_tempdir();
    make_certs(certs.path());
    let dir = certs.path().display();
    let pg = PgCluster::start_with(ClusterOptions {
        extra_conf: vec![
            "ssl = on".into(),
            format!("ssl_cert_file = '{dir}/server.pem'"),
            format!("ssl_key_file = '{dir}/server.key'"),
        ],
        ..Default::default()
    });
    let base = |host: &str, q: &str| format!("postgres://postgres@{host}:{}/einvoice?{q}", pg.port);

    assert_eq!(
        uses_tls(&base("127.0.0.1", "sslmode=disable")).await,
        Ok(false)
    );
    assert_eq!(
        uses_tls(&base("127.0.0.1", "sslmode=prefer")).await,
        Ok(true)
    );
    assert_eq!(
        uses_tls(&base("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    let ca = format!("sslrootcert={dir}/ca.pem");
    assert_eq!(
        uses_tls(&base("127.0.0.1", &format!("sslmode=verify-full&{ca}"))).await,
        Ok(true)
    );
    // The certificate names 127.0.0.1, not localhost: verify-ca accepts, verify-full refuses.
    assert_eq!(
        uses_tls(&base("localhost", &format!("sslmode=verify-ca&{ca}"))).await,
        Ok(true)
    );
    let e = uses_tls(&base("localhost", &format!("sslmode=verify-full&{ca}")))
        .await
        .unwrap_err();
    assert!(
        e.contains("cannot connect") && e.contains("localhost"),
        "{e}"
    );
    // A certificate from an untrusted CA is refused, also under `require` with a root cert.
    let other = format!("sslrootcert={dir}/other.pem");
    for mode in ["verify-ca", "verify-full", "require"] {
        let e = uses_tls(&base("127.0.0.1", &format!("sslmode={mode}&{other}")))
            .await
            .unwrap_err();
        assert!(e.contains("cannot connect"), "{mode}: {e}");
    }
}

#[tokio::test]
async fn unix_socket_host() {
    let pg = PgCluster::start();
    let url = format!(
        "postgres://postgres@/einvoice?host={}&port={}",
        pg.socket_dir().display(),
        pg.port
    );
    let client = ConnInfo::parse(&url).unwrap().connect().await.unwrap();
    let row = client
        .query_one("SELECT inet_client_addr() IS NULL", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "expected a unix-socket connection");
}

/// libpq percent-decodes URI parameters and reads `+` as a plus: `options` with an encoded
/// space and `=` reach the server as one `-c` setting, and `application_name=my+app` stays so.
#[tokio::test]
async fn uri_parameters_reach_the_server_as_libpq_passes_them() {
    let pg = PgCluster::start();
    let uri = format!(
        "postgres://postgres@127.0.0.1:{}/einvoice?sslmode=disable&options=-c%20statement_timeout%3D5000%20-c%20lock_timeout%3D4000&application_name=my+app",
        pg.port
    );
    let key_value = format!(
        "host=127.0.0.1 port={} user=postgres dbname=einvoice sslmode=disable options='-c statement_timeout=5000 -c lock_timeout=4000' application_name=my+app",
        pg.port
    );
    for text in [&uri, &key_value] {
        let client = ConnInfo::parse(text)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        let row = client
            .query_one(
                "SELECT current_setting('statement_timeout'), current_setting('application_name'), \
                        current_setting('lock_timeout')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "5s", "{text}");
        assert_eq!(row.get::<_, String>(1), "my+app", "{text}");
        assert_eq!(row.get::<_, String>(2), "4s", "{text}");
    }

    // Through a command: `verify db` compares only rows its filter admits, and the filter
    // holds only in a session that got the second setting of `options` (verify sets
    // statement_timeout and application_name itself).
    pg.psql(
        "einvoice",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)",
    );
    let (code, out, err) = support::invsync(&[
        "verify",
        "db",
        "--source",
        &uri,
        "--target",
        &key_value,
        "--tables",
        "public.t",
        "--where",
        "current_setting('lock_timeout') = '4s'",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["tables"][0]["source_rows"], 2, "{out}");
    assert_eq!(report["tables"][0]["target_rows"], 2, "{out}");
}

/// A cluster where role `pwuser` must give the password `S3CRET pw+/@'x` (SCRAM), in normal and replication
/// connections; every other role keeps trust authentication.
async fn cluster_with_password() -> PgCluster {
    let pg = PgCluster::start();
    pg.psql(
        "postgres",
        "CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD 'S3CRET pw+/@''x'",
    );
    pg.psql("postgres", "CREATE DATABASE replica");
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all pwuser 127.0.0.1/32 scram-sha-256\nhost replication pwuser 127.0.0.1/32 scram-sha-256\n{old}"
        ),
    )
    .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let no_password = ConnInfo::parse(&pg.url_as("pwuser", "einvoice")).unwrap();
    support::wait_until(
        std::time::Duration::from_secs(20),
        "pg_hba.conf to ask pwuser for a password",
        || async { no_password.connect().await.is_err() },
    )
    .await;
    pg
}

/// The password in each form libpq accepts (URI userinfo, `?password=`, `password=` pair) is
/// sent as written and never shown: not by `config check`, `sync setup`, `sync status` or
/// `verify db`, nor in their errors.
#[tokio::test]
async fn passwords_work_and_never_show_in_any_form() {
    let pg = cluster_with_password().await;
    pg.psql(
        "einvoice",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)",
    );
    let port = pg.port;
    let encoded = "S3CRET%20pw%2B%2F%40'x";
    let userinfo = format!("postgres://pwuser:{encoded}@127.0.0.1:{port}/einvoice?sslmode=disable");
    let in_query =
        format!("postgres://pwuser@127.0.0.1:{port}/replica?sslmode=disable&password={encoded}");
    let key_value = format!(
        r"host=127.0.0.1 port={port} user=pwuser password='S3CRET pw+/@\'x' dbname=einvoice sslmode=disable"
    );
    for text in [&userinfo, &in_query, &key_value] {
        let conn = ConnInfo::parse(text).unwrap();
        conn.connect()
            .await
            .unwrap_or_else(|e| panic!("{conn}: {e}"));
        assert!(!conn.to_string().contains("S3CRET"), "{conn}");
    }
    let hidden = |what: &str, out: &str, err: &str| {
        for secret in ["S3CRET", "S3CRET%20pw"] {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{what} shows the password: {out}{err}"
            );
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::new()
        .database("src", &userinfo)
        .database("kv", &key_value)
        .database("dst", &in_query)
        .pipeline("p", "src", &["dst"], &["public.t"])
        .write(&dir.path().join("invsync.toml"));
    let config = config.to_str().unwrap();
    for args in [
        &["config", "check"][..],
        &["config", "check", "--json"],
        &["sync", "setup", "p"],
        &["sync", "status"],
        &["sync", "status", "--json"],
        &[
            "verify", "db", "--source", "kv", "--target", "dst", "--tables", "public.t",
        ],
    ] {
        let mut all = vec!["--config", config];
        all.extend_from_slice(args);
        let (code, out, err) = support::invsync(&all);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        hidden(&format!("{args:?}"), &out, &err);
    }
    let (code, out, err) = support::invsync(&[
        "verify", "db", "--source", &key_value, "--target", &in_query, "--tables", "public.t",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    hidden("verify db with connection strings", &out, &err);
    assert!(out.contains("password=***"), "{out}");

    // Error paths: a database that does not exist, a wrong password, a malformed string.
    let wrong_password = key_value.replace("pw+", "pw-");
    let unclosed = key_value.replace(r"\'x'", "x");
    for (source, says) in [
        (key_value.replace("dbname=einvoice", "dbname=nope"), "nope"),
        (in_query.replace("/replica", "/nope"), "nope"),
        (wrong_password, "password authentication failed"),
        (unclosed, "no closing quote"),
        (userinfo.replace("%20", "%2"), "hex digits"),
    ] {
        let (code, out, err) =
            support::invsync(&["verify", "db", "--source", &source, "--target", &in_query]);
        assert_eq!(code, 2, "{source}: {out}{err}");
        assert!(err.contains(says), "{says}: {err}");
        hidden("verify db error", &out, &err);
    }
}

/// Server notices are routine (`DROP ... IF EXISTS` of nothing) and go to debug; warnings stay
/// visible.
#[test]
fn server_notices_are_debug_and_warnings_stay() {
    let pg = PgCluster::start();
    pg.psql(
        "einvoice",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1); \
         CREATE FUNCTION noisy() RETURNS bool LANGUAGE plpgsql AS \
         $$BEGIN RAISE NOTICE 'routine notice'; RAISE WARNING 'real warning'; RETURN true; END$$",
    );
    let url = pg.url("einvoice");
    let verify = |log: &str| {
        let (code, out, err) = support::invsync(&[
            "--log", log, "verify", "db", "--source", &url, "--target", &url, "--tables",
            "public.t", "--where", "noisy()",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        err
    };
    let err = verify("info");
    assert!(!err.contains("routine notice"), "{err}");
    let warning = err.lines().find(|l| l.contains("real warning"));
    assert!(
        warning.is_some_and(|l| l.contains(" WARN ")),
        "the warning must be logged as one: {err}"
    );
    let err = verify("invsync=debug");
    assert!(
        err.contains("DEBUG") && err.contains("routine notice"),
        "{err}"
    );
}
