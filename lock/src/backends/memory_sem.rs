//! The in-process backend's semaphore slots: a table per name behind one mutex, and a release
//! counter per name that the head of the queue waits on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::backend::{HeldLock, Holder, LostSignalHandle, SlotTry, sealed::Sealed};
use crate::error::LockError;
use crate::session::{Liveness, LostSignal};

struct Table {
    /// The permits the current holders took their slots with.
    permits: u32,
    /// The holders, by their fencing token (the queue's token; strictly increasing).
    held: BTreeMap<u64, Holder>,
    /// Counts releases; the head of the queue waits for it to move past what it saw.
    released: watch::Sender<u64>,
}

/// Every semaphore of one memory backend.
#[derive(Default)]
pub(super) struct MemSlots(Arc<Mutex<HashMap<String, Table>>>);

impl MemSlots {
    fn tables(&self) -> MutexGuard<'_, HashMap<String, Table>> {
        // Every update is one step under the mutex: a poisoned one is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn take(
        &self,
        name: &str,
        permits: u32,
        token: u64,
        value: Vec<u8>,
    ) -> Result<SlotTry, LockError> {
        let mut tables = self.tables();
        let table = tables.entry(name.to_string()).or_insert_with(|| Table {
            permits,
            held: BTreeMap::new(),
            released: watch::Sender::new(0),
        });
        if table.held.is_empty() {
            table.permits = permits;
        } else if table.permits != permits {
            return Err(LockError::PermitsMismatch {
                name: name.to_string(),
                ours: permits,
                theirs: table.permits,
            });
        }
        if table.held.len() >= permits as usize {
            return Ok(SlotTry::Full {
                seen: *table.released.borrow(),
                holder: table.held.values().next().cloned(),
            });
        }
        let holder = Holder {
            value,
            fencing_token: token,
        };
        table.held.insert(token, holder);
        Ok(SlotTry::Taken(Box::new(MemSlotHeld {
            slots: MemSlots(self.0.clone()),
            name: name.to_string(),
            token,
            lost: LostSignal(Liveness::forever()),
        })))
    }

    pub(super) async fn freed(&self, name: &str, seen: u64) {
        let mut rx = match self.tables().get(name) {
            Some(table) => table.released.subscribe(),
            None => return,
        };
        let _ = rx.wait_for(|released| *released > seen).await;
    }

    pub(super) fn holders(&self, name: &str) -> Vec<Holder> {
        self.tables()
            .get(name)
            .map(|t| t.held.values().cloned().collect())
            .unwrap_or_default()
    }

    fn release(&self, name: &str, token: u64) {
        if let Some(table) = self.tables().get_mut(name)
            && table.held.remove(&token).is_some()
        {
            table.released.send_modify(|n| *n += 1);
        }
    }
}

#[derive(Debug)]
struct MemSlotHeld {
    slots: MemSlots,
    name: String,
    token: u64,
    lost: LostSignal,
}

impl std::fmt::Debug for MemSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemSlots").finish_non_exhaustive()
    }
}

impl Sealed for MemSlotHeld {}

#[async_trait]
impl HeldLock for MemSlotHeld {
    fn fencing_token(&self) -> u64 {
        self.token
    }
    fn lost_signal(&self) -> LostSignalHandle {
        LostSignalHandle(self.lost.clone())
    }
    async fn release(self: Box<Self>) -> Result<(), LockError> {
        Ok(()) // dropped here
    }
    fn release_in_background(self: Box<Self>) {}
}

impl Drop for MemSlotHeld {
    fn drop(&mut self) {
        self.slots.release(&self.name, self.token);
    }
}
