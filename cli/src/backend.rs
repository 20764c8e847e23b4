//! Where locks live: a directory on this host by default, etcd when endpoints are given.

use crate::exit::{CONFIG, CliError, UNAVAILABLE, chain};
use crate::tls::{Signed, TlsFiles};
use clap::Args;
use palisade_lock::{Coordinator, LockError};
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

    /// Lock keys in etcd's own layout, NAME/<lease> (outside --namespace), so that palisade and
    /// `etcdctl lock NAME` (Go's concurrency.Mutex) exclude each other.
    #[arg(long, env = "PALISADE_ETCDCTL_LAYOUT")]
    pub etcdctl_layout: bool,

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
        let signed = self.check_client_cert()?;
        let client = match self.etcd_client(signed).await {
            Ok(client) => client,
            Err(error) => return Err(self.diagnose(error, signed).await),
        };
        // The client connects lazily; granting the session's lease is the first round trip, and
        // the lock crate retries it for up to a TTL: --connect-timeout bounds the whole start.
        let connect = Coordinator::etcd(client)
            .namespace(self.namespace.clone())
            .etcdctl_layout(self.etcdctl_layout)
            .lease_ttl(ttl)
            .connect();
        let error = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(coordinator)) => return Ok(coordinator),
            Ok(Err(e)) => match self.refusal(&e, signed) {
                Some(refusal) => return Err(refusal),
                None => CliError::from(e),
            },
            Err(_) => CliError::new(
                UNAVAILABLE,
                format!(
                    "cannot reach etcd at {} within {} (--connect-timeout)",
                    self.etcd.join(","),
                    humantime::format_duration(self.connect_timeout)
                ),
            ),
        };
        Err(self.diagnose(error, signed).await)
    }

    /// A lock error that is etcd refusing our credentials or a certificate, as one line that
    /// says which (exit 78).
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn refusal(&self, error: &LockError, signed: Signed) -> Option<CliError> {
        let (LockError::Backend { source, .. } | LockError::Tls { source, .. }) = error else {
            return None;
        };
        let etcd = source.downcast_ref::<etcd_client::Error>()?;
        if let Some(refusal) = etcd_refusal(etcd, self.etcd_user.as_deref()) {
            return Some(refusal);
        }
        #[cfg(feature = "tls")]
        if let Some((problem, detail)) = crate::tls::etcd_problem(etcd) {
            return Some(self.tls_files().refused(problem, signed, &detail));
        }
        None
    }

    /// The TLS files of the etcd flags.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    fn tls_files(&self) -> TlsFiles<'_> {
        TlsFiles {
            server: "etcd",
            ca_flag: "--etcd-ca",
            ca: self.etcd_ca.as_deref(),
            cert_flag: "--etcd-cert",
            cert: self.etcd_cert.as_deref(),
            key_flag: "--etcd-key",
            key: self.etcd_key.as_deref(),
        }
    }

    /// Refuses an expired client certificate before connecting; tells whether --etcd-ca signed
    /// it (for the message if etcd refuses it).
    #[cfg(feature = "tls")]
    fn check_client_cert(&self) -> Result<Signed, CliError> {
        self.tls_files().check_client_cert()
    }

    #[cfg(not(feature = "tls"))]
    fn check_client_cert(&self) -> Result<Signed, CliError> {
        Ok(Signed::Unknown)
    }

    /// etcd closes the connection on a client certificate it refuses, which the client sees as
    /// a transport error (retried until --connect-timeout). With TLS on, one handshake of our own
    /// (bounded) reads etcd's alert and says which certificate was refused; otherwise `error`
    /// stands.
    #[cfg(feature = "tls")]
    async fn diagnose(&self, error: CliError, signed: Signed) -> CliError {
        if error.code == CONFIG || self.etcd_ca.is_none() {
            return error;
        }
        let files = self.tls_files();
        let timeout = self.connect_timeout.min(Duration::from_secs(2));
        // Blocking socket calls, each bounded by `timeout`, on this worker (the runtime has
        // another); only on the way out with an error.
        let found = tokio::task::block_in_place(|| {
            self.etcd
                .iter()
                .find_map(|endpoint| files.probe(endpoint, timeout))
        });
        match found {
            Some((problem, detail)) => files.refused(problem, signed, &detail),
            None => error,
        }
    }

    #[cfg(not(feature = "tls"))]
    async fn diagnose(&self, error: CliError, _signed: Signed) -> CliError {
        error
    }

    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    async fn etcd_client(&self, signed: Signed) -> Result<etcd_client::Client, CliError> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // A member cut off from its cluster then fails requests and watches at once
            // ("no leader") instead of serving stale reads or hanging.
            .with_require_leader(true);
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
            Ok(Err(e)) => {
                if let Some(refusal) = etcd_refusal(&e, self.etcd_user.as_deref()) {
                    return Err(refusal);
                }
                #[cfg(feature = "tls")]
                if let Some((problem, detail)) = crate::tls::etcd_problem(&e) {
                    return Err(self.tls_files().refused(problem, signed, &detail));
                }
                Err(CliError::new(
                    UNAVAILABLE,
                    format!("cannot reach etcd at {endpoints}: {}", chain(&e)),
                ))
            }
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

/// A request that etcd refused for its credentials, as a configuration error (exit 78) that says
/// which: a wrong user or password, a user missing while auth is on, or a missing permission.
pub fn etcd_refusal(error: &etcd_client::Error, user: Option<&str>) -> Option<CliError> {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return None;
    };
    let said = status.message();
    let user = user.map_or_else(|| "the etcd user".to_string(), |u| format!("user `{u}`"));
    let message = if said.contains("authentication failed") {
        format!(
            "etcd rejected the user/password: {user} with the password in PALISADE_ETCD_PASSWORD ({said})"
        )
    } else if said.contains("user name is empty") {
        format!(
            "etcd requires a user (its auth is enabled): give --etcd-user USER and the password in PALISADE_ETCD_PASSWORD ({said})"
        )
    } else if said.contains("permission denied") {
        format!(
            "etcd refused the request: {user} has no permission on the --namespace prefix; grant its role readwrite on it ({said})"
        )
    } else {
        return None;
    };
    Some(CliError::new(CONFIG, message))
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
