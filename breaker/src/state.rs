//! The states of a breaker, and the packed word that holds the current one.

use std::fmt;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum State {
    /// Calls are permitted and their outcomes recorded; the breaker opens when the failure rate
    /// or the slow-call rate in the window reaches its threshold.
    Closed,
    /// Calls are rejected until the wait in the open state has passed.
    Open,
    /// A limited number of probe calls (`half_open_permits`) are permitted; their outcomes decide
    /// whether the breaker closes or opens again.
    HalfOpen,
    /// Every call is permitted and nothing is recorded; only an explicit state change leaves it.
    Disabled,
    /// Every call is rejected; only an explicit state change leaves it.
    ForcedOpen,
    /// Every call is permitted and outcomes are recorded (metrics and events), but the breaker
    /// never changes state by itself.
    MetricsOnly,
}

impl State {
    pub(crate) const fn to_bits(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::Disabled => 3,
            State::ForcedOpen => 4,
            State::MetricsOnly => 5,
        }
    }

    pub(crate) const fn from_bits(bits: u64) -> State {
        match bits & KIND_MASK {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::Disabled,
            4 => State::ForcedOpen,
            _ => State::MetricsOnly,
        }
    }

    /// The state's name in snake case, as used in logs and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Disabled => "disabled",
            State::ForcedOpen => "forced_open",
            State::MetricsOnly => "metrics_only",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const KIND_BITS: u32 = 3;
const KIND_MASK: u64 = (1 << KIND_BITS) - 1;

/// The breaker's current state and its epoch, packed in one `u64` so that the hot path reads
/// both with a single atomic load.
///
/// The epoch grows by one on every transition (including a reset from closed to closed). A permit
/// remembers the epoch it was granted in; an outcome reported in a later epoch is not counted in
/// the window, so a slow call from before a transition cannot skew the state after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Word(pub(crate) u64);

impl Word {
    pub(crate) const fn new(state: State, epoch: u64) -> Word {
        Word((epoch << KIND_BITS) | state.to_bits())
    }

    pub(crate) const fn state(self) -> State {
        State::from_bits(self.0)
    }

    pub(crate) const fn epoch(self) -> u64 {
        self.0 >> KIND_BITS
    }

    /// The word for a transition to `to`: the next epoch.
    pub(crate) const fn next(self, to: State) -> Word {
        Word::new(to, self.epoch().wrapping_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_round_trips_every_state() {
        for s in [
            State::Closed,
            State::Open,
            State::HalfOpen,
            State::Disabled,
            State::ForcedOpen,
            State::MetricsOnly,
        ] {
            let w = Word::new(s, 12345);
            assert_eq!(w.state(), s);
            assert_eq!(w.epoch(), 12345);
            assert_eq!(w.next(State::Open).epoch(), 12346);
        }
    }
}
