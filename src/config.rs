//! The `invsync.toml` configuration: parsing, `${ENV}` interpolation and validation.
//!
//! The key names are a contract that users and outside tests rely on. Every error names the
//! file, the key and its line, and says what to do. Values that may hold secrets (database URLs,
//! passphrases) are kept in types whose `Display` and `Debug` never show the secret.
//!
//! Everything is validated when the file is loaded, except what depends on an environment
//! variable that is not set: the database or repository whose value names it is kept as an
//! [`UnsetVariable`], and only a command that uses that database or repository fails, with an
//! error naming the variable, the key and line, and the use. A command that never touches it
//! runs as usual.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::pg::ConnInfo;

mod agent;
/// Table patterns are parsed in `pg`, where the catalog resolves them; re-exported for callers
/// that know them as configuration.
pub use crate::pg::TablePattern;
pub use agent::{
    AgentConfig, ArchiveConfig, BlackoutConfig, BlackoutWhen, DuringBlackout, JobSpec, KeepPolicy,
    LeaseTiming, MissedRuns, ScheduleConfig, TimeOfDay, DEFAULT_TIME_ZONE,
};

/// The environment variable that names the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "INVSYNC_CONFIG";
/// The config file used when neither `--config` nor `INVSYNC_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "invsync.toml";

/// Everything that can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (create one with `invsync init {path}` or pass --config)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{path} already exists; refusing to overwrite it (remove it or choose another path)")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A string that must never be printed: a passphrase or a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from.
    pub path: PathBuf,
    /// Each database, or the variable its settings need that the environment does not set.
    pub databases: BTreeMap<String, Result<DatabaseConfig, UnsetVariable>>,
    pub pipelines: BTreeMap<String, PipelineConfig>,
    /// Each repository, or the variable its settings need that the environment does not set.
    pub repositories: BTreeMap<String, Result<RepositoryConfig, UnsetVariable>>,
    /// `[agent]`, with its defaults when the section is absent.
    pub agent: AgentConfig,
    /// `[[schedules]]`, in the order of the file.
    pub schedules: Vec<ScheduleConfig>,
    /// `[[blackouts]]`: the peak calendar, in the order of the file.
    pub blackouts: Vec<BlackoutConfig>,
    /// `[archives.NAME]`: change archives the agent keeps running.
    pub archives: BTreeMap<String, ArchiveConfig>,
}

/// A `${NAME}` in a value whose variable is not set when the configuration is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsetVariable {
    pub variable: String,
    pub path: PathBuf,
    pub line: usize,
    /// The key holding the value, e.g. `repositories.offsite.passphrase`.
    pub key: String,
    /// What needs the value, e.g. "opening repository `offsite`"; filled in when it is used.
    pub needed_for: Option<String>,
}

impl UnsetVariable {
    /// The same, saying what needs the value.
    pub fn needed_for(&self, what: String) -> UnsetVariable {
        UnsetVariable {
            needed_for: Some(what),
            ..self.clone()
        }
    }
}

impl fmt::Display for UnsetVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let UnsetVariable {
            variable,
            path,
            line,
            key,
            ..
        } = self;
        write!(
            f,
            "{}:{line}: {key}: environment variable {variable} is not set",
            path.display()
        )?;
        if let Some(what) = &self.needed_for {
            write!(f, ", and {what} needs it")?;
        }
        write!(f, "; export {variable} or edit the value")
    }
}

/// `[databases.NAME]`: a PostgreSQL database invsync reads from or writes to.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub name: String,
    /// Connection settings; its `Display` hides the password.
    pub conn: ConnInfo,
}

/// `[pipelines.NAME]`: CDC replication from one source database to one or more targets.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub name: String,
    pub source: String,
    pub targets: Vec<String>,
    /// Table patterns: `schema.table` or `schema.*`.
    pub tables: Vec<TablePattern>,
    /// What an UPDATE or DELETE whose row is not on a target does (`missing_rows`).
    pub missing_rows: MissingRows,
    /// Sequences brought to the targets besides those the tables' columns own (`sequences`).
    pub sequences: Vec<crate::pg::TableName>,
    /// How often `sync run` brings the sequences to the targets (`sequence_interval`).
    pub sequence_interval: std::time::Duration,
    /// The roles the application writes the pipeline's tables with on its source, which a
    /// switchover makes read-only there (`application_roles`).
    pub application_roles: Vec<String>,
    /// How much WAL a target that is down may hold on the source before it is cut loose
    /// (`max_retained_wal`, bytes).
    pub max_retained_wal: Option<u64>,
    /// How long a target may be down before it is cut loose (`max_target_downtime`).
    pub max_target_downtime: Option<std::time::Duration>,
}

/// How often `sync run` brings sequences to the targets unless `sequence_interval` says.
pub const DEFAULT_SEQUENCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// `missing_rows`: what applying an UPDATE or DELETE does when the target lacks the row (the
/// target differs from the source: rows deleted or never copied there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingRows {
    /// Count the row, log a warning, and go on (the change is lost on that target).
    #[default]
    Warn,
    /// Stop the pipeline before the batch commits, naming the table and key.
    Stop,
    /// Insert the row an UPDATE carries whole (else stop); a DELETE of it does nothing.
    Apply,
}

impl MissingRows {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "warn" => Ok(MissingRows::Warn),
            "stop" => Ok(MissingRows::Stop),
            "apply" => Ok(MissingRows::Apply),
            other => Err(format!(
                "`{other}` is not a policy; use \"warn\" (count and go on), \"stop\" (stop the pipeline) or \"apply\" (insert what an update carries)"
            )),
        }
    }
}

/// `[repositories.NAME]`: a backup repository in object storage.
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    pub name: String,
    /// `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`,
    /// or `memory://` (for tests).
    pub url: url::Url,
    /// age X25519 recipients (`age1...`) that can read the repository.
    pub recipients: Vec<String>,
    /// age identity file, needed to read (restore, verify, prune).
    pub identity_file: Option<PathBuf>,
    /// Passphrase, the alternative to identities.
    pub passphrase: Option<Secret>,
    /// Extra options for the object store builder (`aws_endpoint`, `aws_region`, ...).
    pub options: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    databases: BTreeMap<String, RawDatabase>,
    #[serde(default)]
    pipelines: BTreeMap<String, RawPipeline>,
    #[serde(default)]
    repositories: BTreeMap<String, RawRepository>,
    agent: Option<agent::RawAgent>,
    #[serde(default)]
    schedules: Vec<agent::RawSchedule>,
    #[serde(default)]
    blackouts: Vec<agent::RawBlackout>,
    #[serde(default)]
    archives: BTreeMap<String, agent::RawArchive>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    source: Spanned<String>,
    targets: Spanned<Vec<Spanned<String>>>,
    tables: Spanned<Vec<Spanned<String>>>,
    missing_rows: Option<Spanned<String>>,
    #[serde(default)]
    sequences: Vec<Spanned<String>>,
    sequence_interval: Option<Spanned<String>>,
    #[serde(default)]
    application_roles: Vec<Spanned<String>>,
    max_retained_wal: Option<Spanned<String>>,
    max_target_downtime: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    url: Spanned<String>,
    #[serde(default)]
    recipients: Vec<Spanned<String>>,
    identity_file: Option<Spanned<String>>,
    passphrase: Option<Spanned<String>>,
    #[serde(default)]
    options: BTreeMap<String, Spanned<String>>,
}

/// Where the config file is: `--config`, else `INVSYNC_CONFIG`, else `./invsync.toml`.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

impl Config {
    /// Reads and validates the configuration at `path`, interpolating `${ENV}` from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates `text`; `env` supplies `${NAME}` values.
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: parse_message(text, &e),
        })?;
        let cx = Context { path, text, env };

        let mut databases = BTreeMap::new();
        for (name, db) in raw.databases {
            let key = format!("databases.{name}.url");
            let entry = match cx.interpolate(&key, &db.url)? {
                Err(unset) => Err(unset),
                Ok(url) => Ok(DatabaseConfig {
                    conn: ConnInfo::parse(&url)
                        .map_err(|message| cx.invalid(&key, &db.url, message))?,
                    name: name.clone(),
                }),
            };
            databases.insert(name, entry);
        }

        let mut pipelines = BTreeMap::new();
        for (name, p) in raw.pipelines {
            let source = p.source.get_ref().clone();
            if !databases.contains_key(&source) {
                return Err(cx.invalid(
                    &format!("pipelines.{name}.source"),
                    &p.source,
                    format!(
                        "no database named `{source}`; add [databases.{source}] or fix the name"
                    ),
                ));
            }
            if p.targets.get_ref().is_empty() {
                return Err(cx.invalid(
                    &format!("pipelines.{name}.targets"),
                    &p.targets,
                    "a pipeline needs at least one target database".into(),
                ));
            }
            let mut targets = Vec::new();
            for t in p.targets.get_ref() {
                let key = format!("pipelines.{name}.targets");
                let target = t.get_ref().clone();
                if !databases.contains_key(&target) {
                    return Err(cx.invalid(
                        &key,
                        t,
                        format!("no database named `{target}`; add [databases.{target}] or fix the name"),
                    ));
                }
                if target == source {
                    return Err(cx.invalid(
                        &key,
                        t,
                        format!("`{target}` is also the pipeline's source; a pipeline cannot replicate into itself"),
                    ));
                }
                if targets.contains(&target) {
                    return Err(cx.invalid(&key, t, format!("`{target}` is listed twice")));
                }
                targets.push(target);
            }
            if p.tables.get_ref().is_empty() {
                return Err(cx.invalid(
                    &format!("pipelines.{name}.tables"),
                    &p.tables,
                    "list at least one table (`schema.table` or `schema.*`)".into(),
                ));
            }
            let mut tables = Vec::new();
            for t in p.tables.get_ref() {
                let pattern = TablePattern::parse(t.get_ref())
                    .map_err(|m| cx.invalid(&format!("pipelines.{name}.tables"), t, m))?;
                tables.push(pattern);
            }
            let missing_rows = match &p.missing_rows {
                None => MissingRows::default(),
                Some(v) => MissingRows::parse(v.get_ref())
                    .map_err(|m| cx.invalid(&format!("pipelines.{name}.missing_rows"), v, m))?,
            };
            let mut sequences = Vec::new();
            for q in &p.sequences {
                let key = format!("pipelines.{name}.sequences");
                match TablePattern::parse(q.get_ref()) {
                    Ok(TablePattern {
                        schema,
                        table: Some(seq),
                    }) => sequences.push(crate::pg::TableName::new(&schema, &seq)),
                    Ok(_) => {
                        return Err(cx.invalid(
                            &key,
                            q,
                            "name one sequence (`schema.sequence`), not a schema".into(),
                        ))
                    }
                    Err(m) => return Err(cx.invalid(&key, q, m)),
                }
            }
            let sequence_interval = match &p.sequence_interval {
                None => DEFAULT_SEQUENCE_INTERVAL,
                Some(v) => match humantime::parse_duration(v.get_ref()) {
                    Ok(d) if !d.is_zero() => d,
                    _ => {
                        return Err(cx.invalid(
                            &format!("pipelines.{name}.sequence_interval"),
                            v,
                            format!(
                                "`{}` is not a duration; write e.g. \"30s\" or \"5m\"",
                                v.get_ref()
                            ),
                        ))
                    }
                },
            };
            let mut application_roles: Vec<String> = Vec::new();
            for r in &p.application_roles {
                let role = r.get_ref();
                if role.is_empty() || application_roles.contains(role) {
                    return Err(cx.invalid(
                        &format!("pipelines.{name}.application_roles"),
                        r,
                        format!("`{role}` is empty or listed twice; list each role the application writes with once"),
                    ));
                }
                application_roles.push(role.clone());
            }
            let max_retained_wal = match &p.max_retained_wal {
                None => None,
                Some(v) => Some(parse_wal_size(v.get_ref()).map_err(|m| {
                    cx.invalid(&format!("pipelines.{name}.max_retained_wal"), v, m)
                })?),
            };
            let max_target_downtime = match &p.max_target_downtime {
                None => None,
                Some(v) => match humantime::parse_duration(v.get_ref()) {
                    Ok(d) if !d.is_zero() => Some(d),
                    _ => {
                        return Err(cx.invalid(
                            &format!("pipelines.{name}.max_target_downtime"),
                            v,
                            format!(
                                "`{}` is not a duration; write e.g. \"30m\" or \"6h\"",
                                v.get_ref()
                            ),
                        ))
                    }
                },
            };
            pipelines.insert(
                name.clone(),
                PipelineConfig {
                    name,
                    source,
                    targets,
                    tables,
                    missing_rows,
                    sequences,
                    sequence_interval,
                    application_roles,
                    max_retained_wal,
                    max_target_downtime,
                },
            );
        }

        let mut repositories = BTreeMap::new();
        for (name, r) in raw.repositories {
            // Every value is checked that can be; the first unset variable, if any, is what
            // keeps the repository from use.
            let mut unset = None;
            let mut resolve = |key: String, value: &Spanned<String>| {
                Ok::<_, ConfigError>(match cx.interpolate(&key, value)? {
                    Ok(v) => Some(v),
                    Err(u) => {
                        unset.get_or_insert(u);
                        None
                    }
                })
            };
            let key = format!("repositories.{name}.url");
            let url = match resolve(key.clone(), &r.url)? {
                Some(text) => {
                    Some(parse_repository_url(&text).map_err(|m| cx.invalid(&key, &r.url, m))?)
                }
                None => None,
            };
            let mut recipients = Vec::new();
            for rec in &r.recipients {
                let key = format!("repositories.{name}.recipients");
                let Some(value) = resolve(key.clone(), rec)? else {
                    continue;
                };
                if value.parse::<age::x25519::Recipient>().is_err() {
                    return Err(cx.invalid(
                        &key,
                        rec,
                        format!("`{value}` is not an age X25519 recipient; expected `age1...` as printed by `age-keygen -y KEYFILE`"),
                    ));
                }
                recipients.push(value);
            }
            let identity_file = match &r.identity_file {
                Some(v) => {
                    resolve(format!("repositories.{name}.identity_file"), v)?.map(PathBuf::from)
                }
                None => None,
            };
            let passphrase = match &r.passphrase {
                Some(v) => resolve(format!("repositories.{name}.passphrase"), v)?.map(Secret::new),
                None => None,
            };
            let mut options = BTreeMap::new();
            for (k, v) in &r.options {
                if let Some(value) = resolve(format!("repositories.{name}.options.{k}"), v)? {
                    options.insert(k.clone(), value);
                }
            }
            let entry = match (unset, url) {
                (None, Some(url)) => Ok(RepositoryConfig {
                    name: name.clone(),
                    url,
                    recipients,
                    identity_file,
                    passphrase,
                    options,
                }),
                (Some(u), _) => Err(u),
                (None, None) => unreachable!("a URL is missing only when a variable is unset"),
            };
            repositories.insert(name, entry);
        }

        let agent = cx.agent(raw.agent, &databases)?;
        let names = agent::Names {
            databases: &databases,
            pipelines: &pipelines,
            repositories: &repositories,
        };
        let schedules = cx.schedules(raw.schedules, agent.time_zone, &names)?;
        let blackouts = cx.blackouts(raw.blackouts, agent.time_zone, &names)?;
        let archives = cx.archives(raw.archives, &names)?;

        Ok(Config {
            path: path.to_path_buf(),
            databases,
            pipelines,
            repositories,
            agent,
            schedules,
            blackouts,
            archives,
        })
    }

    /// The database called `name`, or an error listing the ones there are, or naming the
    /// variable its URL needs.
    pub fn database(&self, name: &str) -> Result<&DatabaseConfig, String> {
        match self.databases.get(name) {
            None => Err(unknown("database", name, self.databases.keys(), &self.path)),
            Some(Ok(db)) => Ok(db),
            Some(Err(unset)) => Err(unset
                .needed_for(format!("connecting to database `{name}`"))
                .to_string()),
        }
    }

    /// The pipeline called `name`, or an error listing the ones there are.
    pub fn pipeline(&self, name: &str) -> Result<&PipelineConfig, String> {
        self.pipelines
            .get(name)
            .ok_or_else(|| unknown("pipeline", name, self.pipelines.keys(), &self.path))
    }

    /// The repository called `name`; with `None`, the only one configured.
    pub fn repository<'a>(&'a self, name: Option<&str>) -> Result<&'a RepositoryConfig, String> {
        let ready = |name: &str, entry: &'a Result<RepositoryConfig, UnsetVariable>| {
            entry.as_ref().map_err(|unset| {
                unset
                    .needed_for(format!("opening repository `{name}`"))
                    .to_string()
            })
        };
        match name {
            Some(n) => match self.repositories.get(n) {
                Some(entry) => ready(n, entry),
                None => Err(unknown(
                    "repository",
                    n,
                    self.repositories.keys(),
                    &self.path,
                )),
            },
            None => {
                let mut all = self.repositories.iter();
                match (all.next(), all.next()) {
                    (Some((n, r)), None) => ready(n, r),
                    (None, _) => Err(format!(
                        "{} has no [repositories.NAME] section; add one",
                        self.path.display()
                    )),
                    (Some(_), Some(_)) => Err(format!(
                        "{} has several repositories ({}); choose one with --repo",
                        self.path.display(),
                        self.repositories
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            }
        }
    }
}

/// A database named on the command line: the name of a configured database, or a libpq
/// connection string (a `postgres://` URI or `host=... dbname=...` pairs) used as it is and
/// labelled with its password hidden. A name needs a configuration.
///
/// A connection string is never echoed as given, not even in an error: it may hold a password.
pub fn database_arg(config: Option<&Config>, arg: &str) -> Result<DatabaseConfig, String> {
    if let Some(config) = config.filter(|c| c.databases.contains_key(arg)) {
        return config.database(arg).cloned();
    }
    if ConnInfo::is_connection_string(arg) {
        let conn = ConnInfo::parse(arg).map_err(|e| format!("database connection string: {e}"))?;
        return Ok(DatabaseConfig {
            name: conn.to_string(),
            conn,
        });
    }
    let config = config.ok_or_else(|| {
        format!("database {arg} needs a configuration file; pass --config, a postgres:// URL or host=... dbname=... pairs")
    })?;
    config.database(arg).cloned()
}

fn unknown<'a>(
    kind: &str,
    name: &str,
    known: impl Iterator<Item = &'a String>,
    path: &Path,
) -> String {
    let known: Vec<&str> = known.map(String::as_str).collect();
    if known.is_empty() {
        format!("unknown {kind} `{name}`: {} defines none", path.display())
    } else {
        format!(
            "unknown {kind} `{name}`; {} defines: {}",
            path.display(),
            known.join(", ")
        )
    }
}

/// Accepts the URL schemes `object_store` can serve.
fn parse_repository_url(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s).map_err(|e| {
        format!("`{s}` is not a URL ({e}); use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")
    })?;
    match url.scheme() {
        "file" | "memory" => Ok(url),
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
            if url.host_str().unwrap_or("").is_empty() {
                Err(format!(
                    "`{s}` names no bucket; write {}://BUCKET/prefix",
                    url.scheme()
                ))
            } else {
                Ok(url)
            }
        }
        other => Err(format!(
            "unsupported scheme `{other}:`; use file://, s3://, gs:// or az://"
        )),
    }
}

struct Context<'a> {
    path: &'a Path,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Context<'_> {
    fn line_of<T>(&self, spanned: &Spanned<T>) -> usize {
        line_at(self.text, spanned.span().start)
    }

    fn invalid<T>(&self, key: &str, at: &Spanned<T>, message: String) -> ConfigError {
        self.invalid_at(key, at.span().start, message)
    }

    /// The same for a value known by its byte offset in the file.
    fn invalid_at(&self, key: &str, offset: usize, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: line_at(self.text, offset),
            key: key.to_string(),
            message,
        }
    }

    /// Replaces each `${NAME}` with the variable's value; `$${` stands for a literal `${`.
    /// A malformed reference is an error now; an unset variable is returned for the caller to
    /// keep until the value is used.
    fn interpolate(
        &self,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<Result<String, UnsetVariable>, ConfigError> {
        let s = value.get_ref();
        let mut out = String::with_capacity(s.len());
        let mut rest = s.as_str();
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix("${") {
                out.push_str("${");
                rest = tail;
            } else if let Some(tail) = after.strip_prefix('{') {
                let Some(end) = tail.find('}') else {
                    return Err(self.invalid(key, value, "unclosed `${`; write ${NAME}".into()));
                };
                let name = &tail[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(self.invalid(
                        key,
                        value,
                        format!("`${{{name}}}` is not an environment variable name"),
                    ));
                }
                match (self.env)(name) {
                    Some(v) => out.push_str(&v),
                    None => {
                        return Ok(Err(UnsetVariable {
                            variable: name.to_string(),
                            path: self.path.to_path_buf(),
                            line: self.line_of(value),
                            key: key.to_string(),
                            needed_for: None,
                        }))
                    }
                }
                rest = &tail[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        Ok(Ok(out))
    }
}

/// A WAL size as PostgreSQL writes it (`max_slot_wal_keep_size`): a whole number with `kB`,
/// `MB`, `GB` or `TB`, or bytes without a unit.
fn parse_wal_size(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let unit: u64 = match v[digits..].trim() {
        "" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => 0,
    };
    match v[..digits]
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
    {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "`{value}` is not a WAL size; write e.g. \"512MB\" or \"4GB\""
        )),
    }
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// toml's message spans several lines with a source excerpt; keep it to one line with the
/// line number first. The excerpt could hold a secret, so it is dropped.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let first = e.message().lines().next().unwrap_or("invalid TOML").trim();
    match e.span() {
        Some(span) => format!("line {}: {first}", line_at(text, span.start)),
        None => first.to_string(),
    }
}

/// The commented example written by `invsync init`.
pub const EXAMPLE: &str = r#"# invsync configuration. Values may use ${ENV_VAR}; keep secrets in the environment.

# Databases invsync connects to. sslmode: disable, prefer, require, verify-ca, verify-full.
# A unix-socket host is written as host=/var/run/postgresql in the query string.
[databases.maindc]
url = "postgres://invsync@127.0.0.1:5432/einvoice?sslmode=prefer"

[databases.cloud_a]
url = "${CLOUD_A_URL}"

# CDC replication from a source database to one or more targets.
[pipelines.invoices_to_cloud]
source = "maindc"
targets = ["cloud_a"]
tables = ["public.invoice", "public.invoice_item"]   # "schema.*" for a whole schema

# Backup repositories in object storage: file:///path, s3://bucket/prefix, gs://..., az://...
[repositories.offsite]
url = "file:///var/backups/invsync"
recipients = ["age1..."]                       # age public keys that can read the backups
identity_file = "/etc/invsync/backup.key"      # age secret key: restore, verify, prune
# passphrase = "${INVSYNC_PASSPHRASE}"         # alternative to identities
# options = { aws_endpoint = "http://127.0.0.1:9000", aws_region = "ap-northeast-1" }

# Scheduled jobs and the peak calendar; `invsync agent --check` prints their next runs.
# [agent]
# time_zone = "Asia/Taipei"                    # schedules and windows are read on its clock
# lease_duration = 15                          # seconds; a standby takes over within 30 s
# renew_interval = 5                           # the holder stops work 10 s after its last renewal
# lease_db = "maindc"                          # one database for every lease (default: each
#                                              # pipeline's or job's own database)
#
# [[schedules]]
# name = "nightly-backup"
# cron = "0 30 2 * * *"                        # sec min hour day-of-month month day-of-week
# job = "backup"                               # backup | verify | forget | prune
# repo = "offsite"
# db = "maindc"
# missed = "run-once"                          # or "skip": runs missed while the agent was down
# during_blackout = "defer"                    # or "skip", "ignore"
#
# [[blackouts]]                                # heavy jobs do not start on its databases
# name = "prize-draw"
# months = "odd"
# start_day = 24                               # 24th 00:00 to 26th 24:00
# end_day = 26
# databases = ["maindc"]
"#;

/// Writes the example configuration to `path`; never overwrites an existing file.
pub fn write_example(path: &Path) -> Result<(), ConfigError> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                ConfigError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::Write {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    file.write_all(EXAMPLE.as_bytes())
        .map_err(|source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text, &|name| match name {
            "CLOUD_URL" => Some("postgres://u:s3cret@10.0.0.1/db".into()),
            _ => None,
        })
    }

    const GOOD: &str = r#"
[databases.maindc]
url = "postgres://invsync@127.0.0.1:5432/einvoice?sslmode=prefer"
[databases.cloud_a]
url = "${CLOUD_URL}"
[pipelines.p]
source = "maindc"
targets = ["cloud_a"]
tables = ["public.invoice", "audit.*"]
[repositories.offsite]
url = "file:///tmp/repo"
recipients = ["age194c3vs4hy6cygqtz0j5lhtpj7hy9xra3jq7vfkczykr30ys6fzqsywtajt"]
"#;

    const RECIPIENT: &str = "age194c3vs4hy6cygqtz0j5lhtpj7hy9xra3jq7vfkczykr30ys6fzqsywtajt";

    #[test]
    fn parses_the_contract_keys() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.pipelines["p"].targets, vec!["cloud_a"]);
        assert_eq!(
            c.pipelines["p"].tables[1],
            TablePattern::parse("audit.*").unwrap()
        );
        assert_eq!(c.pipelines["p"].tables[1].table, None);
        assert_eq!(
            c.database("cloud_a").unwrap().conn.to_string(),
            "postgres://u:***@10.0.0.1/db"
        );
        assert_eq!(c.repository(None).unwrap().url.scheme(), "file");
    }

    #[test]
    fn missing_rows_policy_defaults_to_warn_and_refuses_other_words() {
        assert_eq!(
            parse(GOOD).unwrap().pipelines["p"].missing_rows,
            MissingRows::Warn
        );
        let with = |policy: &str| {
            GOOD.replace(
                "tables = [\"public.invoice\", \"audit.*\"]",
                &format!("tables = [\"public.invoice\", \"audit.*\"]\nmissing_rows = \"{policy}\""),
            )
        };
        assert_eq!(
            parse(&with("stop")).unwrap().pipelines["p"].missing_rows,
            MissingRows::Stop
        );
        assert_eq!(
            parse(&with("apply")).unwrap().pipelines["p"].missing_rows,
            MissingRows::Apply
        );
        let e = parse(&with("insert")).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "t.toml:10: pipelines.p.missing_rows: `insert` is not a policy; use \"warn\""
            ),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn cut_loose_limits_read_postgres_sizes_and_durations() {
        let with = |line: &str| {
            GOOD.replace(
                "tables = [\"public.invoice\", \"audit.*\"]",
                &format!("tables = [\"public.invoice\", \"audit.*\"]\n{line}"),
            )
        };
        let p = &parse(GOOD).unwrap().pipelines["p"];
        assert_eq!((p.max_retained_wal, p.max_target_downtime), (None, None));
        let size = |v: &str| {
            parse(&with(&format!("max_retained_wal = \"{v}\"")))
                .map(|c| c.pipelines["p"].max_retained_wal)
        };
        assert_eq!(size("512MB").unwrap(), Some(512 << 20));
        assert_eq!(size("4GB").unwrap(), Some(4 << 30));
        assert_eq!(size("65536").unwrap(), Some(65536));
        let e = size("4 gigs").unwrap_err().to_string();
        assert!(
            e.starts_with("t.toml:10: pipelines.p.max_retained_wal: `4 gigs` is not a WAL size"),
            "{e}"
        );
        assert!(size("0MB").is_err());
        let c = parse(&with("max_target_downtime = \"6h\"")).unwrap();
        assert_eq!(
            c.pipelines["p"].max_target_downtime,
            Some(std::time::Duration::from_secs(6 * 3600))
        );
        assert!(parse(&with("max_target_downtime = \"soon\"")).is_err());
    }

    #[test]
    fn example_parses() {
        let c = Config::parse(Path::new("e.toml"), EXAMPLE, &|_| {
            Some("postgres://x@h/db".into())
        });
        assert!(
            c.is_err(),
            "the example's recipient placeholder must be replaced"
        );
        let text = EXAMPLE.replace("age1...", RECIPIENT);
        let c = Config::parse(Path::new("e.toml"), &text, &|_| {
            Some("postgres://x@h/db".into())
        })
        .unwrap();
        assert_eq!(c.pipelines.len(), 1);
        // The commented agent sections are valid once uncommented.
        let (head, agent) = text.split_at(text.find("# [agent]").unwrap());
        let agent: Vec<&str> = agent
            .lines()
            .map(|l| l.strip_prefix('#').unwrap_or(l))
            .collect();
        let text = format!("{head}{}", agent.join("\n"));
        let c = Config::parse(Path::new("e.toml"), &text, &|_| {
            Some("postgres://x@h/db".into())
        })
        .unwrap();
        assert_eq!(c.schedules[0].name, "nightly-backup");
        assert_eq!(c.blackouts[0].databases, Some(vec!["maindc".to_string()]));
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err(&GOOD.replace("targets = [", "tragets = [\"x\"]\ntargets = ["));
        assert!(e.contains("line 8") && e.contains("tragets"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn unknown_database_reference() {
        let e = err(&GOOD.replace("source = \"maindc\"", "source = \"nope\""));
        assert!(
            e.contains("t.toml:7: pipelines.p.source") && e.contains("`nope`"),
            "{e}"
        );
        let e = err(&GOOD.replace("[\"cloud_a\"]", "[\"cloud_b\"]"));
        assert!(
            e.contains("pipelines.p.targets") && e.contains("cloud_b"),
            "{e}"
        );
    }

    #[test]
    fn malformed_urls() {
        let e = err(&GOOD.replace("file:///tmp/repo", "ftp://x/y"));
        assert!(
            e.contains(":11: repositories.offsite.url") && e.contains("ftp"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "postgres://invsync@127.0.0.1:5432/einvoice?sslmode=prefer",
            "mysql://x/y",
        ));
        assert!(e.contains(":3: databases.maindc.url"), "{e}");
        let e = err(&GOOD.replace("sslmode=prefer", "sslmode=sometimes"));
        assert!(e.contains("sslmode"), "{e}");
    }

    #[test]
    fn unset_variable_fails_only_the_use_that_needs_it() {
        let text = GOOD.replace("${CLOUD_URL}", "${NOPE_URL}")
            + "passphrase = \"${NOPE_PASS}\"\n[repositories.other]\nurl = \"file:///tmp/other\"\nrecipients = [\"RCPT\"]\n";
        let c = parse(&text.replace("RCPT", RECIPIENT)).unwrap();
        assert!(c.database("maindc").is_ok());
        assert!(c.repository(Some("other")).is_ok());
        let e = c.database("cloud_a").unwrap_err();
        assert_eq!(
            e,
            "t.toml:5: databases.cloud_a.url: environment variable NOPE_URL is not set, and \
             connecting to database `cloud_a` needs it; export NOPE_URL or edit the value"
        );
        let e = c.repository(Some("offsite")).unwrap_err();
        assert!(
            e.starts_with(
                "t.toml:13: repositories.offsite.passphrase: environment variable NOPE_PASS"
            ) && e.contains("opening repository `offsite` needs it"),
            "{e}"
        );
        // The rest of an unusable repository is still checked when the file is loaded.
        let e = err(&text.replace("RCPT", "age1abc"));
        assert!(e.contains("repositories.other.recipients"), "{e}");
        let e = err(&(GOOD.replace(RECIPIENT, "age1abc") + "passphrase = \"${NOPE_PASS}\"\n"));
        assert!(e.contains("repositories.offsite.recipients"), "{e}");
        // A malformed reference is still an error at load.
        let e = err(&GOOD.replace("${CLOUD_URL}", "${CLOUD URL}"));
        assert!(
            e.contains(":5:") && e.contains("not an environment variable name"),
            "{e}"
        );
    }

    #[test]
    fn secret_is_not_shown() {
        let e = err(&GOOD
            .replace("sslmode=prefer", "sslmode=bogus")
            .replace("invsync@127", "invsync:hunter2@127"));
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn interpolation_escape() {
        let c = parse(&GOOD.replace("/tmp/repo", "/tmp/$${X}")).unwrap();
        assert_eq!(c.repository(None).unwrap().url.path(), "/tmp/$%7BX%7D");
        let e = err(&GOOD.replace(RECIPIENT, "age1abc"));
        assert!(
            e.contains("repositories.offsite.recipients") && e.contains("age-keygen"),
            "{e}"
        );
    }
}
