//! Where locks live: a directory on this host by default, etcd when endpoints are given.

use crate::exit::{CliError, UNAVAILABLE, chain};
use clap::Args;
use palisade_lock::Coordinator;
use std::path::PathBuf;
use std::time::Duration;

/// Flags that choose and configure the coordination backend.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Directory of the file backend (one host); the default is per user:
    /// $XDG_STATE_HOME/palisade or ~/.local/state/palisade.
    #[arg(long, env = "PALISADE_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// etcd endpoints (comma-separated URLs); with them, locks and the job registry live in
    /// etcd and are shared by every host.
    #[arg(
        long,
        env = "PALISADE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL,..."
    )]
    pub etcd: Vec<String>,

    /// etcd user; the password is read from PALISADE_ETCD_PASSWORD (never from the command
    /// line, where `ps` would show it).
    #[arg(long, env = "PALISADE_ETCD_USER", value_name = "USER")]
    pub etcd_user: Option<String>,

    /// CA certificate (PEM) that signed etcd's server certificate; turns TLS on.
    #[arg(long, env = "PALISADE_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's mutual TLS; needs --etcd-key.
    #[arg(
        long,
        env = "PALISADE_ETCD_CERT",
        value_name = "FILE",
        requires = "etcd_key"
    )]
    pub etcd_cert: Option<PathBuf>,

    /// Client key (PEM) for etcd's mutual TLS; needs --etcd-cert.
    #[arg(
        long,
        env = "PALISADE_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    pub etcd_key: Option<PathBuf>,

    /// Key prefix of every lock and job entry in etcd.
    #[arg(long, env = "PALISADE_NAMESPACE", default_value = "palisade/")]
    pub namespace: String,

    /// How long to try to reach etcd before giving up (exit code 69).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s", value_name = "DURATION")]
    pub connect_timeout: Duration,
}

impl BackendArgs {
    /// The directory of the file backend.
    pub fn dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(default_dir)
    }

    /// A coordinator on etcd (with a lease of `ttl`) when endpoints are given, else on files.
    pub async fn coordinator(&self, ttl: Duration) -> Result<Coordinator, CliError> {
        if self.etcd.is_empty() {
            let dir = self.dir();
            return Coordinator::file(&dir).map_err(CliError::from);
        }
        let client = self.etcd_client().await?;
        // The client connects lazily; granting the session's lease is the first round trip, and
        // the lock crate retries it for up to a TTL: --connect-timeout bounds the whole start.
        let connect = Coordinator::etcd(client)
            .namespace(self.namespace.clone())
            .lease_ttl(ttl)
            .connect();
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(result) => result.map_err(CliError::from),
            Err(_) => Err(CliError::new(
                UNAVAILABLE,
                format!(
                    "cannot reach etcd at {} within {} (--connect-timeout)",
                    self.etcd.join(","),
                    humantime::format_duration(self.connect_timeout)
                ),
            )),
        }
    }

    async fn etcd_client(&self) -> Result<etcd_client::Client, CliError> {
        let mut options =
            etcd_client::ConnectOptions::new().with_connect_timeout(self.connect_timeout);
        if let Some(user) = &self.etcd_user {
            let password = std::env::var("PALISADE_ETCD_PASSWORD").map_err(|_| {
                CliError::config("--etcd-user needs the password in PALISADE_ETCD_PASSWORD")
            })?;
            options = options.with_user(user.clone(), password);
        }
        options = self.tls(options)?;
        let endpoints = self.etcd.join(",");
        let connect = etcd_client::Client::connect(self.etcd.clone(), Some(options));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(CliError::new(
                UNAVAILABLE,
                format!("cannot reach etcd at {endpoints}: {}", chain(&e)),
            )),
            Err(_) => Err(CliError::new(
                UNAVAILABLE,
                format!(
                    "cannot reach etcd at {endpoints} within {}",
                    humantime::format_duration(self.connect_timeout)
                ),
            )),
        }
    }

    #[cfg(feature = "tls")]
    fn tls(
        &self,
        options: etcd_client::ConnectOptions,
    ) -> Result<etcd_client::ConnectOptions, CliError> {
        use etcd_client::{Certificate, Identity, TlsOptions};
        if self.etcd_ca.is_none() && self.etcd_cert.is_none() {
            return Ok(options);
        }
        let read = |path: &PathBuf, flag: &str| {
            std::fs::read(path)
                .map_err(|e| CliError::config(format!("{flag} {}: {e}", path.display())))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.etcd_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--etcd-ca")?));
        }
        if let (Some(cert), Some(key)) = (&self.etcd_cert, &self.etcd_key) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "--etcd-cert")?,
                read(key, "--etcd-key")?,
            ));
        }
        Ok(options.with_tls(tls))
    }

    #[cfg(not(feature = "tls"))]
    fn tls(
        &self,
        options: etcd_client::ConnectOptions,
    ) -> Result<etcd_client::ConnectOptions, CliError> {
        if self.etcd_ca.is_some() || self.etcd_cert.is_some() {
            return Err(CliError::config(
                "this palisade was built without the `tls` feature; rebuild with it for --etcd-ca/--etcd-cert",
            ));
        }
        Ok(options)
    }
}

/// `$XDG_STATE_HOME/palisade`, else `~/.local/state/palisade`, else a per-user temp directory.
pub fn default_dir() -> PathBuf {
    let non_empty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    if let Some(state) = non_empty("XDG_STATE_HOME") {
        return PathBuf::from(state).join("palisade");
    }
    if let Some(home) = non_empty("HOME") {
        return PathBuf::from(home).join(".local/state/palisade");
    }
    std::env::temp_dir().join(format!("palisade-{}", nix::unistd::getuid()))
}
