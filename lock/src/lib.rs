#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc = include_str!("../README.md")]
//!
//! # Backends
//!
//! - **etcd** (feature `etcd`, on by default): the revision-ordered recipe of etcd's Go
//!   `concurrency` package on a kept-alive session lease. See [`Session`] for when a lease counts
//!   as lost.
//! - **file** ([`Coordinator::file`]): one host, many processes. A lock is a `flock(2)` on a file
//!   per name; the kernel releases it when the holder's process dies, so the session is never
//!   lost while the process lives. Fencing tokens come from a counter stored in the lock file,
//!   incremented and fsynced by each new holder under the lock. Ordering: the tasks of one
//!   process queue in FIFO order; between processes `flock` makes no ordering promise (the
//!   kernel wakes the blocked processes and one of them wins). A waiter that times out leaves a
//!   thread blocked in `flock` that releases the lock as soon as it gets it. Observing holders
//!   and watching the registry poll the directory every 100 ms.
//! - **memory** ([`Coordinator::memory`]): the tasks of one process, strict FIFO.

// Modules from the bottom up, each using only those before it: `session` (a lease's liveness),
// `job` (what a job says about itself), `error`, `backend` (the sealed `LockBackend` trait and
// the types it speaks in: `Wait`, `Kind`, `Holder`), `backends/` (memory, file, etcd), `guard`,
// `election`, `registry`, `semaphore`, `coordinator`, and `etcd_builder` (`Coordinator::etcd` and its builder).
mod backend;
mod backends;
mod coordinator;
mod election;
mod error;
#[cfg(feature = "etcd")]
mod etcd_builder;
mod guard;
mod job;
mod registry;
mod semaphore;
mod session;

pub use backend::{
    HeldLock, Holder, Kind, LockBackend, LostSignalHandle, Registration, SlotTry, Wait,
};
#[cfg(feature = "etcd")]
#[doc(hidden)]
pub use backends::etcd::stats;
pub use coordinator::{Coordinator, JobContext, RunOutcome};
pub use election::{Election, Leader, Leadership};
pub use error::LockError;
#[cfg(feature = "etcd")]
pub use etcd_builder::EtcdBuilder;
pub use guard::LockGuard;
pub use job::{JobEvent, JobInfo};
pub use registry::JobRegistry;
pub use semaphore::Semaphore;
pub use session::Session;
