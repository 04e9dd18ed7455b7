//! Opening the object store behind a repository URL.
//!
//! `s3://`, `gs://` and `az://` builders start from the standard environment credentials
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`) and then apply the repository's `options`; an unknown option
//! is an error rather than silently ignored. `file://` repositories live in a local directory.
//!
//! Two options are invsync's own, for any cloud store: `retry_timeout` (a duration such as
//! `30s` or `2m`; default 3 minutes), how long a failing request is retried before the command
//! reports the store unreachable, and `max_retries` (default 10), how many times at most.
//! A hung endpoint is thus reported after `retry_timeout`, and meanwhile logged (see
//! `repository`).

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, RetryConfig};

use super::BackupError;
use crate::config::RepositoryConfig;

/// An object store and the prefix inside it where the repository lives.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The repository URL, for messages (it holds no secret: credentials live in options).
    pub url: String,
    /// How long the store client retries a failing request (for messages while it does).
    pub retry_timeout: Duration,
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
    let mut retry = RetryConfig::default();
    let mut store_options = Vec::new();
    for (k, v) in &repo.options {
        match k.as_str() {
            "retry_timeout" => {
                retry.retry_timeout = humantime::parse_duration(v).map_err(|e| {
                    err(format!(
                        "option retry_timeout = \"{v}\": {e}; write a duration such as \"30s\" or \"2m\""
                    ))
                })?
            }
            "max_retries" => {
                retry.max_retries = v.parse().map_err(|_| {
                    err(format!(
                        "option max_retries = \"{v}\" is not a whole number; write e.g. \"3\""
                    ))
                })?
            }
            _ => store_options.push((k, v)),
        }
    }
    let retry_timeout = retry.retry_timeout;
    // The three cloud builders share no trait: each starts from the environment's credentials,
    // then takes the repository's options, refusing keys it does not know.
    macro_rules! cloud_store {
        ($builder:ty, $kind:literal) => {{
            let mut b = <$builder>::from_env()
                .with_url(url.as_str())
                .with_retry(retry.clone());
            for &(k, v) in &store_options {
                let key = k
                    .parse()
                    .map_err(|_| err(format!("unknown {} option `{k}`", $kind)))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err(e.to_string()))?)
        }};
    }
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
                retry_timeout,
            });
        }
        "memory" => Arc::new(object_store::memory::InMemory::new()),
        "s3" | "s3a" => cloud_store!(object_store::aws::AmazonS3Builder, "S3"),
        "gs" => cloud_store!(object_store::gcp::GoogleCloudStorageBuilder, "GCS"),
        "az" | "azure" | "abfs" | "abfss" => {
            cloud_store!(object_store::azure::MicrosoftAzureBuilder, "Azure")
        }
        other => return Err(err(format!("unsupported scheme `{other}:`"))),
    };
    Ok(Location {
        store,
        prefix: prefix_of(url.path())?,
        url: url.to_string(),
        retry_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(url: &str, options: &[(&str, &str)]) -> RepositoryConfig {
        RepositoryConfig {
            name: "r".into(),
            url: url::Url::parse(url).unwrap(),
            recipients: Vec::new(),
            identity_file: None,
            passphrase: None,
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn unknown_cloud_options_are_refused() {
        for (url, kind) in [
            ("s3://b/p", "S3"),
            ("gs://b/p", "GCS"),
            ("az://c/p", "Azure"),
        ] {
            let e = open(&repo(url, &[("bogus_key", "1")]), false).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("unknown {kind} option `bogus_key`")),
                "{e}"
            );
        }
        let loc = open(
            &repo(
                "s3://b/some/prefix",
                &[("aws_region", "ap-northeast-1"), ("retry_timeout", "20s")],
            ),
            false,
        )
        .unwrap();
        assert_eq!(loc.prefix.as_ref(), "some/prefix");
        assert_eq!(loc.retry_timeout, Duration::from_secs(20));
        let e = open(&repo("s3://b/p", &[("retry_timeout", "soon")]), false).unwrap_err();
        assert!(e.to_string().contains("retry_timeout"), "{e}");
    }
}
