//! Run-once records in process memory.

use std::collections::HashMap;
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
        expires: Instant,
    },
}

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
/// use paused time. Nothing survives a restart: use [`FileStore`](crate::FileStore) on one host
/// or [`RedisStore`](crate::RedisStore) for a fleet.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    records: Arc<Mutex<HashMap<String, Record>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Record>) -> T) -> T {
        let mut guard = match self.records.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
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
        let now = Instant::now();
        Ok(self.with(|m| {
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
        let now = Instant::now();
        self.with(|m| match m.get(key) {
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
                        expires: now + ttl,
                    },
                );
                Ok(())
            }
            _ => Err(Error::OwnershipLost {
                key: key.to_string(),
            }),
        })
    }

    async fn release(&self, key: &str, owner: &OwnerToken) -> Result<()> {
        self.with(|m| {
            if matches!(m.get(key), Some(Record::InProgress { owner: o, .. }) if o == owner) {
                m.remove(key);
            }
        });
        Ok(())
    }

    async fn extend(&self, key: &str, owner: &OwnerToken, ttl: Duration) -> Result<bool> {
        let now = Instant::now();
        Ok(self.with(|m| match m.get_mut(key) {
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
