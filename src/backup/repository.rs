//! The repository: its format, its keys, and typed access to its objects over `object_store`.
//!
//! # Format, version 1
//!
//! All paths are relative to the repository prefix.
//!
//! | object | content |
//! | --- | --- |
//! | `config` | plaintext JSON: `format` = "invsync-repository", `version` = 1, repository `id`, the repository `recipient` (age X25519 public key), chunker sizes |
//! | `keys/<key id>` | JSON: key `id`, `kind` (`x25519` or `passphrase`), the reader's public `recipient` (x25519 only), `created`, and `wrapped`: the master key (see [`crypto`](super::crypto)) age-encrypted to that reader, armored |
//! | `data/<2 hex>/<pack id>` | a pack (see [`pack`](super::pack)) |
//! | `index/<id>` | an encrypted, zstd-compressed JSON [`IndexFile`](super::index::IndexFile) |
//! | `snapshots/<id>` | an encrypted, zstd-compressed JSON [`Snapshot`](super::snapshot::Snapshot), written last |
//! | `locks/<kind>-<ms>-<uuid>` | an encrypted lock body (see [`lock`](super::lock)) |
//! | `archive/data/<hash>` | an encrypted, zstd-compressed JSON [`SegmentData`](super::archive::SegmentData): one archive segment's transactions as raw `pgoutput` messages (see [`archive`](super::archive)) |
//! | `archive/segments/<hash>` | an encrypted, zstd-compressed JSON [`SegmentManifest`](super::archive::SegmentManifest) (database, slot, LSN and commit-time range, transaction count, its data object), written after its data |
//! | `fences/<lease id>/<epoch>` | an encrypted record of an agent lease's epoch that ran a backup (see [`fence`](super::fence)); create-only |
//!
//! Encrypted objects start with the plaintext header `INVSYNC1 | kind | wrapped object key`.
//! Object names other than locks and keys are the blake3 hash of the object's bytes, and every
//! object except locks is written create-only (`PutMode::Create`; stores without conditional
//! create get a check for existence first), so nothing is ever overwritten. Locks are the one
//! mutable object: their owner refreshes them.
//!
//! Table data in a snapshot: each table lists its chunk ids in order (their plaintexts, one
//! after the other, are the table's COPY text), its row and byte counts, and, since the
//! incremental backups, `segments`: the key ranges the chunks are grouped by (bounds as the
//! text of each key column, row and byte counts, how many of the table's chunks each holds),
//! the relation oids and the text shape they were read with, and, per snapshot, `cut` (the
//! cluster, timeline and snapshot xmin/xmax of the cut); see [`segment`](super::segment).
//! Both are additions that change no existing field's meaning: readers that do not know them
//! (earlier invsync versions ignore unknown fields) still restore, verify and prune correctly,
//! and snapshots without them are read as tables to be read whole next time. So the format
//! stays version 1.
//!
//! A reader (recipient or passphrase) is added or removed by writing or deleting one `keys/`
//! object; removal cannot take back a master key someone already unwrapped.
//!
//! # Damage and weather
//!
//! Only what the repository's bytes say is damage (`Corrupt`): an object that does not
//! decrypt, parse or match its hash, or one that does not exist where the format says it
//! must. A store that fails or refuses a request, after the store client's own retries
//! (bounded by the repository option `retry_timeout`), is `Unreachable`, keeping the
//! object_store error as its source, so callers tell a network blip or a denied credential
//! from a damaged repository. While a request goes unanswered, a line is logged every
//! [`SLOW_NOTICE`], so a hung endpoint is never silent.

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use age::secrecy::SecretString;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::crypto::{Keyring, MasterKey, Reader};
use super::store::{self, Location};
use super::{chunker, BackupError};
use crate::config::RepositoryConfig;

pub const FORMAT: &str = "invsync-repository";
/// How often a store request that has not answered yet is reported.
pub const SLOW_NOTICE: Duration = Duration::from_secs(10);
pub const VERSION: u32 = 1;

/// The plaintext `config` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    /// The repository recipient: objects are encrypted to it.
    pub recipient: String,
    pub chunker: ChunkerParams,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

/// A `keys/` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub id: String,
    pub kind: KeyKind,
    pub recipient: Option<String>,
    pub created: DateTime<Utc>,
    pub wrapped: String,
}

/// What `invsync key list --json` shows of a key: everything but the wrapped key.
#[derive(Debug, Clone, Serialize)]
pub struct KeySummary {
    pub created: DateTime<Utc>,
    pub id: String,
    pub kind: KeyKind,
    pub recipient: Option<String>,
}

impl From<&KeyFile> for KeySummary {
    fn from(k: &KeyFile) -> KeySummary {
        KeySummary {
            created: k.created,
            id: k.id.clone(),
            kind: k.kind,
            recipient: k.recipient.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    X25519,
    Passphrase,
}

/// An open repository.
pub struct Repository {
    /// The configured name, for messages.
    pub name: String,
    pub location: Location,
    pub config: RepoConfig,
    pub keys: Keyring,
}

impl Repository {
    fn label(cfg: &RepositoryConfig) -> String {
        format!("{} ({})", cfg.name, cfg.url)
    }

    /// Creates the repository: refuses one that exists; wraps a new master key for every
    /// configured recipient and the passphrase.
    pub async fn init(cfg: &RepositoryConfig) -> Result<Repository, BackupError> {
        let label = Self::label(cfg);
        let mut readers = Vec::new();
        for r in &cfg.recipients {
            readers.push(parse_recipient(r, &label)?);
        }
        if let Some(p) = &cfg.passphrase {
            readers.push(Reader::Passphrase(SecretString::from(
                p.expose().to_string(),
            )));
        }
        if readers.is_empty() {
            return Err(BackupError::Key {
                repo: label,
                message: "no recipients and no passphrase configured: nobody could read it; add `recipients` or `passphrase`".into(),
            });
        }
        let location = store::open(cfg, true)?;
        let master = MasterKey::generate();
        let config = RepoConfig {
            format: FORMAT.into(),
            version: VERSION,
            id: uuid::Uuid::new_v4().simple().to_string(),
            recipient: master.identity.to_public().to_string(),
            chunker: ChunkerParams {
                min: chunker::MIN_CHUNK,
                avg: chunker::AVG_CHUNK,
                max: chunker::MAX_CHUNK,
            },
        };
        let repo = Repository {
            name: label.clone(),
            location,
            keys: Keyring {
                recipient: master.identity.to_public(),
                master: Some(master),
            },
            config,
        };
        // Keys first, config last: a repository without `config` is not one, so a crash here
        // leaves something `repo init` can be rerun over (key objects have fresh names).
        if repo.exists("config").await? {
            return Err(BackupError::Exists { repo: label });
        }
        for reader in &readers {
            repo.add_key_for(reader).await?;
        }
        let bytes = serde_json::to_vec_pretty(&repo.config)
            .map_err(|e| BackupError::Invalid(e.to_string()))?;
        match repo.put_create("config", bytes).await {
            Err(BackupError::Exists { .. }) => Err(BackupError::Exists { repo: label }),
            other => other.map(|_| repo),
        }
    }

    /// Opens the repository. With `identity_file` or `passphrase` configured, unwraps the
    /// master key (a wrong key is an error before anything is written); without, the host is
    /// write-only.
    pub async fn open(cfg: &RepositoryConfig) -> Result<Repository, BackupError> {
        let label = Self::label(cfg);
        let location = store::open(cfg, false)?;
        let raw = {
            let path = location.prefix.clone().join("config");
            let read = async {
                match location.store.get(&path).await {
                    Ok(r) => r.bytes().await,
                    Err(e) => Err(e),
                }
            };
            watched(&label, "read config", location.retry_timeout, read).await
        };
        let raw = match raw {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BackupError::NotInitialised { repo: label })
            }
            Err(source) => {
                return Err(BackupError::Unreachable {
                    repo: label,
                    action: "read config".into(),
                    source,
                })
            }
        };
        let config: RepoConfig =
            serde_json::from_slice(&raw).map_err(|e| BackupError::Corrupt {
                object: format!("{label}/config"),
                reason: e.to_string(),
            })?;
        if config.format != FORMAT || config.version != VERSION {
            return Err(BackupError::Invalid(format!(
                "repository {label} has format {} version {}; this invsync reads {FORMAT} version {VERSION}",
                config.format, config.version
            )));
        }
        let recipient = age::x25519::Recipient::from_str(&config.recipient).map_err(|e| {
            BackupError::Corrupt {
                object: format!("{label}/config"),
                reason: format!("bad repository recipient: {e}"),
            }
        })?;
        let mut repo = Repository {
            name: label.clone(),
            location,
            config,
            keys: Keyring {
                recipient,
                master: None,
            },
        };

        let mut identities: Vec<Box<dyn age::Identity>> = Vec::new();
        if let Some(path) = &cfg.identity_file {
            let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
                .map_err(|e| BackupError::io(path.display(), e))?;
            identities = file.into_identities().map_err(|e| BackupError::Key {
                repo: label.clone(),
                message: format!("identity file {}: {e}", path.display()),
            })?;
        }
        if cfg.identity_file.is_none() && cfg.passphrase.is_none() {
            return Ok(repo);
        }
        let key_files = repo.list_keys().await?;
        for kf in &key_files {
            let result = match (kf.kind, &cfg.passphrase) {
                (KeyKind::X25519, _) if !identities.is_empty() => {
                    MasterKey::unwrap(&kf.wrapped, &identities)
                }
                (KeyKind::Passphrase, Some(p)) => {
                    let id = age::scrypt::Identity::new(SecretString::from(p.expose().to_string()));
                    MasterKey::unwrap(&kf.wrapped, &[Box::new(id) as Box<dyn age::Identity>])
                }
                _ => continue,
            };
            if let Ok(master) = result {
                if master.identity.to_public().to_string() != repo.config.recipient {
                    return Err(BackupError::Corrupt {
                        object: format!("{label}/keys/{}", kf.id),
                        reason: "it holds a key that does not belong to this repository".into(),
                    });
                }
                repo.keys.master = Some(master);
                return Ok(repo);
            }
        }
        let what = match (cfg.identity_file.is_some(), cfg.passphrase.is_some()) {
            (true, true) => "identity_file or passphrase",
            (true, false) => "identity_file",
            _ => "passphrase",
        };
        Err(BackupError::Key {
            repo: label,
            message: format!(
                "the configured {what} opens none of its {} key(s); check it, or have a reader run `invsync key add` for it",
                key_files.len()
            ),
        })
    }

    /// The master key, or an error saying this host is write-only.
    pub fn master(&self, action: &str) -> Result<&MasterKey, BackupError> {
        self.keys
            .master
            .as_ref()
            .ok_or_else(|| BackupError::WriteOnly {
                repo: self.name.clone(),
                action: action.into(),
            })
    }

    pub fn path(&self, rel: &str) -> Path {
        let mut p = self.location.prefix.clone();
        for part in rel.split('/') {
            p = p.join(part);
        }
        p
    }

    fn unreachable(&self, action: String, source: object_store::Error) -> BackupError {
        BackupError::Unreachable {
            repo: self.name.clone(),
            action,
            source,
        }
    }

    /// Runs one store request for `action`, reporting it while it goes unanswered.
    async fn watched<T>(&self, action: &str, request: impl Future<Output = T>) -> T {
        watched(&self.name, action, self.location.retry_timeout, request).await
    }

    pub async fn exists(&self, rel: &str) -> Result<bool, BackupError> {
        let action = format!("look for {rel}");
        match self
            .watched(&action, self.location.store.head(&self.path(rel)))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.unreachable(action, e)),
        }
    }

    /// Writes a new object; `Exists` if something is already there.
    pub async fn put_create(&self, rel: &str, bytes: Vec<u8>) -> Result<(), BackupError> {
        let (path, label) = (self.path(rel), format!("{}/{rel}", self.name));
        let write = put_create_at(&self.location.store, &path, bytes, &label);
        self.watched(&format!("write {rel}"), write).await
    }

    /// An object's bytes; a missing object is `Corrupt` ("does not exist"): callers read
    /// what the format says must be there.
    pub async fn get(&self, rel: &str) -> Result<Bytes, BackupError> {
        let action = format!("read {rel}");
        let read = async {
            match self.location.store.get(&self.path(rel)).await {
                Ok(r) => r.bytes().await,
                Err(e) => Err(e),
            }
        };
        self.watched(&action, read).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => BackupError::Corrupt {
                object: format!("{}/{rel}", self.name),
                reason: "it does not exist".into(),
            },
            e => self.unreachable(action, e),
        })
    }

    /// A byte range of an object that was listed when the job started; its absence now is
    /// `Vanished` (removed meanwhile), not damage.
    pub async fn get_range(
        &self,
        rel: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, BackupError> {
        let action = format!("read {rel}");
        self.watched(
            &action,
            self.location.store.get_range(&self.path(rel), range),
        )
        .await
        .map_err(|e| match e {
            object_store::Error::NotFound { .. } => BackupError::Vanished {
                object: format!("{}/{rel}", self.name),
            },
            e => self.unreachable(action, e),
        })
    }

    pub async fn delete(&self, rel: &str) -> Result<(), BackupError> {
        let action = format!("delete {rel}");
        match self
            .watched(&action, self.location.store.delete(&self.path(rel)))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unreachable(action, e)),
        }
    }

    /// Objects below `dir`, with paths relative to `dir`.
    pub async fn list(&self, dir: &str) -> Result<Vec<(String, ObjectMeta)>, BackupError> {
        let base = self.path(dir);
        let action = format!("list {dir}/");
        let metas: Vec<ObjectMeta> = self
            .watched(&action, self.location.store.list(Some(&base)).try_collect())
            .await
            .map_err(|e| self.unreachable(action, e))?;
        let mut out: Vec<(String, ObjectMeta)> = metas
            .into_iter()
            .filter_map(|m| {
                let rel = m
                    .location
                    .prefix_match(&base)?
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>();
                (!rel.is_empty()).then(|| (rel.join("/"), m))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Names of the objects directly in `dir`.
    pub async fn list_names(&self, dir: &str) -> Result<Vec<String>, BackupError> {
        Ok(self.list(dir).await?.into_iter().map(|(n, _)| n).collect())
    }

    /// Seals `value` as an object of `kind` in `dir`, named by its hash; returns the name.
    pub async fn write_object<T: Serialize>(
        &self,
        kind: u8,
        dir: &str,
        value: &T,
    ) -> Result<String, BackupError> {
        let bytes = self.seal(kind, value)?;
        let name = blake3::hash(&bytes).to_hex().to_string();
        self.put_create(&format!("{dir}/{name}"), bytes).await?;
        Ok(name)
    }

    pub fn seal<T: Serialize>(&self, kind: u8, value: &T) -> Result<Vec<u8>, BackupError> {
        let plain = encode_body(value).map_err(BackupError::Invalid)?;
        self.keys
            .seal_object(kind, &plain)
            .map_err(|e| BackupError::Invalid(e.to_string()))
    }

    /// Reads and decrypts an object of `kind`; damage is `Corrupt` naming the object.
    pub async fn read_object<T: DeserializeOwned>(
        &self,
        kind: u8,
        rel: &str,
    ) -> Result<T, BackupError> {
        self.master("reading repository objects")?;
        let bytes = self.get(rel).await?;
        self.open_sealed(kind, rel, &bytes)
    }

    pub fn open_sealed<T: DeserializeOwned>(
        &self,
        kind: u8,
        rel: &str,
        bytes: &[u8],
    ) -> Result<T, BackupError> {
        let corrupt = |reason: String| BackupError::Corrupt {
            object: format!("{}/{rel}", self.name),
            reason,
        };
        let plain = self
            .keys
            .open_object(kind, bytes)
            .map_err(|e| corrupt(e.to_string()))?;
        decode_body(&plain).map_err(corrupt)
    }

    // ---- keys ----

    pub async fn list_keys(&self) -> Result<Vec<KeyFile>, BackupError> {
        let mut out = Vec::new();
        for name in self.list_names("keys").await? {
            let raw = self.get(&format!("keys/{name}")).await?;
            let kf: KeyFile = serde_json::from_slice(&raw).map_err(|e| BackupError::Corrupt {
                object: format!("{}/keys/{name}", self.name),
                reason: e.to_string(),
            })?;
            out.push(kf);
        }
        out.sort_by_key(|k| k.created);
        Ok(out)
    }

    async fn add_key_for(&self, reader: &Reader) -> Result<KeyFile, BackupError> {
        let master = self.master("adding a key")?;
        let wrapped = master
            .wrap(reader)
            .map_err(|e| BackupError::Invalid(e.to_string()))?;
        let (kind, recipient, id) = match reader {
            Reader::Recipient(r) => {
                let s = r.to_string();
                let id = blake3::hash(s.as_bytes()).to_hex()[..16].to_string();
                (KeyKind::X25519, Some(s), id)
            }
            Reader::Passphrase(_) => (
                KeyKind::Passphrase,
                None,
                uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
            ),
        };
        let kf = KeyFile {
            id: id.clone(),
            kind,
            recipient,
            created: Utc::now(),
            wrapped,
        };
        let bytes =
            serde_json::to_vec_pretty(&kf).map_err(|e| BackupError::Invalid(e.to_string()))?;
        match self.put_create(&format!("keys/{id}"), bytes).await {
            Err(BackupError::Exists { .. }) => Err(BackupError::Key {
                repo: self.name.clone(),
                message: format!("key {id} for this recipient exists already"),
            }),
            other => other.map(|_| kf),
        }
    }

    /// Adds a reader: an `age1...` recipient or a passphrase. Needs the master key.
    pub async fn add_key(
        &self,
        recipient: Option<&str>,
        passphrase: Option<SecretString>,
    ) -> Result<KeyFile, BackupError> {
        let reader = match (recipient, passphrase) {
            (Some(r), None) => parse_recipient(r, &self.name)?,
            (None, Some(p)) => Reader::Passphrase(p),
            _ => {
                return Err(BackupError::Invalid(
                    "give either a recipient or a passphrase".into(),
                ))
            }
        };
        self.add_key_for(&reader).await
    }

    /// Removes a reader's key; the last one cannot be removed.
    pub async fn remove_key(&self, id: &str) -> Result<KeyFile, BackupError> {
        self.master("removing a key")?;
        let keys = self.list_keys().await?;
        let kf = keys
            .iter()
            .find(|k| k.id == id)
            .cloned()
            .ok_or_else(|| BackupError::Key {
                repo: self.name.clone(),
                message: format!(
                    "no key `{id}`; `invsync key list` shows: {}",
                    keys.iter()
                        .map(|k| k.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        if keys.len() == 1 {
            return Err(BackupError::Key {
                repo: self.name.clone(),
                message: format!("key {id} is the only one; add another before removing it"),
            });
        }
        self.delete(&format!("keys/{id}")).await?;
        Ok(kf)
    }
}

/// An object body before encryption: `u64 BE length of the JSON | zstd(JSON)`.
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    let compressed = zstd::bulk::compress(&json, 3).map_err(|e| e.to_string())?;
    let mut plain = (json.len() as u64).to_be_bytes().to_vec();
    plain.extend_from_slice(&compressed);
    Ok(plain)
}

/// The value in a decrypted object body ([`encode_body`]): `u64 BE length of the JSON | zstd(JSON)` (what
/// [`Repository::seal`] writes). Authentication does not make the body trustworthy: anyone
/// who can write to the store knows the repository recipient and can seal any body, so this
/// checks everything and never panics.
pub fn decode_body<T: DeserializeOwned>(plain: &[u8]) -> Result<T, String> {
    let Some((len, compressed)) = plain.split_first_chunk::<8>() else {
        return Err("too short".into());
    };
    let len = u64::from_be_bytes(*len);
    // Bound the allocation: zstd cannot expand beyond ~ 1000x here, a corrupt length must not
    // ask for terabytes.
    if len > (compressed.len() as u64).saturating_mul(2000) + 1024 {
        return Err("implausible length".into());
    }
    let json = zstd::bulk::decompress(compressed, len as usize).map_err(|e| e.to_string())?;
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

fn parse_recipient(r: &str, label: &str) -> Result<Reader, BackupError> {
    age::x25519::Recipient::from_str(r)
        .map(Reader::Recipient)
        .map_err(|e| BackupError::Key {
            repo: label.to_string(),
            message: format!("`{r}` is not an age X25519 recipient: {e}"),
        })
}

/// Writes a new object at `path` (`label` names it in errors); `Exists` if something is there.
/// Stores without conditional create get a check for existence first: racy, but only ever
/// between writers of the same content-addressed bytes, or of `config` during `repo init`.
pub async fn put_create_at(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    path: &Path,
    bytes: Vec<u8>,
    label: &str,
) -> Result<(), BackupError> {
    let store_err = |source: object_store::Error| BackupError::Unreachable {
        repo: label.to_string(),
        action: "write it".into(),
        source,
    };
    let exists = || BackupError::Exists {
        repo: label.to_string(),
    };
    let payload = PutPayload::from(bytes);
    match store
        .put_opts(path, payload.clone(), PutOptions::from(PutMode::Create))
        .await
    {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. })
        | Err(object_store::Error::Precondition { .. }) => Err(exists()),
        Err(object_store::Error::NotImplemented { .. }) => match store.head(path).await {
            Ok(_) => Err(exists()),
            Err(object_store::Error::NotFound { .. }) => store
                .put(path, payload)
                .await
                .map(|_| ())
                .map_err(store_err),
            Err(e) => Err(store_err(e)),
        },
        Err(e) => Err(store_err(e)),
    }
}

/// Awaits `request`, logging every [`SLOW_NOTICE`] while it has not answered: the store
/// client retries a failing request silently for up to `retry_timeout`.
async fn watched<T>(
    repo: &str,
    action: &str,
    retry_timeout: Duration,
    request: impl Future<Output = T>,
) -> T {
    let mut request = std::pin::pin!(request);
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + SLOW_NOTICE, SLOW_NOTICE);
    loop {
        tokio::select! {
            answer = &mut request => return answer,
            _ = tick.tick() => tracing::warn!(
                "repository {repo}: still trying to {action}, no answer for {}s; retrying for up to {}s (repository option `retry_timeout`)",
                started.elapsed().as_secs(),
                retry_timeout.as_secs()
            ),
        }
    }
}
