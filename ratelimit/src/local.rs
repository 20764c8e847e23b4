//! The embedded default: an in-process keyed limiter on `governor`, timed by tokio's clock.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use std::cell::RefCell;

use governor::clock::{Clock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, nanos::Nanos};

use crate::{Decision, Error, Limit, RateLimiter};

/// Governor's clock reading tokio's [`tokio::time::Instant`], so that paused tokio time
/// (`tokio::time::pause`, `start_paused`) drives the local limiter in tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

/// An instant of [`TokioClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl std::ops::Add<Nanos> for TokioInstant {
    type Output = TokioInstant;
    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }
    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(self.0.checked_sub(duration.into()).unwrap_or(self.0))
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

type Keyed<C> =
    governor::RateLimiter<String, DefaultKeyedStateStore<String>, C, StateInformationMiddleware>;

/// The clock a [`LocalLimiter`] uses unless told otherwise: governor's default (quanta, the
/// fastest monotonic clock on the platform).
pub type DefaultClock = governor::clock::DefaultClock;

thread_local! {
    /// Governor's keyed limiter looks keys up by `&String`; callers hand us `&str`. Copying into
    /// a per-thread buffer avoids an allocation per decision (governor clones the key only when
    /// it first stores it).
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The embedded default limiter: in-process, keyed, no server.
///
/// It is governor's keyed GCRA with one unit replenished every `window / max` and a burst of
/// `max` (or the burst given to [`LocalLimiter::with_burst`]): a quiet key may take `max` units
/// at once, then units come back at the steady rate. Unlike the Redis sliding log this is not a
/// hard cap per sliding window (a full burst followed by the steady rate admits up to about
/// `2 × max` in one window); it limits one process only. Cloning shares the state.
///
/// The clock is governor's fastest ([`DefaultClock`]); for tests on tokio's paused clock, build
/// it with [`LocalLimiter::with_clock`] and [`TokioClock`].
pub struct LocalLimiter<C: Clock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

impl<C: Clock> Clone for LocalLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Clock> std::fmt::Debug for LocalLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("burst", &self.inner.burst)
            .field("per_unit", &self.inner.per_unit)
            .finish_non_exhaustive()
    }
}

struct Inner<C: Clock> {
    limiter: Keyed<C>,
    burst: u32,
    /// The time one unit takes to come back.
    per_unit: Duration,
    /// `per_unit` in nanoseconds (fits: at most a 366-day window per unit).
    per_unit_ns: u64,
    /// The time a whole burst takes to come back (the `window` reported in decisions).
    window: Duration,
}

impl LocalLimiter {
    /// A limiter admitting `limit.max()` units per `limit.window()` for each key, in bursts of up
    /// to `limit.max()`.
    pub fn new(limit: Limit) -> Result<Self, Error> {
        Self::with_burst(limit, limit.max())
    }

    /// Like [`LocalLimiter::new`] with an explicit burst (units admitted back to back, ≥ 1).
    pub fn with_burst(limit: Limit, burst: u32) -> Result<Self, Error> {
        LocalLimiter::with_clock(limit, burst, DefaultClock::default())
    }
}

impl<C> LocalLimiter<C>
where
    C: Clock + Clone,
{
    /// A limiter of `limit` with bursts of `burst`, timed by `clock` (e.g. [`TokioClock`]).
    pub fn with_clock(limit: Limit, burst: u32, clock: C) -> Result<Self, Error> {
        let burst_nz = NonZeroU32::new(burst).ok_or_else(|| Error::InvalidConfig {
            field: "burst",
            reason: "must be at least 1".into(),
        })?;
        let period = limit.window() / limit.max();
        let quota = Quota::with_period(period)
            .ok_or_else(|| Error::InvalidConfig {
                field: "max",
                reason: format!(
                    "{} per {:?} is finer than 1 ns per unit; use a longer window",
                    limit.max(),
                    limit.window()
                ),
            })?
            .allow_burst(burst_nz);
        let limiter: Keyed<C> =
            governor::RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock);
        Ok(Self {
            inner: Arc::new(Inner {
                limiter,
                burst,
                per_unit: quota.replenish_interval(),
                per_unit_ns: quota.replenish_interval().as_nanos() as u64,
                window: period * burst,
            }),
        })
    }

    /// Decides `n` units for `key` now, synchronously (the async trait methods call this).
    #[inline]
    pub fn check_n_now(&self, key: &str, n: u32) -> Result<Decision, Error> {
        let Some(cells) = NonZeroU32::new(n) else {
            return Err(Error::ZeroCost);
        };
        let inner = &*self.inner;
        if n > inner.burst {
            return Err(Error::CostExceedsLimit {
                cost: n,
                capacity: inner.burst,
            });
        }
        let outcome = KEY.with_borrow_mut(|buf| {
            buf.clear();
            buf.push_str(key);
            // governor's single-cell check is its fast path; `check_key_n` multiplies.
            if n == 1 {
                Ok(inner.limiter.check_key(buf))
            } else {
                inner.limiter.check_key_n(buf, cells)
            }
        });
        Ok(match outcome {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit: inner.burst,
                    remaining,
                    retry_after: None,
                    reset_after: Duration::from_nanos(
                        inner
                            .per_unit_ns
                            .saturating_mul(u64::from(inner.burst.saturating_sub(remaining))),
                    ),
                    window: inner.window,
                    server_time: None,
                }
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(inner.limiter.clock().now());
                Decision {
                    allowed: false,
                    limit: inner.burst,
                    remaining: 0,
                    retry_after: Some(wait.max(Duration::from_nanos(1))),
                    reset_after: wait + inner.per_unit * inner.burst,
                    window: inner.window,
                    server_time: None,
                }
            }
            Err(insufficient) => {
                return Err(Error::CostExceedsLimit {
                    cost: n,
                    capacity: insufficient.0,
                });
            }
        })
    }

    /// Forgets keys whose limit is fully replenished, so memory follows the active keys.
    pub fn retain_recent(&self) {
        self.inner.limiter.retain_recent();
    }

    /// The number of keys currently tracked.
    pub fn len(&self) -> usize {
        self.inner.limiter.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.inner.limiter.is_empty()
    }
}

impl<C> RateLimiter for LocalLimiter<C>
where
    C: Clock + Clone + Send + Sync,
    C::Instant: Send + Sync,
{
    #[inline]
    fn check_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send {
        std::future::ready(self.check_n_now(key, n))
    }
}
