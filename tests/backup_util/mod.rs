//! Helpers shared by the backup tests: keys, config files, and a table with many types.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use age::secrecy::ExposeSecret;
use invsync::backup::session::DatabaseSource;
use invsync::config::{RepositoryConfig, TablePattern};

use crate::support::config_file::ConfigFile;
use crate::support::{invsync, PgCluster};

/// A fresh age identity written to `dir/name.key`; returns (path, recipient).
pub fn identity(dir: &Path, name: &str) -> (PathBuf, String) {
    let id = age::x25519::Identity::generate();
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, format!("{}\n", id.to_string().expose_secret())).unwrap();
    (path, id.to_public().to_string())
}

/// Repository `r` at `url`, written for `recipient` and read with the identity in `key`, for
/// tests that call the library.
pub fn repo_config(url: &str, key: &Path, recipient: &str) -> RepositoryConfig {
    RepositoryConfig {
        name: "r".into(),
        url: url.parse().unwrap(),
        recipients: vec![recipient.to_string()],
        identity_file: Some(key.to_path_buf()),
        passphrase: None,
        options: BTreeMap::new(),
    }
}

/// The tables of `pg`'s `einvoice` database matching `pattern`, as a backup source `src`.
pub fn tables_of(pg: &PgCluster, pattern: &str) -> DatabaseSource {
    DatabaseSource {
        label: "src".into(),
        conn: pg.conn("einvoice"),
        tables: vec![TablePattern::parse(pattern).unwrap()],
        jobs: 2,
    }
}

/// The key lines of a repository that `recipient` writes and the identity in `key` reads.
pub fn owner_keys(recipient: &str, key: &Path) -> String {
    let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        "recipients = [{}]\nidentity_file = {}",
        quoted(recipient),
        quoted(&key.display().to_string())
    )
}

/// Writes a config with one database `src` (and optionally `dst`) and repository `r`.
/// `repo_keys` is the TOML body of the repository after its `url` line.
pub fn write_config(
    dir: &Path,
    name: &str,
    dbs: &[(&str, String)],
    url: &str,
    repo_keys: &str,
) -> PathBuf {
    let mut file = ConfigFile::new();
    for (n, u) in dbs {
        file = file.database(n, u);
    }
    file.repository("r", url, repo_keys).write(&dir.join(name))
}

/// A fresh identity `owner` in `dir` and `dir/owner.toml` for a repository at `url` that it
/// reads and writes; returns the config and the owner's recipient.
pub fn owner_config(dir: &Path, dbs: &[(&str, String)], url: &str) -> (PathBuf, String) {
    let (key, recipient) = identity(dir, "owner");
    let cfg = write_config(dir, "owner.toml", dbs, url, &owner_keys(&recipient, &key));
    (cfg, recipient)
}

/// A fresh identity `name` in `dir` and `dir/NAME.toml` naming only its key file, so it opens
/// the repository at `url` only once that key is added; returns the config and the recipient.
pub fn reader_config(
    dir: &Path,
    name: &str,
    dbs: &[(&str, String)],
    url: &str,
) -> (PathBuf, String) {
    let (key, recipient) = identity(dir, name);
    let cfg = write_config(
        dir,
        &format!("{name}.toml"),
        dbs,
        url,
        &format!("identity_file = \"{}\"", key.display()),
    );
    (cfg, recipient)
}

/// `dir/invsync.toml` with database `src` (`einvoice`), `dst` (`restored`, created here, empty)
/// and an initialised file repository that the owner reads and writes.
pub fn restore_setup(pg: &PgCluster, dir: &Path) -> PathBuf {
    pg.psql("postgres", "CREATE DATABASE restored");
    let (key, recipient) = identity(dir, "owner");
    let cfg = write_config(
        dir,
        "invsync.toml",
        &[("src", pg.url("einvoice")), ("dst", pg.url("restored"))],
        &format!("file://{}", dir.join("repo").display()),
        &owner_keys(&recipient, &key),
    );
    ok(&cfg, &["repo", "init"]);
    cfg
}

/// Runs invsync with `--config cfg` and the args.
pub fn run(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    invsync(&all)
}

/// Runs and asserts success; returns stdout.
pub fn ok(cfg: &Path, args: &[&str]) -> String {
    let (code, out, err) = run(cfg, args);
    assert_eq!(code, 0, "invsync {args:?} failed: {out}{err}");
    out
}

/// Creates `public.items` (many types, serial key, identity column, generated column,
/// unique constraint, check constraint, an index) with `rows` rows, and `public.tags`
/// (composite text key).
pub fn make_tables(pg: &PgCluster, db: &str, rows: u32) {
    pg.psql(
        db,
        &format!(
            "CREATE TABLE items (
                id serial PRIMARY KEY,
                code text NOT NULL UNIQUE,
                amount numeric(12,2) CHECK (amount >= 0),
                qty int DEFAULT 1,
                ratio double precision,
                issued timestamptz,
                day date,
                flag boolean,
                doc jsonb,
                blob bytea,
                labels text[],
                uid uuid,
                note text,
                seq bigint GENERATED BY DEFAULT AS IDENTITY,
                total numeric GENERATED ALWAYS AS (amount * qty) STORED
             );
             CREATE INDEX items_day ON items (day);
             INSERT INTO items (code, amount, qty, ratio, issued, day, flag, doc, blob, labels, uid, note)
             SELECT 'AB' || lpad(g::text, 8, '0'), (g % 1000) / 7.0, g % 5, g / 3.0,
                    '2026-01-01 08:00+08'::timestamptz + g * interval '1 minute', DATE '2026-01-01' + (g % 60),
                    g % 2 = 0, jsonb_build_object('n', g, 's', 'x' || g), decode(md5(g::text), 'hex'),
                    ARRAY['a' || g, NULL, 'tab\there'], md5(g::text)::uuid,
                    CASE WHEN g % 10 = 0 THEN NULL WHEN g % 10 = 1 THEN '' ELSE repeat(md5(g::text), 2) || E'\\n中文' END
             FROM generate_series(1, {rows}) g;
             CREATE TABLE tags (kind text, name text, v int, PRIMARY KEY (kind, name));
             INSERT INTO tags SELECT 'k' || (g % 3), 'n' || g, g FROM generate_series(1, 500) g;"
        ),
    );
}

/// A fingerprint of a table's contents, ordered by `order`.
pub fn fingerprint(pg: &PgCluster, db: &str, table: &str, order: &str) -> String {
    pg.psql(db, &format!("SELECT count(*) || ':' || md5(string_agg(t::text, '|' ORDER BY {order})) FROM {table} t"))
}

/// Runs invsync with extra environment variables.
pub fn run_env(cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Files below `dir` (recursively), relative paths sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(base, &e.path(), out);
            } else {
                out.push(
                    e.path()
                        .strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// `cp -a`.
pub fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The findings of `verify repo --json` as (kind, object, affects joined).
pub fn findings(report: &str) -> Vec<(String, String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(report).unwrap_or_else(|e| panic!("{e}: {report}"));
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["object"].as_str().unwrap().to_string(),
                f["affects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })
        .collect()
}

/// Starts `invsync --config cfg ARGS` in the background, its stderr captured.
pub fn spawn(cfg: &Path, args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_invsync"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to a minute) until some session of database `db` waits for a lock on `table`:
/// a job the test paused by holding that lock has reached it.
pub async fn queued_on(pg: &PgCluster, db: &str, table: &str) {
    let watch = pg.client(db).await;
    let sql = format!(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = '{table}'::regclass"
    );
    crate::support::wait_until(
        std::time::Duration::from_secs(60),
        &format!("a session to queue for the lock on {table}"),
        || async { watch.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) > 0 },
    )
    .await;
}

/// An LSN as PostgreSQL prints it (`16/B374D848`), as a number.
pub fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Waits until the archive's newest segment ends at or past `at`.
pub fn wait_archived(cfg: &Path, at: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out, _) = run(cfg, &["archive", "status", "--json"]);
        let end = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v[0]["latest"]["lsn"].as_str().map(lsn));
        if end.is_some_and(|e| e >= lsn(at)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{at} not archived within 60 s: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
