//! Denials remembered in-process, so a key known to be over its limit costs no round trip.
//!
//! Bounded: at most [`CAPACITY`] keys; inserting into a full cache evicts the oldest insertion.
//! Every operation is O(1) (amortized) under one mutex: the queue of insertions is consumed from
//! its front, each element once, and never scanned.
//!
//! Staleness: a remembered denial is answered until its `retry_after` has passed, even if the
//! key was reset, or its limit raised, by another process meanwhile (a reset through this
//! limiter forgets it at once). So a cached answer is at most one `retry_after` old, and
//! `retry_after` is never longer than the longest window.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::time::Instant;

use crate::Decision;

/// The most keys remembered at once.
pub(crate) const CAPACITY: usize = 4096;

#[derive(Debug)]
pub(crate) struct DenialCache {
    state: Mutex<State>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Insertions, oldest first: the key and the `seq` of that insertion. An element whose key
    /// has been replaced (another `seq`) or removed since is skipped when it reaches the front.
    order: VecDeque<(String, u64)>,
    next_seq: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The denied decision as Redis gave it, at `at`.
    decision: Decision,
    at: Instant,
    /// Denied until then for costs of at least `cost`.
    until: Instant,
    cost: u32,
    seq: u64,
}

impl Default for DenialCache {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl State {
    /// Pops the oldest insertion; removes its entry if it is still that insertion's.
    fn pop_oldest(&mut self) {
        if let Some((key, seq)) = self.order.pop_front()
            && self.entries.get(&key).is_some_and(|e| e.seq == seq)
        {
            self.entries.remove(&key);
        }
    }
}

impl DenialCache {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        DenialCache {
            state: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// A denial for `key` at cost `n`, if one is remembered and still in force.
    pub(crate) fn lookup(&self, key: &str, n: u32, now: Instant) -> Option<Decision> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let e = state.entries.get(key)?;
        if now >= e.until || n < e.cost {
            return None;
        }
        let elapsed = now - e.at;
        Some(Decision {
            retry_after: Some(e.until - now),
            reset_after: e.decision.reset_after.saturating_sub(elapsed),
            server_time: None,
            ..e.decision
        })
    }

    /// Forgets `key`'s denial (after a reset).
    pub(crate) fn remove(&self, key: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Its element in `order` stays until it reaches the front, where it is skipped.
        state.entries.remove(key);
    }

    pub(crate) fn insert(&self, key: &str, n: u32, decision: Decision, until: Instant) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded work: `order` holds at most 2 × capacity elements (each insert adds one and
        // pops at least one once it is that long), and each is popped once.
        while state.entries.len() >= self.capacity || state.order.len() >= 2 * self.capacity {
            state.pop_oldest();
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.order.push_back((key.to_owned(), seq));
        state.entries.insert(
            key.to_owned(),
            Entry {
                decision,
                at: now,
                until,
                cost: n,
                seq,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.entries.len(), state.order.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn denial() -> Decision {
        Decision {
            allowed: false,
            limit: 1,
            remaining: 0,
            retry_after: Some(Duration::from_secs(60)),
            reset_after: Duration::from_secs(60),
            window: Duration::from_secs(60),
            server_time: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_oldest_evicted_and_removed_on_reset() {
        let cache = DenialCache::with_capacity(3);
        let until = Instant::now() + Duration::from_secs(60);
        for k in ["a", "b", "c", "d"] {
            cache.insert(k, 1, denial(), until);
        }
        let now = Instant::now();
        assert!(
            cache.lookup("a", 1, now).is_none(),
            "the oldest was evicted"
        );
        assert!(cache.lookup("d", 1, now).is_some());
        assert_eq!(cache.len().0, 3);
        cache.remove("d");
        assert!(cache.lookup("d", 1, now).is_none());
        // Re-inserting one key many times keeps `order` bounded too.
        for _ in 0..100 {
            cache.insert("b", 1, denial(), until);
        }
        let (entries, order) = cache.len();
        assert!(entries <= 3 && order <= 6, "{entries} {order}");
        assert!(cache.lookup("b", 1, now).is_some());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(cache.lookup("b", 1, Instant::now()).is_none(), "expired");
    }
}
