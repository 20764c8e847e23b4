//! The errors of palisade-breaker.

use std::fmt;
use std::time::Duration;

use crate::State;

/// A call was not permitted by the breaker.
///
/// It says in which state the breaker was and, when it can tell, how long until a call may be
/// permitted again ([`Rejected::retry_after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub(crate) state: State,
    pub(crate) retry_after: Option<Duration>,
}

impl Rejected {
    /// The state the breaker was in when it rejected the call (`Open`, `HalfOpen` with all
    /// permits taken, or `ForcedOpen`).
    pub fn state(&self) -> State {
        self.state
    }

    /// How long until a call may be permitted: the rest of the wait in the open state. `None`
    /// when the breaker cannot tell: forced open (until someone changes the state), or half-open
    /// with every probe permit taken (until the probes finish).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "call not permitted: the circuit breaker is {}",
            self.state
        )?;
        match self.retry_after {
            Some(d) => write!(f, "; retry in {d:?}"),
            None => match self.state {
                State::ForcedOpen => f.write_str("; it stays open until its state is changed"),
                _ => f.write_str("; retry when the probe calls have finished"),
            },
        }
    }
}

impl std::error::Error for Rejected {}

/// The error of a call made through a breaker: either the breaker rejected it, or the call ran
/// and returned its own error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerError<E> {
    /// The breaker did not permit the call; the operation was not run.
    Rejected(Rejected),
    /// The operation ran and failed with this error.
    Inner(E),
}

impl<E> BreakerError<E> {
    /// The rejection, if the call was rejected.
    pub fn rejected(&self) -> Option<&Rejected> {
        match self {
            BreakerError::Rejected(r) => Some(r),
            BreakerError::Inner(_) => None,
        }
    }

    /// The operation's own error, if it ran and failed.
    pub fn into_inner(self) -> Option<E> {
        match self {
            BreakerError::Rejected(_) => None,
            BreakerError::Inner(e) => Some(e),
        }
    }

    /// Whether the breaker rejected the call.
    pub fn is_rejected(&self) -> bool {
        matches!(self, BreakerError::Rejected(_))
    }
}

impl<E> From<Rejected> for BreakerError<E> {
    fn from(r: Rejected) -> Self {
        BreakerError::Rejected(r)
    }
}

impl<E: fmt::Display> fmt::Display for BreakerError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakerError::Rejected(r) => r.fmt(f),
            BreakerError::Inner(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for BreakerError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BreakerError::Rejected(_) => None,
            BreakerError::Inner(e) => Some(e),
        }
    }
}

/// A breaker configuration that `build()` refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An option has a value outside its allowed range.
    #[error("invalid circuit breaker option `{option}`: {reason}")]
    Invalid {
        /// The builder method (or config field) with the bad value, e.g. `failure_rate_threshold`.
        option: &'static str,
        /// What is wrong and what values are allowed.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(option: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            option,
            reason: reason.into(),
        }
    }

    /// The option that was rejected.
    pub fn option(&self) -> &'static str {
        match self {
            ConfigError::Invalid { option, .. } => option,
        }
    }
}
