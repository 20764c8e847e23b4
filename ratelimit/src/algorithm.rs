//! The arithmetic of each algorithm, as pure functions of (state, now, cost).
//!
//! Nothing here reads a clock or talks to a server. The Lua scripts of [`crate::RedisLimiter`] implement
//! exactly this arithmetic on Redis (a test replays the same sequences through both and checks
//! that every decision is identical), so these functions are also the specification of what the
//! scripts do.
//!
//! Times are integer microseconds (Redis `TIME` has microsecond resolution; every value used here
//! stays far below 2^53, so Lua's doubles represent them exactly).

mod sliding_log;

pub use sliding_log::{LogEntry, LogState, SlidingLog, TRIM_PER_DECISION};

/// What one limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether this limit alone admits the request.
    pub allowed: bool,
    /// Units this limit still has after the decision (after recording the request if it was
    /// admitted; what is left now if it was not).
    pub remaining: u32,
    /// 0 if admitted; otherwise how long (µs) until this limit would admit the same cost.
    pub retry_after_us: i64,
    /// How long (µs) until this limit is fully replenished (nothing recorded counts any more).
    pub reset_after_us: i64,
}

/// The parameters of one limit, in the units the algorithms use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Units admitted per window.
    pub max: u32,
    /// The window, in microseconds (≥ 1).
    pub window_us: i64,
    /// GCRA only: the burst capacity (units that may be admitted at once). Ignored otherwise.
    pub burst: u32,
}

/// One algorithm's state for one key and limit, and its two steps: `evaluate` (which may drop
/// expired information but never records the request) and `record` (which consumes `cost`).
///
/// A multi-limit decision evaluates every limit first and records into all of them only if all
/// admit ([`decide`]), which is how the scripts keep a denied request from consuming anything.
pub trait Algorithm {
    /// The per-key state (what Redis stores under the key).
    type State: Default;
    /// Judges `cost` units at `now` without recording them.
    fn evaluate(state: &mut Self::State, now: i64, cost: u32, p: &Params) -> Verdict;
    /// Records `cost` units at `now`; called only after every limit admitted. Returns the verdict
    /// as it stands after recording.
    fn record(state: &mut Self::State, now: i64, cost: u32, p: &Params) -> Verdict;
}

/// Decides `cost` units at `now` against several limits at once: admitted only if every limit
/// admits, and then recorded in every limit; otherwise nothing is recorded anywhere.
///
/// A cost of 0 is a peek: it records nothing, and its verdicts say what the key has left (it is
/// `allowed` unless a limit is already over its `max`, which a lowered `max` can cause).
///
/// Returns whether it was admitted and one verdict per limit.
pub fn decide<A: Algorithm>(
    states: &mut [A::State],
    params: &[Params],
    now: i64,
    cost: u32,
) -> (bool, Vec<Verdict>) {
    let mut verdicts: Vec<Verdict> = states
        .iter_mut()
        .zip(params)
        .map(|(s, p)| A::evaluate(s, now, cost, p))
        .collect();
    let allowed = verdicts.iter().all(|v| v.allowed);
    if allowed && cost > 0 {
        for ((s, p), v) in states.iter_mut().zip(params).zip(verdicts.iter_mut()) {
            *v = A::record(s, now, cost, p);
        }
    }
    (allowed, verdicts)
}

fn clamp_u32(x: i64) -> u32 {
    x.clamp(0, i64::from(u32::MAX)) as u32
}

/// The sliding window counter: two fixed windows, the previous one weighted by how much of it
/// the sliding window still overlaps. O(1) memory per key, approximate (see the crate docs for the
/// measured over-admission).
#[derive(Debug, Clone, Copy)]
pub struct WindowCounter;

/// The counts of the current and the previous fixed window (a Redis hash `w`, `c`, `p`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterState {
    /// Index of the current fixed window (`floor(now / window)`), `None` if nothing was stored.
    pub window: Option<i64>,
    /// Units admitted in the current fixed window.
    pub current: i64,
    /// Units admitted in the previous fixed window.
    pub previous: i64,
}

/// The state rolled forward to `now`: (window index, current, previous, elapsed µs).
fn roll(state: &CounterState, now: i64, w_us: i64) -> (i64, i64, i64, i64) {
    let mut w = now.div_euclid(w_us);
    let (mut c, mut pv) = (0, 0);
    if let Some(sw) = state.window {
        // A server clock that stepped back keeps using the stored window.
        if sw > w {
            w = sw;
        }
        if sw == w {
            c = state.current;
            pv = state.previous;
        } else if sw == w - 1 {
            pv = state.current;
        }
    }
    let elapsed = (now - w * w_us).max(0);
    (w, c, pv, elapsed)
}

/// `floor(previous * (window - elapsed) / window)`, in doubles exactly as the Lua script does.
fn weighted(previous: i64, elapsed: i64, w_us: i64) -> i64 {
    ((previous as f64) * ((w_us - elapsed) as f64) / (w_us as f64)).floor() as i64
}

/// Smallest elapsed time `e` in a window whose previous-window count is `previous` at which
/// `weighted(previous, e) <= avail`; `w_us` if no time in the window suffices.
fn first_fit(previous: i64, avail: i64, w_us: i64) -> i64 {
    if previous <= avail {
        return 0;
    }
    let e = ((w_us as f64) - ((avail + 1) as f64) * (w_us as f64) / (previous as f64)).floor()
        as i64
        + 1;
    e.clamp(0, w_us)
}

impl Algorithm for WindowCounter {
    type State = CounterState;

    fn evaluate(state: &mut CounterState, now: i64, cost: u32, p: &Params) -> Verdict {
        let w_us = p.window_us;
        let (w, c, pv, elapsed) = roll(state, now, w_us);
        let (max, cost) = (i64::from(p.max), i64::from(cost));
        let estimate = weighted(pv, elapsed, w_us) + c;
        let reset = if c > 0 {
            (w + 2) * w_us - now
        } else if pv > 0 {
            (w + 1) * w_us - now
        } else {
            0
        };
        if estimate + cost <= max {
            return Verdict {
                allowed: true,
                remaining: clamp_u32(max - estimate - cost),
                retry_after_us: 0,
                reset_after_us: reset,
            };
        }
        let avail = max - c - cost;
        let mut at = w_us;
        if avail >= 0 {
            at = first_fit(pv, avail, w_us).max(elapsed + 1);
        }
        let retry = if at < w_us {
            at - elapsed
        } else {
            // Not in this window: in the next one the current count becomes the previous one.
            let e2 = first_fit(c, max - cost, w_us);
            (w + 1) * w_us + e2 - now
        };
        Verdict {
            allowed: false,
            remaining: clamp_u32(max - estimate),
            retry_after_us: retry,
            reset_after_us: reset,
        }
    }

    fn record(state: &mut CounterState, now: i64, cost: u32, p: &Params) -> Verdict {
        let w_us = p.window_us;
        let (w, c, pv, elapsed) = roll(state, now, w_us);
        let c = c + i64::from(cost);
        *state = CounterState {
            window: Some(w),
            current: c,
            previous: pv,
        };
        let estimate = weighted(pv, elapsed, w_us) + c;
        Verdict {
            allowed: true,
            remaining: clamp_u32(i64::from(p.max) - estimate),
            retry_after_us: 0,
            reset_after_us: (w + 2) * w_us - now,
        }
    }
}

/// GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): one unit every
/// `emission = ceil(window / max)` µs, up to `burst` units at once.
#[derive(Debug, Clone, Copy)]
pub struct Gcra;

/// The theoretical arrival time (µs) of the next unit, if any was stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcraState {
    /// The stored TAT.
    pub tat: Option<i64>,
}

impl Gcra {
    /// The emission interval in whole microseconds (rounded up, so the rate is never exceeded).
    pub fn emission_us(p: &Params) -> i64 {
        let max = i64::from(p.max.max(1));
        (p.window_us + max - 1) / max
    }
}

impl Algorithm for Gcra {
    type State = GcraState;

    fn evaluate(state: &mut GcraState, now: i64, cost: u32, p: &Params) -> Verdict {
        let t = Self::emission_us(p);
        let tau = t * i64::from(p.burst);
        let tat = state.tat.unwrap_or(now).max(now);
        let new_tat = tat + t * i64::from(cost);
        let diff = now - (new_tat - tau);
        if diff < 0 {
            Verdict {
                allowed: false,
                remaining: clamp_u32((now + tau - tat).div_euclid(t)),
                retry_after_us: -diff,
                reset_after_us: tat - now,
            }
        } else {
            Verdict {
                allowed: true,
                remaining: clamp_u32(diff.div_euclid(t)),
                retry_after_us: 0,
                reset_after_us: new_tat - now,
            }
        }
    }

    fn record(state: &mut GcraState, now: i64, cost: u32, p: &Params) -> Verdict {
        let t = Self::emission_us(p);
        let tau = t * i64::from(p.burst);
        let tat = state.tat.unwrap_or(now).max(now);
        let new_tat = tat + t * i64::from(cost);
        state.tat = Some(new_tat);
        Verdict {
            allowed: true,
            remaining: clamp_u32((now - (new_tat - tau)).div_euclid(t)),
            retry_after_us: 0,
            reset_after_us: new_tat - now,
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn denied_multi_limit_records_nothing() {
        let params = [p(10, SEC), p(2, 60 * SEC)];
        let mut s = [LogState::default(), LogState::default()];
        assert!(decide::<SlidingLog>(&mut s, &params, 0, 2).0);
        let before = s.clone();
        let (ok, v) = decide::<SlidingLog>(&mut s, &params, 1, 1);
        assert!(!ok);
        assert!(v[0].allowed && !v[1].allowed);
        assert_eq!(s, before);
    }

    #[test]
    fn counter_weights_previous_window() {
        let params = [p(10, SEC)];
        let mut s = [CounterState::default()];
        assert!(decide::<WindowCounter>(&mut s, &params, 0, 10).0);
        // Half way through the next window, the previous 10 count as 5.
        assert!(!decide::<WindowCounter>(&mut s.clone(), &params, SEC + 399_999, 5).0);
        let (ok, _) = decide::<WindowCounter>(&mut s, &params, SEC + SEC / 2, 5);
        assert!(ok);
        let (ok, v) = decide::<WindowCounter>(&mut s, &params, SEC + SEC / 2, 1);
        assert!(!ok);
        assert!(v[0].retry_after_us > 0);
    }

    #[test]
    fn gcra_bursts_then_paces() {
        let params = [Params {
            max: 10,
            window_us: SEC,
            burst: 3,
        }];
        let mut s = [GcraState::default()];
        for _ in 0..3 {
            assert!(decide::<Gcra>(&mut s, &params, 0, 1).0);
        }
        let (ok, v) = decide::<Gcra>(&mut s, &params, 0, 1);
        assert!(!ok);
        assert_eq!(v[0].retry_after_us, 100_000);
        assert!(decide::<Gcra>(&mut s, &params, 100_000, 1).0);
    }

    /// Replays requests and checks that a denial's `retry_after` is right: denied one µs before,
    /// admitted at that time (single limit, nobody else using the key).
    pub(super) fn retry_is_exact<A: Algorithm>(
        params: Params,
        steps: &[(i64, u32)],
    ) -> Result<(), TestCaseError>
    where
        A::State: Clone,
    {
        let mut s = [A::State::default()];
        let mut now = 0;
        for &(dt, cost) in steps {
            now += dt;
            let cost = cost.min(params.max).min(params.burst).max(1);
            let (ok, v) = decide::<A>(&mut s, &[params], now, cost);
            if !ok {
                let r = v[0].retry_after_us;
                prop_assert!(r > 0);
                let mut probe = s.clone();
                prop_assert!(
                    decide::<A>(&mut probe, &[params], now + r, cost).0,
                    "not admitted at retry_after"
                );
                if r > 1 {
                    let mut probe = s.clone();
                    prop_assert!(
                        !decide::<A>(&mut probe, &[params], now + r - 1, cost).0,
                        "admitted before retry_after"
                    );
                }
            }
        }
        Ok(())
    }

    /// The most units admitted in any window of `window_us` (admissions sorted by time).
    fn worst_window(admitted: &[(i64, u32)], window_us: i64) -> u32 {
        let (mut best, mut sum, mut j) = (0, 0, 0);
        for i in 0..admitted.len() {
            sum += admitted[i].1;
            while admitted[i].0 - admitted[j].0 >= window_us {
                sum -= admitted[j].1;
                j += 1;
            }
            best = best.max(sum);
        }
        best
    }

    /// Measures the sliding window counter's over-admission on bursty traffic (the number quoted
    /// in the crate docs): bursts of 1-300 requests at random instants, separated by random
    /// gaps, limit 100 per second, 2000 simulated seconds per seed. Also the adversarial pattern:
    /// a full window at the very end of one fixed window, then as much as possible right after.
    #[test]
    fn counter_over_admission_on_bursty_traffic() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let params = [p(100, SEC)];
        let mut worst = 0;
        for seed in 0..8 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut s = [CounterState::default()];
            let mut admitted = Vec::new();
            let mut now = 0;
            while now < 2000 * SEC {
                now += rng.random_range(0..SEC * 3 / 2);
                for _ in 0..rng.random_range(1..=300) {
                    now += rng.random_range(0..200);
                    if decide::<WindowCounter>(&mut s, &params, now, 1).0 {
                        admitted.push((now, 1));
                    }
                }
            }
            worst = worst.max(worst_window(&admitted, SEC));
        }
        println!(
            "sliding window counter, bursty traffic: at most {worst} per 1 s window (limit 100)"
        );
        assert!(worst <= 200, "{worst}");

        // Adversarial: 100 at 0.999 s, then a request every 100 µs.
        let mut s = [CounterState::default()];
        let mut admitted = Vec::new();
        assert!(decide::<WindowCounter>(&mut s, &params, SEC - 1_000, 100).0);
        admitted.push((SEC - 1_000, 100));
        let mut now = SEC;
        while now < 3 * SEC {
            if decide::<WindowCounter>(&mut s, &params, now, 1).0 {
                admitted.push((now, 1));
            }
            now += 100;
        }
        let adversarial = worst_window(&admitted, SEC);
        println!(
            "sliding window counter, adversarial: at most {adversarial} per 1 s window (limit 100)"
        );
        assert!(adversarial <= 200, "{adversarial}");
    }

    proptest! {
        #[test]
        fn gcra_retry_after_is_exact(max in 1u32..10, burst in 1u32..10, window_us in 2i64..1_000,
            steps in prop::collection::vec((0i64..200, 1u32..4), 1..100)) {
            retry_is_exact::<Gcra>(Params { max, window_us, burst }, &steps)?;
        }

        #[test]
        fn counter_retry_after_is_sufficient(max in 1u32..10, window_us in 2i64..1_000,
            steps in prop::collection::vec((0i64..200, 1u32..4), 1..100)) {
            // For the counter the retry time is computed in doubles; it must never be too early.
            let params = p(max, window_us);
            let mut s = [CounterState::default()];
            let mut now = 0;
            for (dt, cost) in steps {
                now += dt;
                let cost = cost.min(max);
                let (ok, v) = decide::<WindowCounter>(&mut s, &[params], now, cost);
                if !ok {
                    let r = v[0].retry_after_us;
                    prop_assert!(r > 0);
                    let mut probe = s.clone();
                    prop_assert!(decide::<WindowCounter>(&mut probe, &[params], now + r, cost).0, "not admitted at retry_after {r}");
                }
            }
        }
    }
}
