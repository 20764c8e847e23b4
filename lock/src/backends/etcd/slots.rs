//! Key names for contenders: one per (session lease, lock prefix), reused only once free.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Which key names each (lease, prefix) uses now. A name is reused only once its previous key
/// is known to be deleted: otherwise the acquire transaction ("create unless it exists") would
/// find the old key and take it for ours.
#[derive(Default)]
pub(crate) struct Slots(std::sync::Mutex<HashMap<(i64, String), BTreeSet<u32>>>);

impl Slots {
    pub(crate) fn take(self: &Arc<Self>, lease: i64, prefix: &str) -> Slot {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let used = map.entry((lease, prefix.to_string())).or_default();
        let index = (0..).find(|i| !used.contains(i)).unwrap_or(u32::MAX);
        used.insert(index);
        Slot {
            table: self.clone(),
            lease,
            prefix: prefix.to_string(),
            index,
            deleted: false,
        }
    }
}

/// One key name in use. Dropping it frees the name only if `deleted` was set (the key is gone
/// from etcd, or the lease is); a name whose key may survive stays taken.
pub(crate) struct Slot {
    table: Arc<Slots>,
    lease: i64,
    prefix: String,
    index: u32,
    deleted: bool,
}

impl Slot {
    /// Records whether the key is known to be gone (so the name may be reused on drop).
    pub(crate) fn set_deleted(&mut self, deleted: bool) {
        self.deleted = deleted;
    }

    pub(crate) fn key(&self) -> String {
        match self.index {
            0 => format!("{}{:016x}", self.prefix, self.lease),
            n => format!("{}{:016x}-{n}", self.prefix, self.lease),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.deleted {
            return;
        }
        let mut map = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (self.lease, std::mem::take(&mut self.prefix));
        if let Some(used) = map.get_mut(&key) {
            used.remove(&self.index);
            if used.is_empty() {
                map.remove(&key);
            }
        }
    }
}
