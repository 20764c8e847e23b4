//! What a job run by `once` sees of its claim: the key, the owner token, and when the claim
//! ends.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::OwnerToken;

/// The claim's state as the renewing task last saw it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClaimState {
    /// The instant (local monotonic clock) at which the claim may have run out in the store: the
    /// send time of the last renewal the store acknowledged plus `in_progress_ttl`, never later
    /// than the store's own expiry.
    pub(super) deadline: Instant,
    /// The claim is lost (taken over, or not renewed before `deadline`).
    pub(super) lost: bool,
}

/// The claim a job runs under, handed to it by
/// [`once_with_claim`](super::IdempotencyStore::once_with_claim), as
/// [`run_exclusive`](https://docs.rs/palisade-lock) hands a locked job its `JobContext`.
///
/// The claim is what makes a run "the" run of its key. It is lost when another runner takes the
/// key over (this runner was paused or cut off from the store for longer than
/// `in_progress_ttl`), or when renewals fail until the claim runs out. `once` then drops the
/// job's future, so the job stops at its next `.await`; [`cancelled`](Self::cancelled) is for
/// work the job handed to other tasks, threads or processes, to stop them too.
///
/// Cloning is cheap; clones watch the same claim.
#[derive(Debug, Clone)]
pub struct ClaimContext {
    key: String,
    token: OwnerToken,
    state: watch::Receiver<ClaimState>,
}

impl ClaimContext {
    pub(super) fn new(key: &str, token: OwnerToken, state: watch::Receiver<ClaimState>) -> Self {
        Self {
            key: key.to_string(),
            token,
            state,
        }
    }

    /// The idempotency key this run claimed.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The claim's owner token: unique to this run of the key (a run after a lost claim gets
    /// another). Record it with the job's effect, in the same write, so that a later run of the
    /// key can see that the effect was made and by which run (see the run-once contract in the
    /// [module docs](super)).
    pub fn token(&self) -> &OwnerToken {
        &self.token
    }

    /// Resolves when this run no longer holds the claim: it was lost (the job's own future is
    /// dropped at that moment), or `once` returned or was dropped.
    pub async fn cancelled(&self) {
        let mut state = self.state.clone();
        // An error means the sender is gone: `once` ended.
        let _ = state.wait_for(|s| s.lost).await;
    }

    /// Whether the claim is lost now (or `once` has ended). Check it before each external write
    /// from blocking code.
    pub fn is_cancelled(&self) -> bool {
        self.state.borrow().lost || self.state.has_changed().is_err()
    }

    /// The instant (local monotonic clock) at which the job is cancelled unless the claim is
    /// renewed before: the send time of the last renewal the store acknowledged plus
    /// `in_progress_ttl`, which is never later than the store's own expiry of the claim.
    pub fn deadline(&self) -> Instant {
        self.state.borrow().deadline
    }

    /// Resolves once renewals have failed for so long that the job will be cancelled within
    /// `margin` (now >= [`deadline`](Self::deadline) - `margin`), or the claim is lost: the
    /// moment to ask work outside the job's future to stop, so that it has stopped before another
    /// runner can claim the key.
    pub async fn expiring(&self, margin: Duration) {
        let mut state = self.state.clone();
        loop {
            let now = *state.borrow_and_update();
            if now.lost {
                return;
            }
            let at = now.deadline.checked_sub(margin).unwrap_or(now.deadline);
            if Instant::now() >= at {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
