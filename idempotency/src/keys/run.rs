//! The run-once runner: claim, run the job while renewing the claim (cancelling the job when the
//! claim is lost), record the result with retries, and give the claim back however the run ends.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::context::{ClaimContext, ClaimState};
use super::{Claim, IdempotencyStore, OnceOptions, Outcome, OwnerToken, validate_key};
use crate::error::{Error, Result};

/// Attempts at recording a result before `once` gives up with [`Error::NotRecorded`]: the first
/// and up to five retries, 100 ms to 3.2 s apart (with jitter), about 6 s in all. The claim is
/// renewed meanwhile.
const COMPLETE_ATTEMPTS: usize = 6;

/// How long after a failed renewal the next one is tried, as a fraction of the renewal period.
const RENEW_RETRY_DIVISOR: u32 = 4;

#[tracing::instrument(name = "once", skip_all, fields(key = %key))]
pub(super) async fn run_once<S, T, E, F, Fut>(
    store: &S,
    key: &str,
    fingerprint: &str,
    options: &OnceOptions,
    job: F,
) -> Result<Outcome<T>>
where
    S: IdempotencyStore + Clone + 'static,
    T: Serialize + DeserializeOwned + Send,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: FnOnce(ClaimContext) -> Fut + Send,
    Fut: Future<Output = std::result::Result<T, E>> + Send,
{
    validate_key(key)?;
    options.validate()?;
    let deadline = options.wait.map(|w| Instant::now() + w);
    loop {
        // The claim's local deadline counts from before the request: the store's expiry is later.
        let sent = Instant::now();
        match store
            .claim(key, fingerprint, options.in_progress_ttl)
            .await?
        {
            Claim::Acquired(owner) => {
                return run_claimed(store, key, owner, sent, options, job).await;
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
                    Some(d) if Instant::now() < d => {
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

/// Runs `job` under the claim `owner` acquired at `claimed_at`, and records its result.
async fn run_claimed<S, T, E, F, Fut>(
    store: &S,
    key: &str,
    owner: OwnerToken,
    claimed_at: Instant,
    options: &OnceOptions,
    job: F,
) -> Result<Outcome<T>>
where
    S: IdempotencyStore + Clone + 'static,
    T: Serialize + DeserializeOwned + Send,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: FnOnce(ClaimContext) -> Fut + Send,
    Fut: Future<Output = std::result::Result<T, E>> + Send,
{
    debug!(key, "claimed; running the job");
    // From here until the claim is completed or released, a drop of this future (the caller gave
    // up) gives the claim back instead of blocking the key for `in_progress_ttl`.
    let mut guard = ReleaseOnDrop::new(store, key, &owner);
    let ttl = options.in_progress_ttl;
    let (state_tx, state_rx) = watch::channel(ClaimState {
        deadline: claimed_at + ttl,
        lost: false,
    });
    let context = ClaimContext::new(key, owner.clone(), state_rx);
    let keeper = keep_claim(store, key, &owner, ttl, &state_tx);
    tokio::pin!(keeper);

    let ran: std::result::Result<T, Box<dyn std::error::Error + Send + Sync>> = tokio::select! {
        // Polled first on every wake-up: a job resumed after its claim ran out is dropped before
        // it runs another step.
        biased;
        lost = &mut keeper => {
            warn!(key, error = %lost, "claim lost mid-run: job cancelled");
            count("claim_lost");
            // The guard gives the claim back in the background, in case it is still ours.
            return Err(lost);
        }
        ran = job(context) => ran.map_err(Into::into),
    };
    let value = match ran {
        Ok(value) => value,
        Err(e) => {
            release_quietly(store, key, &owner).await;
            guard.disarm();
            return Err(Error::Job(e));
        }
    };
    let json = match serde_json::to_string(&value) {
        Ok(j) => j,
        Err(source) => {
            release_quietly(store, key, &owner).await;
            guard.disarm();
            return Err(Error::Serialization {
                what: "the job's result",
                source,
            });
        }
    };
    let attempts = AtomicUsize::new(0);
    let complete = || async {
        attempts.fetch_add(1, Ordering::Relaxed);
        store.complete(key, &owner, &json, options.ttl).await
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(4))
        .with_max_times(COMPLETE_ATTEMPTS - 1)
        .with_jitter();
    let recorded = tokio::select! {
        biased;
        // A renewal that reached the store after an in-flight `complete` finds the key completed
        // and reports it lost: ask once more (`complete` is idempotent for its owner) before
        // calling the result unrecorded.
        lost = &mut keeper => complete().await.map_err(|_| lost),
        done = complete
            .retry(backoff)
            .sleep(tokio::time::sleep)
            // Only the owner can complete: once the claim is someone else's, retrying is futile.
            .when(|e| !matches!(e, Error::OwnershipLost { .. }))
            .notify(|e, after| {
                warn!(key, error = %e, ?after, "could not record the result; retrying");
            }) => done,
    };
    match recorded {
        Ok(()) => {
            guard.disarm();
            count("executed");
            Ok(Outcome::Executed(value))
        }
        // The claim was taken over: the new owner's run decides the key.
        Err(lost @ Error::OwnershipLost { .. }) => Err(lost),
        Err(source) => {
            warn!(key, error = %source, "the job ran but its result was not recorded");
            count("not_recorded");
            // Free the key now rather than after `in_progress_ttl` (a no-op if the store did
            // record the result, or if the claim is someone else's now).
            release_quietly(store, key, &owner).await;
            guard.disarm();
            Err(Error::NotRecorded {
                key: key.to_string(),
                attempts: attempts.load(Ordering::Relaxed),
                source: Box::new(source),
            })
        }
    }
}

/// Renews `owner`'s claim every third of `ttl` for as long as it is polled, and reports in
/// `state` until when the claim is known to hold. Returns [`Error::ClaimLost`] when the store
/// says another runner holds the key, or when no renewal succeeded before the claim's deadline
/// (the store may have expired it, and another runner may have claimed it since).
async fn keep_claim<S: IdempotencyStore + ?Sized>(
    store: &S,
    key: &str,
    owner: &OwnerToken,
    ttl: Duration,
    state: &watch::Sender<ClaimState>,
) -> Error {
    let period = (ttl / 3).max(Duration::from_millis(1));
    let retry = (period / RENEW_RETRY_DIVISOR).max(Duration::from_millis(1));
    let mut next = Instant::now() + period;
    let mut last_error: Option<Error> = None;
    let lost = |reason: &'static str, source: Option<Error>| {
        state.send_modify(|s| s.lost = true);
        Error::ClaimLost {
            key: key.to_string(),
            reason,
            source: source.map(Box::new),
        }
    };
    loop {
        let deadline = state.borrow().deadline;
        let renewal = async {
            tokio::time::sleep_until(next).await;
            let sent = Instant::now();
            (sent, store.extend(key, owner, ttl).await)
        };
        // Timers round up to the next millisecond: end a millisecond early, so that the job is
        // gone by the deadline and never runs past it.
        let cut_off = deadline
            .checked_sub(Duration::from_millis(1))
            .unwrap_or(deadline);
        match tokio::time::timeout_at(cut_off, renewal).await {
            Ok((sent, Ok(true))) => {
                last_error = None;
                state.send_modify(|s| s.deadline = sent + ttl);
                next = sent + period;
            }
            Ok((_, Ok(false))) => {
                return lost("another runner took the key over", None);
            }
            Ok((_, Err(e))) => {
                warn!(key, error = %e, "could not renew the claim; retrying");
                last_error = Some(e);
                next = Instant::now() + retry;
            }
            Err(_elapsed) => {
                return lost(
                    "it could not be renewed before in_progress_ttl ran out",
                    last_error,
                );
            }
        }
    }
}

/// Gives a claim back when the run that holds it is dropped before it completed or released it:
/// the release is spawned on the current tokio runtime (a drop cannot wait for it). Without a
/// runtime, or if the release fails, the claim lapses after `in_progress_ttl`.
struct ReleaseOnDrop<S: IdempotencyStore + Clone + 'static> {
    /// `None` once disarmed: the claim was completed or released.
    armed: Option<(S, String, OwnerToken)>,
}

impl<S: IdempotencyStore + Clone + 'static> ReleaseOnDrop<S> {
    fn new(store: &S, key: &str, owner: &OwnerToken) -> Self {
        Self {
            armed: Some((store.clone(), key.to_string(), owner.clone())),
        }
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl<S: IdempotencyStore + Clone + 'static> Drop for ReleaseOnDrop<S> {
    fn drop(&mut self) {
        let Some((store, key, owner)) = self.armed.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                debug!(key, "run dropped before it ended; releasing its claim");
                runtime.spawn(async move { release_quietly(&store, &key, &owner).await });
            }
            Err(_) => {
                warn!(
                    key,
                    "run dropped outside a tokio runtime; its claim lapses after in_progress_ttl"
                );
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
