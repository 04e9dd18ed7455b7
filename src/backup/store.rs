//! Opening the object store behind a repository URL.
//!
//! `s3://`, `gs://` and `az://` builders start from the standard environment credentials
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`) and then apply the repository's `options`; an unknown option
//! is an error rather than silently ignored. `file://` repositories live in a local directory.

use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;

use super::BackupError;
use crate::config::RepositoryConfig;

/// An object store and the prefix inside it where the repository lives.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The repository URL, for messages (it holds no secret: credentials live in options).
    pub url: String,
}

/// Builds the store for `repo`. With `create`, a missing local directory is created (for
/// `repo init`); otherwise its absence is an error that says to run `invsync repo init`.
pub fn open(repo: &RepositoryConfig, create: bool) -> Result<Location, BackupError> {
    let url = &repo.url;
    let err = |message: String| BackupError::Store {
        repo: format!("{} ({url})", repo.name),
        message,
    };
    let prefix_of = |path: &str| {
        Path::parse(path.trim_matches('/')).map_err(|e| err(format!("invalid path: {e}")))
    };
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => {
            if !repo.options.is_empty() {
                return Err(err("file:// repositories take no options".into()));
            }
            let dir = url
                .to_file_path()
                .map_err(|_| err("not a local path; write file:///absolute/path".into()))?;
            if create {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
            } else if !dir.is_dir() {
                return Err(err(format!(
                    "directory {} does not exist; run `invsync repo init` first",
                    dir.display()
                )));
            }
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| err(e.to_string()))?;
            return Ok(Location {
                store: Arc::new(fs),
                prefix: Path::default(),
                url: url.to_string(),
            });
        }
        "memory" => Arc::new(object_store::memory::InMemory::new()),
        "s3" | "s3a" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str());
            for (k, v) in &repo.options {
                let key = k.parse().map_err(|_| err(format!("unknown S3 option `{k}`")))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err(e.to_string()))?)
        }
        "gs" => {
            let mut b =
                object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url.as_str());
            for (k, v) in &repo.options {
                let key = k.parse().map_err(|_| err(format!("unknown GCS option `{k}`")))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err(e.to_string()))?)
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url.as_str());
            for (k, v) in &repo.options {
                let key = k.parse().map_err(|_| err(format!("unknown Azure option `{k}`")))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err(e.to_string()))?)
        }
        other => return Err(err(format!("unsupported scheme `{other}:`"))),
    };
    Ok(Location {
        store,
        prefix: prefix_of(url.path())?,
        url: url.to_string(),
    })
}
