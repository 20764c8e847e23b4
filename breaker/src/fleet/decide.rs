//! The fleet's decisions, kept apart from Redis and from any clock.
//!
//! [`Model`] is the fleet-wide state machine that the sync script (`redis.rs`) runs inside Redis,
//! written again in plain Rust: the same inputs at the same server time give the same replies
//! (checked against the script on real Redis in `redis.rs`'s tests). [`Follower`] is what one
//! process does with a reply: which gate its hot path uses, what it does to its local breaker,
//! and which event it reports.

use std::collections::BTreeMap;

/// The state of a fleet breaker, as stored in Redis and shared by every process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FleetState {
    /// Each process decides with its local breaker; the fleet opens when the rates of all
    /// processes' outcomes over the fleet window reach a threshold.
    Closed,
    /// Every process rejects calls until the open wait (timed by the Redis server) has passed.
    Open,
    /// At most `half_open_permits` probe calls run across the whole fleet; their outcomes
    /// decide whether the fleet closes or opens again.
    HalfOpen,
    /// Every process rejects every call until the state is changed again.
    ForcedOpen,
    /// Every process permits every call and records nothing until the state is changed again.
    Disabled,
}

impl FleetState {
    /// The state's name as stored in Redis (`closed`, `open`, `half_open`, `forced_open`,
    /// `disabled`).
    pub const fn as_str(self) -> &'static str {
        match self {
            FleetState::Closed => "closed",
            FleetState::Open => "open",
            FleetState::HalfOpen => "half_open",
            FleetState::ForcedOpen => "forced_open",
            FleetState::Disabled => "disabled",
        }
    }

    /// The state's code in the script's replies.
    #[cfg(test)]
    pub(crate) const fn code(self) -> i64 {
        match self {
            FleetState::Closed => 0,
            FleetState::Open => 1,
            FleetState::HalfOpen => 2,
            FleetState::ForcedOpen => 3,
            FleetState::Disabled => 4,
        }
    }

    pub(crate) const fn from_code(code: i64) -> Option<FleetState> {
        match code {
            0 => Some(FleetState::Closed),
            1 => Some(FleetState::Open),
            2 => Some(FleetState::HalfOpen),
            3 => Some(FleetState::ForcedOpen),
            4 => Some(FleetState::Disabled),
            _ => None,
        }
    }
}

impl std::fmt::Display for FleetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Calls, failed calls and slow calls (a slow failure counts in both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Counts {
    pub(crate) fn add(&mut self, other: Counts) {
        self.calls += other.calls;
        self.failures += other.failures;
        self.slow += other.slow;
    }
}

/// The fleet's decision parameters (validated by the builder).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Params {
    pub(crate) window_secs: u64,
    pub(crate) minimum_calls: u64,
    pub(crate) failure_rate_threshold: f64,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) wait_in_open_ms: u64,
    pub(crate) half_open_permits: u32,
    pub(crate) half_open_timeout_ms: u64,
}

/// Whether `counts` open the fleet: at least `minimum` calls, and the failure rate or the
/// slow-call rate at or above its threshold (the local breaker's rule, `machine::rates_trip`).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn trips(p: &Params, counts: Counts, minimum: u64) -> bool {
    let calls = counts.calls as f64;
    counts.calls > 0
        && counts.calls >= minimum
        && (counts.failures as f64 / calls >= p.failure_rate_threshold
            || counts.slow as f64 / calls >= p.slow_call_rate_threshold)
}

/// What one process sends with a sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SyncInput {
    /// Outcomes of local calls since the last report.
    pub(crate) report: Counts,
    /// Outcomes of probes granted in the half-open period `probe_gen`.
    pub(crate) probes: Counts,
    pub(crate) probe_gen: u64,
    /// Probe permits of period `give_back_gen` that this process will not use.
    pub(crate) give_back: u32,
    pub(crate) give_back_gen: u64,
    /// Whether the process asks for one probe permit.
    pub(crate) want_probe: bool,
}

/// The fleet's answer to a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyncReply {
    pub(crate) state: FleetState,
    /// Grows by one on every transition (a reset included); back to 0 when Redis lost its data.
    pub(crate) generation: u64,
    /// While open: how long until the fleet goes half-open, in server milliseconds.
    pub(crate) open_remaining_ms: u64,
    /// Whether a probe permit of this `generation` was granted to the caller.
    pub(crate) probe_granted: bool,
    /// Server time (ms since the Unix epoch) at which the fleet last opened; 0 if never.
    pub(crate) opened_at_ms: u64,
}

/// The fleet-wide state machine, as the sync script keeps it in Redis. (Only tests run it:
/// Redis runs the script.)
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Model {
    pub(crate) state: FleetState,
    pub(crate) generation: u64,
    pub(crate) open_until_ms: u64,
    pub(crate) opened_at_ms: u64,
    pub(crate) half_open_since_ms: u64,
    pub(crate) probes_issued: u32,
    pub(crate) probes: Counts,
    /// Per-second buckets of reported outcomes (seconds since the Unix epoch).
    pub(crate) buckets: BTreeMap<u64, Counts>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            state: FleetState::Closed,
            generation: 0,
            open_until_ms: 0,
            opened_at_ms: 0,
            half_open_since_ms: 0,
            probes_issued: 0,
            probes: Counts::default(),
            buckets: BTreeMap::new(),
        }
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl Model {
    fn enter(&mut self, state: FleetState) {
        self.state = state;
        self.generation += 1;
        self.probes_issued = 0;
        self.probes = Counts::default();
    }

    fn open(&mut self, p: &Params, now_ms: u64) {
        self.enter(FleetState::Open);
        self.open_until_ms = now_ms + p.wait_in_open_ms;
        self.opened_at_ms = now_ms;
    }

    fn close(&mut self) {
        self.enter(FleetState::Closed);
        // A closed period starts with an empty window: the failures that opened the fleet must
        // not open it again.
        self.buckets.clear();
    }

    /// The outcomes of the window ending in second `sec` (the last `window_secs` seconds).
    pub(crate) fn window(&self, p: &Params, sec: u64) -> Counts {
        let mut sum = Counts::default();
        let from = (sec + 1).saturating_sub(p.window_secs);
        for (_, c) in self.buckets.range(from..=sec) {
            sum.add(*c);
        }
        sum
    }

    /// One sync of one process at server time `now_ms`.
    pub(crate) fn sync(&mut self, p: &Params, now_ms: u64, input: SyncInput) -> SyncReply {
        let sec = now_ms / 1000;
        // The moves that time alone makes.
        if self.state == FleetState::Open && now_ms >= self.open_until_ms {
            self.enter(FleetState::HalfOpen);
            self.half_open_since_ms = now_ms;
        }
        if self.state == FleetState::HalfOpen
            && now_ms.saturating_sub(self.half_open_since_ms) >= p.half_open_timeout_ms
        {
            self.open(p, now_ms);
        }
        // Outcomes count only while closed: a late report from before an opening, or from a
        // process that has not learnt of it yet, says nothing about the period after it.
        if input.report.calls > 0 && self.state == FleetState::Closed {
            self.buckets.entry(sec).or_default().add(input.report);
            let window = self.window(p, sec);
            if trips(p, window, p.minimum_calls) {
                self.open(p, now_ms);
            }
        }
        if input.probes.calls > 0
            && self.state == FleetState::HalfOpen
            && input.probe_gen == self.generation
        {
            self.probes.add(input.probes);
            let permits = u64::from(p.half_open_permits);
            if self.probes.calls >= permits {
                if trips(p, self.probes, permits) {
                    self.open(p, now_ms);
                } else {
                    self.close();
                }
            }
        }
        if input.give_back > 0
            && self.state == FleetState::HalfOpen
            && input.give_back_gen == self.generation
        {
            self.probes_issued = self.probes_issued.saturating_sub(input.give_back);
        }
        let mut probe_granted = false;
        if input.want_probe
            && self.state == FleetState::HalfOpen
            && self.probes_issued < p.half_open_permits
        {
            self.probes_issued += 1;
            probe_granted = true;
        }
        SyncReply {
            state: self.state,
            generation: self.generation,
            open_remaining_ms: if self.state == FleetState::Open {
                self.open_until_ms.saturating_sub(now_ms)
            } else {
                0
            },
            probe_granted,
            opened_at_ms: self.opened_at_ms,
        }
    }

    /// An operator's command: `ForcedOpen`, `Disabled`, or `Closed` (a reset, with an empty
    /// window).
    pub(crate) fn command(&mut self, to: FleetState) -> SyncReply {
        if to == FleetState::Closed {
            self.close();
        } else {
            self.enter(to);
        }
        SyncReply {
            state: self.state,
            generation: self.generation,
            open_remaining_ms: 0,
            probe_granted: false,
            opened_at_ms: self.opened_at_ms,
        }
    }
}

/// Which check the hot path makes before (or instead of) the local breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Ask the local breaker only: the fleet is closed, mirrored onto the local breaker (forced
    /// open, disabled), or unreachable.
    Local,
    /// Reject until the fleet's open wait has passed.
    Open,
    /// Only calls holding one of this process's probe permits pass.
    HalfOpen,
}

impl Gate {
    pub(crate) const fn to_bits(self) -> u32 {
        match self {
            Gate::Local => 0,
            Gate::Open => 1,
            Gate::HalfOpen => 2,
        }
    }

    pub(crate) const fn from_bits(bits: u32) -> Gate {
        match bits {
            0 => Gate::Local,
            1 => Gate::Open,
            _ => Gate::HalfOpen,
        }
    }
}

/// What to do to the local breaker after a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalAction {
    None,
    /// The fleet closed (probes succeeded, or a reset): start the local breaker afresh.
    Reset,
    ForceOpen,
    Disable,
}

/// What a process does with one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reaction {
    pub(crate) gate: Gate,
    pub(crate) local: LocalAction,
    /// `Some((from, to))` when the fleet's state differs from the one this process last saw.
    pub(crate) changed: Option<(FleetState, FleetState)>,
    /// Whether the probe permits this process holds belong to an earlier half-open period.
    pub(crate) new_probe_period: bool,
}

/// What a process remembers of the fleet between replies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Follower {
    /// The last state and generation seen (`None` before the first reply).
    pub(crate) last: Option<(FleetState, u64)>,
    /// The fleet state the local breaker was put in (forced open or disabled), if any.
    pub(crate) mirrored: Option<FleetState>,
}

impl Follower {
    pub(crate) fn react(&mut self, state: FleetState, generation: u64) -> Reaction {
        let last = self.last.replace((state, generation));
        let gate = match state {
            FleetState::Open => Gate::Open,
            FleetState::HalfOpen => Gate::HalfOpen,
            FleetState::Closed | FleetState::ForcedOpen | FleetState::Disabled => Gate::Local,
        };
        let local = match state {
            FleetState::ForcedOpen | FleetState::Disabled => {
                if self.mirrored == Some(state) {
                    LocalAction::None
                } else {
                    self.mirrored = Some(state);
                    if state == FleetState::ForcedOpen {
                        LocalAction::ForceOpen
                    } else {
                        LocalAction::Disable
                    }
                }
            }
            _ if self.mirrored.take().is_some() => LocalAction::Reset,
            // A later generation of the closed state follows a probe verdict or a reset. (A
            // Redis that lost its data starts again at generation 0: that is no verdict, and a
            // local breaker that opened during the outage keeps its state.)
            FleetState::Closed => match last {
                Some((_, g)) if generation > g => LocalAction::Reset,
                _ => LocalAction::None,
            },
            _ => LocalAction::None,
        };
        let changed = match last {
            Some((from, _)) if from != state => Some((from, state)),
            None if state != FleetState::Closed => Some((FleetState::Closed, state)),
            _ => None,
        };
        let new_probe_period =
            state == FleetState::HalfOpen && last != Some((FleetState::HalfOpen, generation));
        Reaction {
            gate,
            local,
            changed,
            new_probe_period,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            window_secs: 10,
            minimum_calls: 10,
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 1.0,
            wait_in_open_ms: 5_000,
            half_open_permits: 2,
            half_open_timeout_ms: 30_000,
        }
    }

    fn report(calls: u64, failures: u64) -> SyncInput {
        SyncInput {
            report: Counts {
                calls,
                failures,
                slow: 0,
            },
            ..SyncInput::default()
        }
    }

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn the_fleet_opens_on_the_sum_of_every_process_but_not_below_minimum_calls() {
        let p = params();
        let mut m = Model::default();
        // Three processes, each below the minimum on its own.
        assert_eq!(m.sync(&p, T0, report(4, 4)).state, FleetState::Closed);
        assert_eq!(m.sync(&p, T0 + 10, report(4, 0)).state, FleetState::Closed);
        let r = m.sync(&p, T0 + 20, report(2, 1));
        assert_eq!(r.state, FleetState::Open);
        assert_eq!(r.generation, 1);
        assert_eq!(r.open_remaining_ms, 5_000);
        assert_eq!(r.opened_at_ms, T0 + 20);
    }

    #[test]
    fn outcomes_leave_the_window_after_window_secs() {
        let p = params();
        let mut m = Model::default();
        m.sync(&p, T0, report(9, 9));
        // 10 s later the first second has left the window: 1 failure of 1 call is below minimum.
        let r = m.sync(&p, T0 + 10_000, report(1, 1));
        assert_eq!(r.state, FleetState::Closed);
        // One second earlier it would still count.
        let mut m = Model::default();
        m.sync(&p, T0, report(9, 9));
        assert_eq!(m.sync(&p, T0 + 9_999, report(1, 1)).state, FleetState::Open);
    }

    #[test]
    fn slow_calls_open_the_fleet_too() {
        let p = Params {
            slow_call_rate_threshold: 0.5,
            ..params()
        };
        let mut m = Model::default();
        let input = SyncInput {
            report: Counts {
                calls: 10,
                failures: 0,
                slow: 5,
            },
            ..SyncInput::default()
        };
        assert_eq!(m.sync(&p, T0, input).state, FleetState::Open);
    }

    fn open_model(p: &Params) -> Model {
        let mut m = Model::default();
        assert_eq!(m.sync(p, T0, report(10, 10)).state, FleetState::Open);
        m
    }

    #[test]
    fn half_open_grants_at_most_the_permits_and_decides_on_the_probes() {
        let p = params();
        let mut m = open_model(&p);
        let want = SyncInput {
            want_probe: true,
            ..SyncInput::default()
        };
        // Still open one millisecond before the wait ends: no probe.
        let r = m.sync(&p, T0 + 4_999, want);
        assert_eq!(
            (r.state, r.probe_granted, r.open_remaining_ms),
            (FleetState::Open, false, 1)
        );
        let r = m.sync(&p, T0 + 5_000, want);
        assert_eq!((r.state, r.probe_granted), (FleetState::HalfOpen, true));
        let g0 = r.generation;
        assert!(m.sync(&p, T0 + 5_001, want).probe_granted);
        assert!(
            !m.sync(&p, T0 + 5_002, want).probe_granted,
            "a third permit"
        );
        // A give-back frees one; a give-back of another period does not.
        let back = |g| SyncInput {
            give_back: 1,
            give_back_gen: g,
            want_probe: false,
            ..SyncInput::default()
        };
        m.sync(&p, T0 + 5_003, back(g0 - 1));
        assert!(!m.sync(&p, T0 + 5_004, want).probe_granted);
        m.sync(&p, T0 + 5_005, back(g0));
        assert!(m.sync(&p, T0 + 5_006, want).probe_granted);
        // Two successful probes close the fleet with an empty window.
        let probe = |failures| SyncInput {
            probes: Counts {
                calls: 1,
                failures,
                slow: 0,
            },
            probe_gen: g0,
            ..SyncInput::default()
        };
        assert_eq!(m.sync(&p, T0 + 5_100, probe(0)).state, FleetState::HalfOpen);
        let r = m.sync(&p, T0 + 5_200, probe(0));
        assert_eq!(r.state, FleetState::Closed);
        assert!(m.buckets.is_empty());
        // A stale probe outcome (an earlier period) is ignored.
        let mut m = open_model(&p);
        let g0 = m.sync(&p, T0 + 5_000, want).generation;
        let stale = SyncInput {
            probe_gen: g0 - 1,
            ..probe(1)
        };
        assert_eq!(m.sync(&p, T0 + 5_001, stale).state, FleetState::HalfOpen);
        assert_eq!(m.probes, Counts::default());
        // One failed probe of two reaches the 50 % threshold: open again.
        m.sync(&p, T0 + 5_002, probe(1));
        let r = m.sync(&p, T0 + 5_003, probe(0));
        assert_eq!(r.state, FleetState::Open);
        assert_eq!(r.open_remaining_ms, 5_000);
    }

    #[test]
    fn a_half_open_period_without_verdict_times_out_to_open() {
        let p = params();
        let mut m = open_model(&p);
        let r = m.sync(&p, T0 + 5_000, SyncInput::default());
        assert_eq!(r.state, FleetState::HalfOpen);
        let r = m.sync(&p, T0 + 5_000 + 29_999, SyncInput::default());
        assert_eq!(r.state, FleetState::HalfOpen);
        let r = m.sync(&p, T0 + 5_000 + 30_000, SyncInput::default());
        assert_eq!(r.state, FleetState::Open);
    }

    #[test]
    fn reports_count_only_while_closed_and_commands_override() {
        let p = params();
        let mut m = open_model(&p);
        m.sync(&p, T0 + 1, report(100, 0));
        assert!(m.window(&p, T0 / 1000).calls == 10, "late report ignored");
        let r = m.command(FleetState::ForcedOpen);
        assert_eq!(r.state, FleetState::ForcedOpen);
        // Forced open stays, whatever the time.
        let r = m.sync(&p, T0 + 1_000_000, report(100, 0));
        assert_eq!(r.state, FleetState::ForcedOpen);
        let r = m.command(FleetState::Closed);
        assert_eq!(r.state, FleetState::Closed);
        assert_eq!(m.window(&p, T0 / 1000).calls, 0);
    }

    #[test]
    fn the_follower_mirrors_forced_states_and_resets_on_a_verdict() {
        let mut f = Follower::default();
        let r = f.react(FleetState::Closed, 0);
        assert_eq!(
            (r.gate, r.local, r.changed),
            (Gate::Local, LocalAction::None, None)
        );
        let r = f.react(FleetState::Open, 1);
        assert_eq!(r.gate, Gate::Open);
        assert_eq!(r.changed, Some((FleetState::Closed, FleetState::Open)));
        let r = f.react(FleetState::HalfOpen, 2);
        assert_eq!(r.gate, Gate::HalfOpen);
        assert!(r.new_probe_period);
        assert!(!f.react(FleetState::HalfOpen, 2).new_probe_period);
        let r = f.react(FleetState::Closed, 3);
        assert_eq!((r.gate, r.local), (Gate::Local, LocalAction::Reset));
        // A reset: closed to closed, later generation.
        assert_eq!(f.react(FleetState::Closed, 4).local, LocalAction::Reset);
        // Redis restarted empty: generation 0, no verdict, no reset.
        assert_eq!(f.react(FleetState::Closed, 0).local, LocalAction::None);
        assert_eq!(
            f.react(FleetState::ForcedOpen, 1).local,
            LocalAction::ForceOpen
        );
        assert_eq!(f.react(FleetState::ForcedOpen, 1).local, LocalAction::None);
        assert_eq!(f.react(FleetState::Disabled, 2).local, LocalAction::Disable);
        // Leaving a mirrored state resets the local breaker even across a Redis restart.
        assert_eq!(f.react(FleetState::Closed, 0).local, LocalAction::Reset);
        // The first reply of a process that joins an open fleet reports the change.
        let mut f = Follower::default();
        let r = f.react(FleetState::Open, 7);
        assert_eq!(r.changed, Some((FleetState::Closed, FleetState::Open)));
    }

    #[test]
    fn gate_bits_round_trip() {
        for g in [Gate::Local, Gate::Open, Gate::HalfOpen] {
            assert_eq!(Gate::from_bits(g.to_bits()), g);
        }
        for s in [
            FleetState::Closed,
            FleetState::Open,
            FleetState::HalfOpen,
            FleetState::ForcedOpen,
            FleetState::Disabled,
        ] {
            assert_eq!(FleetState::from_code(s.code()), Some(s));
        }
    }
}
