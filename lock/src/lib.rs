//! # palisade-lock
//!
//! Distributed locks that are safe to build on: every guard carries a fencing token that strictly
//! increases across holders, and the guarded work is cancelled when the lease behind it is lost.
//!
//! This crate will hold the `Coordinator` with its three backends behind one `LockBackend`
//! trait (etcd with sessions and keepalive, `flock` files for one host, memory for one process),
//! `LockGuard`s with fencing tokens, `run_exclusive`, the `JobRegistry` of running jobs and
//! leader `Election`.
