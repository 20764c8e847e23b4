#![doc = include_str!("../README.md")]
// docs.rs (nightly, `--cfg docsrs`): mark each feature-gated item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod breaker;
mod clock;
mod config;
#[cfg(feature = "serde")]
mod config_serde;
mod counters;
mod error;
pub mod events;
#[cfg(feature = "metrics")]
mod facade;
#[cfg(feature = "fleet")]
#[cfg_attr(docsrs, doc(cfg(feature = "fleet")))]
pub mod fleet;
mod machine;
mod state;
mod sync;
mod tower;
#[doc(hidden)]
pub mod window;

pub use crate::breaker::{CircuitBreaker, Metrics, Outcome, Permit};
pub use crate::clock::{Clock, FakeClock, MonotonicClock, TokioClock};
pub use crate::config::{BreakerBuilder, MAX_COUNT_WINDOW, MAX_TIME_WINDOW, OpenBackoff, Window};
#[cfg(feature = "serde")]
pub use crate::config_serde::{BreakerConfig, OpenBackoffConfig, WindowConfig};
pub use crate::error::{BreakerError, ConfigError, Rejected};
pub use crate::events::{Event, EventReceiver};
pub use crate::state::State;
pub use crate::tower::{BreakerLayer, BreakerService, Classifier, Classify, ResponseFuture};
