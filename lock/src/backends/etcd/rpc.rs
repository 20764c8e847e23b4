//! Requests to etcd: the retry loop with its backoff and give-up rules, and which errors a
//! retry can cure.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::stats::count_request;
use crate::error::LockError;
use crate::session::Liveness;

/// Whether an etcd error may go away on retry (connection lost, leader change, timeout).
fn transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        // gRPC codes: CANCELLED 1, UNKNOWN 2, DEADLINE_EXCEEDED 4, ABORTED 10, INTERNAL 13,
        // UNAVAILABLE 14 (numbers, to avoid depending on tonic for its enum).
        E::GRpcStatus(s) => matches!(i32::from(s.code()), 1 | 2 | 4 | 10 | 13 | 14),
        _ => false,
    }
}

/// Whether etcd refused a request because our lease no longer exists.
pub(crate) fn lease_gone(e: &etcd_client::Error) -> bool {
    // gRPC NOT_FOUND (5) with etcd's ErrLeaseNotFound message.
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if i32::from(s.code()) == 5 && s.message().contains("lease not found"))
}

/// Whether a TLS handshake failed on a certificate (ours or the server's): retrying cannot help.
#[cfg(feature = "tls")]
fn certificate_refused(e: &etcd_client::Error) -> bool {
    use rustls::AlertDescription as A;
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    // etcd_client::Error has no `source()`: start from the error it wraps.
    let mut next: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(transport) => Some(transport),
        etcd_client::Error::IoError(io) => Some(io),
        _ => return false,
    };
    // Bounded: error chains are short.
    for _ in 0..32 {
        let Some(mut current) = next else {
            return false;
        };
        if let Some(shared) = current.downcast_ref::<Shared>() {
            current = &**shared;
        }
        match current.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(_)) => return true,
            Some(rustls::Error::AlertReceived(
                A::BadCertificate
                | A::CertificateExpired
                | A::CertificateRequired
                | A::CertificateRevoked
                | A::CertificateUnknown
                | A::UnknownCA
                | A::UnsupportedCertificate,
            )) => return true,
            _ => {}
        }
        // `io::Error::source` skips the error it wraps (tonic's connect errors wrap rustls's).
        let wrapped = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        next = wrapped.or_else(|| current.source());
    }
    false
}

/// Without the `tls` feature there is no TLS: no certificate can be refused.
#[cfg(not(feature = "tls"))]
fn certificate_refused(_e: &etcd_client::Error) -> bool {
    false
}

/// A backoff schedule for retries against etcd.
pub(crate) fn backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs one request with a timeout, retrying transient failures with backoff until `give_up`
/// says stop (session lost, budget spent). Each attempt counts as one request. A request refused
/// because our lease is gone fails with [`LockError::Lost`].
pub(crate) async fn retry<T, F, Fut>(
    op: &'static str,
    rpc_timeout: Duration,
    give_up: impl Fn() -> bool,
    mut f: F,
) -> Result<T, LockError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delays = backoff();
    loop {
        count_request();
        let err = match tokio::time::timeout(rpc_timeout, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if lease_gone(&e) => return Err(LockError::Lost),
            Ok(Err(e)) if certificate_refused(&e) => {
                return Err(LockError::Tls {
                    op,
                    source: Box::new(e),
                });
            }
            Ok(Err(e)) if transient(&e) => LockError::backend(op, e),
            Ok(Err(e)) => return Err(LockError::backend(op, e)),
            Err(elapsed) => LockError::backend(op, elapsed),
        };
        if give_up() {
            return Err(err);
        }
        tracing::debug!(op, error = %err, "etcd request failed; retrying");
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
    }
}

/// A give-up rule: after `budget` has passed.
pub(crate) fn budget(budget: Duration) -> impl Fn() -> bool {
    let start = tokio::time::Instant::now();
    move || start.elapsed() >= budget
}

/// A give-up rule: once the session is lost.
pub(crate) fn while_alive(liveness: &Arc<Liveness>) -> impl Fn() -> bool + use<> {
    let liveness = liveness.clone();
    move || liveness.is_lost()
}
