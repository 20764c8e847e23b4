//! Python bindings of palisade: the extension module `palisade._palisade`, re-exported by the
//! Python package `palisade` (see `palisade/__init__.py`).
//!
//! A thin layer: every algorithm is the crates'. What is specific to Python lives here:
//! - one tokio runtime per process, made anew after `fork` (module `runtime`);
//! - the GIL released around every wait on a server or a lock (`runtime::block_on`);
//! - objects that are their configuration, connecting lazily once per process and
//!   configuration, so that they pickle (Spark closures, `multiprocessing`);
//! - Python functions run on the caller's thread, never on the runtime's, so they can call
//!   palisade again.

mod breaker;
mod breaker_events;
mod coordinator;
mod errors;
mod once;
mod publish;
mod ratelimit;
mod ratelimit_thread;
mod runtime;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _palisade(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<breaker::CircuitBreaker>()?;
    m.add_class::<breaker_events::BreakerEvents>()?;
    m.add_class::<coordinator::Coordinator>()?;
    m.add_class::<coordinator::Lock>()?;
    m.add_class::<coordinator::Guard>()?;
    m.add_class::<coordinator::Ran>()?;
    m.add_class::<coordinator::Skipped>()?;
    m.add_class::<coordinator::JobContext>()?;
    m.add_function(wrap_pyfunction!(coordinator::current_job, m)?)?;
    m.add_function(wrap_pyfunction!(once::once, m)?)?;
    m.add_function(wrap_pyfunction!(publish::publish, m)?)?;
    m.add_class::<ratelimit::RateLimiter>()?;
    m.add_class::<ratelimit::Decision>()?;
    Ok(())
}
