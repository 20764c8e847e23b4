//! The one trait every limiter implements, and the waiting built on top of `check`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::{Decision, Error};

/// The shortest sleep between two attempts of `acquire`, so that it never busy-polls even if a
/// limiter answers a denial with a zero `retry_after`.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// A rate limiter: decides whether `key` may spend `n` units now.
///
/// `check`/`check_n` answer at once; `acquire`/`acquire_n` wait (sleeping for the decision's
/// `retry_after` plus a little jitter, never polling) until admitted;
/// `acquire_with_deadline` gives up with [`Error::DeadlineExceeded`] as soon as it knows the
/// deadline cannot be met.
pub trait RateLimiter: Send + Sync {
    /// Decides `n` units for `key`. A cost larger than the limit's capacity is an error. A cost
    /// of 0 is a peek: it consumes nothing and answers what the key has left (`remaining`,
    /// `reset_after`); it is `allowed` unless the key is already over its limit (which a lowered
    /// `max` can cause).
    fn check_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send;

    /// What `key` has left, without consuming anything (`check_n(key, 0)`).
    fn peek(&self, key: &str) -> impl Future<Output = Result<Decision, Error>> + Send {
        self.check_n(key, 0)
    }

    /// Decides one unit for `key`.
    #[inline]
    fn check(&self, key: &str) -> impl Future<Output = Result<Decision, Error>> + Send {
        self.check_n(key, 1)
    }

    /// Waits until one unit for `key` is admitted.
    fn acquire(&self, key: &str) -> impl Future<Output = Result<Decision, Error>> + Send {
        acquire_until(self, key, 1, None)
    }

    /// Waits until `n` units for `key` are admitted.
    fn acquire_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send {
        acquire_until(self, key, n, None)
    }

    /// Waits until `n` units for `key` are admitted, or fails with [`Error::DeadlineExceeded`]
    /// once the next possible admission would come after `deadline` (without sleeping in vain).
    fn acquire_with_deadline(
        &self,
        key: &str,
        n: u32,
        deadline: Instant,
    ) -> impl Future<Output = Result<Decision, Error>> + Send {
        acquire_until(self, key, n, Some(deadline))
    }
}

/// The wait before the next attempt: `retry_after` plus up to 10% (at most 20 ms) of jitter, so
/// that clients denied together do not all come back at the same instant.
pub(crate) fn wait_for(decision: &Decision) -> Duration {
    let base = decision.retry_after.unwrap_or(MIN_WAIT).max(MIN_WAIT);
    let spread = (base / 10).min(Duration::from_millis(20));
    let jitter = if spread.is_zero() {
        Duration::ZERO
    } else {
        let nanos = rand::rng().random_range(0..=spread.as_nanos() as u64);
        Duration::from_nanos(nanos)
    };
    base + jitter
}

async fn acquire_until<L: RateLimiter + ?Sized>(
    limiter: &L,
    key: &str,
    n: u32,
    deadline: Option<Instant>,
) -> Result<Decision, Error> {
    loop {
        let decision = limiter.check_n(key, n).await?;
        if decision.allowed {
            return Ok(decision);
        }
        let wait = wait_for(&decision);
        if let Some(deadline) = deadline {
            let earliest = Instant::now() + decision.retry_after.unwrap_or(MIN_WAIT);
            if earliest > deadline {
                return Err(Error::DeadlineExceeded(decision));
            }
            tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
        } else {
            tokio::time::sleep(wait).await;
        }
        tracing::trace!(key, n, ?wait, "rate limit: retrying after wait");
    }
}

impl<L: RateLimiter> RateLimiter for Arc<L> {
    fn check_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send {
        (**self).check_n(key, n)
    }
}

impl<L: RateLimiter> RateLimiter for &L {
    fn check_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send {
        (**self).check_n(key, n)
    }
}
