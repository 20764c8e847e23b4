//! What a limit is: at most `max` units per sliding `window`.

use std::time::Duration;

use crate::Error;

/// The shortest window a limit may have.
pub const MIN_WINDOW: Duration = Duration::from_millis(1);
/// The longest window a limit may have.
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// At most `max` units in any `window` (a sliding window: any interval of that length, not
/// calendar-aligned buckets). A `Limit` that exists is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(try_from = "LimitConfig", into = "LimitConfig")
)]
pub struct Limit {
    max: u32,
    window: Duration,
}

impl Limit {
    /// At most `max` units per `window`. Rejects `max == 0` and windows shorter than 1 ms or
    /// longer than 366 days.
    pub fn new(max: u32, window: Duration) -> Result<Self, Error> {
        if max == 0 {
            return Err(Error::InvalidConfig {
                field: "max",
                reason: "must be at least 1 (a limit of 0 admits nothing; deny instead)".into(),
            });
        }
        if window < MIN_WINDOW {
            return Err(Error::InvalidConfig {
                field: "window",
                reason: format!("is {window:?}; it must be at least {MIN_WINDOW:?}"),
            });
        }
        if window > MAX_WINDOW {
            return Err(Error::InvalidConfig {
                field: "window",
                reason: format!("is {window:?}; it must be at most 366 days"),
            });
        }
        Ok(Self { max, window })
    }

    /// At most `n` units per second.
    pub fn per_second(n: u32) -> Result<Self, Error> {
        Self::new(n, Duration::from_secs(1))
    }

    /// At most `n` units per minute.
    pub fn per_minute(n: u32) -> Result<Self, Error> {
        Self::new(n, Duration::from_secs(60))
    }

    /// At most `n` units per hour.
    pub fn per_hour(n: u32) -> Result<Self, Error> {
        Self::new(n, Duration::from_secs(3600))
    }

    /// The most units admitted in any window.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The length of the sliding window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The window in whole microseconds (rounded up).
    pub(crate) fn window_us(&self) -> i64 {
        let us = self.window.as_nanos().div_ceil(1000);
        us as i64
    }
}

/// The serde form of a [`Limit`]: `{ max = 100, window_ms = 1000 }`.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
struct LimitConfig {
    max: u32,
    window_ms: u64,
}

#[cfg(feature = "serde")]
impl TryFrom<LimitConfig> for Limit {
    type Error = Error;
    fn try_from(c: LimitConfig) -> Result<Self, Error> {
        Limit::new(c.max, Duration::from_millis(c.window_ms))
    }
}

#[cfg(feature = "serde")]
impl From<Limit> for LimitConfig {
    fn from(l: Limit) -> Self {
        LimitConfig {
            max: l.max,
            window_ms: l.window.as_millis() as u64,
        }
    }
}

/// Which algorithm a [`crate::RedisLimiter`] runs on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Algorithm {
    /// Exact: one sorted-set entry per admitted unit; never more than `max` in any window.
    /// Memory per key grows with `max`.
    #[default]
    SlidingLog,
    /// Approximate, O(1) memory per key: the current fixed window plus the previous one weighted
    /// by its overlap with the sliding window. May over-admit on bursty traffic (see the crate docs).
    SlidingWindowCounter,
    /// GCRA (a token bucket kept as one timestamp): one unit every `window / max`, up to `burst`
    /// units at once. O(1) memory per key.
    Gcra {
        /// How many units may be admitted back to back (≥ 1); also the largest cost of one request.
        burst: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_limits_are_rejected_with_the_field_named() {
        let e = Limit::per_second(0).unwrap_err();
        assert!(e.to_string().contains("`max`"), "{e}");
        let e = Limit::new(5, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("`window`"), "{e}");
        let e = Limit::new(5, Duration::from_secs(400 * 86400)).unwrap_err();
        assert!(e.to_string().contains("366 days"), "{e}");
        let l = Limit::per_minute(7).unwrap();
        assert_eq!((l.max(), l.window()), (7, Duration::from_secs(60)));
        assert_eq!(Limit::per_hour(1).unwrap().window_us(), 3_600_000_000);
    }
}

#[cfg(all(test, feature = "serde"))]
mod serde_tests {
    use super::*;

    #[test]
    fn limits_deserialize_validated() {
        let l: Limit = serde_json::from_str(r#"{"max": 100, "window_ms": 60000}"#).unwrap();
        assert_eq!(l, Limit::per_minute(100).unwrap());
        let e = serde_json::from_str::<Limit>(r#"{"max": 0, "window_ms": 1000}"#).unwrap_err();
        assert!(e.to_string().contains("`max`"), "{e}");
        let a: Algorithm = serde_json::from_str(r#"{"Gcra": {"burst": 5}}"#).unwrap();
        assert_eq!(a, Algorithm::Gcra { burst: 5 });
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"max":100,"window_ms":60000}"#
        );
    }
}
