//! # palisade
//!
//! Coordination and resilience for Rust services and jobs. This umbrella crate re-exports each
//! palisade crate as a module:
//!
//! - [`lock`]: distributed locks with fencing tokens, lease-loss cancellation, a job registry and
//!   leader election (etcd; files on one host; memory in one process).
//! - [`ratelimit`]: exact sliding-window rate limits on Redis, and an in-process limiter.
//! - [`breaker`]: circuit breakers with count and time windows, slow calls and a tower layer.
//! - [`idempotency`]: content-hash partition writers and run-once idempotency keys.
//!
//! Every capability has an embedded default that needs no server; the distributed engine is a
//! change of constructor. The etcd lock backend is behind the `etcd` feature, because building
//! etcd-client needs `protoc`.

// docs.rs (nightly, `--cfg docsrs`): mark each feature-gated item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use palisade_breaker as breaker;
pub use palisade_idempotency as idempotency;
pub use palisade_lock as lock;
pub use palisade_ratelimit as ratelimit;

/// The etcd client crate, to build the `etcd_client::Client` that `lock::Coordinator::etcd` takes.
#[cfg(feature = "etcd")]
pub use etcd_client;

/// The README's examples, compiled as doctests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
