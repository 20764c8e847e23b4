//! The exact sliding log, one entry per admitted *decision* (not per unit), so that a decision's
//! work does not grow with its cost or with the limit's size.
//!
//! Each entry carries the decision's cost and the running total of units admitted on the key up
//! to and including it (`end`). The units in the window are then `newest.end - oldest_live.start`
//! (where `start = end - cost`): two lookups, whatever the limit. A denial finds the entry whose
//! expiry frees enough units by binary search over `end` (monotone), again independent of the
//! limit. Expired entries are dropped at most [`TRIM_PER_DECISION`] per decision, so one decision
//! never frees a large backlog at once; they are never counted meanwhile.
//!
//! The Lua script `SLIDING_LOG` (crate::redis::scripts) and [`crate::FileLimiter`] run exactly
//! this arithmetic: Redis keeps the entries in a sorted set (score `at`, member `end:cost`), the
//! file limiter in a file.

use std::collections::VecDeque;

use super::{Algorithm, Params, Verdict, clamp_u32};

/// The most expired entries one decision removes (the rest go in later decisions; each decision
/// adds at most one entry, so the backlog shrinks).
pub const TRIM_PER_DECISION: usize = 64;

/// The exact sliding log: an admitted unit counts while `now - window < at`, i.e. in the
/// half-open window `(now - window, now]`, and leaves it exactly `window` after it was admitted.
///
/// Memory is one entry per admitted decision in the window (at most `max` entries per key, fewer
/// when decisions cost more than one unit).
#[derive(Debug, Clone, Copy)]
pub struct SlidingLog;

/// One admitted decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    /// When it was admitted (µs); never earlier than the entry before it (a clock that stepped
    /// back records at the newest entry's time instead, which only delays its expiry).
    pub at: i64,
    /// Its cost in units (≥ 1).
    pub cost: u32,
    /// The units admitted on this key up to and including this decision (strictly increasing
    /// from one entry to the next).
    pub end: i64,
}

impl LogEntry {
    /// The running total just before this decision.
    pub fn start(&self) -> i64 {
        self.end - i64::from(self.cost)
    }
}

/// The admitted decisions of one key, oldest first (a Redis sorted set by `at`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogState {
    /// Sorted by `at`, and by `end`. May start with a few expired entries not yet trimmed.
    pub entries: VecDeque<LogEntry>,
}

impl LogState {
    /// Drops up to [`TRIM_PER_DECISION`] expired entries; returns how many expired ones remain
    /// at the front.
    fn trim(&mut self, horizon: i64) -> usize {
        let expired = self.entries.partition_point(|e| e.at <= horizon);
        let drop = expired.min(TRIM_PER_DECISION);
        self.entries.drain(..drop);
        expired - drop
    }

    /// The units admitted in `(horizon, ..]`, given the number of expired entries at the front.
    fn count(&self, expired: usize) -> i64 {
        match (self.entries.get(expired), self.entries.back()) {
            (Some(oldest), Some(newest)) => newest.end - oldest.start(),
            _ => 0,
        }
    }
}

impl Algorithm for SlidingLog {
    type State = LogState;

    fn evaluate(state: &mut LogState, now: i64, cost: u32, p: &Params) -> Verdict {
        let expired = state.trim(now - p.window_us);
        let count = state.count(expired);
        let (max, cost) = (i64::from(p.max), i64::from(cost));
        let reset = match state.entries.back() {
            Some(newest) if count > 0 => newest.at + p.window_us - now,
            _ => 0,
        };
        if count + cost <= max {
            return Verdict {
                allowed: true,
                remaining: clamp_u32(max - count - cost),
                retry_after_us: 0,
                reset_after_us: reset,
            };
        }
        // The request fits once `k` units have left: the first live entry whose expiry frees
        // that many (binary search on `end`, which the script does with ZRANGE by rank).
        // (Expired entries end at or before `start`, so they are all on the `true` side.)
        let k = count + cost - max;
        let start = state.entries[expired].start();
        let j = state.entries.partition_point(|e| e.end - start < k);
        Verdict {
            allowed: false,
            remaining: clamp_u32(max - count),
            retry_after_us: state.entries[j].at + p.window_us - now,
            reset_after_us: reset,
        }
    }

    fn record(state: &mut LogState, now: i64, cost: u32, p: &Params) -> Verdict {
        let newest = state.entries.back().copied();
        let at = newest.map_or(now, |e| e.at.max(now));
        let end = newest.map_or(0, |e| e.end) + i64::from(cost);
        state.entries.push_back(LogEntry { at, cost, end });
        let expired = state.entries.partition_point(|e| e.at <= now - p.window_us);
        Verdict {
            allowed: true,
            remaining: clamp_u32(i64::from(p.max) - state.count(expired)),
            retry_after_us: 0,
            reset_after_us: at + p.window_us - now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::decide;
    use super::*;
    use proptest::prelude::*;

    const SEC: i64 = 1_000_000;

    fn p(max: u32, window_us: i64) -> Params {
        Params {
            max,
            window_us,
            burst: max,
        }
    }

    #[test]
    fn admits_exactly_max_per_window() {
        let params = [p(3, SEC)];
        let mut s = [LogState::default()];
        for i in 0..3 {
            assert!(decide::<SlidingLog>(&mut s, &params, 10 * SEC + i, 1).0);
        }
        let (ok, v) = decide::<SlidingLog>(&mut s, &params, 10 * SEC + 10, 1);
        assert!(!ok);
        // The oldest unit (at 10s) leaves at 11s: the window is (now - w, now].
        assert_eq!(v[0].retry_after_us, SEC - 10);
        assert!(!decide::<SlidingLog>(&mut s, &params, 11 * SEC - 1, 1).0);
        assert!(decide::<SlidingLog>(&mut s, &params, 11 * SEC, 1).0);
    }

    #[test]
    fn weighted_retry_waits_for_enough_units() {
        let params = [p(5, SEC)];
        let mut s = [LogState::default()];
        for i in 0..5 {
            assert!(decide::<SlidingLog>(&mut s, &params, i * 100_000, 1).0);
        }
        let (ok, v) = decide::<SlidingLog>(&mut s, &params, 500_000, 3);
        assert!(!ok);
        // Three units must leave: the third oldest was admitted at 200ms.
        assert_eq!(v[0].retry_after_us, 200_000 + SEC - 500_000);
        assert_eq!(v[0].remaining, 0);
        assert!(decide::<SlidingLog>(&mut s, &params, 500_000 + v[0].retry_after_us, 3).0);
    }

    #[test]
    fn one_entry_per_decision_whatever_its_cost() {
        let params = [p(1_000_000, 3600 * SEC)];
        let mut s = [LogState::default()];
        assert!(decide::<SlidingLog>(&mut s, &params, 0, 600_000).0);
        let (ok, v) = decide::<SlidingLog>(&mut s, &params, 1, 300_000);
        assert!(ok && v[0].remaining == 100_000);
        let (ok, v) = decide::<SlidingLog>(&mut s, &params, 2, 200_000);
        // 100,000 more must leave: the first decision's 600,000, at 0.
        assert!(!ok && v[0].retry_after_us == 3600 * SEC - 2);
        assert_eq!(s[0].entries.len(), 2);
    }

    #[test]
    fn a_lowered_max_applies_to_the_recorded_history() {
        let mut s = [LogState::default()];
        for i in 0..10 {
            assert!(decide::<SlidingLog>(&mut s, &[p(10, SEC)], i, 1).0);
        }
        let (ok, v) = decide::<SlidingLog>(&mut s, &[p(4, SEC)], 20, 0);
        assert!(
            !ok && v[0].remaining == 0,
            "10 recorded > 4: over the limit"
        );
        // 7 must leave before one more fits under 4: the 7th, admitted at 6.
        let (_, v) = decide::<SlidingLog>(&mut s, &[p(4, SEC)], 20, 1);
        assert_eq!(v[0].retry_after_us, 6 + SEC - 20);
        let (ok, v) = decide::<SlidingLog>(&mut s, &[p(12, SEC)], 20, 0);
        assert!(
            ok && v[0].remaining == 2,
            "a raised max: 2 more, not a fresh 12"
        );
    }

    #[test]
    fn expired_entries_are_trimmed_a_bounded_number_at_a_time() {
        let params = [p(1000, SEC)];
        let mut s = [LogState::default()];
        for i in 0..200 {
            assert!(decide::<SlidingLog>(&mut s, &params, i, 1).0);
        }
        let (ok, v) = decide::<SlidingLog>(&mut s, &params, 10 * SEC, 0);
        assert!(ok && v[0].remaining == 1000 && v[0].reset_after_us == 0);
        assert_eq!(s[0].entries.len(), 200 - TRIM_PER_DECISION);
        let (ok, v) = decide::<SlidingLog>(&mut s, &params, 10 * SEC, 1);
        assert!(ok && v[0].remaining == 999);
    }

    #[test]
    fn a_clock_stepping_back_records_at_the_newest_time() {
        let params = [p(2, SEC)];
        let mut s = [LogState::default()];
        assert!(decide::<SlidingLog>(&mut s, &params, 5 * SEC, 1).0);
        assert!(decide::<SlidingLog>(&mut s, &params, 4 * SEC, 1).0);
        assert_eq!(s[0].entries[1].at, 5 * SEC);
        assert!(!decide::<SlidingLog>(&mut s, &params, 6 * SEC - 1, 1).0);
        assert!(decide::<SlidingLog>(&mut s, &params, 6 * SEC, 2).0);
    }

    proptest! {
        #[test]
        fn never_exceeds_max_in_any_window(
            max in 1u32..20,
            window_us in 1i64..2_000,
            steps in prop::collection::vec((0i64..300, 1u32..5), 1..200),
        ) {
            let params = [p(max, window_us)];
            let mut s = [LogState::default()];
            let mut admitted: Vec<(i64, u32)> = Vec::new();
            let mut now = 0;
            for (dt, cost) in steps {
                now += dt;
                let cost = cost.min(max);
                if decide::<SlidingLog>(&mut s, &params, now, cost).0 {
                    admitted.push((now, cost));
                }
            }
            for &(start, _) in &admitted {
                let in_window: u32 = admitted.iter().filter(|(t, _)| *t >= start && *t < start + window_us).map(|(_, c)| c).sum();
                prop_assert!(in_window <= max, "{in_window} > {max}");
            }
        }

        #[test]
        fn retry_after_is_exact(max in 1u32..10, window_us in 2i64..1_000,
            steps in prop::collection::vec((0i64..200, 1u32..4), 1..100)) {
            super::super::tests::retry_is_exact::<SlidingLog>(p(max, window_us), &steps)?;
        }

        #[test]
        fn a_peek_changes_nothing_but_trimming(max in 1u32..10, window_us in 2i64..1_000,
            steps in prop::collection::vec((0i64..200, 1u32..4), 1..100)) {
            let params = [p(max, window_us)];
            let mut s = [LogState::default()];
            let mut now = 0;
            for (dt, cost) in steps {
                now += dt;
                let before = s.clone();
                let (_, peek) = decide::<SlidingLog>(&mut s, &params, now, 0);
                let (_, probe) = decide::<SlidingLog>(&mut before.clone(), &params, now, 0);
                prop_assert_eq!(peek, probe);
                let live = |st: &[LogState]| st[0].entries.iter().filter(|e| e.at > now - window_us).count();
                prop_assert_eq!(live(&s), live(&before));
                decide::<SlidingLog>(&mut s, &params, now, cost.min(max));
            }
        }
    }
}
