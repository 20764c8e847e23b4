//! Where the breaker gets the time from.
//!
//! The breaker never reads the system clock directly: it asks a [`Clock`]. Production code uses
//! [`MonotonicClock`]; tests use [`FakeClock`] (advanced by hand) or [`TokioClock`] (follows
//! tokio's paused time, so `tokio::time::advance` and backon's sleeps move it).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonic source of time for a breaker.
///
/// `now()` is the time elapsed since an arbitrary origin fixed when the clock was created; only
/// differences between two readings of the same clock mean anything. It must never go backwards.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The time elapsed since this clock's origin.
    fn now(&self) -> Duration;
}

/// The default clock: the CPU's time-stamp counter through `quanta` (calibrated against the OS
/// monotonic clock, falling back to it where the counter is not usable), measured from the
/// clock's creation. A reading costs a few nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: quanta::Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: quanta::Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    #[inline]
    fn now(&self) -> Duration {
        quanta::Instant::now().saturating_duration_since(self.origin)
    }
}

/// A clock that only moves when told to: for deterministic tests of time logic.
///
/// Clones share the same time, so a test keeps one clone and gives another to the breaker.
///
/// ```
/// use palisade_breaker::{Clock, FakeClock};
/// use std::time::Duration;
///
/// let clock = FakeClock::new();
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Default)]
pub struct FakeClock {
    nanos: Arc<AtomicU64>,
}

impl FakeClock {
    /// A fake clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos
            .fetch_add(duration_to_nanos(by), Ordering::SeqCst);
    }

    /// Sets the clock to `to` (which must not be earlier than the current time).
    pub fn set(&self, to: Duration) {
        self.nanos
            .fetch_max(duration_to_nanos(to), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// A clock on [`tokio::time::Instant`]: it follows tokio's paused and advanced time in tests
/// (`#[tokio::test(start_paused = true)]`), and is the real monotonic time otherwise.
///
/// Create it inside a tokio runtime when time is paused, so that its origin is on the paused clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is tokio's now.
    pub fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// Nanoseconds in `d`, saturating at `u64::MAX` (585 years).
pub(crate) fn duration_to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
