//! Test harness: throwaway PostgreSQL clusters and a loopback S3 API server.
//!
//! Every integration test uses these; nothing is mocked. A cluster lives in a temporary
//! directory on a free port and is stopped (immediate mode) and deleted when dropped, also
//! when the test panics. When the tests run as root, the server runs as the `postgres` user.
//! Clusters are copied from one `initdb` made per test process, so starting one is cheap.
#![allow(dead_code)]

pub mod config_file;
pub mod rich_schema;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use invsync::pg::ConnInfo;

/// The PostgreSQL binaries: `PG_BINDIR` if set, else `pg_config --bindir`, else PATH.
pub fn pg_bin(name: &str) -> PathBuf {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let dir = BINDIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("PG_BINDIR") {
            return Some(PathBuf::from(d));
        }
        let out = Command::new("pg_config").arg("--bindir").output().ok()?;
        let s = String::from_utf8(out.stdout).ok()?;
        Some(PathBuf::from(s.trim()))
    });
    match dir {
        Some(d) if d.join(name).exists() => d.join(name),
        _ => PathBuf::from(name),
    }
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.trim_ascii() == b"0")
            .unwrap_or(false)
    })
}

/// Runs a PostgreSQL program, as `postgres` when we are root.
fn pg_command(name: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(name));
        c
    } else {
        Command::new(pg_bin(name))
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A temporary directory the server user can write.
pub fn server_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("invsync-pg-")
        .tempdir()
        .expect("tempdir");
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["postgres:", dir.path().to_str().unwrap()]);
                c
            },
            "chown",
        );
    }
    dir
}

/// One `initdb` per test process; clusters are copies of it.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<tempfile::TempDir> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let dir = server_tempdir();
            let data = dir.path().join("data");
            let mut c = pg_command("initdb");
            c.args(["-D", data.to_str().unwrap()])
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg("--no-sync");
            run(c, "initdb");
            dir
        })
        .path()
}

/// Picks a port nobody listens on right now. Another process may take it before the server
/// binds; `PgCluster::start` retries in that case.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Options a test may change before the cluster starts.
#[derive(Clone)]
pub struct ClusterOptions {
    pub wal_level: &'static str,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical",
            extra_conf: Vec::new(),
        }
    }
}

/// A running PostgreSQL 15 cluster on 127.0.0.1.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl PgCluster {
    /// Starts a cluster with `wal_level=logical` and database `einvoice`.
    pub fn start() -> PgCluster {
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(opts: ClusterOptions) -> PgCluster {
        let dir = server_tempdir();
        let data = dir.path().join("data");
        let mut c = Command::new("cp");
        c.args([
            "-a",
            template().join("data").to_str().unwrap(),
            data.to_str().unwrap(),
        ]);
        run(c, "copy template cluster");
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = {}\nmax_replication_slots = 32\nmax_wal_senders = 32\n\
             max_connections = 100\nfsync = off\nfull_page_writes = off\n\
             shared_buffers = 64MB\nlogging_collector = off\n",
            dir.path().display(),
            opts.wal_level
        );
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("write postgresql.conf");

        let log = dir.path().join("server.log");
        for attempt in 0..8 {
            let port = free_port();
            let mut c = pg_command("pg_ctl");
            c.args([
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
            ])
            .args(["-o", &format!("-p {port}"), "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            if c.status().map(|s| s.success()).unwrap_or(false) {
                let cluster = PgCluster { dir, port };
                cluster.psql("postgres", "CREATE DATABASE einvoice");
                return cluster;
            }
            if attempt == 7 {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("PostgreSQL did not start: {text}");
            }
        }
        unreachable!()
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB?sslmode=disable`
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A URL for `user` (no password: trust authentication).
    pub fn url_as(&self, user: &str, db: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn conn(&self, db: &str) -> ConnInfo {
        ConnInfo::parse(&self.url(db)).unwrap()
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        self.conn(db)
            .connect()
            .await
            .expect("connect to test cluster")
    }

    /// Runs SQL with psql (stops at the first error) and returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed on {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    }

    /// Stops the server (fast mode); `start_again` brings it back on the same port.
    pub fn stop(&self) {
        self.stop_in("fast");
    }

    /// Stops the server as a crash would (immediate mode): WAL not yet written is lost, so
    /// are asynchronous commits the WAL writer has not reached.
    pub fn crash(&self) {
        self.stop_in("immediate");
    }

    fn stop_in(&self, mode: &str) {
        let mut c = pg_command("pg_ctl");
        c.args([
            "-D",
            self.data_dir().to_str().unwrap(),
            "-m",
            mode,
            "-w",
            "stop",
        ])
        .stdout(Stdio::null());
        run(c, "pg_ctl stop");
    }

    pub fn start_again(&self) {
        let log = self.dir.path().join("server.log");
        let mut c = pg_command("pg_ctl");
        c.args([
            "-D",
            self.data_dir().to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-w",
        ])
        .args(["-o", &format!("-p {}", self.port), "start"])
        .stdout(Stdio::null());
        run(c, "pg_ctl start");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .args([
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Where `moto_server` is: `INVSYNC_MOTO_SERVER`, the project's `.venv` (made by
/// `scripts/test.sh`), or PATH.
fn moto_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("INVSYNC_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("moto_server")
}

/// A real S3 API server (moto) on loopback, with one bucket, killed when dropped.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    pub fn start() -> S3Server {
        let port = free_port();
        let child = Command::new(moto_server_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server (run scripts/test.sh, which installs it into .venv)");
        let mut server = S3Server {
            child,
            port,
            bucket: "invsync-test".into(),
        };
        // Listening is not yet serving: the first requests may be reset. The bucket is made
        // once a request is answered.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match server.create_bucket() {
                Ok(resp) => {
                    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
                    break;
                }
                Err(e) => {
                    if let Ok(Some(status)) = server.child.try_wait() {
                        panic!("moto_server exited: {status}");
                    }
                    assert!(
                        Instant::now() < deadline,
                        "moto_server did not answer on {port}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        server
    }

    /// Asks for the bucket; the server's answer.
    fn create_bucket(&self) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "PUT /{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.bucket, self.port
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp)
    }

    /// `s3://BUCKET/prefix`
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Options for `[repositories.NAME] options` / the object store builder.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".into()),
            ("aws_access_key_id", "testing".into()),
            ("aws_secret_access_key", "testing".into()),
            ("aws_region", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The options as a TOML inline table for a config file.
    pub fn options_toml(&self) -> String {
        let items: Vec<String> = self
            .options()
            .into_iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        format!("{{ {} }}", items.join(", "))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `invsync` binary with `args`; returns (exit code, stdout, stderr).
pub fn invsync(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_invsync"))
        .args(args)
        .env_remove("INVSYNC_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run invsync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the `einvoice-gen` binary with `args` to the end; panics with its stderr if it fails.
pub fn einvoice_gen(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_einvoice-gen"))
        .args(args)
        .env_remove("EINVOICE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run einvoice-gen");
    assert!(
        out.status.success(),
        "einvoice-gen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A program installed by the scripts: `$ENV_VAR`, else `DIR/REL` below the project (where
/// `scripts/test.sh` installs it), else the bare name on PATH.
fn installed_tool(env_var: &str, rel: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if local.exists() {
        return local;
    }
    PathBuf::from(name)
}

/// A real Azure Blob API server (Azurite, from the npm registry; `scripts/test.sh` installs it
/// into `.azurite/`) on loopback, in memory, with one container; killed when dropped. Its
/// telemetry is off: nothing leaves the machine.
pub struct AzureServer {
    child: Child,
    pub port: u16,
    pub container: String,
}

impl AzureServer {
    /// The emulator's well-known development account (public, documented by Azurite).
    const ACCOUNT: &'static str = "devstoreaccount1";
    const KEY: &'static str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    pub fn start() -> AzureServer {
        let port = free_port();
        let child = Command::new(installed_tool(
            "INVSYNC_AZURITE",
            ".azurite/node_modules/.bin/azurite-blob",
            "azurite-blob",
        ))
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .args([
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start azurite-blob (run scripts/test.sh, which installs it into .azurite)");
        let mut server = AzureServer {
            child,
            port,
            container: "invsync-test".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("azurite-blob exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "azurite did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.create_container();
        server
    }

    /// Creates the container with the Azure SDK for Python (installed beside moto), since
    /// object_store has no call for it and the request must carry a Shared Key signature.
    fn create_container(&self) {
        let python = installed_tool("INVSYNC_PYTHON", ".venv/bin/python", "python3");
        let script = format!(
            "from azure.storage.blob import BlobServiceClient\n\
             BlobServiceClient.from_connection_string('{}').create_container('{}')\n",
            self.connection_string(),
            self.container
        );
        let out = Command::new(python)
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()
            .expect("run python with azure-storage-blob");
        assert!(
            out.status.success(),
            "create container: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={};AccountKey={};BlobEndpoint={}/{};",
            Self::ACCOUNT,
            Self::KEY,
            self.endpoint(),
            Self::ACCOUNT
        )
    }

    /// `az://CONTAINER/prefix`
    pub fn url(&self, prefix: &str) -> String {
        format!("az://{}/{prefix}", self.container)
    }

    /// Options for `[repositories.NAME] options`: the emulator's account and key.
    pub fn options_toml(&self) -> String {
        "{ azure_storage_use_emulator = \"true\" }".into()
    }

    /// The environment that points object_store's emulator mode at this server.
    pub fn env(&self) -> [(&'static str, String); 1] {
        [("AZURITE_BLOB_STORAGE_URL", self.endpoint())]
    }
}

impl Drop for AzureServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (a name such as `TERM`) to `child`.
pub fn send_signal(child: &Child, signal: &str) {
    let st = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits (up to a minute) for `child` to exit; returns its exit code (minus the signal
/// number when a signal ended it) and its stderr.
pub async fn finish(mut child: Child) -> (i32, String) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "invsync did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let code = status
        .code()
        .unwrap_or_else(|| -status.signal().unwrap_or(0));
    (code, err)
}
