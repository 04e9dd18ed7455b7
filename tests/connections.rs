//! Connections as users configure them: TLS under each `sslmode`, and a unix-socket host.

mod support;

use std::path::Path;
use std::process::Command;

use invsync::pg::ConnInfo;
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
