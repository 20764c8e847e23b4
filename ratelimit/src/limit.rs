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

/// The units a period may be written in, with their length.
const UNITS: [(&str, Duration); 15] = [
    ("ms", Duration::from_millis(1)),
    ("s", Duration::from_secs(1)),
    ("sec", Duration::from_secs(1)),
    ("second", Duration::from_secs(1)),
    ("seconds", Duration::from_secs(1)),
    ("m", Duration::from_secs(60)),
    ("min", Duration::from_secs(60)),
    ("minute", Duration::from_secs(60)),
    ("minutes", Duration::from_secs(60)),
    ("h", Duration::from_secs(3600)),
    ("hour", Duration::from_secs(3600)),
    ("hours", Duration::from_secs(3600)),
    ("d", Duration::from_secs(86_400)),
    ("day", Duration::from_secs(86_400)),
    ("days", Duration::from_secs(86_400)),
];

impl std::str::FromStr for Limit {
    type Err = Error;

    /// `N/PERIOD`, where PERIOD is a unit (`ms`, `s`, `min` or `m`, `h`, `d`; also spelled
    /// out) optionally preceded by a count: `100/min`, `10/s`, `5000/h`, `3/10s`, `1000/1h`.
    fn from_str(text: &str) -> Result<Limit, Error> {
        let bad = |why: &str| Error::InvalidConfig {
            field: "limit",
            reason: format!(
                "{text:?} {why}; write N/PERIOD such as 100/min, 10/s, 5000/h or 3/10s"
            ),
        };
        let (max, period) = text.split_once('/').ok_or_else(|| bad("has no `/`"))?;
        let max: u32 = max
            .trim()
            .parse()
            .map_err(|_| bad("does not start with a whole number of units"))?;
        let period = period.trim();
        let digits = period.len()
            - period
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .len();
        let (count, unit) = period.split_at(digits);
        let count: u32 = if count.is_empty() {
            1
        } else {
            count
                .parse()
                .map_err(|_| bad("has a period count too large"))?
        };
        let unit = unit.trim();
        let length = UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|(_, d)| *d)
            .ok_or_else(|| bad("has no known unit (ms, s, min, h, d)"))?;
        if count == 0 {
            return Err(bad("has a period of zero"));
        }
        let window = length
            .checked_mul(count)
            .ok_or_else(|| bad("has a period longer than 366 days"))?;
        Limit::new(max, window)
    }
}

impl std::fmt::Display for Limit {
    /// The form [`Limit::from_str`](std::str::FromStr) reads: `100/min`, `3/10s`, `5/1500ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.window.as_millis();
        let exact = self.window.subsec_nanos().is_multiple_of(1_000_000);
        for (name, unit) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("min", 60_000),
            ("s", 1000),
        ] {
            if exact && ms.is_multiple_of(unit) {
                return match ms / unit {
                    1 => write!(f, "{}/{name}", self.max),
                    n => write!(f, "{}/{n}{name}", self.max),
                };
            }
        }
        if exact {
            write!(f, "{}/{ms}ms", self.max)
        } else {
            write!(f, "{} per {:?}", self.max, self.window)
        }
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
    /// Exact: one sorted-set entry per admitted decision, carrying its cost; never more than `max`
    /// units in any window. Memory per key ≈ 120 bytes × the decisions admitted in one window, at
    /// most `max` entries (fewer when decisions cost more than one unit).
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

    #[test]
    fn limits_parse_from_text_and_print_back() {
        let parse = |t: &str| t.parse::<Limit>();
        assert_eq!(parse("100/min").unwrap(), Limit::per_minute(100).unwrap());
        assert_eq!(parse("10/s").unwrap(), Limit::per_second(10).unwrap());
        assert_eq!(parse("5000/h").unwrap(), Limit::per_hour(5000).unwrap());
        assert_eq!(
            parse(" 3 / 10s ").unwrap().window(),
            Duration::from_secs(10)
        );
        assert_eq!(parse("1000/1h").unwrap(), Limit::per_hour(1000).unwrap());
        assert_eq!(
            parse("7/2days").unwrap().window(),
            Duration::from_secs(172_800)
        );
        assert_eq!(
            parse("5/250ms").unwrap().window(),
            Duration::from_millis(250)
        );
        for text in ["100/min", "3/10s", "5/1500ms", "1/d", "2/36h", "4/90s"] {
            assert_eq!(parse(text).unwrap().to_string(), text);
        }
        for (bad, says) in [
            ("", "no `/`"),
            ("5", "no `/`"),
            ("x/s", "whole number"),
            ("-1/s", "whole number"),
            ("0/s", "`max`"),
            ("5/", "no known unit"),
            ("5/fortnight", "no known unit"),
            ("5/0s", "period of zero"),
            ("5/400d", "366 days"),
            ("5/4294967295d", "366 days"),
        ] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert!(
            parse("5/fortnight")
                .unwrap_err()
                .to_string()
                .contains("100/min")
        );
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
