//! Run-once keys: a job or request retried by its runner runs once per idempotency key, and
//! later calls replay its recorded result.
//!
//! A key's record goes through two states. **In progress**: a runner claimed it with a random
//! owner token; `once` renews the claim every third of `in_progress_ttl` while the job runs,
//! so a live runner keeps it however long the job takes, and the claim lapses `in_progress_ttl`
//! after a runner died (or lost touch with the store), so a dead runner does not block the key
//! for ever. **Completed**: the owner stored the result, kept for `ttl`. Only the owner
//! token can complete or release a claim, atomically (a Lua script on Redis, a lock file and
//! rename for files, a mutex in memory): a runner that was presumed dead and comes back after its
//! claim was taken over gets [`Error::OwnershipLost`] and cannot overwrite the new owner's
//! record. A job that fails releases its claim and records nothing, so a retry runs it again.

mod file;
mod memory;
mod redis_store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::error::{Error, Result};

pub use file::FileStore;
pub use memory::MemoryStore;
pub use redis_store::RedisStore;

/// A random token that identifies one claim on a key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OwnerToken(String);

impl OwnerToken {
    /// A fresh random token.
    pub fn random() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Owner tokens are capabilities: do not print them.
        f.write_str("OwnerToken(..)")
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (or its claim had lapsed): the caller owns it now.
    Acquired(OwnerToken),
    /// Another runner holds the key.
    InProgress {
        /// The fingerprint of the request being run.
        fingerprint: String,
    },
    /// The key completed.
    Completed {
        /// The fingerprint of the request that completed.
        fingerprint: String,
        /// Its result, as JSON text.
        result: String,
    },
}

/// How a run-once call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// This call ran the job; its result is recorded.
    Executed(T),
    /// An earlier call ran the job; this is its recorded result.
    Replayed(T),
}

impl<T> Outcome<T> {
    /// The result, however it was obtained.
    pub fn into_inner(self) -> T {
        match self {
            Outcome::Executed(t) | Outcome::Replayed(t) => t,
        }
    }

    /// Whether the result was replayed.
    pub fn is_replayed(&self) -> bool {
        matches!(self, Outcome::Replayed(_))
    }
}

/// Options of a run-once call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
pub struct OnceOptions {
    /// How long a completed result is kept and replayed.
    pub ttl: Duration,
    /// How long a claim outlives its runner: `once` renews it every third of this while the job
    /// runs, so it lapses only this long after the runner died or lost touch with the store.
    pub in_progress_ttl: Duration,
    /// If set, a call that finds the key in progress waits up to this long for it to complete
    /// (or lapse) instead of failing with [`Error::InProgress`].
    pub wait: Option<Duration>,
    /// How often a waiting call checks the key.
    pub poll_interval: Duration,
}

impl Default for OnceOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            in_progress_ttl: Duration::from_secs(300),
            wait: None,
            poll_interval: Duration::from_millis(100),
        }
    }
}

impl OnceOptions {
    /// Keep completed results this long (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Let a claim lapse this long after its runner stopped renewing it (default 5 min). A live
    /// runner renews it every third of this, so it bounds how long a dead runner blocks the key,
    /// not how long a job may run.
    pub fn in_progress_ttl(mut self, ttl: Duration) -> Self {
        self.in_progress_ttl = ttl;
        self
    }

    /// Wait up to `wait` for an in-progress key instead of failing (default: fail at once).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Checks the options; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.ttl < Duration::from_millis(1) {
            return Err(Error::Config {
                field: "ttl",
                reason: "must be at least 1 ms",
            });
        }
        if self.in_progress_ttl < Duration::from_millis(1) {
            return Err(Error::Config {
                field: "in_progress_ttl",
                reason: "must be at least 1 ms",
            });
        }
        if self.poll_interval.is_zero() {
            return Err(Error::Config {
                field: "poll_interval",
                reason: "must be greater than zero",
            });
        }
        Ok(())
    }
}

/// A store of run-once records. Implementations make each method atomic.
///
/// The entry point is [`once`](IdempotencyStore::once); the three primitives are public so that
/// other runners (the CLI's `palisade once`) can build on them.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims `key` for a run of the request `fingerprint`, or reports the record that holds it.
    /// A claim whose `in_progress_ttl` passed is free again.
    async fn claim(&self, key: &str, fingerprint: &str, in_progress_ttl: Duration)
    -> Result<Claim>;

    /// Records the result of the claim `owner` (JSON text), kept for `ttl`. Fails with
    /// [`Error::OwnershipLost`] if the key is no longer claimed by `owner`.
    async fn complete(
        &self,
        key: &str,
        owner: &OwnerToken,
        result: &str,
        ttl: Duration,
    ) -> Result<()>;

    /// Drops the claim `owner` holds on `key` (after a failed job). Does nothing if `owner` no
    /// longer holds it.
    async fn release(&self, key: &str, owner: &OwnerToken) -> Result<()>;

    /// Renews the claim `owner` holds on `key` for another `in_progress_ttl` from now; false if
    /// `owner` no longer holds it (it lapsed and another runner took the key). `once` calls it
    /// every third of `in_progress_ttl` while the job runs, so a live runner keeps its claim
    /// however long the job takes, and only a runner that died lets it lapse.
    async fn extend(
        &self,
        key: &str,
        owner: &OwnerToken,
        in_progress_ttl: Duration,
    ) -> Result<bool>;

    /// Runs `job` once per `key`: the first call runs it and records its result; later calls with
    /// the same key and `fingerprint` get [`Outcome::Replayed`] without running it. See
    /// [`Error`] for the errors and their HTTP mapping.
    ///
    /// ```
    /// use palisade_idempotency::{IdempotencyStore, MemoryStore, OnceOptions, Outcome};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = MemoryStore::new();
    /// let opts = OnceOptions::default();
    /// let first = store.once("charge-42", "fp", &opts, || async { Ok::<_, std::io::Error>(7) }).await?;
    /// let again = store.once("charge-42", "fp", &opts, || async { Ok::<_, std::io::Error>(8) }).await?;
    /// assert_eq!((first, again), (Outcome::Executed(7), Outcome::Replayed(7)));
    /// # Ok::<(), palisade_idempotency::Error>(()) }).unwrap();
    /// ```
    fn once<T, E, F, Fut>(
        &self,
        key: &str,
        fingerprint: &str,
        options: &OnceOptions,
        job: F,
    ) -> impl Future<Output = Result<Outcome<T>>> + Send
    where
        Self: Sized,
        T: Serialize + DeserializeOwned + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, E>> + Send,
    {
        run_once(self, key, fingerprint, options, job)
    }
}

#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Arc<S> {
    async fn claim(&self, key: &str, fingerprint: &str, ttl: Duration) -> Result<Claim> {
        (**self).claim(key, fingerprint, ttl).await
    }
    async fn complete(
        &self,
        key: &str,
        owner: &OwnerToken,
        result: &str,
        ttl: Duration,
    ) -> Result<()> {
        (**self).complete(key, owner, result, ttl).await
    }
    async fn release(&self, key: &str, owner: &OwnerToken) -> Result<()> {
        (**self).release(key, owner).await
    }
    async fn extend(&self, key: &str, owner: &OwnerToken, ttl: Duration) -> Result<bool> {
        (**self).extend(key, owner, ttl).await
    }
}

/// Checks a key: non-empty, at most 512 bytes, no control characters.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::MissingKey);
    }
    if key.len() > 512 {
        return Err(Error::InvalidKey {
            reason: "longer than 512 bytes",
        });
    }
    if key.chars().any(char::is_control) {
        return Err(Error::InvalidKey {
            reason: "contains control characters",
        });
    }
    Ok(())
}

/// Renews `owner`'s claim every third of `ttl` for as long as it is polled (the job runs).
/// It never completes: when the claim is lost it stops renewing and waits (the job's `complete`
/// then reports [`Error::OwnershipLost`]); a failed renewal is retried at the next period.
async fn keep_claim<S: IdempotencyStore + ?Sized>(
    store: &S,
    key: &str,
    owner: &OwnerToken,
    ttl: Duration,
) -> std::convert::Infallible {
    let period = (ttl / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(period).await;
        match store.extend(key, owner, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(key, "the claim lapsed and another runner took the key");
                return std::future::pending().await;
            }
            Err(e) => tracing::warn!(key, error = %e, "could not renew the claim; retrying"),
        }
    }
}

#[tracing::instrument(name = "once", skip_all, fields(key = %key))]
async fn run_once<S, T, E, F, Fut>(
    store: &S,
    key: &str,
    fingerprint: &str,
    options: &OnceOptions,
    job: F,
) -> Result<Outcome<T>>
where
    S: IdempotencyStore + ?Sized,
    T: Serialize + DeserializeOwned + Send,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = std::result::Result<T, E>> + Send,
{
    validate_key(key)?;
    options.validate()?;
    let deadline = options.wait.map(|w| tokio::time::Instant::now() + w);
    loop {
        match store
            .claim(key, fingerprint, options.in_progress_ttl)
            .await?
        {
            Claim::Acquired(owner) => {
                debug!(key, "claimed; running the job");
                let ran: std::result::Result<T, Box<dyn std::error::Error + Send + Sync>> = tokio::select! {
                    ran = job() => ran.map_err(Into::into),
                    never = keep_claim(store, key, &owner, options.in_progress_ttl) => match never {},
                };
                return match ran {
                    Ok(value) => {
                        let json = match serde_json::to_string(&value) {
                            Ok(j) => j,
                            Err(source) => {
                                release_quietly(store, key, &owner).await;
                                return Err(Error::Serialization {
                                    what: "the job's result",
                                    source,
                                });
                            }
                        };
                        store.complete(key, &owner, &json, options.ttl).await?;
                        count("executed");
                        Ok(Outcome::Executed(value))
                    }
                    Err(e) => {
                        release_quietly(store, key, &owner).await;
                        Err(Error::Job(e))
                    }
                };
            }
            Claim::Completed {
                fingerprint: recorded,
                result,
            } => {
                if recorded != fingerprint {
                    return Err(Error::FingerprintMismatch {
                        key: key.to_string(),
                    });
                }
                let value =
                    serde_json::from_str(&result).map_err(|source| Error::Serialization {
                        what: "the recorded result",
                        source,
                    })?;
                debug!(key, "replayed");
                count("replayed");
                return Ok(Outcome::Replayed(value));
            }
            Claim::InProgress {
                fingerprint: recorded,
            } => {
                if recorded != fingerprint {
                    return Err(Error::FingerprintMismatch {
                        key: key.to_string(),
                    });
                }
                match deadline {
                    Some(d) if tokio::time::Instant::now() < d => {
                        tokio::time::sleep(options.poll_interval).await;
                    }
                    _ => {
                        return Err(Error::InProgress {
                            key: key.to_string(),
                        });
                    }
                }
            }
        }
    }
}

fn count(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("palisade_idempotency_once_total", "outcome" => outcome).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

async fn release_quietly<S: IdempotencyStore + ?Sized>(store: &S, key: &str, owner: &OwnerToken) {
    if let Err(e) = store.release(key, owner).await {
        warn!(key, error = %e, "could not release the claim; it lapses after in_progress_ttl");
    }
}
