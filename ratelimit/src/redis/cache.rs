//! Denials remembered in-process, so a key known to be over its limit costs no round trip.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::Decision;

/// Above this many remembered keys, expired entries are swept on insert.
const SWEEP_ABOVE: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct DenialCache {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The denied decision as Redis gave it, at `at`.
    decision: Decision,
    at: Instant,
    /// Denied until then for costs of at least `cost`.
    until: Instant,
    cost: u32,
}

impl DenialCache {
    /// A denial for `key` at cost `n`, if one is remembered and still in force.
    pub(crate) fn lookup(&self, key: &str, n: u32, now: Instant) -> Option<Decision> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(key)?;
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

    pub(crate) fn insert(&self, key: &str, n: u32, decision: Decision, until: Instant) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= SWEEP_ABOVE {
            entries.retain(|_, e| e.until > now);
        }
        entries.insert(
            key.to_owned(),
            Entry {
                decision,
                at: now,
                until,
                cost: n,
            },
        );
    }
}
