//! The one trait behind the etcd, file and memory backends.

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::coordinator::Wait;
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::{LostSignal, Session};

/// Which family of names a lock belongs to: locks and elections with the same name are distinct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    /// A lock taken with `lock`, `try_lock`, `lock_timeout` or `run_exclusive`.
    Lock,
    /// A leadership taken with `Election::campaign`.
    Election,
}

/// The current holder of a lock or leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The value the holder stored with it (a `JobInfo` as JSON under `run_exclusive`, the
    /// campaign value for an election, empty for a plain `lock`).
    pub value: Vec<u8>,
    /// The holder's fencing token.
    pub fencing_token: u64,
}

impl Holder {
    /// The value as UTF-8 text, lossily.
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// A lock held through a backend. [`crate::LockGuard`] wraps it.
#[async_trait]
pub trait HeldLock: Send + Sync + std::fmt::Debug {
    /// The fencing token: strictly greater than every token of an earlier holder of this name.
    fn fencing_token(&self) -> u64;
    #[doc(hidden)]
    /// The liveness this lock depends on.
    fn lost_signal(&self) -> LostSignalHandle;
    /// Releases the lock and waits until the backend confirmed it.
    async fn release(self: Box<Self>) -> Result<(), LockError>;
    /// Releases the lock from a background task (used on drop).
    fn release_in_background(self: Box<Self>);
    /// On etcd: the holder's key and its create revision, for fenced transactions.
    fn etcd_ownership(&self) -> Option<(Vec<u8>, i64)> {
        None
    }
    /// On the file backend: the descriptor that holds the `flock`.
    fn lock_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// An opaque handle on a lease's liveness, passed from a backend to the guard.
#[derive(Debug, Clone)]
pub struct LostSignalHandle(pub(crate) LostSignal);

/// A job's entry in the registry. Dropping it removes the entry in the background.
#[async_trait]
pub trait Registration: Send + Sync + std::fmt::Debug {
    /// Removes the entry, reporting the job as finished.
    async fn finish(self: Box<Self>) -> Result<(), LockError>;
}

/// What a coordination backend provides. Implemented by the etcd, file and memory backends;
/// [`crate::Coordinator`] builds everything else on top of it.
#[async_trait]
pub trait LockBackend: Send + Sync + 'static {
    /// The current session (a new one replaces a lost one on the next acquire).
    fn session(&self) -> Session;

    /// Takes `name` with `value` as the holder's value. `Wait::No` fails with
    /// [`LockError::Held`] at once when held; `Wait::Up(d)` fails with [`LockError::Timeout`].
    /// Waiters are served in arrival order as far as the backend allows.
    async fn acquire(
        &self,
        kind: Kind,
        name: &str,
        value: Vec<u8>,
        wait: Wait,
    ) -> Result<Box<dyn HeldLock>, LockError>;

    /// The current holder of `name`, if any.
    async fn holder(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError>;

    /// How many contenders wait for `name` behind its holder (on the file backend: the waiters
    /// of this process only, `flock` does not tell about others).
    async fn queue_len(&self, kind: Kind, name: &str) -> Result<usize, LockError>;

    /// The holder of `name` now and after every change (`None` while free).
    fn observe(&self, kind: Kind, name: &str) -> BoxStream<'static, Option<Holder>>;

    /// Registers a running job (its `lock` is set) until the registration is finished or
    /// dropped, or the process dies.
    async fn register(&self, job: JobInfo) -> Result<Box<dyn Registration>, LockError>;

    /// The registered jobs whose process is alive.
    async fn running(&self) -> Result<Vec<JobInfo>, LockError>;

    /// Registry changes from now on.
    fn watch_jobs(&self) -> BoxStream<'static, JobEvent>;

    /// Gives up the session at once: on etcd its lease is revoked, so every key on it (held
    /// locks, waiters' keys, registry entries) is deleted now rather than when the TTL runs out.
    /// For a process about to exit. Nothing to do on the other backends.
    async fn close(&self) -> Result<(), LockError> {
        Ok(())
    }
}
