//! `RateLimiter.check` on Redis from the calling thread itself.
//!
//! Through the process's runtime a decision crosses threads twice: the Python thread hands the
//! request to the connection's task on a runtime thread and sleeps until that thread wakes it
//! with the answer. On a loaded machine those wake-ups cost more than Redis does. So each
//! Python thread that checks a Redis limiter gets a current-thread runtime and its own
//! connection on it: the request is written, and the answer read, by the thread that waits for
//! it, as a plain synchronous client does. The limiter on that connection is made from the
//! same parts as the process's (`RedisParts`, whose local fallback is shared by clones), so it
//! decides exactly as the process's does: every decision is one script on the server.
//!
//! Made per process (a thread that forked is in a new process: its parent's connection is
//! forgotten, never used) and dropped with the thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;

use palisade_ratelimit::redis_crate::aio::ConnectionManager;
use palisade_ratelimit::{Decision, RateLimiter as _, RedisLimiter};
use pyo3::prelude::*;

use crate::errors;
use crate::ratelimit::{Config, RedisParts, limit_error};
use crate::runtime::PerProcess;

/// The parts of every Redis limiter this process built, by configuration.
static PARTS: PerProcess<std::sync::Arc<Mutex<HashMap<Config, RedisParts>>>> = PerProcess::new();

/// Records what the process's limiter for `config` is made of.
pub(crate) fn remember(config: &Config, parts: RedisParts) {
    if let Ok(all) = PARTS.get_or_try_init(|| Ok::<_, ()>(std::sync::Arc::default())) {
        all.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(config.clone(), parts);
    }
}

struct ThreadRedis {
    pid: u32,
    runtime: tokio::runtime::Runtime,
    limiters: HashMap<Config, RedisLimiter<ConnectionManager>>,
}

thread_local! {
    static THREAD: RefCell<Option<ThreadRedis>> = const { RefCell::new(None) };
}

/// Decides `cost` units for `key` with this thread's limiter for `config` (a Redis one the
/// process has built, so its parts are known).
pub(crate) fn check(
    py: Python<'_>,
    config: &Config,
    key: &str,
    cost: u32,
) -> PyResult<Result<Decision, palisade_ratelimit::Error>> {
    let Config::Redis { url, .. } = config else {
        return Err(errors::error("internal: not a Redis limiter"));
    };
    THREAD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let pid = std::process::id();
        if let Some(inherited) = slot.take_if(|t| t.pid != pid) {
            // Made before a fork: its socket is the parent's.
            std::mem::forget(inherited);
        }
        if slot.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    errors::error(format!("cannot start a runtime for this thread: {e}"))
                })?;
            *slot = Some(ThreadRedis {
                pid,
                runtime,
                limiters: HashMap::new(),
            });
        }
        let Some(this) = slot.as_mut() else {
            return Err(errors::error("internal: no thread runtime"));
        };
        let limiter = match this.limiters.get(config) {
            Some(l) => l.clone(),
            None => {
                let parts = PARTS
                    .get()
                    .and_then(|all| {
                        all.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(config)
                            .cloned()
                    })
                    .ok_or_else(|| errors::error("internal: a Redis limiter without its parts"))?;
                let runtime = &this.runtime;
                let conn = py
                    .detach(|| runtime.block_on(parts.connect(url)))
                    .map_err(|e| limit_error(py, e))?;
                let limiter = {
                    let _entered = runtime.enter();
                    parts.build(py, conn)?
                };
                this.limiters.insert(config.clone(), limiter.clone());
                limiter
            }
        };
        let runtime = &this.runtime;
        Ok(py.detach(|| runtime.block_on(limiter.check_n(key, cost))))
    })
}
