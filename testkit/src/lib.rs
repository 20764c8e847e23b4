//! # palisade-testkit
//!
//! Starts real `etcd` and `redis-server` processes for tests and benchmarks, on free ports of
//! 127.0.0.1, each with a fresh temporary data directory, and lets a test kill, pause (`SIGSTOP`),
//! resume (`SIGCONT`) and restart them to inject faults. Nothing is mocked: the servers are the
//! ones palisade runs against in production.
//!
//! [`S3`] runs an S3-compatible server, moto's `moto_server` (PyPI `moto[server]`), for the
//! object-store tests; it keeps state in memory (a restart empties it) and its conditional
//! writes differ from real S3's in one way, documented on [`S3`].
//!
//! [`TlsFiles`] makes a throw-away CA with server and client certificates (and an expired one,
//! and one of another CA, for negative tests); [`Etcd::start_tls`] and [`RedisOptions::tls`] serve
//! clients over TLS only with them, and [`Etcd::start_with_auth`] turns etcd's auth on.
//!
//! ```no_run
//! use palisade_testkit::{Etcd, Redis};
//!
//! # fn main() -> Result<(), palisade_testkit::Error> {
//! let etcd = Etcd::start()?; // waits until etcd answers /health
//! println!("etcd at {:?}", etcd.endpoints());
//! etcd.pause()?; // SIGSTOP: the server stops answering but keeps its sockets
//! etcd.resume()?;
//! etcd.kill()?;
//! etcd.restart()?; // same ports, same data directory
//!
//! let redis = Redis::start()?;
//! println!("redis at {}", redis.url());
//!
//! let s3 = palisade_testkit::S3::start()?; // moto_server
//! s3.create_bucket("datasets")?;
//! println!("S3 at {} ({})", s3.endpoint(), s3.region());
//! # Ok(()) }
//! ```
//!
//! All calls block the calling thread (startup waits are bounded by [`STARTUP_TIMEOUT`]). In an
//! async test, use `#[tokio::test(flavor = "multi_thread")]` or `tokio::task::spawn_blocking`.
//!
//! Every server is killed when its handle is dropped, and also when the test process dies
//! (the server gets `SIGKILL` through Linux's parent-death signal), so a failed or killed test
//! never leaves a server behind.
//!
//! A missing binary is reported as [`Error::MissingBinary`], which names the package (Debian's,
//! or PyPI's `moto[server]`) and the setup command; a server that does not come up is reported
//! with the end of its log.

mod etcd;
mod net;
mod process;
mod proxy;
mod redis;
mod s3;
mod tls;

pub use etcd::{Etcd, EtcdCluster};
pub use process::{pause_process, resume_process};
pub use proxy::{Direction, FaultProxy, Mode, ProxyStats};
pub use redis::{Redis, RedisCluster, RedisOptions};
pub use s3::S3;
pub use tls::{CLIENT_COMMON_NAME, CertFiles, TlsFiles};

use std::path::PathBuf;
use std::time::Duration;

/// How long a server may take to answer after it is started or restarted.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// What went wrong while starting or controlling a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server's binary is not installed.
    #[error(
        "`{binary}` was not found on PATH (it comes with the {} package `{package}`): \
         run `scripts/setup`, or `{}`",
        package_source(.package),
        install_command(.package)
    )]
    MissingBinary {
        /// The program that was looked for.
        binary: &'static str,
        /// The package that provides it: a Debian package, or `moto[server]` from PyPI.
        package: &'static str,
    },
    /// The server did not answer within the startup timeout.
    #[error("{server} did not answer within {timeout:?}; end of its log ({log_path}):\n{log}")]
    NotReady {
        /// Which server.
        server: String,
        /// How long we waited.
        timeout: Duration,
        /// Where its full log is.
        log_path: PathBuf,
        /// The last lines of its log.
        log: String,
    },
    /// The server exited while we waited for it to answer.
    #[error("{server} exited during startup ({status}); end of its log ({log_path}):\n{log}")]
    Exited {
        /// Which server.
        server: String,
        /// Its exit status.
        status: String,
        /// Where its full log is.
        log_path: PathBuf,
        /// The last lines of its log.
        log: String,
    },
    /// A signal was sent to a server that is not running (it was killed and not restarted).
    #[error("{server} is not running (it was killed): call restart() first")]
    NotRunning {
        /// Which server.
        server: String,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Generating a test certificate failed (see [`TlsFiles::generate`]).
    #[error("generating a test certificate failed: {detail}")]
    Certificate {
        /// Which certificate, and rcgen's message.
        detail: String,
    },
    /// etcd refused a step of enabling authentication (see [`Etcd::start_with_auth`]).
    #[error("enabling authentication on etcd failed: {detail}")]
    Auth {
        /// The request and etcd's answer.
        detail: String,
    },
    /// Forming a cluster failed (e.g. `redis-cli --cluster create` or an etcd leader election).
    #[error("forming the {what} cluster failed: {detail}")]
    Cluster {
        /// Which kind of cluster.
        what: &'static str,
        /// What went wrong, with the tool's output where there is one.
        detail: String,
    },
}

fn package_source(package: &str) -> &'static str {
    if package == s3::MOTO_PACKAGE {
        "PyPI"
    } else {
        "Debian"
    }
}

fn install_command(package: &str) -> String {
    if package == s3::MOTO_PACKAGE {
        format!("python3 -m pip install '{package}'")
    } else {
        format!("sudo apt-get install {package}")
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
