//! Options of a breaker, their defaults, and their validation.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::{CircuitBreaker, ConfigError};

/// The largest count-based window: 2^18 calls (the window's counters are 20 bits wide and keep
/// their upper half for transient dips below zero under concurrency).
pub const MAX_COUNT_WINDOW: u32 = 1 << 18;
/// The longest time-based window: one day of per-second buckets.
pub const MAX_TIME_WINDOW: Duration = Duration::from_secs(86_400);

/// The sliding window over which the failure rate and the slow-call rate are computed in the
/// closed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The outcomes of the last `n` calls (1 ..= [`MAX_COUNT_WINDOW`]).
    Count(u32),
    /// The outcomes of the calls in the last `d`, aggregated in one bucket per second: a call
    /// leaves the window when its second is `d` (rounded up to whole seconds) in the past.
    /// 1 s ..= [`MAX_TIME_WINDOW`].
    Time(Duration),
}

/// How the wait in the open state grows when the breaker re-opens without having closed in
/// between (a probe in half-open failed again): the `k`-th consecutive opening waits
/// `min(wait_in_open × multiplier^(k-1), max_wait)`, then multiplied by a random factor in
/// `[1 - jitter, 1 + jitter]`. The first opening after a close waits `wait_in_open` (± jitter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenBackoff {
    /// Growth factor per consecutive opening (≥ 1).
    pub multiplier: f64,
    /// The cap of the grown wait, before jitter.
    pub max_wait: Duration,
    /// Randomisation factor in `[0, 1)`; 0 means no jitter.
    pub jitter: f64,
}

impl OpenBackoff {
    /// Doubling waits capped at `max_wait`, with ±20 % jitter.
    pub fn exponential(max_wait: Duration) -> Self {
        Self {
            multiplier: 2.0,
            max_wait,
            jitter: 0.2,
        }
    }

    /// The same backoff with `jitter` as its randomisation factor.
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The same backoff with `multiplier` as its growth factor.
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }
}

/// A validated configuration (see [`BreakerBuilder`] for what each field means).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) failure_rate_threshold: f64,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) slow_call_duration: Duration,
    pub(crate) slow_call_detection: bool,
    pub(crate) window: Window,
    pub(crate) minimum_calls: u32,
    pub(crate) wait_in_open: Duration,
    pub(crate) open_backoff: Option<OpenBackoff>,
    pub(crate) half_open_permits: u32,
    pub(crate) max_wait_in_half_open: Duration,
    pub(crate) automatic_half_open: bool,
    pub(crate) event_capacity: usize,
}

impl Config {
    /// The number of recorded calls the closed window needs before it can open the breaker. For a
    /// count window this is capped at the window size, as resilience4j does.
    pub(crate) fn effective_minimum_calls(&self) -> u64 {
        match self.window {
            Window::Count(n) => u64::from(self.minimum_calls.min(n)),
            Window::Time(_) => u64::from(self.minimum_calls),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 1.0,
            slow_call_duration: Duration::from_secs(60),
            slow_call_detection: false,
            window: Window::Count(100),
            minimum_calls: 100,
            wait_in_open: Duration::from_secs(60),
            open_backoff: None,
            half_open_permits: 10,
            max_wait_in_half_open: Duration::ZERO,
            automatic_half_open: false,
            event_capacity: 1024,
        }
    }
}

/// Builds a [`CircuitBreaker`]; every option starts at resilience4j's default.
///
/// | option | default | resilience4j name |
/// |---|---|---|
/// | `failure_rate_threshold` | 0.5 | `failureRateThreshold` = 50 % |
/// | `slow_call_rate_threshold` | 1.0 | `slowCallRateThreshold` = 100 % |
/// | `slow_call_duration` | 60 s | `slowCallDurationThreshold` |
/// | `sliding_window` | `Window::Count(100)` | `slidingWindowType` COUNT_BASED, `slidingWindowSize` 100 |
/// | `minimum_calls` | 100 | `minimumNumberOfCalls` |
/// | `wait_in_open` | 60 s | `waitDurationInOpenState` |
/// | `open_backoff` | none (constant wait) | `waitIntervalFunctionInOpenState` |
/// | `half_open_permits` | 10 | `permittedNumberOfCallsInHalfOpenState` |
/// | `max_wait_in_half_open` | 0 (wait for the permitted calls) | `maxWaitDurationInHalfOpenState` |
/// | `automatic_half_open` | false | `automaticTransitionFromOpenToHalfOpenEnabled` |
///
/// One deviation: calls are timed (slow-call detection) only once `slow_call_duration` or
/// `slow_call_rate_threshold` is set, or `slow_call_detection(true)` is called; then the defaults
/// above apply. resilience4j times every call, but with its defaults (100 % of the window slower
/// than 60 s) that rarely decides anything, and the two clock readings cost three times the rest
/// of the closed-state path.
///
/// Invalid values are reported by [`build`](Self::build) as a [`ConfigError`] naming the option.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct BreakerBuilder {
    name: Arc<str>,
    cfg: Config,
    clock: Option<Arc<dyn Clock>>,
    /// Set by `slow_call_detection`; otherwise detection is on iff a slow-call option was set.
    slow_call_detection: Option<bool>,
    slow_call_configured: bool,
}

impl BreakerBuilder {
    pub(crate) fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            cfg: Config::default(),
            clock: None,
            slow_call_detection: None,
            slow_call_configured: false,
        }
    }

    /// The failure rate (a fraction in `(0, 1]`) of the closed window at or above which the
    /// breaker opens. Default 0.5.
    pub fn failure_rate_threshold(mut self, threshold: f64) -> Self {
        self.cfg.failure_rate_threshold = threshold;
        self
    }

    /// The slow-call rate (a fraction in `(0, 1]`) at or above which the breaker opens. Default
    /// 1.0. Setting it turns slow-call detection on.
    pub fn slow_call_rate_threshold(mut self, threshold: f64) -> Self {
        self.cfg.slow_call_rate_threshold = threshold;
        self.slow_call_configured = true;
        self
    }

    /// A call that takes at least this long is slow. Default 60 s. Setting it turns slow-call
    /// detection on.
    pub fn slow_call_duration(mut self, duration: Duration) -> Self {
        self.cfg.slow_call_duration = duration;
        self.slow_call_configured = true;
        self
    }

    /// Whether [`CircuitBreaker::call`] times calls to find slow ones. Default: on once
    /// `slow_call_duration` or `slow_call_rate_threshold` is set, off otherwise (see the table
    /// above for why). Off saves the two clock readings per call on the hot path; permits settled
    /// by hand still report the elapsed time they are given.
    pub fn slow_call_detection(mut self, enabled: bool) -> Self {
        self.slow_call_detection = Some(enabled);
        self
    }

    /// The closed-state sliding window. Default `Window::Count(100)`.
    pub fn sliding_window(mut self, window: Window) -> Self {
        self.cfg.window = window;
        self
    }

    /// The number of calls the window must hold before a rate can open the breaker (≥ 1; for a
    /// count window, values above the window size act as the window size). Default 100.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.cfg.minimum_calls = calls;
        self
    }

    /// How long the breaker stays open before it lets probe calls through (> 0). Default 60 s.
    pub fn wait_in_open(mut self, wait: Duration) -> Self {
        self.cfg.wait_in_open = wait;
        self
    }

    /// Grow the wait in the open state on consecutive re-openings (see [`OpenBackoff`]).
    /// Default: none, every opening waits `wait_in_open`.
    pub fn open_backoff(mut self, backoff: OpenBackoff) -> Self {
        self.cfg.open_backoff = Some(backoff);
        self
    }

    /// The number of probe calls permitted in the half-open state (1 ..= 65535). Default 10.
    pub fn half_open_permits(mut self, permits: u32) -> Self {
        self.cfg.half_open_permits = permits;
        self
    }

    /// The longest time the breaker stays half-open before it opens again if the probes have
    /// not finished; zero (the default) waits for the permitted calls however long they take.
    pub fn max_wait_in_half_open(mut self, wait: Duration) -> Self {
        self.cfg.max_wait_in_half_open = wait;
        self
    }

    /// Move from open to half-open as soon as the wait ends, even if no call arrives. The move is
    /// made by a timer task when the breaker opens inside a tokio runtime, and in any case when
    /// [`CircuitBreaker::state`] or a call observes that the wait has passed. Default false: the
    /// first call after the wait makes the move.
    pub fn automatic_half_open(mut self, enabled: bool) -> Self {
        self.cfg.automatic_half_open = enabled;
        self
    }

    /// How many events a slow subscriber may fall behind before it misses some (≥ 1). Default 1024.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.cfg.event_capacity = capacity;
        self
    }

    /// The clock the breaker reads. Default [`MonotonicClock`]; tests pass a
    /// [`FakeClock`](crate::FakeClock) or a [`TokioClock`](crate::TokioClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Turns this breaker into one shared by a fleet of processes through the Redis at
    /// `redis_url` (see [`FleetBuilder`](crate::fleet::FleetBuilder)): the options set so far
    /// configure each process's local breaker and the fleet's decisions.
    #[cfg(feature = "fleet")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fleet")))]
    pub fn fleet(self, redis_url: impl Into<String>) -> crate::fleet::FleetBuilder {
        crate::fleet::FleetBuilder::new(self, redis_url.into())
    }

    /// The breaker's name.
    #[cfg(feature = "fleet")]
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Validates the options and builds the breaker, in the closed state.
    pub fn build(mut self) -> Result<CircuitBreaker, ConfigError> {
        self.cfg.slow_call_detection = self
            .slow_call_detection
            .unwrap_or(self.slow_call_configured);
        validate(&self.cfg)?;
        let clock = self
            .clock
            .unwrap_or_else(|| Arc::new(MonotonicClock::new()));
        Ok(CircuitBreaker::from_parts(self.name, self.cfg, clock))
    }
}

fn check_fraction(option: &'static str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            option,
            format!("{v} is not a fraction in (0, 1]; 0.5 means 50 %"),
        ))
    }
}

pub(crate) fn validate(cfg: &Config) -> Result<(), ConfigError> {
    check_fraction("failure_rate_threshold", cfg.failure_rate_threshold)?;
    check_fraction("slow_call_rate_threshold", cfg.slow_call_rate_threshold)?;
    if cfg.slow_call_duration.is_zero() {
        return Err(ConfigError::invalid(
            "slow_call_duration",
            "must be greater than zero (every call would be slow)",
        ));
    }
    match cfg.window {
        Window::Count(n) if n == 0 || n > MAX_COUNT_WINDOW => {
            return Err(ConfigError::invalid(
                "sliding_window",
                format!("a count window holds 1 ..= {MAX_COUNT_WINDOW} calls, not {n}"),
            ));
        }
        Window::Time(d) if d < Duration::from_secs(1) || d > MAX_TIME_WINDOW => {
            return Err(ConfigError::invalid(
                "sliding_window",
                format!("a time window lasts 1 s ..= {MAX_TIME_WINDOW:?}, not {d:?}"),
            ));
        }
        _ => {}
    }
    if cfg.minimum_calls == 0 {
        return Err(ConfigError::invalid(
            "minimum_calls",
            "must be at least 1 call",
        ));
    }
    if cfg.wait_in_open.is_zero() {
        return Err(ConfigError::invalid(
            "wait_in_open",
            "must be greater than zero; use disable() for a breaker that never rejects",
        ));
    }
    if let Some(b) = cfg.open_backoff {
        if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
            return Err(ConfigError::invalid(
                "open_backoff",
                format!(
                    "multiplier must be a finite number >= 1, not {}",
                    b.multiplier
                ),
            ));
        }
        if !(b.jitter.is_finite() && (0.0..1.0).contains(&b.jitter)) {
            return Err(ConfigError::invalid(
                "open_backoff",
                format!("jitter must be in [0, 1), not {}", b.jitter),
            ));
        }
        if b.max_wait < cfg.wait_in_open {
            return Err(ConfigError::invalid(
                "open_backoff",
                format!(
                    "max_wait {:?} is shorter than wait_in_open {:?}",
                    b.max_wait, cfg.wait_in_open
                ),
            ));
        }
    }
    if cfg.half_open_permits == 0 || cfg.half_open_permits > u32::from(u16::MAX) {
        return Err(ConfigError::invalid(
            "half_open_permits",
            format!("must be 1 ..= 65535, not {}", cfg.half_open_permits),
        ));
    }
    if cfg.event_capacity == 0 {
        return Err(ConfigError::invalid("event_capacity", "must be at least 1"));
    }
    Ok(())
}
