//! Counters for tests and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Requests this process sent to etcd through palisade-lock (keepalives excluded).
static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// Times a waiter woke up because the key it watched was deleted.
static WAKEUPS: AtomicU64 = AtomicU64::new(0);
/// Times the head of a semaphore's queue woke up because a slot was freed.
static SLOT_WAKEUPS: AtomicU64 = AtomicU64::new(0);
/// Times a registry watch or observer re-read everything after a compaction.
static RESYNCS: AtomicU64 = AtomicU64::new(0);

/// Requests sent to etcd by the lock, registry and election code of this process.
pub fn requests() -> u64 {
    REQUESTS.load(Ordering::Relaxed)
}

/// Re-reads of registry watches and observers after a compaction.
pub fn resyncs() -> u64 {
    RESYNCS.load(Ordering::Relaxed)
}

/// Wake-ups of waiters by a deletion they watched.
pub fn wakeups() -> u64 {
    WAKEUPS.load(Ordering::Relaxed)
}

/// Wake-ups of semaphore waiters by a freed slot (only the head of a queue waits for one).
pub fn slot_wakeups() -> u64 {
    SLOT_WAKEUPS.load(Ordering::Relaxed)
}

pub(crate) fn count_slot_wakeup() {
    SLOT_WAKEUPS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn count_request() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn count_resync() {
    RESYNCS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn count_wakeup() {
    WAKEUPS.fetch_add(1, Ordering::Relaxed);
}
