//! Metrics through the `metrics` facade (feature `metrics`), under the names and labels that
//! resilience4j's Micrometer binding (`TaggedCircuitBreakerMetrics`) exports, so that Grafana
//! dashboards built for resilience4j work unchanged. As Prometheus renders them:
//!
//! - `resilience4j_circuitbreaker_state{name, state}`: one gauge per state (`closed`, `open`,
//!   `half_open`, `forced_open`, `disabled`, `metrics_only`), 1 for the current state, 0 else.
//! - `resilience4j_circuitbreaker_calls_seconds{name, kind}`: a histogram of call durations,
//!   `kind` = `successful`, `failed` or `ignored` (its `_count` counts calls, `_sum` their time).
//!   Slow calls count by their outcome, as in resilience4j.
//! - `resilience4j_circuitbreaker_not_permitted_calls_total{name, kind="not_permitted"}`.
//! - `resilience4j_circuitbreaker_failure_rate{name}` and `..._slow_call_rate{name}`: percent
//!   (0-100) of the calls in the window, or -1 while the window holds fewer than the minimum
//!   number of calls (resilience4j's convention); while open, the rates that opened it.
//! - `resilience4j_circuitbreaker_buffered_calls{name, kind}`: calls in the window, `kind` =
//!   `successful` or `failed`.
//!
//! Micrometer's `_max` gauge of the calls timer (a decaying maximum) is not exported.
//!
//! The handles are registered once, when the breaker is built, so install the recorder
//! (Prometheus, OpenTelemetry, ...) before building breakers. The rates are published whenever
//! an outcome can change them, on every state change, and by [`crate::CircuitBreaker::metrics`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::State;
use crate::machine::{Mark, WindowStats};

const STATES: [State; 6] = [
    State::Closed,
    State::Open,
    State::HalfOpen,
    State::ForcedOpen,
    State::Disabled,
    State::MetricsOnly,
];

#[derive(Debug)]
pub(crate) struct Facade {
    successful: Histogram,
    failed: Histogram,
    ignored: Histogram,
    not_permitted: Counter,
    /// One gauge per state, in the order of `STATES`.
    states: [Gauge; 6],
    failure_rate: Gauge,
    slow_call_rate: Gauge,
    buffered_successful: Gauge,
    buffered_failed: Gauge,
    /// Whether the published rates may be out of date when an outcome reports no new window
    /// statistics (below the minimum number of calls, or a non-zero rate published): then the
    /// window is read. False in the steady healthy state, which so costs one atomic load.
    stale: AtomicBool,
}

impl Facade {
    pub(crate) fn new(name: &str) -> Self {
        let calls = |kind: &'static str| histogram!("resilience4j_circuitbreaker_calls_seconds", "name" => name.to_owned(), "kind" => kind);
        let buffered = |kind: &'static str| gauge!("resilience4j_circuitbreaker_buffered_calls", "name" => name.to_owned(), "kind" => kind);
        let facade = Facade {
            successful: calls("successful"),
            failed: calls("failed"),
            ignored: calls("ignored"),
            not_permitted: counter!("resilience4j_circuitbreaker_not_permitted_calls_total", "name" => name.to_owned(), "kind" => "not_permitted"),
            states: STATES.map(|s| gauge!("resilience4j_circuitbreaker_state", "name" => name.to_owned(), "state" => s.as_str())),
            failure_rate: gauge!("resilience4j_circuitbreaker_failure_rate", "name" => name.to_owned()),
            slow_call_rate: gauge!("resilience4j_circuitbreaker_slow_call_rate", "name" => name.to_owned()),
            buffered_successful: buffered("successful"),
            buffered_failed: buffered("failed"),
            stale: AtomicBool::new(true),
        };
        facade.failure_rate.set(-1.0);
        facade.slow_call_rate.set(-1.0);
        facade
    }

    #[inline]
    pub(crate) fn mark(&self, mark: Mark, elapsed: Duration) {
        let calls = if mark.is_failure() {
            &self.failed
        } else {
            &self.successful
        };
        calls.record(elapsed.as_secs_f64());
    }

    pub(crate) fn ignored(&self, elapsed: Duration) {
        self.ignored.record(elapsed.as_secs_f64());
    }

    pub(crate) fn rejected(&self) {
        self.not_permitted.increment(1);
    }

    pub(crate) fn state(&self, state: State) {
        for (gauge, s) in self.states.iter().zip(STATES) {
            gauge.set(if s == state { 1.0 } else { 0.0 });
        }
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Whether the window must be read to keep the rates right (see `stale`).
    #[inline]
    pub(crate) fn stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// Publishes the window's rates (percent, or -1 below `minimum_calls`).
    pub(crate) fn window(&self, stats: WindowStats, minimum_calls: u64) {
        let warm = stats.calls >= minimum_calls.max(1);
        let (failure, slow) = if warm {
            (stats.failure_rate() * 100.0, stats.slow_rate() * 100.0)
        } else {
            (-1.0, -1.0)
        };
        self.failure_rate.set(failure);
        self.slow_call_rate.set(slow);
        self.buffered_failed.set(stats.failures as f64);
        self.buffered_successful
            .set(stats.calls.saturating_sub(stats.failures) as f64);
        self.stale
            .store(!warm || failure != 0.0 || slow != 0.0, Ordering::Relaxed);
    }
}
