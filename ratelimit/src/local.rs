//! The embedded default: an in-process keyed limiter on `governor`, timed by tokio's clock.

use std::future::Future;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use std::sync::{PoisonError, RwLock};

use governor::clock::{Clock, Reference};
use governor::middleware::{RateLimitingMiddleware, StateSnapshot};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, nanos::Nanos};
use hashbrown::{DefaultHashBuilder, HashTable};

use crate::{Decision, Error, Limit, RateLimiter};

/// Governor's clock reading tokio's [`tokio::time::Instant`], so that paused tokio time
/// (`tokio::time::pause`, `start_paused`) drives the local limiter in tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

/// An instant of [`TokioClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl std::ops::Add<Nanos> for TokioInstant {
    type Output = TokioInstant;
    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }
    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(self.0.checked_sub(duration.into()).unwrap_or(self.0))
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

/// The clock a [`LocalLimiter`] uses unless told otherwise: governor's default (quanta, the
/// fastest monotonic clock on the platform).
pub type DefaultClock = governor::clock::DefaultClock;

/// One key's GCRA state: governor's [`InMemoryState`] (the key's theoretical arrival time in one
/// atomic, updated by governor's compare-and-swap loop).
///
/// Governor's keyed stores look keys up by `&K` (a `&String` for string keys), so a caller
/// holding a `&str` would have to copy it first. Instead, [`KeyMap`] looks the `&str` up itself
/// and hands governor the state it found as the "key" of [`ByState`], a store whose key *is*
/// the state. Governor's `RateLimiter` (`check_key`, `check_key_n`: its GCRA and its
/// compare-and-swap on this state) still makes every decision.
#[derive(Default)]
struct Slot(InMemoryState);

impl Slot {
    /// The theoretical arrival time (ns since the limiter's start); `None` for a fresh state.
    fn tat(&self) -> Option<Nanos> {
        // A closure that refuses to update reads the state without writing it.
        self.0
            .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
            .err()
            .flatten()
    }
}

/// Governor's keyed API wants `Key: Eq + Hash + Clone`; a `Slot` is identified by its address
/// (it is never hashed or compared on the decision path: [`ByState`] ignores both).
impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for Slot {}
impl std::hash::Hash for Slot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(self, state);
    }
}
impl Clone for Slot {
    /// A new state holding the same theoretical arrival time.
    fn clone(&self) -> Self {
        let copy = Slot::default();
        if let Some(tat) = self.tat() {
            let _ = copy
                .0
                .measure_and_replace(&NotKeyed::NonKey, |_| Ok::<_, ()>(((), tat)));
        }
        copy
    }
}

/// A governor state store whose key is the state itself (see [`Slot`]).
#[derive(Debug, Default)]
struct ByState;

impl StateStore for ByState {
    type Key = Slot;

    #[inline]
    fn measure_and_replace<T, F, E>(&self, key: &Slot, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        key.0.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

/// Governor middleware that answers with just what a [`Decision`] needs: on admission the
/// remaining burst capacity (governor's `StateSnapshot::remaining_burst_capacity`), on denial
/// the limiter's start instant (to turn the key's state into a wait, see `Inner::denied`).
///
/// Governor's `StateInformationMiddleware` returns the whole snapshot, or a `NotUntil`, through
/// its compare-and-swap loop; reducing them to a `u32` inside the loop measured 9 ns faster.
#[derive(Debug)]
struct Remaining;

impl<P: Reference> RateLimitingMiddleware<P> for Remaining {
    type PositiveOutcome = u32;
    type NegativeOutcome = P;

    #[inline]
    fn allow<K>(_key: &K, state: impl Into<StateSnapshot>) -> u32 {
        state.into().remaining_burst_capacity()
    }

    #[inline]
    fn disallow<K>(_key: &K, _state: impl Into<StateSnapshot>, start: P) -> P {
        start
    }
}

type Engine<C> = governor::RateLimiter<Slot, ByState, C, Remaining>;

type Shard = RwLock<HashTable<(Box<str>, Slot)>>;

/// The keys: `Box<str>` → [`Slot`] in shards of hashbrown tables, each behind a read-write lock.
/// A lookup hashes the `&str` once (foldhash, seeded per process), picks the shard from that
/// hash, and finds the entry under a read lock: no allocation and no copy unless the key is new.
struct KeyMap {
    shards: Box<[Shard]>,
    /// `64 - log2(shards)`: the shard is taken from the hash bits below the 7 top bits that
    /// hashbrown uses inside a table.
    shift: u32,
    hasher: DefaultHashBuilder,
}

impl KeyMap {
    fn new() -> Self {
        let n = (std::thread::available_parallelism().map_or(1, usize::from) * 4)
            .next_power_of_two()
            .max(2);
        KeyMap {
            shards: (0..n).map(|_| RwLock::new(HashTable::new())).collect(),
            shift: 64 - n.trailing_zeros(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// Runs `f` on the state of `key`, creating it (fresh) if the key is new.
    #[inline]
    fn with<R>(&self, key: &str, f: impl FnOnce(&Slot) -> R) -> R {
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[((hash << 7) >> self.shift) as usize];
        {
            let table = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, slot)) = table.find(hash, |(k, _)| **k == *key) {
                return f(slot);
            }
        }
        self.insert_with(shard, hash, key, f)
    }

    /// The first decision for `key` (or after `retain_recent` dropped it): kept out of line.
    #[cold]
    #[inline(never)]
    fn insert_with<R>(&self, shard: &Shard, hash: u64, key: &str, f: impl FnOnce(&Slot) -> R) -> R {
        let mut table = shard.write().unwrap_or_else(PoisonError::into_inner);
        let entry = table
            .entry(
                hash,
                |(k, _)| **k == *key,
                |(k, _)| self.hasher.hash_one(&**k),
            )
            .or_insert_with(|| (key.into(), Slot::default()));
        f(&entry.get().1)
    }

    /// Runs `f` on the state of `key` if it is stored (never stores it).
    fn get<R>(&self, key: &str, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[((hash << 7) >> self.shift) as usize];
        let table = shard.read().unwrap_or_else(PoisonError::into_inner);
        table
            .find(hash, |(k, _)| **k == *key)
            .map(|(_, slot)| f(slot))
    }

    /// Forgets `key` (its next decision starts fresh).
    fn remove(&self, key: &str) {
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[((hash << 7) >> self.shift) as usize];
        let mut table = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Ok(entry) = table.find_entry(hash, |(k, _)| **k == *key) {
            entry.remove();
        }
    }

    /// Drops the keys for which `drop` is true; gives memory back when a shard is mostly empty.
    fn retain(&self, drop: impl Fn(&Slot) -> bool) {
        for shard in &self.shards {
            let mut table = shard.write().unwrap_or_else(PoisonError::into_inner);
            table.retain(|(_, slot)| !drop(slot));
            if table.len() < table.capacity() / 4 {
                table.shrink_to_fit(|(k, _)| self.hasher.hash_one(&**k));
            }
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// The embedded default limiter: in-process, keyed, no server.
///
/// It is governor's keyed GCRA with one unit replenished every `window / max` and a burst of
/// `max` (or the burst given to [`LocalLimiter::with_burst`]): a quiet key may take `max` units
/// at once, then units come back at the steady rate. Unlike the Redis sliding log this is not a
/// hard cap per sliding window (a full burst followed by the steady rate admits up to about
/// `2 × max` in one window); it limits one process only. Cloning shares the state.
///
/// Governor makes every decision (its GCRA on its `InMemoryState`, one atomic per key); the
/// keys live in a sharded map of our own, looked up by `&str` without copying. A key is kept
/// from its first decision until [`LocalLimiter::retain_recent`] finds it fully replenished:
/// call that periodically when keys come and go (e.g. one per client address).
///
/// The clock is governor's fastest ([`DefaultClock`]); for tests on tokio's paused clock, build
/// it with [`LocalLimiter::with_clock`] and [`TokioClock`].
pub struct LocalLimiter<C: Clock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

impl<C: Clock> Clone for LocalLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Clock> std::fmt::Debug for LocalLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("burst", &self.inner.burst)
            .field("per_unit", &self.inner.per_unit)
            .finish_non_exhaustive()
    }
}

struct Inner<C: Clock> {
    /// Governor's GCRA over the states in `keys`.
    engine: Engine<C>,
    keys: KeyMap,
    /// A clock reading taken just after the engine's own start: `now - start` never exceeds
    /// governor's relative time, so `retain_recent` never drops a key early.
    start: C::Instant,
    burst: u32,
    /// The time one unit takes to come back.
    per_unit: Duration,
    /// `per_unit` in nanoseconds (fits: at most a 366-day window per unit).
    per_unit_ns: u64,
    /// The time a whole burst takes to come back (the `window` reported in decisions).
    window: Duration,
}

impl<C: Clock> Inner<C> {
    /// One unit: governor's fast path (`check_key_n` multiplies).
    #[inline]
    fn check_one(&self, key: &str) -> Result<Decision, Error> {
        Ok(self
            .keys
            .with(key, |slot| match self.engine.check_key(slot) {
                Ok(remaining) => self.allowed(remaining),
                Err(start) => self.denied(slot, start, 1),
            }))
    }

    /// `n` units (any `n`; 0 is a peek, more than the burst an error). Out of line, so that
    /// the single-unit path stays small where it is inlined.
    #[inline(never)]
    fn check_many(&self, key: &str, n: u32) -> Result<Decision, Error> {
        if n == 0 {
            return Ok(self.peek(key));
        }
        let Some(cells) = NonZeroU32::new(n).filter(|_| n <= self.burst) else {
            return Err(self.cost_error(n, self.burst));
        };
        self.keys
            .with(key, |slot| match self.engine.check_key_n(slot, cells) {
                Ok(Ok(remaining)) => Ok(self.allowed(remaining)),
                Ok(Err(start)) => Ok(self.denied(slot, start, n)),
                Err(insufficient) => Err(self.cost_error(n, insufficient.0)),
            })
    }

    #[inline]
    fn allowed(&self, remaining: u32) -> Decision {
        Decision {
            allowed: true,
            limit: self.burst,
            remaining,
            retry_after: None,
            // `remaining ≤ burst`, and `per_unit_ns × burst` is the window in ns (it fits).
            reset_after: Duration::from_nanos(
                self.per_unit_ns * u64::from(self.burst.saturating_sub(remaining)),
            ),
            window: self.window,
            server_time: None,
        }
    }

    #[cold]
    #[inline(never)]
    fn cost_error(&self, n: u32, capacity: u32) -> Error {
        Error::CostExceedsLimit { cost: n, capacity }
    }

    /// What `key` has left, without consuming: the units whose intervals have come back since
    /// its theoretical arrival time (governor's GCRA state), rounded down. A key never seen is
    /// not stored.
    fn peek(&self, key: &str) -> Decision {
        // `start` is read just after governor's own start, so this `now` is never ahead of
        // governor's: the backlog is never underestimated.
        let now = self
            .engine
            .clock()
            .now()
            .duration_since(self.start)
            .as_u64();
        let tat = self.keys.get(key, |slot| slot.tat()).flatten();
        let backlog = tat.map_or(0, |tat| tat.as_u64().saturating_sub(now));
        let used = backlog.div_ceil(self.per_unit_ns.max(1));
        let remaining = u64::from(self.burst).saturating_sub(used) as u32;
        Decision {
            allowed: true,
            limit: self.burst,
            remaining,
            retry_after: None,
            reset_after: Duration::from_nanos(backlog),
            window: self.window,
            server_time: None,
        }
    }

    /// The decision for `n` units of `slot` just denied by governor (`start` is the limiter's
    /// start instant, as governor passed it to [`Remaining`]).
    ///
    /// The wait is governor's `NotUntil::wait_time_from`, computed from the key's theoretical
    /// arrival time `tat` with governor's GCRA parameters (`t` = one unit's interval, `tau` =
    /// `t × (burst - 1)`): the earliest admission is `start + tat + t × (n - 1) - tau`. The state
    /// is read again after the denial (so a concurrent admission makes the wait longer, as it
    /// should), and only denials read the clock a second time. A test checks this against
    /// governor's own `NotUntil` step by step.
    #[cold]
    #[inline(never)]
    fn denied(&self, slot: &Slot, start: C::Instant, n: u32) -> Decision {
        let now = self.engine.clock().now();
        let tat = slot.tat().map_or(0, Nanos::as_u64);
        let t = self.per_unit_ns.max(1);
        let tau = t.saturating_mul(u64::from(self.burst - 1));
        let due = tat
            .saturating_add(t.saturating_mul(u64::from(n - 1)))
            .saturating_sub(tau);
        let earliest = start + Nanos::new(due);
        let wait: Duration = earliest.duration_since(earliest.min(now)).into();
        Decision {
            allowed: false,
            limit: self.burst,
            remaining: 0,
            retry_after: Some(wait.max(Duration::from_nanos(1))),
            reset_after: wait + self.per_unit * self.burst,
            window: self.window,
            server_time: None,
        }
    }
}

impl LocalLimiter {
    /// A limiter admitting `limit.max()` units per `limit.window()` for each key, in bursts of up
    /// to `limit.max()`.
    pub fn new(limit: Limit) -> Result<Self, Error> {
        Self::with_burst(limit, limit.max())
    }

    /// Like [`LocalLimiter::new`] with an explicit burst (units admitted back to back, ≥ 1).
    pub fn with_burst(limit: Limit, burst: u32) -> Result<Self, Error> {
        LocalLimiter::with_clock(limit, burst, DefaultClock::default())
    }
}

impl<C> LocalLimiter<C>
where
    C: Clock + Clone,
{
    /// A limiter of `limit` with bursts of `burst`, timed by `clock` (e.g. [`TokioClock`]).
    pub fn with_clock(limit: Limit, burst: u32, clock: C) -> Result<Self, Error> {
        let burst_nz = NonZeroU32::new(burst).ok_or_else(|| Error::InvalidConfig {
            field: "burst",
            reason: "must be at least 1".into(),
        })?;
        let period = limit.window() / limit.max();
        let quota = Quota::with_period(period)
            .ok_or_else(|| Error::InvalidConfig {
                field: "max",
                reason: format!(
                    "{} per {:?} is finer than 1 ns per unit; use a longer window",
                    limit.max(),
                    limit.window()
                ),
            })?
            .allow_burst(burst_nz);
        let engine: Engine<C> = governor::RateLimiter::new(quota, ByState, clock);
        let start = engine.clock().now();
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                keys: KeyMap::new(),
                start,
                burst,
                per_unit: quota.replenish_interval(),
                per_unit_ns: quota.replenish_interval().as_nanos() as u64,
                window: period * burst,
            }),
        })
    }

    /// Decides `n` units for `key` now, synchronously (the async trait methods call this).
    #[inline]
    pub fn check_n_now(&self, key: &str, n: u32) -> Result<Decision, Error> {
        if n == 1 {
            // governor's single-cell check is its fast path (`check_key_n` multiplies).
            self.inner.check_one(key)
        } else {
            self.inner.check_many(key, n)
        }
    }

    /// What `key` has left, without consuming (the same as `check_n_now(key, 0)`; the async
    /// `RateLimiter::peek` calls this).
    pub fn peek_now(&self, key: &str) -> Decision {
        self.inner.peek(key)
    }

    /// Clears `key`: its next decision finds the full burst.
    pub fn reset(&self, key: &str) {
        self.inner.keys.remove(key);
    }

    /// Forgets keys whose limit is fully replenished, so memory follows the active keys.
    pub fn retain_recent(&self) {
        let inner = &*self.inner;
        // A key whose theoretical arrival time has passed is indistinguishable from a new one
        // (governor's own `retain_recent` uses the same test).
        let now = inner.engine.clock().now().duration_since(inner.start);
        inner
            .keys
            .retain(|slot| slot.tat().is_none_or(|tat| tat <= now));
    }

    /// The number of keys currently tracked.
    pub fn len(&self) -> usize {
        self.inner.keys.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<C> RateLimiter for LocalLimiter<C>
where
    C: Clock + Clone + Send + Sync,
    C::Instant: Send + Sync,
{
    #[inline]
    fn check_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send {
        std::future::ready(self.check_n_now(key, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(max: u32) -> (LocalLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let l = LocalLimiter::with_clock(Limit::per_second(max).unwrap(), max, clock.clone());
        (l.unwrap(), clock)
    }

    #[test]
    fn one_key_hammered_from_threads_admits_exactly_the_burst() {
        let (l, _clock) = limiter(100);
        let admitted: u32 = std::thread::scope(|s| {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..50)
                            .filter(|_| l.check_n_now("hot", 1).unwrap().allowed)
                            .count() as u32
                    })
                })
                .collect();
            tasks.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(
            admitted, 100,
            "the fake clock never moved: exactly the burst"
        );
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn many_keys_across_shards_are_independent_and_forgotten_when_replenished() {
        let (l, clock) = limiter(3);
        let keys: Vec<String> = (0..5000).map(|i| format!("k{i}")).collect();
        for k in &keys {
            assert_eq!(l.check_n_now(k, 3).unwrap().remaining, 0, "{k}");
        }
        for k in &keys {
            assert!(!l.check_n_now(k, 1).unwrap().allowed, "{k} kept its state");
        }
        assert_eq!(l.len(), keys.len());
        // Half way through the refill nothing is forgotten; after it, everything is.
        clock.advance(Duration::from_millis(500));
        l.retain_recent();
        assert_eq!(l.len(), keys.len());
        assert!(l.check_n_now("k7", 1).unwrap().allowed);
        clock.advance(Duration::from_millis(500));
        l.retain_recent();
        assert_eq!(l.len(), 1, "only k7, used 500 ms ago, is not replenished");
        clock.advance(Duration::from_millis(334));
        l.retain_recent();
        assert!(l.is_empty());
        // A forgotten key starts fresh.
        assert_eq!(l.check_n_now("k1", 1).unwrap().remaining, 2);
    }

    /// Our decisions, step by step, against governor's own direct limiter with its
    /// `StateInformationMiddleware` on the same fake clock: same admissions, same remaining,
    /// same retry_after (governor's `NotUntil::wait_time_from`).
    #[test]
    fn decisions_match_governors_own_limiter_step_by_step() {
        use governor::middleware::StateInformationMiddleware;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for (max, window_ms, burst) in [(10, 1000, 10), (3, 1000, 1), (7, 60_000, 4), (1000, 1, 50)]
        {
            let clock = FakeRelativeClock::default();
            let limit = Limit::new(max, Duration::from_millis(window_ms)).unwrap();
            let ours = LocalLimiter::with_clock(limit, burst, clock.clone()).unwrap();
            let quota = Quota::with_period(limit.window() / max)
                .unwrap()
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let theirs: Vec<_> = (0..3)
                .map(|_| {
                    governor::RateLimiter::direct_with_clock(quota, clock.clone())
                        .with_middleware::<StateInformationMiddleware>()
                })
                .collect();
            let period_ns = (limit.window() / max).as_nanos() as u64;
            let (mut admitted, mut denied) = (0, 0);
            for step in 0..5000 {
                clock.advance(Duration::from_nanos(next(
                    period_ns * u64::from(burst) / 2 + 2,
                )));
                let key = next(3) as usize;
                let n = 1 + next(u64::from(burst)) as u32;
                let d = ours.check_n_now(&format!("k{key}"), n).unwrap();
                let what =
                    format!("step {step}: {max}/{window_ms}ms burst {burst}, key {key}, n {n}");
                match theirs[key].check_n(NonZeroU32::new(n).unwrap()).unwrap() {
                    Ok(snapshot) => {
                        admitted += 1;
                        assert!(d.allowed, "{what}");
                        assert_eq!(d.remaining, snapshot.remaining_burst_capacity(), "{what}");
                        assert_eq!(d.retry_after, None, "{what}");
                    }
                    Err(not_until) => {
                        denied += 1;
                        assert!(!d.allowed, "{what}");
                        let wait = not_until.wait_time_from(clock.now());
                        assert_eq!(
                            d.retry_after,
                            Some(wait.max(Duration::from_nanos(1))),
                            "{what}"
                        );
                    }
                }
            }
            assert!(
                admitted > 100 && denied > 100,
                "both outcomes exercised: {admitted}/{denied}"
            );
        }
    }

    #[test]
    fn a_cloned_slot_has_the_same_state_and_its_own_identity() {
        let slot = Slot::default();
        assert_eq!(slot.tat(), None);
        let _ = slot
            .0
            .measure_and_replace(&NotKeyed::NonKey, |_| Ok::<_, ()>(((), Nanos::new(42))));
        let copy = slot.clone();
        assert_eq!(copy.tat(), Some(Nanos::new(42)));
        assert!(copy != slot && slot == slot);
    }
}
