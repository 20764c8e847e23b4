//! The backends behind [`LockBackend`](crate::backend::LockBackend): memory (one process), file
//! (one host) and etcd (a fleet). Each uses the layer below it (`backend`, `session`, `job`,
//! `error`) and nothing above it.

#[cfg(feature = "etcd")]
pub(crate) mod etcd;
pub(crate) mod file;
pub(crate) mod memory;
mod memory_sem;
