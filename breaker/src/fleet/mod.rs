//! A circuit breaker shared by a fleet of processes through Redis (feature `fleet`).
//!
//! Every process keeps its own [`CircuitBreaker`] for the closed path, so a permitted call makes
//! no round trip: [`FleetBreaker::try_acquire`] is the local breaker's plus one atomic load of
//! the fleet's *gate*. A background task of each process
//!
//! - reports the local outcomes to Redis every `report_interval` (1 s), into per-second buckets
//!   timed by the Redis server's clock;
//! - syncs with the fleet state every `sync_interval` (100 ms), and at once when a message on the
//!   breaker's channel says it changed;
//!
//! and one Lua script per sync decides for the whole fleet (the window's failure and slow-call
//! rates over every process's outcomes, the open wait on the server's clock, the half-open probe
//! permits). See [`FleetBuilder`] for the options and the crate README for the guarantees.
//!
//! When Redis does not answer (refused, timed out), each process decides with its local breaker
//! alone, says so with [`FleetEvent::Unavailable`], and rejoins ([`FleetEvent::Rejoined`]) as
//! soon as a sync succeeds. A call never waits for Redis.

mod decide;
mod follow;
mod redis;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};

use crate::clock::duration_to_nanos;
use crate::config::BreakerBuilder;
use crate::sync::lock_std;
use crate::{BreakerError, CircuitBreaker, ConfigError, Outcome, Permit, Rejected, State};

pub use self::decide::FleetState;
use self::decide::{Counts, Follower, Gate, LocalAction, Params, SyncReply};
use self::redis::Keys;

/// The default key prefix: keys are `palisade:breaker:{<name>}:...`.
pub const DEFAULT_PREFIX: &str = "palisade:breaker:";
/// The longest fleet window: 10 minutes of per-second buckets (a sync sums them all).
pub const MAX_FLEET_WINDOW: Duration = Duration::from_secs(600);

/// An error talking to the fleet's Redis (from [`FleetBreaker::force_open`],
/// [`disable`](FleetBreaker::disable), [`reset`](FleetBreaker::reset), and in
/// [`FleetEvent::Unavailable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// Redis refused or dropped the connection, or answered with an error: check that it runs
    /// and that the URL and credentials are right.
    #[error("the fleet's Redis failed: {0}")]
    Redis(#[source] ::redis::RedisError),
    /// Redis did not answer in time (`redis_timeout`); it may be overloaded, paused or
    /// partitioned away.
    #[error("the fleet's Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// A script returned something this version does not understand: another version of
    /// palisade may use the same keys; give it another `prefix`.
    #[error("unexpected reply from the fleet's Redis script: {0}")]
    UnexpectedReply(String),
}

/// Something that happened between this process and its fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FleetEvent {
    /// The first sync with Redis succeeded; the fleet is in `state`.
    Joined {
        /// The fleet's state.
        state: FleetState,
    },
    /// The fleet's state changed (seen by this process).
    StateChanged {
        /// The state this process saw before.
        from: FleetState,
        /// The fleet's state now.
        to: FleetState,
    },
    /// Redis did not answer: this process now decides with its local breaker alone.
    Unavailable {
        /// What went wrong (no credentials in it).
        error: String,
    },
    /// Redis answers again after an [`Unavailable`](FleetEvent::Unavailable): this process
    /// follows the fleet again.
    Rejoined {
        /// The fleet's state.
        state: FleetState,
    },
}

/// Builds a [`FleetBreaker`]; made by [`BreakerBuilder::fleet`].
///
/// The local breaker's options (thresholds, `minimum_calls`, `wait_in_open`,
/// `half_open_permits`, slow-call options) also drive the fleet's decisions. The fleet's own:
///
/// | option | default | |
/// |---|---|---|
/// | `window` | 10 s | the fleet's time window (whole seconds, 1 s ..= 10 min) |
/// | `minimum_calls` | the local breaker's | calls the fleet window needs before a rate opens it |
/// | `sync_interval` | 100 ms | how often each process reads the fleet state (besides pub/sub) |
/// | `report_interval` | 1 s | how often each process reports its outcomes |
/// | `redis_timeout` | 250 ms | a connection attempt or a reply slower than this means unavailable |
/// | `half_open_timeout` | 60 s | a half-open period without a verdict opens the fleet again |
/// | `prefix` | `palisade:breaker:` | the keys' namespace |
/// | `runtime` | the current one | the tokio runtime of the background tasks |
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct FleetBuilder {
    local: BreakerBuilder,
    redis_url: String,
    prefix: String,
    window: Duration,
    minimum_calls: Option<u32>,
    sync_interval: Duration,
    report_interval: Duration,
    redis_timeout: Duration,
    half_open_timeout: Duration,
    runtime: Option<tokio::runtime::Handle>,
}

impl FleetBuilder {
    pub(crate) fn new(local: BreakerBuilder, redis_url: String) -> Self {
        FleetBuilder {
            local,
            redis_url,
            prefix: DEFAULT_PREFIX.to_string(),
            window: Duration::from_secs(10),
            minimum_calls: None,
            sync_interval: Duration::from_millis(100),
            report_interval: Duration::from_secs(1),
            redis_timeout: Duration::from_millis(250),
            half_open_timeout: Duration::from_secs(60),
            runtime: None,
        }
    }

    /// The namespace of the breaker's Redis keys (no `{` or `}`). Default `palisade:breaker:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The fleet's sliding window: outcomes of the last `window` (whole seconds of the Redis
    /// server's clock; 1 s ..= [`MAX_FLEET_WINDOW`]). Default 10 s.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The number of calls the fleet window must hold before a rate can open the fleet (≥ 1).
    /// Default: the local breaker's `minimum_calls`.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = Some(calls);
        self
    }

    /// How often each process reads the fleet state even without a pub/sub message (> 0,
    /// ≤ 60 s). A change reaches every process within `sync_interval` plus one round trip.
    /// Default 100 ms.
    pub fn sync_interval(mut self, interval: Duration) -> Self {
        self.sync_interval = interval;
        self
    }

    /// How often each process reports its outcomes (`sync_interval` ..= `window`; a process
    /// whose local breaker opened reports at its next sync). Default 1 s.
    pub fn report_interval(mut self, interval: Duration) -> Self {
        self.report_interval = interval;
        self
    }

    /// How long a connection attempt or a script may take before Redis counts as unavailable
    /// (> 0). Default 250 ms.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// How long the fleet stays half-open without a verdict (a prober died, or was partitioned
    /// away with its permit) before it opens again (> 0). Default 60 s.
    pub fn half_open_timeout(mut self, timeout: Duration) -> Self {
        self.half_open_timeout = timeout;
        self
    }

    /// The tokio runtime that runs the background tasks. Default: the runtime `build()` is
    /// called in.
    pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Validates the options, builds the local breaker and starts the background tasks.
    ///
    /// It does not wait for Redis: until the first sync the process decides with its local
    /// breaker alone (as when Redis is unavailable).
    pub fn build(self) -> Result<FleetBreaker, ConfigError> {
        let name = self.local.name().clone();
        if name.is_empty() || name.contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "name",
                "a fleet breaker's name must be non-empty and without `{` or `}` (it is the \
                 Redis Cluster hash tag of its keys)",
            ));
        }
        if self.prefix.contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "prefix",
                "must not contain `{` or `}` (the breaker's name is the keys' hash tag)",
            ));
        }
        if self.window < Duration::from_secs(1) || self.window > MAX_FLEET_WINDOW {
            return Err(ConfigError::invalid(
                "window",
                format!(
                    "the fleet window lasts 1 s ..= {MAX_FLEET_WINDOW:?}, not {:?}",
                    self.window
                ),
            ));
        }
        if self.minimum_calls == Some(0) {
            return Err(ConfigError::invalid(
                "minimum_calls",
                "must be at least 1 call",
            ));
        }
        if self.sync_interval.is_zero() || self.sync_interval > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "sync_interval",
                format!(
                    "must be greater than zero and at most 60 s, not {:?}",
                    self.sync_interval
                ),
            ));
        }
        if self.report_interval < self.sync_interval || self.report_interval > self.window {
            return Err(ConfigError::invalid(
                "report_interval",
                format!(
                    "must be between sync_interval ({:?}) and window ({:?}), not {:?}",
                    self.sync_interval, self.window, self.report_interval
                ),
            ));
        }
        if self.redis_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "redis_timeout",
                "must be greater than zero",
            ));
        }
        if self.half_open_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "half_open_timeout",
                "must be greater than zero",
            ));
        }
        let client = ::redis::Client::open(self.redis_url.as_str()).map_err(|e| {
            ConfigError::invalid("redis_url", format!("is not a usable Redis URL: {e}"))
        })?;
        let runtime = match self.runtime {
            Some(h) => h,
            None => tokio::runtime::Handle::try_current().map_err(|_| {
                ConfigError::invalid(
                    "runtime",
                    "build() must run inside a tokio runtime, or be given one with .runtime()",
                )
            })?,
        };
        let local = self.local.build()?;
        let cfg = local.config();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let params = Params {
            window_secs: self.window.as_secs() + u64::from(self.window.subsec_nanos() > 0),
            minimum_calls: u64::from(self.minimum_calls.unwrap_or(cfg.minimum_calls)),
            failure_rate_threshold: cfg.failure_rate_threshold,
            slow_call_rate_threshold: cfg.slow_call_rate_threshold,
            wait_in_open_ms: ms(cfg.wait_in_open),
            half_open_permits: cfg.half_open_permits,
            half_open_timeout_ms: ms(self.half_open_timeout),
        };
        let (events, _) = broadcast::channel(cfg.event_capacity);
        let shared = Arc::new(Shared {
            gate: AtomicU32::new(Gate::Local.to_bits()),
            open_until: AtomicU64::new(0),
            probe_word: AtomicU64::new(0),
            want_probe: AtomicBool::new(false),
            wake: Notify::new(),
            pending_probes: Mutex::new((0, Counts::default())),
            follow: Mutex::new(Followed::default()),
            events,
            keys: Keys::new(&self.prefix, &name),
            params,
            sync_interval: self.sync_interval,
            report_interval: self.report_interval,
            timeout: self.redis_timeout,
            conn: Mutex::new(None),
            client,
            local,
        });
        let tasks = Tasks(vec![
            runtime.spawn(follow::sync_loop(Arc::clone(&shared))),
            runtime.spawn(follow::listen(Arc::clone(&shared))),
        ]);
        Ok(FleetBreaker {
            shared,
            _tasks: Arc::new(tasks),
        })
    }
}

/// A circuit breaker shared by a fleet of processes through Redis. Cheap to clone (clones share
/// the local breaker and the background tasks, which stop when the last clone is dropped).
///
/// ```no_run
/// # async fn fetch() -> Result<String, std::io::Error> { Ok("ok".into()) }
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use palisade_breaker::{BreakerError, CircuitBreaker};
/// use std::time::Duration;
///
/// let breaker = CircuitBreaker::builder("inventory-api")
///     .failure_rate_threshold(0.5)
///     .minimum_calls(20)
///     .wait_in_open(Duration::from_secs(30))
///     .fleet("redis://127.0.0.1:6379/")
///     .window(Duration::from_secs(10))
///     .build()?;
/// match breaker.call(|| fetch()).await {
///     Ok(body) => println!("{body}"),
///     Err(BreakerError::Rejected(r)) => println!("not now: {r}"),
///     Err(e) => println!("the call failed: {e}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FleetBreaker {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

/// Aborts the background tasks when the last [`FleetBreaker`] clone is dropped.
#[derive(Debug)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// What the background tasks and the calls share.
///
/// Invariants: `gate` is written only by `apply`/`unavailable` (under `follow`), after
/// `open_until` and `probe_word`, with release ordering. `probe_word` packs the half-open
/// period's generation (high 48 bits) with the probe permits this process holds for it (low 16
/// bits), so a permit is always taken for the period that granted it.
#[derive(Debug)]
pub(crate) struct Shared {
    gate: AtomicU32,
    /// The end of the fleet's open wait, in the local breaker's clock (nanoseconds).
    open_until: AtomicU64,
    probe_word: AtomicU64,
    /// A call found no probe permit: the next sync asks for one. Set once per demand (the
    /// setter wakes the sync task), cleared when a permit is granted or the period ends.
    want_probe: AtomicBool,
    wake: Notify,
    /// Settled probe outcomes not yet reported, with their period's generation.
    pending_probes: Mutex<(u64, Counts)>,
    follow: Mutex<Followed>,
    events: broadcast::Sender<FleetEvent>,
    keys: Keys,
    params: Params,
    sync_interval: Duration,
    report_interval: Duration,
    timeout: Duration,
    /// The sync task's connection, for the operator commands (`None` while disconnected).
    conn: Mutex<Option<::redis::aio::MultiplexedConnection>>,
    client: ::redis::Client,
    local: CircuitBreaker,
}

/// The process's view of the fleet.
#[derive(Debug, Default)]
struct Followed {
    follower: Follower,
    /// `None` before the first sync attempt, then whether the last one succeeded.
    available: Option<bool>,
}

const TOKEN_BITS: u32 = 16;
const TOKEN_MASK: u64 = (1 << TOKEN_BITS) - 1;

impl Shared {
    fn emit(&self, event: FleetEvent) {
        // An error only means nobody subscribes.
        let _ = self.events.send(event);
    }

    /// Applies a successful sync's reply.
    fn apply(&self, reply: SyncReply) {
        let mut f = lock_std(&self.follow);
        let was = f.available.replace(true);
        let r = f.follower.react(reply.state, reply.generation);
        if r.gate == Gate::Open {
            let remaining = Duration::from_millis(reply.open_remaining_ms);
            let until = self.local.now().saturating_add(remaining);
            self.open_until
                .store(duration_to_nanos(until), Ordering::Release);
        }
        if r.new_probe_period {
            self.probe_word
                .store(reply.generation << TOKEN_BITS, Ordering::Release);
            self.want_probe.store(false, Ordering::Relaxed);
        } else if r.gate != Gate::HalfOpen {
            self.probe_word.store(0, Ordering::Release);
        }
        if reply.probe_granted {
            let generation = reply.generation;
            let _ = self
                .probe_word
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    (w >> TOKEN_BITS == generation && w & TOKEN_MASK < TOKEN_MASK).then_some(w + 1)
                });
            self.want_probe.store(false, Ordering::Relaxed);
        }
        self.gate.store(r.gate.to_bits(), Ordering::Release);
        match r.local {
            LocalAction::None => {}
            LocalAction::Reset => self.local.reset(),
            LocalAction::ForceOpen => self.local.force_open(),
            LocalAction::Disable => self.local.disable(),
        }
        let name = self.local.name();
        match was {
            None => {
                tracing::info!(breaker = name, state = %reply.state, "fleet breaker joined its fleet");
                self.emit(FleetEvent::Joined { state: reply.state });
            }
            Some(false) => {
                tracing::info!(breaker = name, state = %reply.state, "fleet breaker rejoined its fleet: Redis answers again");
                self.emit(FleetEvent::Rejoined { state: reply.state });
            }
            Some(true) => {}
        }
        if let Some((from, to)) = r.changed {
            tracing::info!(breaker = name, %from, %to, "fleet breaker state transition");
            self.emit(FleetEvent::StateChanged { from, to });
        }
    }

    /// A sync failed: decide locally until Redis answers again.
    fn unavailable(&self, error: &FleetError) {
        let mut f = lock_std(&self.follow);
        self.probe_word.store(0, Ordering::Release);
        self.want_probe.store(false, Ordering::Relaxed);
        self.gate.store(Gate::Local.to_bits(), Ordering::Release);
        if f.available.replace(false) != Some(false) {
            tracing::warn!(breaker = self.local.name(), %error, "fleet breaker: Redis unavailable, deciding with the local breaker alone");
            self.emit(FleetEvent::Unavailable {
                error: error.to_string(),
            });
        }
    }

    fn ask_for_probe(&self) {
        if !self.want_probe.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    #[cold]
    fn acquire_gated(&self, gate: Gate) -> Result<FleetPermit<'_>, Rejected> {
        match gate {
            Gate::Local => self.local.try_acquire().map(FleetPermit::local),
            Gate::Open => {
                let now = self.local.now();
                let until = Duration::from_nanos(self.open_until.load(Ordering::Acquire));
                if now < until {
                    return Err(self.local.reject_for_fleet(State::Open, Some(until - now)));
                }
                // The wait has passed: the next sync moves the fleet to half-open.
                self.take_probe()
            }
            Gate::HalfOpen => self.take_probe(),
        }
    }

    fn take_probe(&self) -> Result<FleetPermit<'_>, Rejected> {
        let taken = self
            .probe_word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w & TOKEN_MASK > 0).then(|| w - 1)
            });
        match taken {
            Ok(w) => Ok(FleetPermit(Kind::Probe(Probe {
                shared: self,
                generation: w >> TOKEN_BITS,
            }))),
            Err(_) => {
                self.ask_for_probe();
                Err(self.local.reject_for_fleet(State::HalfOpen, None))
            }
        }
    }

    fn settle_probe(&self, generation: u64, outcome: Outcome, elapsed: Duration) {
        if outcome == Outcome::Ignored {
            self.give_back_probe(generation);
            return;
        }
        let slow = elapsed >= self.local.config().slow_call_duration;
        let add = Counts {
            calls: 1,
            failures: u64::from(outcome == Outcome::Failure),
            slow: u64::from(slow),
        };
        {
            let mut pending = lock_std(&self.pending_probes);
            if pending.0 == generation {
                pending.1.add(add);
            } else if generation > pending.0 || pending.1.calls == 0 {
                *pending = (generation, add);
            }
        }
        self.wake.notify_one();
    }

    fn give_back_probe(&self, generation: u64) {
        let _ = self
            .probe_word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w >> TOKEN_BITS == generation && w & TOKEN_MASK < TOKEN_MASK).then_some(w + 1)
            });
    }
}

/// Permission to make one call, from [`FleetBreaker::try_acquire`]: a call of the local
/// breaker's closed path, or one of the fleet's half-open probes ([`is_probe`](Self::is_probe)).
///
/// Settle it as a [`Permit`]; dropped unsettled or ignored, a probe permit goes back to this
/// process for its next call.
#[derive(Debug)]
#[must_use = "a permit records nothing unless it is settled"]
pub struct FleetPermit<'a>(Kind<'a>);

#[derive(Debug)]
enum Kind<'a> {
    Local(Permit<'a>),
    Probe(Probe<'a>),
}

#[derive(Debug)]
struct Probe<'a> {
    shared: &'a Shared,
    generation: u64,
}

impl Drop for Probe<'_> {
    /// Only reached for a probe that was not settled.
    fn drop(&mut self) {
        self.shared.give_back_probe(self.generation);
    }
}

impl<'a> FleetPermit<'a> {
    #[inline]
    fn local(p: Permit<'a>) -> Self {
        FleetPermit(Kind::Local(p))
    }

    /// Whether this permit is one of the fleet's half-open probes.
    pub fn is_probe(&self) -> bool {
        matches!(self.0, Kind::Probe(_))
    }

    /// The call succeeded after `elapsed`.
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
        match self.0 {
            Kind::Local(p) => p.settle(outcome, elapsed),
            Kind::Probe(p) => {
                let p = std::mem::ManuallyDrop::new(p);
                p.shared.settle_probe(p.generation, outcome, elapsed);
            }
        }
    }
}

impl FleetBreaker {
    /// Asks for permission to make one call. While the fleet is closed (or Redis unavailable)
    /// this is the local breaker's decision plus one atomic load; never a round trip.
    #[inline]
    pub fn try_acquire(&self) -> Result<FleetPermit<'_>, Rejected> {
        let gate = self.shared.gate.load(Ordering::Acquire);
        if gate == 0 {
            return match self.shared.local.try_acquire() {
                Ok(p) => Ok(FleetPermit::local(p)),
                Err(r) => Err(r),
            };
        }
        self.shared.acquire_gated(Gate::from_bits(gate))
    }

    /// Runs `f` if the fleet and the local breaker permit it, and records its outcome (`Ok` a
    /// success, `Err` a failure), as [`CircuitBreaker::call`].
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(Outcome::of, f).await
    }

    /// Like [`call`](Self::call), with `classify` deciding how the result counts.
    pub async fn call_with<C, F, Fut, T, E>(&self, classify: C, f: F) -> Result<T, BreakerError<E>>
    where
        C: FnOnce(&Result<T, E>) -> Outcome,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let local = &self.shared.local;
        // The closed path is exactly the local breaker's, after one load.
        if self.shared.gate.load(Ordering::Acquire) == 0 {
            return local.call_with(classify, f).await;
        }
        let permit = self.try_acquire()?;
        let start = local.start_timer();
        let result = f().await;
        permit.settle(classify(&result), local.elapsed_since(start));
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
        let local = &self.shared.local;
        if self.shared.gate.load(Ordering::Acquire) == 0 {
            return local.call_blocking_with(classify, f);
        }
        let permit = self.try_acquire()?;
        let start = local.start_timer();
        let result = f();
        permit.settle(classify(&result), local.elapsed_since(start));
        result.map_err(BreakerError::Inner)
    }

    /// The state this process applies now: the fleet's `Open` or `HalfOpen`, otherwise its
    /// local breaker's state (which mirrors the fleet's forced states).
    pub fn state(&self) -> State {
        match Gate::from_bits(self.shared.gate.load(Ordering::Acquire)) {
            Gate::Local => self.shared.local.state(),
            Gate::HalfOpen => State::HalfOpen,
            Gate::Open => {
                let until = Duration::from_nanos(self.shared.open_until.load(Ordering::Acquire));
                if self.shared.local.now() < until {
                    State::Open
                } else {
                    State::HalfOpen
                }
            }
        }
    }

    /// The fleet's state as last seen by this process, or `None` while it decides alone (before
    /// the first sync, or while Redis is unavailable).
    pub fn fleet_state(&self) -> Option<FleetState> {
        let f = lock_std(&self.shared.follow);
        match f.available {
            Some(true) => f.follower.last.map(|(s, _)| s),
            _ => None,
        }
    }

    /// The local breaker (its metrics count this process's calls, and the fleet's rejections
    /// as not permitted).
    pub fn local(&self) -> &CircuitBreaker {
        &self.shared.local
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        self.shared.local.name()
    }

    /// The Redis key that holds the fleet's state (a hash: `state`, `gen`, `until`, `opened`
    /// in server milliseconds, the half-open probes).
    pub fn state_key(&self) -> &str {
        &self.shared.keys.state
    }

    /// The pub/sub channel on which every transition is announced.
    pub fn channel(&self) -> &str {
        &self.shared.keys.channel
    }

    /// Subscribes to the fleet events of this process from now on.
    pub fn subscribe_fleet(&self) -> broadcast::Receiver<FleetEvent> {
        self.shared.events.subscribe()
    }

    /// Subscribes to the local breaker's events (see [`CircuitBreaker::subscribe`]).
    pub fn subscribe(&self) -> crate::EventReceiver {
        self.shared.local.subscribe()
    }

    /// Rejects every call in every process of the fleet until another state is set. Each process
    /// applies it at its next sync (at once for this one and, through pub/sub, for the others).
    pub async fn force_open(&self) -> Result<(), FleetError> {
        self.command(FleetState::ForcedOpen).await
    }

    /// Permits every call in every process of the fleet, recording nothing, until another state
    /// is set.
    pub async fn disable(&self) -> Result<(), FleetError> {
        self.command(FleetState::Disabled).await
    }

    /// Closes the fleet with an empty window, and every process's local breaker with it.
    pub async fn reset(&self) -> Result<(), FleetError> {
        self.command(FleetState::Closed).await
    }

    async fn command(&self, to: FleetState) -> Result<(), FleetError> {
        let s = &self.shared;
        let conn = lock_std(&s.conn).clone();
        let mut conn = match conn {
            Some(c) => c,
            None => redis::connect(&s.client, s.timeout).await?,
        };
        redis::command(&mut conn, &s.keys, to, None, s.timeout).await?;
        tracing::info!(breaker = s.local.name(), state = %to, "fleet breaker state set");
        s.wake.notify_one();
        Ok(())
    }
}
