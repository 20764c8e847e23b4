//! Run-once keys: a job or request retried by its runner runs once per idempotency key, and
//! later calls replay its recorded result.
//!
//! # The contract: at least once; exactly once when the job's effect is idempotent
//!
//! [`once`](IdempotencyStore::once) promises that a job whose result was recorded is never run
//! again for its key (until the record's `ttl` ends): later calls replay the result. It cannot
//! promise that the job's *effect* happened once, because no store can record a result in the
//! same atomic step as an effect outside it. A job runs **at least once**; it runs again, after
//! its effect may already have happened, when
//! - its runner died, or lost touch with the store for longer than `in_progress_ttl`, between
//!   the effect and the recording of the result (the claim lapses and the next call runs it);
//! - its claim was lost mid-run: the job is cancelled ([`Error::ClaimLost`]), but what it did
//!   before stays;
//! - its result could not be recorded ([`Error::NotRecorded`], after retries);
//! - it failed ([`Error::Job`]): nothing is recorded, so a retry runs it again.
//!
//! It runs **exactly once** only if its effect is made idempotent with its claim: use
//! [`once_with_claim`](IdempotencyStore::once_with_claim), and write the claim's
//! [`token`](ClaimContext::token) (with the key) into the target in the same transaction as the
//! effect, after checking whether an effect for the key is there already; or pass the key as the
//! downstream system's own idempotency key (Stripe's `Idempotency-Key`, a unique constraint).
//! Then a second run finds the first one's effect, by its key, and which run made it, by its
//! token, and does not repeat it.
//!
//! # How a run holds its key
//!
//! A key's record goes through two states. **In progress**: a runner claimed it with a random
//! owner token; `once` renews the claim every third of `in_progress_ttl` while the job runs,
//! so a live runner keeps it however long the job takes, and the claim lapses `in_progress_ttl`
//! after a runner died (or lost touch with the store), so a dead runner does not block the key
//! for ever. **Completed**: the owner stored the result, kept for `ttl`. Only the owner
//! token can complete or release a claim, atomically (a Lua script on Redis, a lock file and
//! rename for files, a mutex in memory): a runner that was presumed dead and comes back after its
//! claim was taken over gets [`Error::OwnershipLost`] and cannot overwrite the new owner's
//! record.
//!
//! While the job runs, `once` keeps its claim and watches it: when a renewal finds the key taken
//! over, or no renewal succeeds before the claim's deadline (the last acknowledged renewal's send
//! time plus `in_progress_ttl`, never later than the store's expiry), the job's future is
//! dropped at once and [`ClaimContext::cancelled`] fires, so the job never runs beside the
//! key's new owner; the caller gets [`Error::ClaimLost`].
//!
//! Recording the result is retried with exponential backoff (six attempts over about six
//! seconds, the claim renewed meanwhile) before `once` gives up with [`Error::NotRecorded`]; a
//! recording that the store applied but reported as failed is recognised on the retry. A job
//! that fails releases its claim and records nothing, so a retry runs it again. A `once` future
//! that is dropped mid-run (a request cancelled, a `select!` or `timeout` that gave up) releases
//! its claim in a task spawned on the current tokio runtime, so the key is free at once rather
//! than after `in_progress_ttl`.
//!
//! [`MemoryStore`] and [`FileStore`] remove expired records (and, for files, lock and temporary
//! files left behind) as they go, a bounded number per call; Redis expires its records itself.

mod context;
mod file;
mod memory;
mod redis_store;
mod run;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

pub use context::ClaimContext;
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
    /// [`Error::OwnershipLost`] if the key is no longer claimed by `owner`. Idempotent: if
    /// `owner` already completed the key, it succeeds again without changing the record, so a
    /// call that the store applied but reported as failed can be retried.
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
    /// The job runs **at least once**, not exactly once (see the [module docs](self) for when it
    /// runs again): make its effect idempotent, or use
    /// [`once_with_claim`](Self::once_with_claim) to make it so with the claim's token. If the
    /// claim is lost while the job runs, the job is cancelled (its future dropped) and the call
    /// fails with [`Error::ClaimLost`]. Dropping the returned future releases the claim, in a
    /// task spawned on the current tokio runtime; this is why the store must be `Clone + 'static`
    /// (every store of this crate is; wrap others in an [`Arc`]).
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
        Self: Sized + Clone + 'static,
        T: Serialize + DeserializeOwned + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, E>> + Send,
    {
        run::run_once(self, key, fingerprint, options, move |_claim| job())
    }

    /// [`once`](Self::once), handing the job its claim: the owner token to make the job's effect
    /// idempotent with, and the signal ([`ClaimContext::cancelled`],
    /// [`expiring`](ClaimContext::expiring)) to stop work the job handed to other tasks or
    /// processes when the claim is lost. The job's own future is dropped at that moment.
    ///
    /// ```
    /// use palisade_idempotency::{IdempotencyStore, MemoryStore, OnceOptions, Outcome};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let store = MemoryStore::new();
    /// let sent = store
    ///     .once_with_claim("invoice-42", "fp", &OnceOptions::default(), |claim| async move {
    ///         // In the effect's own transaction, e.g. `INSERT INTO sent (key, token) VALUES
    ///         // ($1, $2) ON CONFLICT (key) DO NOTHING`, and no effect if the key was there.
    ///         let (key, token) = (claim.key(), claim.token().as_str());
    ///         Ok::<_, std::io::Error>(format!("sent {key} in run {token}"))
    ///     })
    ///     .await?;
    /// assert!(matches!(sent, Outcome::Executed(s) if s.starts_with("sent invoice-42 in run ")));
    /// # Ok::<(), palisade_idempotency::Error>(()) }).unwrap();
    /// ```
    fn once_with_claim<T, E, F, Fut>(
        &self,
        key: &str,
        fingerprint: &str,
        options: &OnceOptions,
        job: F,
    ) -> impl Future<Output = Result<Outcome<T>>> + Send
    where
        Self: Sized + Clone + 'static,
        T: Serialize + DeserializeOwned + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        F: FnOnce(ClaimContext) -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, E>> + Send,
    {
        run::run_once(self, key, fingerprint, options, job)
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
