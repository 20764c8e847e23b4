//! [`BreakerConfig`]: a breaker's options as data (feature `serde`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::OpenBackoff;
use crate::{BreakerBuilder, CircuitBreaker, ConfigError, Window};

/// A breaker's configuration, for TOML, YAML, JSON or any other serde format. Every field is
/// optional and defaults as in [`BreakerBuilder`]; durations are strings like `"60s"` or
/// `"1m 30s"` (humantime).
///
/// ```
/// use palisade_breaker::BreakerConfig;
///
/// let cfg: BreakerConfig = toml::from_str(r#"
///     name = "payments"
///     failure_rate_threshold = 0.25
///     sliding_window = { time = "30s" }
///     minimum_calls = 20
///     wait_in_open = "10s"
///     open_backoff = { multiplier = 2.0, max_wait = "5m", jitter = 0.1 }
/// "#).unwrap();
/// let breaker = cfg.build().unwrap();
/// assert_eq!(breaker.name(), "payments");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// The breaker's name (default `"breaker"`).
    pub name: Option<String>,
    /// See [`BreakerBuilder::failure_rate_threshold`].
    pub failure_rate_threshold: Option<f64>,
    /// See [`BreakerBuilder::slow_call_rate_threshold`].
    pub slow_call_rate_threshold: Option<f64>,
    /// See [`BreakerBuilder::slow_call_duration`].
    #[serde(with = "opt_duration")]
    pub slow_call_duration: Option<Duration>,
    /// See [`BreakerBuilder::slow_call_detection`].
    pub slow_call_detection: Option<bool>,
    /// See [`BreakerBuilder::sliding_window`]: `{ count = 100 }` or `{ time = "60s" }`.
    pub sliding_window: Option<WindowConfig>,
    /// See [`BreakerBuilder::minimum_calls`].
    pub minimum_calls: Option<u32>,
    /// See [`BreakerBuilder::wait_in_open`].
    #[serde(with = "opt_duration")]
    pub wait_in_open: Option<Duration>,
    /// See [`BreakerBuilder::open_backoff`].
    pub open_backoff: Option<OpenBackoffConfig>,
    /// See [`BreakerBuilder::half_open_permits`].
    pub half_open_permits: Option<u32>,
    /// See [`BreakerBuilder::max_wait_in_half_open`].
    #[serde(with = "opt_duration")]
    pub max_wait_in_half_open: Option<Duration>,
    /// See [`BreakerBuilder::automatic_half_open`].
    pub automatic_half_open: Option<bool>,
    /// See [`BreakerBuilder::event_capacity`].
    pub event_capacity: Option<usize>,
}

/// A sliding window as data: `{ count = 100 }` or `{ time = "60s" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowConfig {
    /// [`Window::Count`].
    Count(u32),
    /// [`Window::Time`].
    Time(#[serde(with = "duration")] Duration),
}

/// [`OpenBackoff`] as data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenBackoffConfig {
    /// Growth factor per consecutive opening (default 2).
    #[serde(default = "two")]
    pub multiplier: f64,
    /// Cap of the grown wait.
    #[serde(with = "duration")]
    pub max_wait: Duration,
    /// Randomisation factor in `[0, 1)` (default 0).
    #[serde(default)]
    pub jitter: f64,
}

fn two() -> f64 {
    2.0
}

impl BreakerConfig {
    /// The builder these options describe (add a clock or anything else, then `build()`).
    pub fn builder(&self) -> BreakerBuilder {
        let mut b = CircuitBreaker::builder(self.name.clone().unwrap_or_else(|| "breaker".into()));
        if let Some(v) = self.failure_rate_threshold {
            b = b.failure_rate_threshold(v);
        }
        if let Some(v) = self.slow_call_rate_threshold {
            b = b.slow_call_rate_threshold(v);
        }
        if let Some(v) = self.slow_call_duration {
            b = b.slow_call_duration(v);
        }
        if let Some(v) = self.slow_call_detection {
            b = b.slow_call_detection(v);
        }
        if let Some(v) = self.sliding_window {
            b = b.sliding_window(match v {
                WindowConfig::Count(n) => Window::Count(n),
                WindowConfig::Time(d) => Window::Time(d),
            });
        }
        if let Some(v) = self.minimum_calls {
            b = b.minimum_calls(v);
        }
        if let Some(v) = self.wait_in_open {
            b = b.wait_in_open(v);
        }
        if let Some(v) = self.open_backoff {
            b = b.open_backoff(OpenBackoff {
                multiplier: v.multiplier,
                max_wait: v.max_wait,
                jitter: v.jitter,
            });
        }
        if let Some(v) = self.half_open_permits {
            b = b.half_open_permits(v);
        }
        if let Some(v) = self.max_wait_in_half_open {
            b = b.max_wait_in_half_open(v);
        }
        if let Some(v) = self.automatic_half_open {
            b = b.automatic_half_open(v);
        }
        if let Some(v) = self.event_capacity {
            b = b.event_capacity(v);
        }
        b
    }

    /// Validates the options and builds the breaker.
    pub fn build(&self) -> Result<CircuitBreaker, ConfigError> {
        self.builder().build()
    }
}

mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration like \"60s\" or \"1m 30s\": {e}"
            ))
        })
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::duration")] Duration);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}
