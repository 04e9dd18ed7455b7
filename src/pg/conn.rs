//! Connection settings from a libpq connection string (see [`conninfo`]), and connecting with
//! TLS (rustls).
//!
//! `sslmode` follows libpq: `disable` never uses TLS; `prefer` tries TLS and falls back;
//! `require` insists on TLS without checking the certificate (unless `sslrootcert` is given, as
//! libpq does); `verify-ca` checks the chain against `sslrootcert` or the system roots;
//! `verify-full` also checks the host name.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres::Client;

use super::{conninfo, PgError};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }
}

/// Parsed connection settings. `Display` shows the connection string as written, with every
/// password replaced by `***`.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<std::path::PathBuf>,
    shown: conninfo::Shown,
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown.render(self.config.get_dbname().unwrap_or("")))
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({self})")
    }
}

impl ConnInfo {
    /// True when `text` is a connection string (a `postgres://` URI or `keyword=value` pairs)
    /// rather than the name of a configured database.
    pub fn is_connection_string(text: &str) -> bool {
        conninfo::is_connection_string(text)
    }

    /// Parses a libpq connection string: a `postgres://` or `postgresql://` URI, or
    /// `keyword=value` pairs. Errors never contain the password, nor any other value.
    pub fn parse(text: &str) -> Result<ConnInfo, String> {
        let parsed = conninfo::parse(text)?;
        // As in libpq, the last of a repeated keyword wins (a URI's `?host=` replaces its host).
        let mut params: Vec<(String, String)> = Vec::new();
        for (k, v) in parsed.params {
            params.retain(|(seen, _)| *seen != k);
            params.push((k, v));
        }
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        // The driver takes the rest in its own keyword/value syntax, which quotes any value
        // exactly; sslmode and sslrootcert are libpq's, kept here.
        let mut driver_text = String::new();
        for (k, v) in &params {
            match k.as_str() {
                "sslmode" => ssl_mode = v.parse()?,
                "sslrootcert" => root_cert = Some(std::path::PathBuf::from(v)),
                _ if !conninfo::is_keyword(k) => {
                    return Err(format!(
                    "`{k}` is not a connection parameter; see libpq's list of parameter keywords"
                ))
                }
                _ => conninfo::push_pair(&mut driver_text, k, v),
            }
        }
        let mut config = tokio_postgres::Config::from_str(&driver_text)
            .map_err(|e| format!("invalid connection string ({e})"))?;
        // As in libpq, a unix socket never carries TLS.
        let all_unix = config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        config.ssl_mode(match ssl_mode {
            _ if all_unix => DriverSslMode::Disable,
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            _ => DriverSslMode::Require,
        });
        if config.get_application_name().is_none() {
            config.application_name("invsync");
        }
        Ok(ConnInfo {
            config,
            ssl_mode,
            root_cert,
            shown: parsed.shown,
        })
    }

    /// The driver configuration (for callers that need the host, port, user, or database).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The `sslrootcert` file given in the URL, if any.
    pub fn root_cert(&self) -> Option<&std::path::Path> {
        self.root_cert.as_deref()
    }

    /// The database name, or the user name when none is given (libpq's default).
    pub fn dbname(&self) -> &str {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
    }

    /// A copy connecting to another database on the same server.
    pub fn with_dbname(&self, dbname: &str) -> ConnInfo {
        let mut c = self.clone();
        c.config.dbname(dbname);
        c
    }

    /// Opens a connection. The connection task runs until the returned client is dropped.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let fail = |e: tokio_postgres::Error| PgError::Connect {
            target: self.to_string(),
            reason: super::describe(&e),
        };
        // The TLS connector rejects socket paths as server names even when TLS is off.
        if self.config.get_ssl_mode() == DriverSslMode::Disable {
            let (client, connection) = self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(fail)?;
            spawn_connection(connection);
            return Ok(client);
        }
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
        let (client, connection) = self.config.connect(tls).await.map_err(fail)?;
        spawn_connection(connection);
        Ok(client)
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, PgError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| PgError::Invalid(format!("TLS setup failed: {e}")))?;
        let verify = match self.ssl_mode {
            SslMode::Disable | SslMode::Prefer => None,
            SslMode::Require => self.root_cert.as_ref().map(|_| false),
            SslMode::VerifyCa => Some(false),
            SslMode::VerifyFull => Some(true),
        };
        let chain = match verify {
            None => None,
            Some(check_name) => {
                let roots = Arc::new(self.root_store()?);
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(|e| PgError::Invalid(format!("TLS setup failed: {e}")))?;
                Some((webpki, check_name))
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier { provider, chain }))
            .with_no_client_auth();
        Ok(config)
    }

    fn root_store(&self) -> Result<rustls::RootCertStore, PgError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    PgError::Invalid(format!("cannot read sslrootcert {}: {e}", path.display()))
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| {
                        PgError::Invalid(format!("sslrootcert {} is not PEM: {e}", path.display()))
                    })?;
                    roots.add(cert).map_err(|e| {
                        PgError::Invalid(format!("sslrootcert {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(PgError::Invalid(format!(
                "sslmode={} needs trusted root certificates for {}: give sslrootcert=PATH in the URL",
                ssl_mode_name(self.ssl_mode),
                self
            )));
        }
        Ok(roots)
    }
}

/// Drives a connection until its client is dropped or the server goes away.
///
/// The driver's own loop logs every server notice at INFO; routine ones ("schema ... does not
/// exist, skipping" from `DROP ... IF EXISTS`) are not news to an operator, so notices go to
/// debug here and only warnings stay visible.
fn spawn_connection<S, T>(mut connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio_postgres::error::Severity;
    use tokio_postgres::AsyncMessage;
    tokio::spawn(async move {
        loop {
            match futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notice(n))) => match n.parsed_severity() {
                    Some(Severity::Warning) => {
                        tracing::warn!("server: {}: {}", n.severity(), n.message())
                    }
                    _ => tracing::debug!("server: {}: {}", n.severity(), n.message()),
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!("connection closed: {}", super::describe(&e));
                    break;
                }
                None => break,
            }
        }
    });
}

fn ssl_mode_name(m: SslMode) -> &'static str {
    match m {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// Checks the server's certificate as the sslmode asks: not at all for `prefer` and `require`
/// (encryption without authentication, as libpq does), the chain for `verify-ca`, the chain and
/// the host name for `verify-full`. Handshake signatures are always checked.
#[derive(Debug)]
struct ServerVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The chain verifier and whether the host name must match.
    chain: Option<(Arc<rustls::client::WebPkiServerVerifier>, bool)>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some((webpki, check_name)) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_password_and_keeps_sslmode() {
        let c = ConnInfo::parse("postgres://u:pw@h:5433/db?sslmode=require").unwrap();
        assert_eq!(c.to_string(), "postgres://u:***@h:5433/db?sslmode=require");
        assert_eq!(c.ssl_mode(), SslMode::Require);
        assert_eq!(c.dbname(), "db");
        assert!(!format!("{c:?}").contains("pw"));
        assert_eq!(
            c.with_dbname("x").to_string(),
            "postgres://u:***@h:5433/x?sslmode=require"
        );
        assert_eq!(c.with_dbname("x").dbname(), "x");
    }

    #[test]
    fn unix_socket_host() {
        for url in [
            "postgres:///einvoice?host=/var/run/postgresql",
            "postgres://u@/einvoice?host=/var/run/postgresql",
            "postgres://u:pw@%2Fvar%2Frun%2Fpostgresql/einvoice",
        ] {
            let c = ConnInfo::parse(url).unwrap();
            assert!(
                matches!(
                    c.config().get_hosts()[0],
                    tokio_postgres::config::Host::Unix(_)
                ),
                "{url}"
            );
            assert!(!c.to_string().contains("pw"));
        }
    }

    #[test]
    fn password_in_query_is_hidden() {
        let c = ConnInfo::parse("postgres://h/db?user=u&password=pw").unwrap();
        assert_eq!(c.to_string(), "postgres://h/db?user=u&password=***");
    }

    #[test]
    fn rejects_bad_sslmode_and_scheme() {
        assert!(ConnInfo::parse("postgres://h/db?sslmode=maybe")
            .unwrap_err()
            .contains("sslmode"));
        assert!(ConnInfo::parse("mysql://h/db")
            .unwrap_err()
            .contains("postgres://"));
    }
}
