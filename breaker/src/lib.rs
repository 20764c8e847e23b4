//! # palisade-breaker
//!
//! This crate will hold a circuit breaker whose closed-state path is lock-free: count- and
//! time-based sliding windows, slow-call detection, half-open probing with permits, forced and
//! disabled states, events, metrics, and a tower layer.
