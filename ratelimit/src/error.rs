//! The one error type of this crate.

use std::time::Duration;

use crate::Decision;

/// Everything that can go wrong when deciding or configuring a limit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A limit or builder setting is invalid; `field` names it.
    #[error("invalid configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The setting that is wrong (e.g. `max`, `window`, `limits`).
        field: &'static str,
        /// What is wrong with it and what to use instead.
        reason: String,
    },

    /// The request asks for more units than the limit can ever admit at once; it would be denied
    /// forever, so it is an error rather than a silent denial.
    #[error(
        "cost {cost} exceeds the capacity {capacity} of the limit; split the request or raise the limit"
    )]
    CostExceedsLimit {
        /// The cost asked for.
        cost: u32,
        /// The most units one request may cost (the limit's `max`, or the GCRA burst).
        capacity: u32,
    },

    /// A cost of zero was asked for.
    #[error("cost must be at least 1")]
    ZeroCost,

    /// Redis did not answer within the configured `.timeout`, and the policy is `FailClosed`.
    #[error("Redis did not answer within {0:?}; check the server or raise `.timeout`")]
    Timeout(Duration),

    /// Redis could not be reached (connection refused or dropped, cluster down), and the policy
    /// is `FailClosed`.
    #[error("Redis is unavailable ({0}); the limiter recovers by itself when it is back")]
    Unavailable(#[source] redis::RedisError),

    /// Redis answered with an error that is not about availability (e.g. a permission error
    /// for an ACL user, or a key of the wrong type under the limiter's prefix).
    #[error("Redis refused the rate-limit script: {0}")]
    Redis(#[source] redis::RedisError),

    /// The script's reply did not have the expected shape (a different script under our SHA?).
    #[error("unexpected reply from the rate-limit script: {0}")]
    UnexpectedReply(String),

    /// `acquire_with_deadline` could not be admitted before its deadline. The decision is the last
    /// one seen (its `retry_after` says how much later it would have been admitted).
    #[error("not admitted before the deadline (retry after {:?})", .0.retry_after)]
    DeadlineExceeded(Decision),
}
