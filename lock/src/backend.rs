//! The one trait behind the etcd, file and memory backends, and the types it speaks in.
//!
//! The traits here are sealed: only this crate's backends implement them (see [`LockBackend`]).

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::{LostSignal, Session};

/// How long to wait for a lock that someone else holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Do not wait: give up at once.
    No,
    /// Wait until the lock is free (in arrival order).
    Forever,
    /// Wait at most this long.
    Up(Duration),
}

/// Which family of names a lock belongs to: locks and elections with the same name are distinct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    /// A lock taken with `lock`, `try_lock`, `lock_timeout` or `run_exclusive`.
    Lock,
    /// A leadership taken with `Election::campaign`.
    Election,
    /// The queue of a semaphore ([`crate::Semaphore`]): its head takes a free slot.
    Semaphore,
}

/// What the contender at the head of a semaphore's queue found when it tried to take a slot.
#[derive(Debug)]
pub enum SlotTry {
    /// A slot was free and is now held.
    Taken(Box<dyn HeldLock>),
    /// Every slot is held. `seen` marks the state that was read: [`LockBackend::slot_freed`]
    /// resolves once a slot is freed after it. `holder` is one of the holders.
    Full {
        /// The backend's mark of the state read (an etcd revision, a release counter).
        seen: u64,
        /// The earliest holder, if the backend can tell.
        holder: Option<Holder>,
    },
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

    /// The job this holder (or waiter) runs, when it stored one as its value
    /// (`run_exclusive` and `palisade run` do): host, pid, start time, command.
    pub fn job_info(&self) -> Option<JobInfo> {
        self.job().map(|j| *j)
    }

    /// The job this holder registered (its value, when that is a `JobInfo`), with the holder's
    /// fencing token: the value is written before the token is known, so the token comes from
    /// the holder itself.
    pub(crate) fn job(&self) -> Option<Box<JobInfo>> {
        if self.value.is_empty() {
            return None;
        }
        let mut job = Box::new(JobInfo::from_bytes(&self.value)?);
        if self.fencing_token > 0 {
            job.fencing_token = Some(self.fencing_token);
        }
        Some(job)
    }
}

/// The seal of the backend traits: a public trait in a module no other crate can name, so only
/// this crate can implement it, and with it [`LockBackend`], [`HeldLock`] and [`Registration`].
pub(crate) mod sealed {
    /// Implemented by this crate's backends (and their held locks and registrations) only.
    pub trait Sealed {}
}

/// A lock held through a backend. [`crate::LockGuard`] wraps it. Sealed like [`LockBackend`].
#[async_trait]
pub trait HeldLock: sealed::Sealed + Send + Sync + std::fmt::Debug {
    /// The fencing token: strictly greater than every token of an earlier holder of this name.
    fn fencing_token(&self) -> u64;
    #[doc(hidden)]
    /// The liveness this lock depends on.
    fn lost_signal(&self) -> LostSignalHandle;
    /// Releases the lock and waits until the backend confirmed it.
    async fn release(self: Box<Self>) -> Result<(), LockError>;
    /// Releases the lock from a background task (used on drop).
    fn release_in_background(self: Box<Self>);
    /// For a semaphore's queue entry once [`LockBackend::take_slot`] took a slot with it: lets
    /// it go. On etcd the slot's transaction already deleted it, so nothing is sent; elsewhere
    /// this is [`release_in_background`](Self::release_in_background).
    #[doc(hidden)]
    fn left_with_slot(self: Box<Self>) {
        self.release_in_background();
    }
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

/// A job's entry in the registry. Dropping it removes the entry in the background. Sealed like
/// [`LockBackend`].
#[async_trait]
pub trait Registration: sealed::Sealed + Send + Sync + std::fmt::Debug {
    /// Removes the entry, reporting the job as finished.
    async fn finish(self: Box<Self>) -> Result<(), LockError>;
}

/// What a coordination backend provides. Implemented by the etcd, file and memory backends;
/// [`crate::Coordinator`] builds everything else on top of it.
///
/// The trait is sealed: other crates can call its methods (through
/// [`crate::Coordinator::backend`]) but cannot implement it. A backend's locks must hand the
/// guard a [`LostSignalHandle`], the crate-private liveness of their lease, which only this
/// crate can make, and the guarantees of [`crate::LockGuard`] rest on it; rather than half an
/// extension point, there is none. [`crate::Coordinator::from_backend`] takes one of this
/// crate's backends (another coordinator's, say).
///
/// ```compile_fail,E0277
/// // Sealed: another crate cannot implement the backend traits (here `Registration`, the
/// // smallest; the error is that `Entry` does not implement the crate-private `Sealed`).
/// #[derive(Debug)]
/// struct Entry;
/// #[async_trait::async_trait]
/// impl palisade_lock::Registration for Entry {
///     async fn finish(self: Box<Self>) -> Result<(), palisade_lock::LockError> {
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait LockBackend: sealed::Sealed + Send + Sync + 'static {
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

    /// Everyone holding or waiting for `name`, in arrival order: the holder first, then the
    /// waiters (each with the value it will hold with, and its queue position's token). On the
    /// file backend only the holder (`flock` does not tell about waiters).
    async fn contenders(&self, kind: Kind, name: &str) -> Result<Vec<Holder>, LockError> {
        Ok(self.holder(kind, name).await?.into_iter().collect())
    }

    /// Breaks `name` for an operator: on etcd the holder's session lease is revoked (its keys
    /// go, and its `run_exclusive` or `palisade run` sees the lease lost and stops its job); on
    /// the file backend it is refused with [`LockError::Held`] while the holder process lives
    /// (the kernel frees the lock when it dies). Returns the holder it broke, `None` if free.
    async fn break_lock(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError>;

    /// For the contender at the head of semaphore `name`'s queue (`queue`, held with
    /// [`Kind::Semaphore`]): takes one of the `permits` slots if one is free, without waiting.
    /// `token` is the queue's fencing token (the backends that have no ordered store of their
    /// own use it as the slot's). Fails with [`LockError::PermitsMismatch`] when a current
    /// holder took its slot with another number of permits.
    async fn take_slot(
        &self,
        name: &str,
        permits: u32,
        value: Vec<u8>,
        queue: &dyn HeldLock,
    ) -> Result<SlotTry, LockError>;

    /// Resolves once a slot of semaphore `name` may have been freed after the state marked
    /// `seen` ([`SlotTry::Full`]); the caller then tries again. An error means: look again later.
    async fn slot_freed(&self, name: &str, seen: u64) -> Result<(), LockError>;

    /// The current holders of semaphore `name`'s slots, earliest first.
    async fn slot_holders(&self, name: &str) -> Result<Vec<Holder>, LockError>;

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
