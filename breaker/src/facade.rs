//! Counters and a gauge through the `metrics` facade (feature `metrics`).
//!
//! The handles are registered once, when the breaker is built, so install the recorder
//! (Prometheus, OpenTelemetry, ...) before building breakers. Names:
//!
//! - `palisade_breaker_calls_total{breaker, outcome}` with outcome `success`, `failure`,
//!   `ignored`, `rejected`; slow calls are also counted in `palisade_breaker_slow_calls_total{breaker}`.
//! - `palisade_breaker_state{breaker}`: 0 closed, 1 open, 2 half-open, 3 disabled, 4 forced open,
//!   5 metrics-only.

use metrics::{Counter, Gauge, counter, gauge};

use crate::State;
use crate::machine::Mark;

#[derive(Debug)]
pub(crate) struct Facade {
    success: Counter,
    failure: Counter,
    ignored: Counter,
    rejected: Counter,
    slow: Counter,
    state: Gauge,
}

impl Facade {
    pub(crate) fn new(name: &str) -> Self {
        let calls = |outcome: &'static str| counter!("palisade_breaker_calls_total", "breaker" => name.to_owned(), "outcome" => outcome);
        Facade {
            success: calls("success"),
            failure: calls("failure"),
            ignored: calls("ignored"),
            rejected: calls("rejected"),
            slow: counter!("palisade_breaker_slow_calls_total", "breaker" => name.to_owned()),
            state: gauge!("palisade_breaker_state", "breaker" => name.to_owned()),
        }
    }

    #[inline]
    pub(crate) fn mark(&self, mark: Mark) {
        if mark.is_failure() {
            self.failure.increment(1);
        } else {
            self.success.increment(1);
        }
        if mark.is_slow() {
            self.slow.increment(1);
        }
    }

    pub(crate) fn outcome(&self, outcome: &'static str) {
        if outcome == "ignored" {
            self.ignored.increment(1);
        }
    }

    pub(crate) fn rejected(&self) {
        self.rejected.increment(1);
    }

    pub(crate) fn state(&self, state: State) {
        self.state.set(state.to_bits() as f64);
    }
}
