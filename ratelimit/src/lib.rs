//! # palisade-ratelimit
//!
//! This crate will hold exact sliding-window rate limiters on Redis (sliding log, sliding window
//! counter and GCRA, each one atomic Lua script per decision, timed by the server's clock), the
//! in-process `LocalLimiter` on governor, one `RateLimiter` trait for both, and a tower layer.
