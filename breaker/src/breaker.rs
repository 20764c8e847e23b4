//! The circuit breaker: its atomics, its control lock, and the API around them.
//!
//! Who writes what:
//! - `word` (state + epoch) is written only with `control` locked; every call reads it with one
//!   atomic load. A transition publishes its side data (`open_until`, the reset window) before
//!   it stores the new word, with release ordering.
//! - The closed window is written lock-free by every call (see `window/`).
//! - `control` guards the rare paths: transitions, the half-open probes, the opening count.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::clock::{Clock, duration_to_nanos};
use crate::config::{BreakerBuilder, Config};
use crate::counters::{Counter, Counters};
use crate::events::{Event, EventReceiver, Events};
use crate::machine::{self, HalfOpenProbes, HalfOpenVerdict, Mark};
use crate::state::Word;
use crate::sync::{AtomicU64, Mutex, Ordering, lock};
use crate::window::SlidingWindow;
use crate::{BreakerError, Rejected, State};

/// How a call's result counts in the breaker (see [`CircuitBreaker::call_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counts as a success (it may still be slow).
    Success,
    /// Counts as a failure.
    Failure,
    /// Counts as neither: not recorded in the window; in half-open its probe permit is given back.
    Ignored,
}

impl Outcome {
    /// The default classification: `Ok` is a success, `Err` a failure.
    pub fn of<T, E>(result: &Result<T, E>) -> Outcome {
        if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
}

/// A snapshot of a breaker's counts.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// The state when the snapshot was taken.
    pub state: State,
    /// Failed calls / buffered calls in the current window (0 when it is empty). In half-open,
    /// the window is the probes settled so far; while open, the window that opened it (the
    /// probes', when half-open went back to open).
    pub failure_rate: f64,
    /// Slow calls / buffered calls in the current window.
    pub slow_call_rate: f64,
    /// Calls held by the current window.
    pub buffered_calls: u64,
    /// Failed calls held by the current window.
    pub failed_buffered_calls: u64,
    /// Slow calls held by the current window.
    pub slow_buffered_calls: u64,
    /// Calls that succeeded, since the breaker was created.
    pub successful_calls: u64,
    /// Calls that failed, since the breaker was created.
    pub failed_calls: u64,
    /// Calls that were slow (successful or not), since the breaker was created.
    pub slow_calls: u64,
    /// Calls whose result was ignored, since the breaker was created.
    pub ignored_calls: u64,
    /// Calls that were rejected, since the breaker was created.
    pub not_permitted_calls: u64,
}

/// A circuit breaker. Cheap to clone (an `Arc`); clones share one state.
///
/// See the [crate documentation](crate) for an example.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Control {
    /// Openings since the last close; the `k`-th waits `open_wait(k)`.
    consecutive_opens: u32,
    probes: HalfOpenProbes,
    half_open_since: Duration,
    /// The window that decided the current opening when it was the half-open probes' (`None`:
    /// the sliding window opened it, and still shows it).
    opened_by_probes: Option<crate::machine::WindowStats>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    word: AtomicU64,
    /// When the current open state's wait ends, in the clock's nanoseconds.
    open_until: AtomicU64,
    window: SlidingWindow,
    counters: Counters,
    events: Events,
    cfg: Config,
    clock: Arc<dyn Clock>,
    name: Arc<str>,
    control: Mutex<Control>,
    this: Weak<Inner>,
    #[cfg(feature = "metrics")]
    facade: crate::facade::Facade,
}

/// What a permit remembers about the decision that granted it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    word: Word,
}

/// Permission to make one call, from [`CircuitBreaker::try_acquire`].
///
/// Settle it with [`success`](Permit::success), [`failure`](Permit::failure) or
/// [`ignore`](Permit::ignore). A permit dropped unsettled (for instance because the call's future
/// was cancelled) records nothing, and in the half-open state gives its probe slot back so that
/// another probe can be made.
///
/// An outcome is counted in the window only if the breaker is still in the state (and epoch) that
/// granted the permit: a call that started before a transition does not count after it.
#[derive(Debug)]
#[must_use = "a permit records nothing unless it is settled"]
pub struct Permit<'a> {
    // Two words, passed in registers: settling consumes the permit through `ManuallyDrop`
    // instead of a `settled` flag (a flag made the struct 17 bytes, and copying its padding cost
    // a store-forwarding stall on the hot path).
    inner: &'a Inner,
    ticket: Ticket,
}

impl Permit<'_> {
    /// The call succeeded after `elapsed` (slow if `elapsed >= slow_call_duration`).
    #[inline]
    pub fn success(self, elapsed: Duration) {
        self.settle(Outcome::Success, elapsed);
    }

    /// The call failed after `elapsed`.
    #[inline]
    pub fn failure(self, elapsed: Duration) {
        self.settle(Outcome::Failure, elapsed);
    }

    /// The call's result counts as neither success nor failure.
    #[inline]
    pub fn ignore(self) {
        self.settle(Outcome::Ignored, Duration::ZERO);
    }

    /// Settles the permit with `outcome` after `elapsed`.
    #[inline]
    pub fn settle(self, outcome: Outcome, elapsed: Duration) {
        let this = ManuallyDrop::new(self);
        this.inner.settle(this.ticket, outcome, elapsed);
    }

    /// The state the permit was granted in.
    pub fn state(&self) -> State {
        self.ticket.word.state()
    }
}

impl Drop for Permit<'_> {
    /// Only reached for a permit that was not settled.
    #[inline]
    fn drop(&mut self) {
        self.inner.give_back(self.ticket);
    }
}

/// A permit that owns a handle on its breaker (for futures that must be `'static`).
#[derive(Debug)]
pub(crate) struct OwnedPermit {
    inner: Arc<Inner>,
    ticket: Ticket,
    start: Option<Duration>,
    settled: bool,
}

impl OwnedPermit {
    pub(crate) fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        let elapsed = self.inner.elapsed_since(self.start);
        self.inner.settle(self.ticket, outcome, elapsed);
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        if !self.settled {
            self.inner.give_back(self.ticket);
        }
    }
}

impl CircuitBreaker {
    /// Starts building a breaker called `name` (the name appears in logs and metrics labels).
    pub fn builder(name: impl Into<Arc<str>>) -> BreakerBuilder {
        BreakerBuilder::new(name)
    }

    pub(crate) fn from_parts(name: Arc<str>, cfg: Config, clock: Arc<dyn Clock>) -> Self {
        let word = Word::new(State::Closed, 0);
        let inner = Arc::new_cyclic(|this| Inner {
            word: AtomicU64::new(word.0),
            open_until: AtomicU64::new(0),
            window: SlidingWindow::new(cfg.window, word.epoch()),
            counters: Counters::new(),
            events: Events::new(cfg.event_capacity),
            #[cfg(feature = "metrics")]
            facade: crate::facade::Facade::new(&name),
            cfg,
            clock,
            name,
            control: Mutex::new(Control {
                consecutive_opens: 0,
                probes: HalfOpenProbes::default(),
                half_open_since: Duration::ZERO,
                opened_by_probes: None,
            }),
            this: this.clone(),
        });
        #[cfg(feature = "metrics")]
        inner.facade.state(State::Closed);
        CircuitBreaker { inner }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Asks for permission to make one call. In the closed state this is one atomic load.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, Rejected> {
        let ticket = self.inner.acquire()?;
        Ok(Permit {
            inner: &self.inner,
            ticket,
        })
    }

    pub(crate) fn try_acquire_owned(&self) -> Result<OwnedPermit, Rejected> {
        let ticket = self.inner.acquire()?;
        Ok(OwnedPermit {
            inner: Arc::clone(&self.inner),
            ticket,
            start: self.inner.start_timer(),
            settled: false,
        })
    }

    /// Runs `f` if the breaker permits it, and records its outcome: `Ok` is a success, `Err` a
    /// failure; a call that takes `slow_call_duration` or longer is also slow.
    ///
    /// If the returned future is dropped before `f`'s future completes, nothing is recorded and a
    /// half-open probe slot is given back.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(Outcome::of, f).await
    }

    /// Like [`call`](Self::call), with `classify` deciding how the result counts: for instance
    /// an HTTP 503 returned as `Ok` can count as a failure, and a "not found" error as ignored.
    ///
    /// ```
    /// # async fn example() {
    /// use palisade_breaker::{CircuitBreaker, Outcome};
    ///
    /// let breaker = CircuitBreaker::builder("api").build().unwrap();
    /// let status = breaker
    ///     .call_with(
    ///         |r: &Result<u16, std::io::Error>| match r {
    ///             Ok(503) => Outcome::Failure,
    ///             Ok(_) => Outcome::Success,
    ///             Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Ignored,
    ///             Err(_) => Outcome::Failure,
    ///         },
    ///         || async { Ok(503) },
    ///     )
    ///     .await;
    /// assert_eq!(status.unwrap(), 503); // the value is returned, and counted as a failure
    /// assert_eq!(breaker.metrics().failed_calls, 1);
    /// # }
    /// ```
    pub async fn call_with<C, F, Fut, T, E>(&self, classify: C, f: F) -> Result<T, BreakerError<E>>
    where
        C: FnOnce(&Result<T, E>) -> Outcome,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let start = self.inner.start_timer();
        let result = f().await;
        let elapsed = self.inner.elapsed_since(start);
        permit.settle(classify(&result), elapsed);
        result.map_err(BreakerError::Inner)
    }

    /// [`call`](Self::call) for blocking code.
    pub fn call_blocking<F, T, E>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Result<T, E>,
    {
        self.call_blocking_with(Outcome::of, f)
    }

    /// [`call_with`](Self::call_with) for blocking code.
    pub fn call_blocking_with<C, F, T, E>(&self, classify: C, f: F) -> Result<T, BreakerError<E>>
    where
        C: FnOnce(&Result<T, E>) -> Outcome,
        F: FnOnce() -> Result<T, E>,
    {
        let permit = self.try_acquire()?;
        let start = self.inner.start_timer();
        let result = f();
        let elapsed = self.inner.elapsed_since(start);
        permit.settle(classify(&result), elapsed);
        result.map_err(BreakerError::Inner)
    }

    /// The current state. With `automatic_half_open`, an open breaker whose wait has passed moves
    /// to half-open here; a half-open breaker past `max_wait_in_half_open` moves back to open.
    pub fn state(&self) -> State {
        self.inner.refresh()
    }

    /// A snapshot of the breaker's counts.
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics()
    }

    /// Subscribes to the breaker's events from now on.
    pub fn subscribe(&self) -> EventReceiver {
        self.inner.events.subscribe()
    }

    /// Rejects every call until another state is set (by [`reset`](Self::reset),
    /// [`disable`](Self::disable) or [`metrics_only`](Self::metrics_only)).
    pub fn force_open(&self) {
        self.inner.force(State::ForcedOpen);
    }

    /// Permits every call and records nothing until another state is set.
    pub fn disable(&self) {
        self.inner.force(State::Disabled);
    }

    /// Permits every call and records outcomes (metrics, events), but never changes state by
    /// itself, until another state is set.
    pub fn metrics_only(&self) {
        self.inner.force(State::MetricsOnly);
    }

    /// Back to closed with an empty window and no memory of earlier openings.
    pub fn reset(&self) {
        self.inner.reset();
    }
}

/// What the fleet layer (`fleet/`) needs from its local breaker.
#[cfg(feature = "fleet")]
impl CircuitBreaker {
    pub(crate) fn config(&self) -> &Config {
        &self.inner.cfg
    }

    pub(crate) fn now(&self) -> Duration {
        self.inner.now()
    }

    #[inline]
    pub(crate) fn start_timer(&self) -> Option<Duration> {
        self.inner.start_timer()
    }

    #[inline]
    pub(crate) fn elapsed_since(&self, start: Option<Duration>) -> Duration {
        self.inner.elapsed_since(start)
    }

    /// Counts a call the fleet rejected, as the breaker counts its own rejections.
    pub(crate) fn reject_for_fleet(&self, state: State, retry_after: Option<Duration>) -> Rejected {
        self.inner.reject(state, retry_after)
    }

    /// Successful, failed and slow calls since creation (no lock; sums the per-thread counters).
    pub(crate) fn lifetime_outcomes(&self) -> (u64, u64, u64) {
        let c = &self.inner.counters;
        (
            c.get(Counter::Success),
            c.get(Counter::Failure),
            c.get(Counter::Slow),
        )
    }
}

impl Inner {
    #[inline]
    fn load_word(&self) -> Word {
        Word(self.word.load(Ordering::Acquire))
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    #[inline]
    fn start_timer(&self) -> Option<Duration> {
        if self.cfg.slow_call_detection || self.events.active() {
            Some(self.now())
        } else {
            None
        }
    }

    #[inline]
    fn elapsed_since(&self, start: Option<Duration>) -> Duration {
        match start {
            Some(s) => self.now().saturating_sub(s),
            None => Duration::ZERO,
        }
    }

    #[inline]
    fn acquire(&self) -> Result<Ticket, Rejected> {
        let word = self.load_word();
        match word.state() {
            State::Closed | State::MetricsOnly | State::Disabled => Ok(Ticket { word }),
            _ => self.acquire_slow(word),
        }
    }

    #[cold]
    fn acquire_slow(&self, seen: Word) -> Result<Ticket, Rejected> {
        let now = self.now();
        if seen.state() == State::Open {
            let until = Duration::from_nanos(self.open_until.load(Ordering::Acquire));
            // The word is re-read after `open_until`: if it is still the same open state, the
            // deadline read belongs to it.
            if now < until && self.load_word() == seen {
                return Err(self.reject(State::Open, Some(until - now)));
            }
        }
        let mut ctl = lock(&self.control);
        let mut word = self.load_word();
        if word.state() == State::Open {
            let until = Duration::from_nanos(self.open_until.load(Ordering::Acquire));
            if now < until {
                drop(ctl);
                return Err(self.reject(State::Open, Some(until - now)));
            }
            word = self.transition(&mut ctl, word, State::HalfOpen, now);
        }
        match word.state() {
            State::Closed | State::MetricsOnly | State::Disabled => Ok(Ticket { word }),
            State::ForcedOpen => {
                drop(ctl);
                Err(self.reject(State::ForcedOpen, None))
            }
            State::HalfOpen => {
                if machine::half_open_expired(
                    self.cfg.max_wait_in_half_open,
                    ctl.half_open_since,
                    now,
                ) {
                    self.transition(&mut ctl, word, State::Open, now);
                    let wait = self.open_remaining(now);
                    drop(ctl);
                    return Err(self.reject(State::Open, Some(wait)));
                }
                if ctl.probes.try_issue(self.cfg.half_open_permits) {
                    Ok(Ticket { word })
                } else {
                    drop(ctl);
                    Err(self.reject(State::HalfOpen, None))
                }
            }
            State::Open => unreachable!("an expired open state moved to half-open above"),
        }
    }

    fn open_remaining(&self, now: Duration) -> Duration {
        Duration::from_nanos(self.open_until.load(Ordering::Acquire)).saturating_sub(now)
    }

    fn reject(&self, state: State, retry_after: Option<Duration>) -> Rejected {
        self.counters.add(Counter::Rejected);
        #[cfg(feature = "metrics")]
        self.facade.rejected();
        self.events.emit(Event::Rejected { state });
        Rejected { state, retry_after }
    }

    #[inline]
    fn settle(&self, ticket: Ticket, outcome: Outcome, elapsed: Duration) {
        let state = ticket.word.state();
        if state == State::Disabled {
            return;
        }
        if outcome == Outcome::Ignored {
            self.settle_ignored(ticket, elapsed);
            return;
        }
        let mark = Mark::new(
            outcome == Outcome::Failure,
            elapsed >= self.cfg.slow_call_duration,
        );
        self.count(mark, elapsed);
        match state {
            State::Closed | State::MetricsOnly => {
                let now = if self.window.needs_time() {
                    self.now()
                } else {
                    Duration::ZERO
                };
                // An outcome from an earlier epoch is not counted: the window may already
                // belong to a later state. (A transition racing with this check can still let
                // one outcome through; it is then counted in the generation it raced with.)
                if self.load_word() != ticket.word {
                    return;
                }
                let epoch = ticket.word.epoch();
                let stats = self.window.record(epoch, mark, now);
                #[cfg(feature = "metrics")]
                self.publish_window(stats, now);
                if let Some(stats) = stats
                    && state == State::Closed
                    && machine::closed_should_open(&self.cfg, stats)
                {
                    self.trip(ticket.word);
                }
            }
            State::HalfOpen => self.settle_probe(ticket.word, mark),
            _ => {}
        }
    }

    /// Publishes the window's rates when they may have changed (see `Facade::stale`); `now` is
    /// the time the window was given (zero for a count window, which ignores it).
    #[cfg(feature = "metrics")]
    #[inline]
    fn publish_window(&self, stats: Option<crate::machine::WindowStats>, now: Duration) {
        let minimum = self.cfg.effective_minimum_calls();
        match stats {
            Some(stats) => self.facade.window(stats, minimum),
            None if self.facade.stale() => self.facade.window(self.window.snapshot(now), minimum),
            None => {}
        }
    }

    #[cold]
    fn settle_ignored(&self, ticket: Ticket, elapsed: Duration) {
        self.counters.add(Counter::Ignored);
        #[cfg(feature = "metrics")]
        self.facade.ignored(elapsed);
        #[cfg(not(feature = "metrics"))]
        let _ = elapsed;
        self.events.emit(Event::IgnoredError);
        self.give_back(ticket);
    }

    #[inline]
    fn count(&self, mark: Mark, elapsed: Duration) {
        if mark.is_failure() {
            self.counters.add(Counter::Failure);
        } else {
            self.counters.add(Counter::Success);
        }
        if mark.is_slow() {
            self.counters.add(Counter::Slow);
        }
        #[cfg(feature = "metrics")]
        self.facade.mark(mark, elapsed);
        if self.events.active() {
            self.emit_outcome(mark, elapsed);
        }
    }

    #[cold]
    fn emit_outcome(&self, mark: Mark, elapsed: Duration) {
        if mark.is_failure() {
            self.events.emit(Event::Error { elapsed });
        } else {
            self.events.emit(Event::Success { elapsed });
        }
        if mark.is_slow() {
            self.events.emit(Event::SlowCall {
                elapsed,
                failed: mark.is_failure(),
            });
        }
    }

    /// Opens the closed state `seen` (if nobody changed the state meanwhile).
    #[cold]
    fn trip(&self, seen: Word) {
        let now = self.now();
        let mut ctl = lock(&self.control);
        if self.load_word() == seen {
            self.transition(&mut ctl, seen, State::Open, now);
        }
    }

    #[cold]
    fn settle_probe(&self, granted: Word, mark: Mark) {
        let now = self.now();
        let mut ctl = lock(&self.control);
        let word = self.load_word();
        if word != granted {
            return;
        }
        match ctl.probes.record(&self.cfg, mark) {
            HalfOpenVerdict::Wait => {}
            HalfOpenVerdict::Close => {
                self.transition(&mut ctl, word, State::Closed, now);
            }
            HalfOpenVerdict::Open => {
                self.transition(&mut ctl, word, State::Open, now);
            }
        }
    }

    /// A permit was dropped unsettled or ignored: give a half-open probe slot back.
    #[inline]
    fn give_back(&self, ticket: Ticket) {
        if ticket.word.state() == State::HalfOpen {
            self.give_back_probe(ticket);
        }
    }

    #[cold]
    fn give_back_probe(&self, ticket: Ticket) {
        let mut ctl = lock(&self.control);
        if self.load_word() == ticket.word {
            ctl.probes.give_back();
        }
    }

    /// Applies a transition from `from` to `to` at `now`. Must hold `control`.
    fn transition(&self, ctl: &mut Control, from: Word, to: State, now: Duration) -> Word {
        let next = from.next(to);
        // While open, the window that decided is shown: the probes', when half-open reopened it.
        ctl.opened_by_probes =
            (to == State::Open && from.state() == State::HalfOpen).then_some(ctl.probes.stats);
        match to {
            State::Closed | State::MetricsOnly => {
                if to == State::Closed {
                    ctl.consecutive_opens = 0;
                }
                self.window.reset(next.epoch());
            }
            State::Open => {
                ctl.consecutive_opens = ctl.consecutive_opens.saturating_add(1);
                let wait = machine::open_wait(&self.cfg, ctl.consecutive_opens, rand::random());
                let until = now.saturating_add(wait);
                self.open_until
                    .store(duration_to_nanos(until), Ordering::Release);
                if self.cfg.automatic_half_open {
                    self.schedule_half_open(next, wait);
                }
            }
            State::HalfOpen => {
                ctl.probes = HalfOpenProbes::default();
                ctl.half_open_since = now;
            }
            State::Disabled | State::ForcedOpen => {}
        }
        self.word.store(next.0, Ordering::Release);
        #[cfg(feature = "metrics")]
        {
            self.facade.state(to);
            // While open, the rates that opened it stay visible (as resilience4j's do): the
            // probes' when half-open reopened it; any other state starts an empty window.
            if let Some(probes) = ctl.opened_by_probes {
                self.facade
                    .window(probes, self.cfg.effective_minimum_calls());
            } else if !matches!(to, State::Open | State::ForcedOpen) {
                let stats = crate::machine::WindowStats::default();
                self.facade
                    .window(stats, self.cfg.effective_minimum_calls());
            }
        }
        if from.state() == to {
            return next;
        }
        tracing::info!(
            breaker = %self.name,
            from = %from.state(),
            to = %to,
            "circuit breaker state transition"
        );
        self.events.emit(Event::StateTransition {
            from: from.state(),
            to,
        });
        next
    }

    /// With `automatic_half_open`, a timer task (if a tokio runtime is there to run it) moves
    /// the open state `open` to half-open when its wait ends.
    fn schedule_half_open(&self, open: Word, wait: Duration) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.this.clone();
        handle.spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(inner) = this.upgrade()
                && inner.load_word() == open
            {
                inner.refresh();
            }
        });
    }

    /// The current state, after the moves that time alone makes (see `CircuitBreaker::state`).
    fn refresh(&self) -> State {
        let word = self.load_word();
        match word.state() {
            State::Open if self.cfg.automatic_half_open => {
                let now = self.now();
                if now < Duration::from_nanos(self.open_until.load(Ordering::Acquire)) {
                    return State::Open;
                }
                let mut ctl = lock(&self.control);
                let word = self.load_word();
                if word.state() == State::Open && self.open_remaining(now).is_zero() {
                    self.transition(&mut ctl, word, State::HalfOpen, now);
                }
                self.load_word().state()
            }
            State::HalfOpen if !self.cfg.max_wait_in_half_open.is_zero() => {
                let now = self.now();
                let mut ctl = lock(&self.control);
                let word = self.load_word();
                if word.state() == State::HalfOpen
                    && machine::half_open_expired(
                        self.cfg.max_wait_in_half_open,
                        ctl.half_open_since,
                        now,
                    )
                {
                    self.transition(&mut ctl, word, State::Open, now);
                }
                self.load_word().state()
            }
            s => s,
        }
    }

    fn force(&self, to: State) {
        let now = self.now();
        let mut ctl = lock(&self.control);
        let word = self.load_word();
        if word.state() != to {
            self.transition(&mut ctl, word, to, now);
        }
    }

    fn reset(&self) {
        let now = self.now();
        let mut ctl = lock(&self.control);
        let word = self.load_word();
        self.transition(&mut ctl, word, State::Closed, now);
        drop(ctl);
        tracing::info!(breaker = %self.name, "circuit breaker reset");
        self.events.emit(Event::Reset);
    }

    fn metrics(&self) -> Metrics {
        let state = self.refresh();
        let stats = {
            let ctl = lock(&self.control);
            match (state, ctl.opened_by_probes) {
                (State::HalfOpen, _) => ctl.probes.stats,
                (State::Open, Some(probes)) => probes,
                _ => self.window.snapshot(self.now()),
            }
        };
        #[cfg(feature = "metrics")]
        if !matches!(state, State::Open | State::ForcedOpen) {
            self.facade
                .window(stats, self.cfg.effective_minimum_calls());
        }
        Metrics {
            state,
            failure_rate: stats.failure_rate(),
            slow_call_rate: stats.slow_rate(),
            buffered_calls: stats.calls,
            failed_buffered_calls: stats.failures,
            slow_buffered_calls: stats.slow,
            successful_calls: self.counters.get(Counter::Success),
            failed_calls: self.counters.get(Counter::Failure),
            slow_calls: self.counters.get(Counter::Slow),
            ignored_calls: self.counters.get(Counter::Ignored),
            not_permitted_calls: self.counters.get(Counter::Rejected),
        }
    }
}
