//! The whole backup cycle against a real S3 API server on loopback.

mod backup_util;
mod support;

use backup_util::{files, findings, fingerprint, identity, make_tables, ok, run, write_config};
use support::{PgCluster, S3Server};

#[test]
fn s3_backup_restore_verify_forget_prune() {
    let s3 = S3Server::start();
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 4000);
    pg.psql("postgres", "CREATE DATABASE restored");
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = identity(dir.path(), "k");
    let tree = dir.path().join("etc/app");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("d/app.conf"), "listen = 1\n").unwrap();
    let cfg = write_config(
        dir.path(),
        "c.toml",
        &[("src", pg.url("einvoice")), ("dst", pg.url("restored"))],
        &s3.url("backups/einvoice"),
        &format!(
            "recipients = [\"{recipient}\"]\nidentity_file = \"{}\"\noptions = {}",
            key.display(),
            s3.options_toml()
        ),
    );
    ok(&cfg, &["repo", "init"]);
    let (code, _, err) = run(&cfg, &["repo", "init"]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");

    ok(
        &cfg,
        &[
            "backup",
            "--db",
            "src",
            "--tables",
            "public.*",
            "--config-dir",
            tree.to_str().unwrap(),
        ],
    );
    pg.psql("einvoice", "UPDATE tags SET v = -v WHERE name = 'n7'");
    ok(&cfg, &["backup", "--db", "src", "--tables", "public.*"]);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["snapshots", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);

    ok(&cfg, &["restore", "latest", "--to-db", "dst"]);
    assert_eq!(
        fingerprint(&pg, "einvoice", "items", "id"),
        fingerprint(&pg, "restored", "items", "id")
    );
    assert_eq!(
        fingerprint(&pg, "einvoice", "tags", "kind, name"),
        fingerprint(&pg, "restored", "tags", "kind, name")
    );

    let first = listed[0]["id"].as_str().unwrap();
    let out = dir.path().join("out");
    ok(
        &cfg,
        &["restore", &first[..8], "--to-dir", out.to_str().unwrap()],
    );
    let restored = out.join(tree.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read_to_string(restored.join("d/app.conf")).unwrap(),
        "listen = 1\n"
    );
    assert_eq!(files(&out).len(), 1);

    let out = ok(&cfg, &["verify", "repo", "--read-data", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");
    let forgot = ok(&cfg, &["forget", "--keep-last", "1", "--prune", "--json"]);
    let forgot: serde_json::Value = serde_json::from_str(&forgot).unwrap();
    assert_eq!(
        forgot["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["keep"] == false)
            .count(),
        1
    );
    let out = ok(&cfg, &["verify", "repo", "--read-data=50", "--json"]);
    assert!(findings(&out).is_empty(), "{out}");
}

/// What the loopback proxy in front of the S3 server does once a request for a pack arrives.
#[derive(Clone, Copy, PartialEq)]
enum Outage {
    /// Closes every connection from then on, as a stopped server would.
    Down,
    /// Accepts and never answers, as a hung endpoint does.
    Hung,
}

/// A TCP proxy on loopback in front of `upstream` that forwards everything until the first
/// request reading a pack (`GET .../data/...`), then behaves as `outage` says. Its thread
/// ends with the test process.
fn proxy(upstream: u16, outage: Outage) -> u16 {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        let mut hung = Vec::new();
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            if out.load(Ordering::SeqCst) {
                match outage {
                    Outage::Down => drop(client),
                    Outage::Hung => hung.push(client),
                }
                continue;
            }
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let out = out.clone();
            let (mut client_r, mut server_w) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            // Requests: forwarded until one reads a pack.
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut held = Vec::new();
                loop {
                    let n = match client_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    let reads_pack = chunk.starts_with(b"GET ")
                        && chunk
                            .split(|&b| b == b'\n')
                            .next()
                            .is_some_and(|line| line.windows(6).any(|w| w == b"/data/"));
                    if reads_pack || out.load(Ordering::SeqCst) {
                        out.store(true, Ordering::SeqCst);
                        if outage == Outage::Down {
                            let _ = client_r.shutdown(std::net::Shutdown::Both);
                            let _ = server_w.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                        // Hung: keep the connection open, send nothing.
                        held.push(chunk.to_vec());
                        continue;
                    }
                    if server_w.write_all(chunk).is_err() {
                        break;
                    }
                }
            });
            // Responses.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
            });
        }
    });
    port
}

/// A repository on the S3 server behind a proxy that fails as `outage` says once a pack is
/// read; returns (config, database URL to restore into).
fn repository_behind_a_proxy(
    s3: &S3Server,
    pg: &PgCluster,
    dir: &std::path::Path,
    prefix: &str,
    outage: Outage,
    store_options: &str,
) -> std::path::PathBuf {
    let (key, recipient) = identity(dir, "k");
    let keys = |port: u16| {
        format!(
            "recipients = [\"{recipient}\"]\nidentity_file = \"{}\"\noptions = {{ aws_endpoint = \"http://127.0.0.1:{port}\", aws_allow_http = \"true\", aws_access_key_id = \"testing\", aws_secret_access_key = \"testing\", aws_region = \"us-east-1\"{store_options} }}",
            key.display()
        )
    };
    let dbs = [("src", pg.url("einvoice")), ("dst", pg.url("restored"))];
    let direct = write_config(dir, "direct.toml", &dbs, &s3.url(prefix), &keys(s3.port));
    ok(&direct, &["repo", "init"]);
    ok(&direct, &["backup", "--db", "src", "--tables", "public.*"]);
    write_config(
        dir,
        "proxied.toml",
        &dbs,
        &s3.url(prefix),
        &keys(proxy(s3.port, outage)),
    )
}

#[test]
fn a_store_that_stops_answering_is_reported_as_unreadable_never_as_damage() {
    let s3 = S3Server::start();
    let pg = PgCluster::start();
    make_tables(&pg, "einvoice", 2000);
    pg.psql("postgres", "CREATE DATABASE restored");
    let nothing_restored = |pg: &PgCluster| {
        pg.psql(
            "restored",
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' OR n.nspname LIKE 'invsync\\_restore\\_%'",
        )
    };
    let quick = ", retry_timeout = \"2s\", max_retries = \"2\"";

    // Stopped in the middle of `verify repo --read-data`: exit 2, "could not read".
    let dir = tempfile::tempdir().unwrap();
    let cfg = repository_behind_a_proxy(&s3, &pg, dir.path(), "verify", Outage::Down, quick);
    let (code, out, err) = run(&cfg, &["verify", "repo", "--read-data"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("could not read data/") && !format!("{out}{err}").contains("damaged"),
        "{out}{err}"
    );

    // Stopped in the middle of a restore: a failure to read, nothing half-restored.
    let dir = tempfile::tempdir().unwrap();
    let cfg = repository_behind_a_proxy(&s3, &pg, dir.path(), "restore", Outage::Down, quick);
    let (code, _, err) = run(&cfg, &["restore", "latest", "--to-db", "dst"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("could not read data/")
            && err.contains("nothing was restored")
            && !err.contains("damaged"),
        "{err}"
    );
    assert_eq!(nothing_restored(&pg), "0");

    // A hung endpoint: retried within `retry_timeout`, and said so while it lasts.
    let dir = tempfile::tempdir().unwrap();
    let cfg = repository_behind_a_proxy(
        &s3,
        &pg,
        dir.path(),
        "hung",
        Outage::Hung,
        ", timeout = \"1s\", retry_timeout = \"12s\", max_retries = \"50\"",
    );
    let started = std::time::Instant::now();
    let (code, out, err) = run(&cfg, &["verify", "repo", "--read-data"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        err.contains("still trying to read data/")
            && err.contains("retrying for up to 12s")
            && err.contains("could not read data/"),
        "{err}"
    );
    assert!(
        !err.contains("testing\""),
        "no credentials in messages: {err}"
    );
}
