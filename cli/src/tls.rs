//! TLS to etcd and Redis from flags: the PEM files, a check of the client certificate before
//! connecting, and one line that says which certificate was refused, by whom and why.
// Without `tls` only the flags remain (to refuse them); the files and messages go unused.
#![cfg_attr(not(feature = "tls"), allow(dead_code))]

use crate::exit::CliError;
use clap::Args;
use std::path::{Path, PathBuf};

/// TLS flags of the Redis connection (`palisade limit --redis`, `palisade once --store`).
#[derive(Debug, Args)]
pub struct RedisTlsArgs {
    /// CA certificate (PEM) that signed Redis's server certificate, for a `rediss://` URL
    /// (default: the system's roots).
    #[arg(long, env = "PALISADE_REDIS_CA", value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,

    /// Client certificate (PEM) for a Redis with `tls-auth-clients yes`; needs --redis-key.
    #[arg(
        long,
        env = "PALISADE_REDIS_CERT",
        value_name = "FILE",
        requires = "redis_key"
    )]
    pub redis_cert: Option<PathBuf>,

    /// Client key (PEM) for --redis-cert.
    #[arg(
        long,
        env = "PALISADE_REDIS_KEY",
        value_name = "FILE",
        requires = "redis_cert"
    )]
    pub redis_key: Option<PathBuf>,
}

impl RedisTlsArgs {
    /// The files, as [`TlsFiles`] for messages and checks.
    pub fn files(&self) -> TlsFiles<'_> {
        TlsFiles {
            server: "Redis",
            ca_flag: "--redis-ca",
            ca: self.redis_ca.as_deref(),
            cert_flag: "--redis-cert",
            cert: self.redis_cert.as_deref(),
            key_flag: "--redis-key",
            key: self.redis_key.as_deref(),
        }
    }

    /// Whether any TLS file was given.
    pub fn given(&self) -> bool {
        self.redis_ca.is_some() || self.redis_cert.is_some()
    }

    /// Checks the flags against the URL and the client certificate against the CA (see
    /// [`TlsFiles::check_client_cert`]), and returns the redis crate's certificates when any
    /// file was given (`None`: plain `connect`, which trusts the system's roots).
    #[cfg(feature = "tls")]
    pub fn certificates(
        &self,
        url: &str,
    ) -> Result<Option<palisade_ratelimit::redis_crate::TlsCertificates>, CliError> {
        use palisade_ratelimit::redis_crate::{ClientTlsConfig, TlsCertificates};
        if !self.given() {
            return Ok(None);
        }
        if !url.starts_with("rediss://") {
            return Err(CliError::config(
                "--redis-ca/--redis-cert need a rediss:// URL (TLS); redis:// is plain text",
            ));
        }
        let files = self.files();
        files.check_client_cert()?;
        Ok(Some(TlsCertificates {
            root_cert: files.read_ca()?,
            client_tls: files
                .read_identity()?
                .map(|(client_cert, client_key)| ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
        }))
    }

    /// Without the `tls` feature, TLS files are a configuration error.
    #[cfg(not(feature = "tls"))]
    pub fn certificates(&self, _url: &str) -> Result<Option<()>, CliError> {
        if self.given() {
            return Err(CliError::config(
                "this palisade was built without the `tls` feature; rebuild with it for --redis-ca/--redis-cert",
            ));
        }
        Ok(None)
    }
}

/// The TLS files of one server, with the flags that named them (for messages).
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    /// "etcd" or "Redis".
    pub server: &'static str,
    /// The CA flag, e.g. `--etcd-ca`.
    pub ca_flag: &'static str,
    /// The CA file.
    pub ca: Option<&'a Path>,
    /// The client certificate flag, e.g. `--etcd-cert`.
    pub cert_flag: &'static str,
    /// The client certificate file.
    pub cert: Option<&'a Path>,
    /// The client key flag.
    pub key_flag: &'static str,
    /// The client key file.
    pub key: Option<&'a Path>,
}

/// A client certificate and its key, as PEM bytes.
pub type Identity = (Vec<u8>, Vec<u8>);

/// Whether the client certificate is signed by the CA given for the server (a hint for why a
/// server refused it; servers may trust other CAs for clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signed {
    /// Signed by it.
    ByCa,
    /// Not signed by it.
    NotByCa,
    /// Not known (no CA or no client certificate given, or not checked).
    Unknown,
}

impl TlsFiles<'_> {
    fn read(path: &Path, flag: &str) -> Result<Vec<u8>, CliError> {
        std::fs::read(path).map_err(|e| CliError::config(format!("{flag} {}: {e}", path.display())))
    }

    /// The CA file's bytes, if one was given.
    pub fn read_ca(&self) -> Result<Option<Vec<u8>>, CliError> {
        self.ca.map(|ca| Self::read(ca, self.ca_flag)).transpose()
    }

    /// The client certificate's and key's bytes, if they were given.
    pub fn read_identity(&self) -> Result<Option<Identity>, CliError> {
        match (self.cert, self.key) {
            (Some(cert), Some(key)) => Ok(Some((
                Self::read(cert, self.cert_flag)?,
                Self::read(key, self.key_flag)?,
            ))),
            _ => Ok(None),
        }
    }

    fn cert_text(&self) -> String {
        match self.cert {
            Some(cert) => format!("{} {}", self.cert_flag, cert.display()),
            None => self.cert_flag.to_string(),
        }
    }
}

#[cfg(feature = "tls")]
mod checks {
    use super::{Signed, TlsFiles};
    use crate::exit::{CONFIG, CliError};
    use palisade_ratelimit::TlsProblem;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use std::io::{Read, Write};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn when(time: UnixTime) -> String {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(time.as_secs()))
            .to_string()
    }

    fn certificates(
        pem: &[u8],
        path: &std::path::Path,
        flag: &str,
    ) -> Result<Vec<CertificateDer<'static>>, CliError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CliError::config(format!("{flag} {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(CliError::config(format!(
                "{flag} {}: no PEM certificate in it",
                path.display()
            )));
        }
        Ok(certs)
    }

    fn roots(files: &TlsFiles<'_>) -> Result<Option<rustls::RootCertStore>, CliError> {
        let Some(ca) = files.ca else {
            return Ok(None);
        };
        let pem = TlsFiles::read(ca, files.ca_flag)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(&pem, ca, files.ca_flag)? {
            roots.add(cert).map_err(|e| {
                CliError::config(format!("{} {}: {e}", files.ca_flag, ca.display()))
            })?;
        }
        Ok(Some(roots))
    }

    impl TlsFiles<'_> {
        /// Checks the client certificate before connecting: one that has expired (or is not
        /// valid yet) is a configuration error naming its dates, an unreadable certificate or
        /// key too. Also tells whether the CA given for the server signed it (a hint for the
        /// message when the server refuses it).
        pub fn check_client_cert(&self) -> Result<Signed, CliError> {
            let Some((cert_pem, key_pem)) = self.read_identity()? else {
                return Ok(Signed::Unknown);
            };
            let none = Path::new("");
            let (cert_path, key_path) = (self.cert.unwrap_or(none), self.key.unwrap_or(none));
            let chain = certificates(&cert_pem, cert_path, self.cert_flag)?;
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                CliError::config(format!("{} {}: {e}", self.key_flag, key_path.display()))
            })?;
            let Some(roots) = roots(self)? else {
                return Ok(Signed::Unknown);
            };
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| CliError::config(format!("{}: {e}", self.ca_flag)))?;
            use rustls::CertificateError as C;
            match verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()) {
                Ok(_) => Ok(Signed::ByCa),
                Err(rustls::Error::InvalidCertificate(problem)) => match problem {
                    C::ExpiredContext { not_after, .. } => Err(CliError::config(format!(
                        "TLS: the client certificate {} expired on {}",
                        self.cert_text(),
                        when(not_after)
                    ))),
                    C::Expired => Err(CliError::config(format!(
                        "TLS: the client certificate {} has expired",
                        self.cert_text()
                    ))),
                    C::NotValidYetContext { not_before, .. } => Err(CliError::config(format!(
                        "TLS: the client certificate {} is not valid before {}",
                        self.cert_text(),
                        when(not_before)
                    ))),
                    C::NotValidYet => Err(CliError::config(format!(
                        "TLS: the client certificate {} is not valid yet",
                        self.cert_text()
                    ))),
                    C::UnknownIssuer | C::BadSignature => Ok(Signed::NotByCa),
                    _ => Ok(Signed::Unknown),
                },
                Err(_) => Ok(Signed::Unknown),
            }
        }

        /// The one-line error for a certificate that the handshake refused (exit 78).
        pub fn refused(&self, problem: TlsProblem, signed: Signed, detail: &str) -> CliError {
            let server = self.server;
            let ca = match self.ca {
                Some(ca) => format!("{} {}", self.ca_flag, ca.display()),
                None => format!(
                    "a CA among the system's roots (give its CA with {} FILE)",
                    self.ca_flag
                ),
            };
            let cert = self.cert_text();
            let message = match problem {
                TlsProblem::ServerCertificateUntrusted => {
                    format!("TLS: {server}'s certificate is not signed by {ca}")
                }
                TlsProblem::ServerCertificateExpired => format!(
                    "TLS: {server}'s certificate has expired or is not valid yet; renew it on the server"
                ),
                TlsProblem::ServerNameMismatch => format!(
                    "TLS: {server}'s certificate does not name the host of the URL; connect by a name (or IP) it lists"
                ),
                TlsProblem::ClientCertificateRequired => format!(
                    "TLS: {server} requires a client certificate: give {} FILE and {} FILE",
                    self.cert_flag, self.key_flag
                ),
                TlsProblem::ClientCertificateRejected if self.cert.is_none() => format!(
                    "TLS: {server} refused the connection without a client certificate (bad certificate): give {} FILE and {} FILE",
                    self.cert_flag, self.key_flag
                ),
                TlsProblem::ClientCertificateExpired => {
                    format!("TLS: {server} refused the client certificate {cert}: it has expired")
                }
                TlsProblem::ClientCertificateUntrusted => format!(
                    "TLS: {server} refused the client certificate {cert}: it is not signed by a CA {server} trusts"
                ),
                TlsProblem::ClientCertificateRejected if signed == Signed::NotByCa => format!(
                    "TLS: {server} refused the client certificate {cert} (bad certificate): it is not signed by {ca}, and {server} trusts no CA that signed it"
                ),
                TlsProblem::ClientCertificateRejected => {
                    format!("TLS: {server} refused the client certificate {cert} (bad certificate)")
                }
                _ => format!("TLS: {server}'s certificate is invalid"),
            };
            let message = if detail.is_empty() {
                message
            } else {
                format!("{message} ({detail})")
            };
            CliError::new(CONFIG, message)
        }

        /// Connects to `endpoint` (`https://host:port` or `host:port`) with these files, asks
        /// for `GET /version`, and returns the certificate problem if the handshake or the first
        /// read fails on one. `None`: accepted, or not reached (then the caller's own error
        /// stands). Blocking; every step is bounded by `timeout`.
        pub fn probe(&self, endpoint: &str, timeout: Duration) -> Option<(TlsProblem, String)> {
            let rest = endpoint
                .strip_prefix("https://")
                .or_else(|| endpoint.strip_prefix("http://"))
                .unwrap_or(endpoint);
            let authority = rest.split('/').next().unwrap_or(rest);
            let host = match authority.rsplit_once(':') {
                Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
                None => authority,
            };
            let name = ServerName::try_from(host.to_string()).ok()?;
            // Without a CA file there is nothing to tell about the server's certificate.
            let roots = roots(self).ok()??;
            let builder = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .ok()?
                .with_root_certificates(roots);
            let config = match self.read_identity().ok()? {
                Some((cert, key)) => {
                    let chain = CertificateDer::pem_slice_iter(&cert)
                        .collect::<Result<Vec<_>, _>>()
                        .ok()?;
                    let key = PrivateKeyDer::from_pem_slice(&key).ok()?;
                    builder.with_client_auth_cert(chain, key).ok()?
                }
                None => builder.with_no_client_auth(),
            };
            let connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
            let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
                .ok()?
                .next()?;
            let tcp = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
            tcp.set_read_timeout(Some(timeout)).ok()?;
            tcp.set_write_timeout(Some(timeout)).ok()?;
            let mut stream = rustls::StreamOwned::new(connection, tcp);
            let request =
                format!("GET /version HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
            let exchange = stream
                .write_all(request.as_bytes())
                .and_then(|()| stream.flush())
                .and_then(|()| stream.read(&mut [0u8; 256]));
            let error = exchange.err()?;
            let problem = TlsProblem::find(&error)?;
            Some((problem, error.to_string()))
        }
    }

    /// The certificate problem inside an etcd client error (which has no `source()` of its own).
    pub fn etcd_problem(error: &etcd_client::Error) -> Option<(TlsProblem, String)> {
        let inner: &(dyn std::error::Error + 'static) = match error {
            etcd_client::Error::GRpcStatus(status) => status,
            etcd_client::Error::TransportError(transport) => transport,
            etcd_client::Error::IoError(io) => io,
            _ => return None,
        };
        let problem = TlsProblem::find(inner)?;
        let detail = match error {
            etcd_client::Error::GRpcStatus(status) => status.message().to_string(),
            other => other.to_string(),
        };
        Some((problem, detail))
    }
}

#[cfg(feature = "tls")]
pub use checks::etcd_problem;
