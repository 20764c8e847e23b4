//! The guard of a held lock.

use crate::backend::HeldLock;
use crate::error::LockError;
use crate::session::LostSignal;

/// Proof that this process holds a lock, with the fencing token to pass to the storage it
/// writes.
///
/// The guard does not stop other holders by itself once its lease is lost (no lease can): check
/// [`LockGuard::is_lost`] or await [`LockGuard::lost`] around writes, and make the storage reject
/// writes whose fencing token is smaller than one it has seen.
///
/// Dropping the guard releases the lock from a background task; [`LockGuard::release`] waits for
/// it.
#[derive(Debug)]
pub struct LockGuard {
    name: String,
    token: u64,
    lost: LostSignal,
    // `Some` until released; the drop handler releases what is left.
    held: Option<Box<dyn HeldLock>>,
}

impl LockGuard {
    pub(crate) fn new(name: &str, held: Box<dyn HeldLock>) -> Self {
        LockGuard {
            name: name.to_string(),
            token: held.fencing_token(),
            lost: held.lost_signal().0,
            held: Some(held),
        }
    }

    /// The lock name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token: strictly greater than the token of every earlier holder of this name
    /// (the create revision of the holder's key on etcd; a persisted counter on the file backend).
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Resolves when the lease behind this lock is lost. After that, another process may hold
    /// the lock.
    pub async fn lost(&self) {
        self.lost.0.lost().await;
    }

    /// Whether the lease is lost now, checked against the local monotonic clock. Call it right
    /// before a write that the lock protects.
    pub fn is_lost(&self) -> bool {
        self.lost.0.is_lost()
    }

    pub(crate) fn lost_signal(&self) -> LostSignal {
        self.lost.clone()
    }

    pub(crate) fn lock_fd(&self) -> Option<std::os::fd::RawFd> {
        self.held.as_ref()?.lock_fd()
    }

    /// Releases the lock and waits until the backend confirmed it. On etcd the delete compares
    /// the key's create revision, so a retried release never deletes a newer holder's key.
    pub async fn release(mut self) -> Result<(), LockError> {
        match self.held.take() {
            Some(held) => held.release().await,
            None => Ok(()),
        }
    }

    /// A transaction that only applies while this guard still owns the lock: it already compares
    /// the holder key's create revision; add your operations with `and_then`/`or_else`.
    /// `None` on the file and memory backends.
    #[cfg(feature = "etcd")]
    pub fn txn(&self) -> Option<etcd_client::Txn> {
        self.ownership_compare()
            .map(|cmp| etcd_client::Txn::new().when([cmp]))
    }

    /// The comparison "this guard still owns the lock", to put into your own etcd transactions.
    /// `None` on the file and memory backends.
    #[cfg(feature = "etcd")]
    pub fn ownership_compare(&self) -> Option<etcd_client::Compare> {
        let (key, rev) = self.held.as_ref()?.etcd_ownership()?;
        Some(etcd_client::Compare::create_revision(
            key,
            etcd_client::CompareOp::Equal,
            rev,
        ))
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.release_in_background();
        }
    }
}
