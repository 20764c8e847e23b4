//! The pure decisions of the breaker: functions of (configuration, counts, time) with no atomics,
//! no locks and no clock. The breaker (`breaker.rs`) reads its atomics and its clock, asks these
//! functions what to do, and applies the answer.

use std::time::Duration;

use crate::config::Config;

/// What one settled call contributes to a window: a failure, a slow call, both, or neither
/// (a fast success). Packed in two bits so the lock-free window can store it in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Mark(pub(crate) u8);

impl Mark {
    pub(crate) const FAILURE: u8 = 1;
    pub(crate) const SLOW: u8 = 2;

    pub(crate) fn new(failure: bool, slow: bool) -> Mark {
        Mark((u8::from(failure) * Mark::FAILURE) | (u8::from(slow) * Mark::SLOW))
    }

    pub(crate) fn is_failure(self) -> bool {
        self.0 & Mark::FAILURE != 0
    }

    pub(crate) fn is_slow(self) -> bool {
        self.0 & Mark::SLOW != 0
    }
}

/// The counts of a window at one moment: how many calls it holds, and how many of them failed
/// or were slow (a slow failure counts in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowStats {
    /// Calls held by the window.
    pub calls: u64,
    /// Failed calls among them.
    pub failures: u64,
    /// Slow calls among them.
    pub slow: u64,
}

impl WindowStats {
    pub(crate) fn failure_rate(&self) -> f64 {
        rate(self.failures, self.calls)
    }

    pub(crate) fn slow_rate(&self) -> f64 {
        rate(self.slow, self.calls)
    }
}

fn rate(part: u64, calls: u64) -> f64 {
    if calls == 0 {
        0.0
    } else {
        part as f64 / calls as f64
    }
}

/// Whether rates computed over `stats` open the breaker: the window holds at least the minimum
/// number of calls, and the failure rate or the slow-call rate reaches its threshold.
pub(crate) fn rates_trip(cfg: &Config, stats: WindowStats, minimum_calls: u64) -> bool {
    stats.calls > 0
        && stats.calls >= minimum_calls
        && (stats.failure_rate() >= cfg.failure_rate_threshold
            || stats.slow_rate() >= cfg.slow_call_rate_threshold)
}

/// The closed state's decision after an outcome was recorded.
pub(crate) fn closed_should_open(cfg: &Config, stats: WindowStats) -> bool {
    rates_trip(cfg, stats, cfg.effective_minimum_calls())
}

/// The probes of one half-open period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HalfOpenProbes {
    /// Permits handed out and not given back (settled ones included).
    pub(crate) issued: u32,
    /// Probes settled as success or failure.
    pub(crate) stats: WindowStats,
}

/// What the half-open state does after a probe settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HalfOpenVerdict {
    /// Keep waiting for the other probes.
    Wait,
    /// Every permitted probe finished and the rates are below the thresholds.
    Close,
    /// Every permitted probe finished and a rate reached its threshold.
    Open,
}

impl HalfOpenProbes {
    /// Hands out a probe permit if one is left.
    pub(crate) fn try_issue(&mut self, permits: u32) -> bool {
        if self.issued < permits {
            self.issued += 1;
            true
        } else {
            false
        }
    }

    /// Gives back the permit of a probe that was ignored or dropped unsettled.
    pub(crate) fn give_back(&mut self) {
        self.issued = self.issued.saturating_sub(1);
    }

    /// Records a settled probe and decides once all `permits` probes have settled.
    pub(crate) fn record(&mut self, cfg: &Config, mark: Mark) -> HalfOpenVerdict {
        self.stats.calls += 1;
        self.stats.failures += u64::from(mark.is_failure());
        self.stats.slow += u64::from(mark.is_slow());
        if self.stats.calls < u64::from(cfg.half_open_permits) {
            HalfOpenVerdict::Wait
        } else if rates_trip(cfg, self.stats, u64::from(cfg.half_open_permits)) {
            HalfOpenVerdict::Open
        } else {
            HalfOpenVerdict::Close
        }
    }
}

/// The wait of the `consecutive`-th consecutive opening (1 for the first after a close), given a
/// uniform random `sample` in `[0, 1)` for the jitter.
pub(crate) fn open_wait(cfg: &Config, consecutive: u32, sample: f64) -> Duration {
    let base = cfg.wait_in_open;
    let Some(b) = cfg.open_backoff else {
        return base;
    };
    let exp = i32::try_from(consecutive.saturating_sub(1)).unwrap_or(i32::MAX);
    let grown = base.as_secs_f64() * b.multiplier.powi(exp);
    let capped = if grown.is_finite() {
        grown.min(b.max_wait.as_secs_f64())
    } else {
        b.max_wait.as_secs_f64()
    };
    let factor = 1.0 - b.jitter + 2.0 * b.jitter * sample.clamp(0.0, 1.0);
    Duration::try_from_secs_f64(capped * factor).unwrap_or(b.max_wait)
}

/// Whether the half-open state entered at `since` has outlived `max_wait` at `now` (a zero
/// `max_wait` never expires).
pub(crate) fn half_open_expired(max_wait: Duration, since: Duration, now: Duration) -> bool {
    !max_wait.is_zero() && now >= since.saturating_add(max_wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OpenBackoff;

    #[test]
    fn minimum_calls_holds_the_closed_state() {
        let cfg = Config {
            minimum_calls: 10,
            ..Config::default()
        };
        let all_failed = |n| WindowStats {
            calls: n,
            failures: n,
            slow: 0,
        };
        assert!(!closed_should_open(&cfg, all_failed(9)));
        assert!(closed_should_open(&cfg, all_failed(10)));
    }

    #[test]
    fn thresholds_are_inclusive() {
        let cfg = Config {
            minimum_calls: 4,
            ..Config::default()
        };
        let s = |failures, slow| WindowStats {
            calls: 4,
            failures,
            slow,
        };
        assert!(!closed_should_open(&cfg, s(1, 3)));
        assert!(closed_should_open(&cfg, s(2, 0)));
        assert!(closed_should_open(&cfg, s(0, 4)));
    }

    #[test]
    fn half_open_decides_after_all_permits() {
        let cfg = Config {
            half_open_permits: 3,
            ..Config::default()
        };
        let mut p = HalfOpenProbes::default();
        for _ in 0..3 {
            assert!(p.try_issue(3));
        }
        assert!(!p.try_issue(3));
        assert_eq!(
            p.record(&cfg, Mark::new(true, false)),
            HalfOpenVerdict::Wait
        );
        assert_eq!(p.record(&cfg, Mark::default()), HalfOpenVerdict::Wait);
        assert_eq!(p.record(&cfg, Mark::default()), HalfOpenVerdict::Close);
        let mut p = HalfOpenProbes::default();
        p.record(&cfg, Mark::new(true, false));
        p.record(&cfg, Mark::new(true, false));
        assert_eq!(p.record(&cfg, Mark::default()), HalfOpenVerdict::Open);
    }

    #[test]
    fn open_wait_grows_with_a_cap_and_jitter() {
        let cfg = Config {
            wait_in_open: Duration::from_secs(1),
            open_backoff: Some(OpenBackoff::exponential(Duration::from_secs(10)).with_jitter(0.0)),
            ..Config::default()
        };
        let waits: Vec<u64> = (1..=6).map(|k| open_wait(&cfg, k, 0.5).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 10, 10]);
        let jittered = Config {
            open_backoff: Some(OpenBackoff::exponential(Duration::from_secs(10)).with_jitter(0.5)),
            ..cfg
        };
        assert_eq!(open_wait(&jittered, 2, 0.0), Duration::from_secs(1));
        assert_eq!(open_wait(&jittered, 2, 1.0), Duration::from_secs(3));
        assert_eq!(open_wait(&jittered, 1000, 0.5), Duration::from_secs(10));
    }
}
