//! The one error type of this crate.

use std::time::Duration;

use crate::Decision;

/// Everything that can go wrong when deciding or configuring a limit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A limit or builder setting is invalid; `field` names it.
    #[error("invalid configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The setting that is wrong (e.g. `max`, `window`, `limits`).
        field: &'static str,
        /// What is wrong with it and what to use instead.
        reason: String,
    },

    /// The request asks for more units than the limit can ever admit at once; it would be denied
    /// forever, so it is an error rather than a silent denial.
    #[error(
        "cost {cost} exceeds the capacity {capacity} of the limit; split the request or raise the limit"
    )]
    CostExceedsLimit {
        /// The cost asked for.
        cost: u32,
        /// The most units one request may cost (the limit's `max`, or the GCRA burst).
        capacity: u32,
    },

    /// A [`crate::FileLimiter`] could not use its directory or a file in it (permissions, a
    /// full disk, or a file it did not write).
    #[error("rate limit file {}: {source}", path.display())]
    File {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the operating system said (or what is wrong with the content).
        #[source]
        source: std::io::Error,
    },

    /// Redis did not answer within the configured `.timeout`, and the policy is `FailClosed`.
    #[error("Redis did not answer within {0:?}; check the server or raise `.timeout`")]
    Timeout(Duration),

    /// Redis could not be reached (connection refused or dropped, cluster down), and the policy
    /// is `FailClosed`.
    #[error("Redis is unavailable ({0}); the limiter recovers by itself when it is back")]
    Unavailable(#[source] redis::RedisError),

    /// Redis answered with an error that is not about availability (e.g. a permission error
    /// for an ACL user, or a key of the wrong type under the limiter's prefix).
    #[error("Redis refused the rate-limit script: {0}")]
    Redis(#[source] redis::RedisError),

    /// Connecting over TLS (`rediss://`) failed because a certificate was refused: the server's
    /// by us (e.g. the CA given does not sign it), or ours by the server. Retrying does not help;
    /// `problem` says which certificate to fix. Returned while connecting: by [`connect`] and
    /// [`connect_with_tls`], or, with [`connect_lazy`], by the decision that connects (whatever
    /// the [`Policy`]: a refused certificate is not an outage).
    ///
    /// [`connect`]: crate::connect
    /// [`connect_with_tls`]: crate::connect_with_tls
    /// [`connect_lazy`]: crate::connect_lazy
    /// [`Policy`]: crate::Policy
    #[error("TLS with Redis failed: {problem}")]
    Tls {
        /// Which certificate was refused, and by whom.
        problem: TlsProblem,
        /// The client's error (with rustls's own message).
        #[source]
        source: redis::RedisError,
    },

    /// The script's reply did not have the expected shape (a different script under our SHA?).
    #[error("unexpected reply from the rate-limit script: {0}")]
    UnexpectedReply(String),

    /// `acquire_with_deadline` could not be admitted before its deadline. The decision is the last
    /// one seen (its `retry_after` says how much later it would have been admitted).
    #[error("not admitted before the deadline (retry after {:?})", .0.retry_after)]
    DeadlineExceeded(Decision),
}

/// Which certificate a TLS handshake refused, and by whom (see [`Error::Tls`]).
///
/// With the `tls` feature, [`TlsProblem::find`] reads it from any error whose chain holds a
/// rustls error: the redis crate's, and also etcd-client's (tonic) when they use the same rustls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsProblem {
    /// The server's certificate is not signed by a CA we trust: the CA certificate given is not
    /// the one that signed it (or, without one, the system's roots do not include its CA).
    ServerCertificateUntrusted,
    /// The server's certificate has expired or is not valid yet.
    ServerCertificateExpired,
    /// The server's certificate does not name the host of the URL.
    ServerNameMismatch,
    /// The server's certificate was refused for another reason (bad encoding, wrong purpose,
    /// unsupported algorithm, revoked).
    ServerCertificateInvalid,
    /// The server requires a client certificate and none was presented.
    ClientCertificateRequired,
    /// The server refused our client certificate because it has expired (or is not valid yet).
    ClientCertificateExpired,
    /// The server refused our client certificate because no CA it trusts signed it.
    ClientCertificateUntrusted,
    /// The server refused our client certificate without saying why (its alert was "bad
    /// certificate" or "certificate unknown", as Go servers such as etcd send for any reason).
    ClientCertificateRejected,
}

impl std::fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsProblem::ServerCertificateUntrusted => {
                "the server's certificate is not signed by the CA we trust; give the CA certificate that signed it"
            }
            TlsProblem::ServerCertificateExpired => {
                "the server's certificate has expired or is not valid yet; renew it on the server"
            }
            TlsProblem::ServerNameMismatch => {
                "the server's certificate does not name the host in the URL; connect by a name it lists"
            }
            TlsProblem::ServerCertificateInvalid => "the server's certificate is invalid",
            TlsProblem::ClientCertificateRequired => {
                "the server requires a client certificate and none was given"
            }
            TlsProblem::ClientCertificateExpired => {
                "the server refused our client certificate: it has expired (or is not valid yet)"
            }
            TlsProblem::ClientCertificateUntrusted => {
                "the server refused our client certificate: it is not signed by a CA the server trusts"
            }
            TlsProblem::ClientCertificateRejected => {
                "the server refused our client certificate (bad certificate)"
            }
        })
    }
}

#[cfg(feature = "tls")]
impl TlsProblem {
    /// The certificate problem behind `error`, if its chain (including errors wrapped in
    /// `std::io::Error`) holds a rustls certificate error or certificate alert; `None` for any
    /// other error.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
        type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
        let mut next = Some(error);
        // Bounded: a chain is short, and this never loops on a cyclic one.
        for _ in 0..32 {
            let mut e = next?;
            // The redis crate's `source()` is its `Arc<dyn Error>` itself: look through it.
            if let Some(shared) = e.downcast_ref::<Shared>() {
                e = &**shared;
            }
            if let Some(problem) = Self::of_rustls(e) {
                return Some(problem);
            }
            // `io::Error::source` skips the error it wraps; look inside it instead.
            let wrapped = e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .map(|inner| inner as &(dyn std::error::Error + 'static));
            next = wrapped.or_else(|| e.source());
        }
        None
    }

    fn of_rustls(error: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
        use rustls::{AlertDescription as A, CertificateError as C};
        Some(match error.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(cert) => match cert {
                C::UnknownIssuer | C::BadSignature => TlsProblem::ServerCertificateUntrusted,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsProblem::ServerCertificateExpired,
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    TlsProblem::ServerNameMismatch
                }
                _ => TlsProblem::ServerCertificateInvalid,
            },
            rustls::Error::AlertReceived(alert) => match alert {
                A::CertificateRequired => TlsProblem::ClientCertificateRequired,
                A::CertificateExpired => TlsProblem::ClientCertificateExpired,
                A::UnknownCA => TlsProblem::ClientCertificateUntrusted,
                A::BadCertificate
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateRevoked => TlsProblem::ClientCertificateRejected,
                _ => return None,
            },
            _ => return None,
        })
    }
}
