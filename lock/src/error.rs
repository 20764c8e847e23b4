//! The one error type of palisade-lock.

use std::time::Duration;

use crate::job::JobInfo;

/// Everything that can go wrong while taking, holding or releasing a lock.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// `try_lock` (or `Wait::No`) found the lock held by someone else.
    #[error("lock is held by {}; retry later or wait with `lock`/`lock_timeout`", describe_holder(.holder))]
    Held {
        /// The holder's job, when it registered one (`run_exclusive` does).
        holder: Option<Box<JobInfo>>,
    },

    /// `lock_timeout` gave up before the lock became free.
    #[error(
        "lock {name:?} was not acquired within {waited:?}; raise the timeout or find the holder with `registry().running()`"
    )]
    Timeout {
        /// The lock name.
        name: String,
        /// How long we waited.
        waited: Duration,
    },

    /// The lease behind the lock (or behind the waiter's queue entry) could no longer be proven
    /// alive: the guarded work was cancelled. Re-acquire the lock before writing again.
    #[error(
        "the lock's lease was lost (expired, revoked or not renewed within its TTL); the guarded work was cancelled, re-acquire before writing again"
    )]
    Lost,

    /// Holders of one semaphore disagree about its number of permits: a slot is held by a
    /// contender that asked for `theirs` permits, and we asked for `ours`. Nothing was taken.
    #[error(
        "semaphore {name:?} is held with {theirs} permits, and this contender asked for {ours}; every holder of one semaphore must use the same number (or use another name)"
    )]
    PermitsMismatch {
        /// The semaphore's name.
        name: String,
        /// The permits we asked for.
        ours: u32,
        /// The permits a current holder asked for.
        theirs: u32,
    },

    /// A name that the backends cannot store.
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A configuration value was refused by `build()`/`connect()`.
    #[error("invalid configuration `{field}`: {reason}")]
    Config {
        /// The field (builder method) at fault.
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },

    /// A file-backend operation failed.
    #[error("{op} {path:?} failed: {source}; check that the lock directory exists and is writable")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The coordination server (etcd) failed or could not be reached.
    #[error(
        "{op} failed on the coordination server: {source}; check the endpoints and credentials"
    )]
    Backend {
        /// What we were doing.
        op: &'static str,
        /// The client error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A TLS handshake with etcd failed on a certificate: etcd's is not signed by the CA the
    /// client trusts (or names another host), or etcd refused the client's certificate with an
    /// alert. Not retried: fix the certificates. Only with the `tls` feature; etcd usually
    /// closes the connection on a refused client certificate without an alert the client reads,
    /// which shows as a [`LockError::Backend`] transport error once the retries are spent.
    #[error(
        "{op} failed: TLS with the coordination server refused a certificate: {source}; check that the CA certificate signed the server's, and the client certificate and key"
    )]
    Tls {
        /// What we were doing.
        op: &'static str,
        /// The client error (it holds rustls's reason).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// Stored data could not be decoded (written by another version or by hand).
    #[error("could not decode {what}: {detail}; remove the entry or upgrade palisade-lock")]
    Corrupt {
        /// Which entry.
        what: String,
        /// The decoder's message.
        detail: String,
    },
}

fn describe_holder(holder: &Option<Box<JobInfo>>) -> String {
    match holder {
        Some(job) => format!(
            "job {:?} (pid {} on {}, token {})",
            job.name,
            job.pid,
            job.host,
            job.fencing_token
                .map_or_else(|| "?".into(), |t| t.to_string())
        ),
        None => "another holder".into(),
    }
}

impl LockError {
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn backend(
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        LockError::Backend {
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        LockError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Checks a lock, election or job name: not empty, no `/` (it separates key parts on etcd), no
/// control characters, at most 200 bytes.
pub(crate) fn validate_name(name: &str) -> Result<(), LockError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > 200 {
        "it is longer than 200 bytes"
    } else if name.contains('/') {
        "it contains '/', which separates key parts; use another separator such as ':'"
    } else if name.chars().any(char::is_control) {
        "it contains control characters"
    } else {
        return Ok(());
    };
    Err(LockError::InvalidName {
        name: name.to_string(),
        reason,
    })
}
