//! Connections for a limiter (standalone, TLS, Cluster), and how their errors are classified:
//! unavailable (the policy answers) or refused (a typed error whatever the policy).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::Error;

/// Connects to a standalone Redis for a limiter: a [`ConnectionManager`] (one multiplexed
/// connection that reconnects by itself) whose connection attempts and responses time out after
/// `timeout`. `url` may carry an ACL user and password (`redis://user:password@host:6379/0`);
/// `rediss://` needs this crate's `tls` feature.
///
/// A TLS connection whose certificate is refused (by either side) fails with [`Error::Tls`]; the
/// system's roots (webpki) are trusted: for a private CA or a client certificate, use
/// [`connect_with_tls`].
pub async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, Error> {
    #[cfg(feature = "tls")]
    install_crypto_provider();
    let client = redis::Client::open(url).map_err(Error::Redis)?;
    manage(client, timeout).await
}

/// Like [`connect`], for a `rediss://` URL, trusting the CA in `certs.root_cert` (PEM; `None`:
/// the system's roots) and presenting the client certificate in `certs.client_tls`, if any (for
/// a server with `tls-auth-clients yes`). A refused certificate fails with [`Error::Tls`], which
/// says whose. Needs the `tls` feature.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use palisade_ratelimit::redis_crate::{ClientTlsConfig, TlsCertificates};
/// let certs = TlsCertificates {
///     root_cert: Some(std::fs::read("/etc/redis/ca.pem")?),
///     client_tls: Some(ClientTlsConfig {
///         client_cert: std::fs::read("/etc/palisade/client.pem")?,
///         client_key: std::fs::read("/etc/palisade/client-key.pem")?,
///     }),
/// };
/// let conn = palisade_ratelimit::connect_with_tls(
///     "rediss://redis.internal:6380/",
///     certs,
///     std::time::Duration::from_millis(500),
/// )
/// .await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "tls")]
pub async fn connect_with_tls(
    url: &str,
    certs: redis::TlsCertificates,
    timeout: Duration,
) -> Result<ConnectionManager, Error> {
    install_crypto_provider();
    manage(tls_client(url, certs)?, timeout).await
}

#[cfg(feature = "tls")]
fn tls_client(url: &str, certs: redis::TlsCertificates) -> Result<redis::Client, Error> {
    redis::Client::build_with_tls(url, certs).map_err(|e| Error::InvalidConfig {
        field: "tls",
        reason: format!("is unusable: {e} (it needs a rediss:// URL and PEM certificates)"),
    })
}

/// Like [`connect`], without connecting now: the first decision connects, and until Redis
/// answers every decision is unavailable, so the limiter's [`Policy`](crate::Policy) decides.
/// For a limiter with [`Policy::FailOpen`](crate::Policy::FailOpen) or
/// [`Policy::Local`](crate::Policy::Local) whose process must start, and keep its policy, while
/// Redis is down ([`connect`] fails then). Only a malformed URL fails here; a refused password
/// or certificate fails the first decision with its typed error. Call it inside a Tokio runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), palisade_ratelimit::Error> {
/// use palisade_ratelimit::{Limit, Policy, RateLimiter, RedisLimiter, connect_lazy};
/// use std::time::Duration;
/// // Nothing listens on port 1: every decision is admitted by the policy.
/// let conn = connect_lazy("redis://127.0.0.1:1/", Duration::from_millis(100))?;
/// let limiter = RedisLimiter::builder(conn)
///     .limit(Limit::per_second(10)?)
///     .on_unavailable(Policy::FailOpen)
///     .timeout(Duration::from_millis(100))
///     .build()?;
/// assert!(limiter.check("partner-api").await?.allowed);
/// # Ok(()) }
/// ```
pub fn connect_lazy(url: &str, timeout: Duration) -> Result<ConnectionManager, Error> {
    #[cfg(feature = "tls")]
    install_crypto_provider();
    let client = redis::Client::open(url).map_err(Error::Redis)?;
    ConnectionManager::new_lazy_with_config(client, manager_config(timeout)).map_err(Error::Redis)
}

/// [`connect_with_tls`] without connecting now, as [`connect_lazy`] is to [`connect`].
#[cfg(feature = "tls")]
pub fn connect_with_tls_lazy(
    url: &str,
    certs: redis::TlsCertificates,
    timeout: Duration,
) -> Result<ConnectionManager, Error> {
    install_crypto_provider();
    let client = tls_client(url, certs)?;
    ConnectionManager::new_lazy_with_config(client, manager_config(timeout)).map_err(Error::Redis)
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

async fn manage(client: redis::Client, timeout: Duration) -> Result<ConnectionManager, Error> {
    ConnectionManager::new_with_config(client, manager_config(timeout))
        .await
        .map_err(classify)
}

/// Connects to a Redis Cluster for a limiter (the cluster's async connection, which follows
/// slot moves and reconnects by itself). `urls` are some of its nodes.
pub async fn connect_cluster<I, T>(
    urls: I,
) -> Result<redis::cluster_async::ClusterConnection, Error>
where
    I: IntoIterator<Item = T>,
    T: redis::IntoConnectionInfo,
{
    cluster_client(urls)?
        .get_async_connection()
        .await
        .map_err(classify)
}

/// Like [`connect_cluster`], without waiting for the cluster, as [`connect_lazy`] is to
/// [`connect`]: the connection is made in the background (and again while no node answers), and
/// until one of `urls` answers every decision is unavailable, so the limiter's
/// [`Policy`](crate::Policy) decides. `timeout` bounds each attempt to reach a node and each
/// node's answer; the limiter's own `timeout` bounds each decision. Only unusable URLs fail
/// here (malformed, or nodes with different credentials or databases). Call it inside a Tokio
/// runtime.
///
/// Unlike [`connect_cluster`], it cannot tell a refused password from an outage (the background
/// connection keeps the reason to itself): a limiter on it answers by its policy while its
/// credentials are refused. Where that matters, try [`connect_cluster`] first and fall back to
/// this only on [`Error::Unavailable`], as the Python package does.
pub fn connect_cluster_lazy<I, T>(
    urls: I,
    timeout: Duration,
) -> Result<redis::cluster_async::ClusterConnection, Error>
where
    I: IntoIterator<Item = T>,
    T: redis::IntoConnectionInfo,
{
    let config = redis::cluster::ClusterConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    Ok(cluster_client(urls)?.get_pending_async_connection_with_config(config))
}

/// The cluster client both cluster connections start from (its URLs checked, TLS ready).
fn cluster_client<I, T>(urls: I) -> Result<redis::cluster::ClusterClient, Error>
where
    I: IntoIterator<Item = T>,
    T: redis::IntoConnectionInfo,
{
    #[cfg(feature = "tls")]
    install_crypto_provider();
    redis::cluster::ClusterClient::new(urls).map_err(Error::Redis)
}

/// rustls needs a process-wide crypto provider and the redis crate selects none; use ring
/// unless the application installed one already.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: any provider will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// An error of a connection or of a decision: a refused certificate is [`Error::Tls`] (with
/// [`connect_lazy`] the decision that connects meets it), the rest is unavailable or refused.
pub(crate) fn classify(e: RedisError) -> Error {
    #[cfg(feature = "tls")]
    if let Some(problem) = crate::TlsProblem::find(&e) {
        return Error::Tls { problem, source: e };
    }
    classify_unavailable(e)
}

fn classify_unavailable(e: RedisError) -> Error {
    if is_unavailable(&e) && !is_refusal(&e) {
        Error::Unavailable(e)
    } else {
        Error::Redis(e)
    }
}

/// Whether Redis refused our credentials (`WRONGPASS`, `NOAUTH`, redis-rs's
/// `AuthenticationFailed`) or an ACL permission (`NOPERM`): a refusal that retrying does not
/// cure, as opposed to an outage. Also when the refusal is only in the error's text: a cluster
/// connection that could reach no node reports "Failed to create initial connections" (an I/O
/// kind) with one node's error ("Password authentication failed - AuthenticationFailed") as the
/// detail.
pub fn is_refusal(e: &RedisError) -> bool {
    const CODES: [&str; 3] = ["NOAUTH", "WRONGPASS", "NOPERM"];
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
    ) || e.code().is_some_and(|code| CODES.contains(&code))
        || e.detail().is_some_and(|detail| {
            detail.contains("AuthenticationFailed") || CODES.iter().any(|c| detail.contains(c))
        })
}

/// Whether an error means "Redis is not there right now" (the policy applies) rather than
/// "Redis refused" (a typed error, whatever the policy).
fn is_unavailable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Io
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        )
        || e.code() == Some("BUSY")
}
