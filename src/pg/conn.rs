//! Connection settings from a `postgres://` URL, and connecting with TLS (rustls).
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

use super::PgError;

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

/// Parsed connection settings. `Display` shows the URL with the password replaced by `***`.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<std::path::PathBuf>,
    display: String,
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({})", self.display)
    }
}

impl ConnInfo {
    /// Parses a `postgres://` or `postgresql://` URL. Errors never contain the password.
    pub fn parse(url_text: &str) -> Result<ConnInfo, String> {
        let mut url = url::Url::parse(url_text).map_err(|e| {
            format!("not a URL ({e}); write postgres://USER:PASSWORD@HOST:PORT/DATABASE")
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!(
                "scheme `{}:` is not postgres://; write postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                url.scheme()
            ));
        }
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        let mut kept: Vec<(String, String)> = Vec::new();
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => ssl_mode = v.parse()?,
                "sslrootcert" => root_cert = Some(std::path::PathBuf::from(v.as_ref())),
                _ => kept.push((k.into_owned(), v.into_owned())),
            }
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(&kept);
        }
        let mut config = tokio_postgres::Config::from_str(url.as_str())
            .map_err(|e| format!("invalid connection URL: {e}"))?;
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            _ => DriverSslMode::Require,
        });
        if config.get_application_name().is_none() {
            config.application_name("invsync");
        }
        let mut shown = url.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        // Keep the sslmode visible: it matters when a connection fails.
        let display = if url_text.contains("sslmode=") {
            let sep = if shown.query().is_some() { '&' } else { '?' };
            format!("{shown}{sep}sslmode={}", ssl_mode_name(ssl_mode))
        } else {
            shown.to_string()
        };
        Ok(ConnInfo {
            config,
            ssl_mode,
            root_cert,
            display,
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
        c.display = match url::Url::parse(&self.display) {
            Ok(mut u) => {
                u.set_path(&format!("/{dbname}"));
                u.to_string()
            }
            Err(_) => format!("{} (database {dbname})", self.display),
        };
        c
    }

    /// Opens a connection. The connection task runs until the returned client is dropped.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
        let (client, connection) = self.config.connect(tls).await.map_err(|e| PgError::Connect {
            target: self.display.clone(),
            reason: super::describe(&e),
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {}", super::describe(&e));
            }
        });
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
        let config = match verify {
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
                .with_no_client_auth(),
            Some(check_name) => {
                let roots = Arc::new(self.root_store()?);
                let webpki =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| PgError::Invalid(format!("TLS setup failed: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainVerifier { webpki, check_name }))
                    .with_no_client_auth()
            }
        };
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
                self.display
            )));
        }
        Ok(roots)
    }
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

/// `prefer` and `require` encrypt without authenticating the server, as libpq does.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` checks the chain only; `verify-full` also the host name.
#[derive(Debug)]
struct ChainVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
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
        assert_eq!(c.with_dbname("x").to_string(), "postgres://u:***@h:5433/x");
    }

    #[test]
    fn unix_socket_host() {
        let c = ConnInfo::parse("postgres:///einvoice?host=/var/run/postgresql").unwrap();
        assert!(matches!(
            c.config().get_hosts()[0],
            tokio_postgres::config::Host::Unix(_)
        ));
    }

    #[test]
    fn rejects_bad_sslmode_and_scheme() {
        assert!(ConnInfo::parse("postgres://h/db?sslmode=maybe")
            .unwrap_err()
            .contains("sslmode"));
        assert!(ConnInfo::parse("mysql://h/db").unwrap_err().contains("postgres://"));
    }
}
