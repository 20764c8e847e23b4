//! Run-once records in process memory.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Claim, IdempotencyStore, OwnerToken};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
enum Record {
    InProgress {
        fingerprint: String,
        owner: OwnerToken,
        expires: Instant,
    },
    Completed {
        fingerprint: String,
        result: String,
        /// The token of the claim that completed it: its owner may complete it again (a retry of
        /// a `complete` whose reply was lost) without error.
        owner: OwnerToken,
        expires: Instant,
    },
}

/// How many records each call looks at for expiry, beyond its own key: every record is looked at
/// within (records / `SWEEP_PER_CALL`) calls, so expired records stay bounded by the call rate.
const SWEEP_PER_CALL: usize = 8;

impl Record {
    fn expires(&self) -> Instant {
        match self {
            Record::InProgress { expires, .. } | Record::Completed { expires, .. } => *expires,
        }
    }
}

/// Run-once records in this process's memory; clones share the records.
///
/// For one process (tests, a single service instance). Expiry follows tokio's clock, so tests can
/// use paused time. Expired records are removed as the store is used: each call looks at a few
/// records past the last one looked at, in key order, so memory does not grow with keys that
/// are never used again. Nothing survives a restart: use [`FileStore`](crate::FileStore) on one
/// host or [`RedisStore`](crate::RedisStore) for a fleet.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Records>>,
}

#[derive(Debug, Default)]
struct Records {
    by_key: BTreeMap<String, Record>,
    /// Where the next sweep starts: the last key a sweep looked at.
    sweep_after: Option<String>,
}

impl Records {
    /// Removes the expired records among the next `SWEEP_PER_CALL` after `sweep_after`, wrapping
    /// around at the end.
    fn sweep(&mut self, now: Instant) {
        let start = match self.sweep_after.take() {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        let mut seen: Vec<(String, bool)> = self
            .by_key
            .range((start, Bound::Unbounded))
            .take(SWEEP_PER_CALL)
            .map(|(k, r)| (k.clone(), r.expires() <= now))
            .collect();
        if seen.len() < SWEEP_PER_CALL {
            // The end of the map: the next sweep starts again at its beginning.
            let wrap = SWEEP_PER_CALL - seen.len();
            let first = seen.first().map(|(k, _)| k.clone());
            seen.extend(
                self.by_key
                    .iter()
                    .take_while(|(k, _)| Some(*k) != first.as_ref())
                    .take(wrap)
                    .map(|(k, r)| (k.clone(), r.expires() <= now)),
            );
        }
        self.sweep_after = seen.last().map(|(k, _)| k.clone());
        for (key, expired) in seen {
            if expired {
                self.by_key.remove(&key);
            }
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records the store holds, expired ones not yet removed included.
    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every expired record; returns how many.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let records = &mut self.lock().by_key;
        let before = records.len();
        records.retain(|_, r| r.expires() > now);
        before - records.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Runs `f` on the records, after a bounded sweep of expired ones.
    fn with<T>(&self, f: impl FnOnce(Instant, &mut BTreeMap<String, Record>) -> T) -> T {
        let mut guard = self.lock();
        let now = Instant::now();
        guard.sweep(now);
        f(now, &mut guard.by_key)
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<Claim> {
        Ok(self.with(|now, m| {
            match m.get(key) {
                Some(r) if r.expires() > now => match r {
                    Record::InProgress { fingerprint, .. } => {
                        return Claim::InProgress {
                            fingerprint: fingerprint.clone(),
                        };
                    }
                    Record::Completed {
                        fingerprint,
                        result,
                        ..
                    } => {
                        return Claim::Completed {
                            fingerprint: fingerprint.clone(),
                            result: result.clone(),
                        };
                    }
                },
                _ => {}
            }
            let owner = OwnerToken::random();
            m.insert(
                key.to_string(),
                Record::InProgress {
                    fingerprint: fingerprint.to_string(),
                    owner: owner.clone(),
                    expires: now + in_progress_ttl,
                },
            );
            Claim::Acquired(owner)
        }))
    }

    async fn complete(
        &self,
        key: &str,
        owner: &OwnerToken,
        result: &str,
        ttl: Duration,
    ) -> Result<()> {
        self.with(|now, m| match m.get(key) {
            Some(Record::InProgress {
                fingerprint,
                owner: o,
                expires,
            }) if o == owner && *expires > now => {
                let fingerprint = fingerprint.clone();
                m.insert(
                    key.to_string(),
                    Record::Completed {
                        fingerprint,
                        result: result.to_string(),
                        owner: owner.clone(),
                        expires: now + ttl,
                    },
                );
                Ok(())
            }
            // This owner completed it already: a retry of a complete that was applied.
            Some(Record::Completed {
                owner: o, expires, ..
            }) if o == owner && *expires > now => Ok(()),
            _ => Err(Error::OwnershipLost {
                key: key.to_string(),
            }),
        })
    }

    async fn release(&self, key: &str, owner: &OwnerToken) -> Result<()> {
        self.with(|_, m| {
            if matches!(m.get(key), Some(Record::InProgress { owner: o, .. }) if o == owner) {
                m.remove(key);
            }
        });
        Ok(())
    }

    async fn extend(&self, key: &str, owner: &OwnerToken, ttl: Duration) -> Result<bool> {
        Ok(self.with(|now, m| match m.get_mut(key) {
            Some(Record::InProgress {
                owner: o, expires, ..
            }) if o == owner && *expires > now => {
                *expires = now + ttl;
                true
            }
            _ => false,
        }))
    }
}
