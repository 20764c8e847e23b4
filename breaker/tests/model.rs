//! The breaker against a small reference model, on random sequences of calls, outcomes, clock
//! advances and manual state changes: both must agree on every state, every permit decision
//! (including `retry_after`) and every count.
//!
//! The model is written to be obviously correct rather than fast: the window is a plain list of
//! outcomes, and every rule is the sentence from the documentation.

use std::collections::VecDeque;
use std::time::Duration;

use palisade_breaker::{CircuitBreaker, FakeClock, OpenBackoff, Outcome, Permit, State, Window};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Cfg {
    count_window: Option<u32>,
    time_window_secs: u64,
    minimum_calls: u32,
    failure_threshold: f64,
    slow_threshold: f64,
    slow_ms: u64,
    wait_secs: u64,
    backoff_max_secs: Option<u64>,
    permits: u32,
    max_half_open_secs: u64,
    automatic: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Settle {
        which: usize,
        outcome: Outcome,
        elapsed_ms: u64,
    },
    Drop {
        which: usize,
    },
    Advance {
        ms: u64,
    },
    State,
    ForceOpen,
    Disable,
    MetricsOnly,
    Reset,
}

fn cfg_strategy() -> impl Strategy<Value = Cfg> {
    (
        prop_oneof![(1u32..6).prop_map(Some), Just(None)],
        1u64..5,
        1u32..7,
        prop_oneof![Just(0.25), Just(0.5), Just(1.0)],
        prop_oneof![Just(0.5), Just(1.0)],
        prop_oneof![Just(100u64), Just(1000)],
        1u64..5,
        prop_oneof![Just(None), (1u64..4).prop_map(Some)],
        1u32..4,
        prop_oneof![Just(0u64), Just(2)],
        any::<bool>(),
    )
        .prop_map(
            |(
                count_window,
                time_window_secs,
                minimum_calls,
                failure_threshold,
                slow_threshold,
                slow_ms,
                wait_secs,
                backoff_factor,
                permits,
                max_half_open_secs,
                automatic,
            )| Cfg {
                count_window,
                time_window_secs,
                minimum_calls,
                failure_threshold,
                slow_threshold,
                slow_ms,
                wait_secs,
                backoff_max_secs: backoff_factor.map(|f| wait_secs * f * 2),
                permits,
                max_half_open_secs,
                automatic,
            },
        )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => Just(Op::Acquire),
        12 => (any::<usize>(), prop_oneof![
            4 => Just(Outcome::Success),
            4 => Just(Outcome::Failure),
            1 => Just(Outcome::Ignored),
        ], prop_oneof![Just(0u64), Just(99), Just(100), Just(1500)])
            .prop_map(|(which, outcome, elapsed_ms)| Op::Settle { which, outcome, elapsed_ms }),
        2 => any::<usize>().prop_map(|which| Op::Drop { which }),
        6 => prop_oneof![Just(1u64), Just(400), Just(999), Just(1000), Just(2500)]
            .prop_map(|ms| Op::Advance { ms }),
        3 => Just(Op::State),
        1 => Just(Op::ForceOpen),
        1 => Just(Op::Disable),
        1 => Just(Op::MetricsOnly),
        1 => Just(Op::Reset),
    ]
}

/// One recorded call in the model's window.
#[derive(Debug, Clone, Copy)]
struct Rec {
    second: u64,
    failed: bool,
    slow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    calls: u64,
    failures: u64,
    slow: u64,
}

#[derive(Debug, Clone, Copy)]
struct ModelPermit {
    epoch: u64,
    state: State,
}

#[derive(Debug)]
struct Model {
    cfg: Cfg,
    now: Duration,
    state: State,
    epoch: u64,
    window: VecDeque<Rec>,
    open_until: Duration,
    consecutive_opens: u32,
    probes_issued: u32,
    probes: Vec<Rec>,
    half_open_since: Duration,
    /// The probes' counts when half-open went back to open (shown while open).
    opened_by_probes: Option<Counts>,
    succeeded: u64,
    failed: u64,
    slow: u64,
    ignored: u64,
    rejected: u64,
}

impl Model {
    fn new(cfg: Cfg) -> Self {
        Model {
            cfg,
            now: Duration::ZERO,
            state: State::Closed,
            epoch: 0,
            window: VecDeque::new(),
            open_until: Duration::ZERO,
            consecutive_opens: 0,
            probes_issued: 0,
            probes: Vec::new(),
            opened_by_probes: None,
            half_open_since: Duration::ZERO,
            succeeded: 0,
            failed: 0,
            slow: 0,
            ignored: 0,
            rejected: 0,
        }
    }

    fn wait(&self) -> Duration {
        let base = self.cfg.wait_secs;
        let secs = match self.cfg.backoff_max_secs {
            None => base,
            Some(max) => {
                let mut w = base;
                for _ in 1..self.consecutive_opens {
                    w = (w * 2).min(max);
                }
                w.min(max)
            }
        };
        Duration::from_secs(secs)
    }

    fn go(&mut self, to: State) {
        self.epoch += 1;
        self.opened_by_probes =
            (to == State::Open && self.state == State::HalfOpen).then(|| self.probe_counts());
        self.state = to;
        match to {
            State::Closed => {
                self.consecutive_opens = 0;
                self.window.clear();
            }
            State::MetricsOnly => self.window.clear(),
            State::Open => {
                self.consecutive_opens += 1;
                self.open_until = self.now + self.wait();
            }
            State::HalfOpen => {
                self.probes_issued = 0;
                self.probes.clear();
                self.half_open_since = self.now;
            }
            _ => {}
        }
    }

    fn counts(&self) -> Counts {
        let in_window: Vec<&Rec> = match self.cfg.count_window {
            Some(_) => self.window.iter().collect(),
            None => {
                let now_sec = self.now.as_secs();
                self.window
                    .iter()
                    .filter(|r| r.second + self.cfg.time_window_secs > now_sec)
                    .collect()
            }
        };
        Counts {
            calls: in_window.len() as u64,
            failures: in_window.iter().filter(|r| r.failed).count() as u64,
            slow: in_window.iter().filter(|r| r.slow).count() as u64,
        }
    }

    fn trips(&self, c: Counts, minimum: u64) -> bool {
        c.calls > 0
            && c.calls >= minimum
            && (c.failures as f64 / c.calls as f64 >= self.cfg.failure_threshold
                || c.slow as f64 / c.calls as f64 >= self.cfg.slow_threshold)
    }

    fn half_open_expired(&self) -> bool {
        self.cfg.max_half_open_secs > 0
            && self.now >= self.half_open_since + Duration::from_secs(self.cfg.max_half_open_secs)
    }

    fn state(&mut self) -> State {
        if self.state == State::Open && self.cfg.automatic && self.now >= self.open_until {
            self.go(State::HalfOpen);
        } else if self.state == State::HalfOpen && self.half_open_expired() {
            self.go(State::Open);
        }
        self.state
    }

    fn reject(
        &mut self,
        state: State,
        retry_after: Option<Duration>,
    ) -> Result<ModelPermit, (State, Option<Duration>)> {
        self.rejected += 1;
        Err((state, retry_after))
    }

    fn acquire(&mut self) -> Result<ModelPermit, (State, Option<Duration>)> {
        if self.state == State::Open {
            if self.now < self.open_until {
                return self.reject(State::Open, Some(self.open_until - self.now));
            }
            self.go(State::HalfOpen);
        }
        let granted = ModelPermit {
            epoch: self.epoch,
            state: self.state,
        };
        match self.state {
            State::ForcedOpen => self.reject(State::ForcedOpen, None),
            State::HalfOpen => {
                if self.half_open_expired() {
                    self.go(State::Open);
                    let wait = self.open_until - self.now;
                    self.reject(State::Open, Some(wait))
                } else if self.probes_issued < self.cfg.permits {
                    self.probes_issued += 1;
                    Ok(granted)
                } else {
                    self.reject(State::HalfOpen, None)
                }
            }
            _ => Ok(granted),
        }
    }

    fn give_back(&mut self, p: ModelPermit) {
        if p.state == State::HalfOpen && p.epoch == self.epoch {
            self.probes_issued = self.probes_issued.saturating_sub(1);
        }
    }

    fn settle(&mut self, p: ModelPermit, outcome: Outcome, elapsed: Duration) {
        if p.state == State::Disabled {
            return;
        }
        if outcome == Outcome::Ignored {
            self.ignored += 1;
            self.give_back(p);
            return;
        }
        let rec = Rec {
            second: self.now.as_secs(),
            failed: outcome == Outcome::Failure,
            slow: elapsed >= Duration::from_millis(self.cfg.slow_ms),
        };
        if rec.failed {
            self.failed += 1;
        } else {
            self.succeeded += 1;
        }
        if rec.slow {
            self.slow += 1;
        }
        if p.epoch != self.epoch {
            return;
        }
        match p.state {
            State::Closed | State::MetricsOnly => {
                self.window.push_back(rec);
                if let Some(n) = self.cfg.count_window {
                    while self.window.len() > n as usize {
                        self.window.pop_front();
                    }
                }
                let minimum = match self.cfg.count_window {
                    Some(n) => u64::from(self.cfg.minimum_calls.min(n)),
                    None => u64::from(self.cfg.minimum_calls),
                };
                if p.state == State::Closed && self.trips(self.counts(), minimum) {
                    self.go(State::Open);
                }
            }
            State::HalfOpen => {
                self.probes.push(rec);
                if self.probes.len() as u32 >= self.cfg.permits {
                    let c = Counts {
                        calls: self.probes.len() as u64,
                        failures: self.probes.iter().filter(|r| r.failed).count() as u64,
                        slow: self.probes.iter().filter(|r| r.slow).count() as u64,
                    };
                    if self.trips(c, u64::from(self.cfg.permits)) {
                        self.go(State::Open);
                    } else {
                        self.go(State::Closed);
                    }
                }
            }
            _ => {}
        }
    }

    fn force(&mut self, to: State) {
        if self.state != to {
            self.go(to);
        }
    }

    fn probe_counts(&self) -> Counts {
        Counts {
            calls: self.probes.len() as u64,
            failures: self.probes.iter().filter(|r| r.failed).count() as u64,
            slow: self.probes.iter().filter(|r| r.slow).count() as u64,
        }
    }

    /// What `metrics()` reports: the probes in half-open; while open, the window that decided
    /// (the probes', when half-open went back to open); the window otherwise.
    fn metric_counts(&mut self) -> Counts {
        match (self.state(), self.opened_by_probes) {
            (State::HalfOpen, _) => self.probe_counts(),
            (State::Open, Some(probes)) => probes,
            _ => self.counts(),
        }
    }
}

fn build(cfg: &Cfg, clock: &FakeClock) -> CircuitBreaker {
    let mut b = CircuitBreaker::builder("model")
        .sliding_window(match cfg.count_window {
            Some(n) => Window::Count(n),
            None => Window::Time(Duration::from_secs(cfg.time_window_secs)),
        })
        .minimum_calls(cfg.minimum_calls)
        .failure_rate_threshold(cfg.failure_threshold)
        .slow_call_rate_threshold(cfg.slow_threshold)
        .slow_call_duration(Duration::from_millis(cfg.slow_ms))
        .wait_in_open(Duration::from_secs(cfg.wait_secs))
        .half_open_permits(cfg.permits)
        .max_wait_in_half_open(Duration::from_secs(cfg.max_half_open_secs))
        .automatic_half_open(cfg.automatic)
        .clock(clock.clone());
    if let Some(max) = cfg.backoff_max_secs {
        b = b.open_backoff(OpenBackoff::exponential(Duration::from_secs(max)).with_jitter(0.0));
    }
    b.build().expect("valid config")
}

fn run(cfg: Cfg, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let clock = FakeClock::new();
    let breaker = build(&cfg, &clock);
    let mut model = Model::new(cfg);
    let mut held: Vec<(Permit<'_>, ModelPermit)> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Acquire => {
                let real = breaker.try_acquire();
                let expected = model.acquire();
                match (real, expected) {
                    (Ok(p), Ok(mp)) => {
                        prop_assert_eq!(p.state(), mp.state, "step {}: granted state", step);
                        held.push((p, mp));
                    }
                    (Err(r), Err((state, retry_after))) => {
                        prop_assert_eq!(r.state(), state, "step {}: rejecting state", step);
                        prop_assert_eq!(r.retry_after(), retry_after, "step {}: retry_after", step);
                    }
                    (real, expected) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: breaker said {:?}, model said {:?}",
                            real.map(|p| p.state()),
                            expected
                        )));
                    }
                }
            }
            Op::Settle {
                which,
                outcome,
                elapsed_ms,
            } => {
                if !held.is_empty() {
                    let (p, mp) = held.remove(which % held.len());
                    let elapsed = Duration::from_millis(elapsed_ms);
                    p.settle(outcome, elapsed);
                    model.settle(mp, outcome, elapsed);
                }
            }
            Op::Drop { which } => {
                if !held.is_empty() {
                    let (p, mp) = held.remove(which % held.len());
                    drop(p);
                    model.give_back(mp);
                }
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(ms));
                model.now += Duration::from_millis(ms);
            }
            Op::State => {
                prop_assert_eq!(breaker.state(), model.state(), "step {}: state()", step);
            }
            Op::ForceOpen => {
                breaker.force_open();
                model.force(State::ForcedOpen);
            }
            Op::Disable => {
                breaker.disable();
                model.force(State::Disabled);
            }
            Op::MetricsOnly => {
                breaker.metrics_only();
                model.force(State::MetricsOnly);
            }
            Op::Reset => {
                breaker.reset();
                model.go(State::Closed);
            }
        }
        let m = breaker.metrics();
        let c = model.metric_counts();
        prop_assert_eq!(m.state, model.state, "step {}: metrics().state", step);
        prop_assert_eq!(
            (
                m.buffered_calls,
                m.failed_buffered_calls,
                m.slow_buffered_calls
            ),
            (c.calls, c.failures, c.slow),
            "step {}: window counts",
            step
        );
        prop_assert_eq!(
            (
                m.successful_calls,
                m.failed_calls,
                m.slow_calls,
                m.ignored_calls,
                m.not_permitted_calls
            ),
            (
                model.succeeded,
                model.failed,
                model.slow,
                model.ignored,
                model.rejected
            ),
            "step {}: lifetime counts",
            step
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn breaker_agrees_with_the_reference_model(
        cfg in cfg_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..200),
    ) {
        run(cfg, ops)?;
    }
}
