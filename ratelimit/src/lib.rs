#![doc = include_str!("../README.md")]
// docs.rs (nightly, `--cfg docsrs`): mark each feature-gated item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod algorithm;
mod decision;
mod error;
mod file;
mod layer;
mod limit;
mod limiter;
mod local;
mod redis;
mod stats;

pub use decision::{Decision, RateLimitHeaders};
pub use error::{Error, TlsProblem};
pub use file::FileLimiter;
pub use layer::{BoxError, Mode, RateLimit, RateLimitLayer, Rejected};
pub use limit::{Algorithm, Limit, MAX_WINDOW, MIN_WINDOW};
pub use limiter::RateLimiter;
pub use local::{DefaultClock, LocalLimiter, TokioClock, TokioInstant};
pub use redis::{
    DEFAULT_TIMEOUT, Policy, RedisLimiter, RedisLimiterBuilder, connect, connect_cluster,
    connect_cluster_lazy, connect_lazy, is_refusal,
};
#[cfg(feature = "tls")]
pub use redis::{connect_with_tls, connect_with_tls_lazy};

/// The redis crate this limiter is built on (for its connection types).
pub use ::redis as redis_crate;
