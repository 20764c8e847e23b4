//! One tokio runtime per process, made anew in a forked child, and the blocking wait that every
//! call into the async crates goes through: it releases the GIL and wakes up to deliver signals.
//!
//! Fork safety: a forked child has a copy of the parent's memory but none of its threads, so the
//! parent's runtime (and every connection driven by it) is dead there. Everything per process is
//! therefore stored with the pid that made it ([`PerProcess`]); a child that finds another pid
//! makes its own and *leaks* the inherited one (dropping it would join worker threads that do
//! not exist in the child, or write to the parent's sockets).
//!
//! Invariant: the slots are only read or written while the GIL is held, and nothing releases
//! the GIL while holding them. `os.fork()` also holds the GIL, so no thread of ours can be inside
//! a slot's mutex when a Python fork happens, and the child never finds one locked.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

/// How often a blocked call wakes up to let Python deliver a signal (Ctrl-C, SIGTERM handlers).
/// This checks no server: waits themselves are notifications, not polls.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// A value that belongs to the process that made it.
#[derive(Debug)]
pub struct PerProcess<T> {
    slot: Mutex<Option<(u32, T)>>,
}

impl<T: Clone> PerProcess<T> {
    /// An empty slot.
    pub const fn new() -> Self {
        PerProcess {
            slot: Mutex::new(None),
        }
    }

    /// This process's value, made by `make` on first use in each process.
    pub fn get_or_try_init<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let pid = std::process::id();
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((owner, value)) = slot.as_ref()
            && *owner == pid
        {
            return Ok(value.clone());
        }
        if let Some(inherited) = slot.take() {
            // Made before a fork: its threads and sockets are the parent's.
            std::mem::forget(inherited);
        }
        let value = make()?;
        *slot = Some((pid, value.clone()));
        Ok(value)
    }

    /// This process's value, if it made one.
    pub fn get(&self) -> Option<T> {
        let pid = std::process::id();
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .filter(|(owner, _)| *owner == pid)
            .map(|(_, v)| v.clone())
    }
}

static RUNTIME: PerProcess<Arc<Runtime>> = PerProcess::new();

/// This process's runtime (two worker threads: the I/O of every palisade object of the process,
/// lease keepalives, claim renewals).
pub fn runtime() -> PyResult<Arc<Runtime>> {
    RUNTIME.get_or_try_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("palisade")
            .enable_all()
            .build()
            .map(Arc::new)
            .map_err(|e| crate::errors::error(format!("cannot start palisade's I/O runtime: {e}")))
    })
}

/// Runs `fut` to completion on this process's runtime with the GIL released. Every
/// [`SIGNAL_CHECK`] it takes the GIL back for a moment to run Python's signal handlers; if one
/// raises (KeyboardInterrupt), `fut` is dropped (the crates' futures are cancel-safe) and the
/// exception propagates.
pub fn block_on<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let rt = runtime()?;
    let mut fut = Box::pin(fut);
    loop {
        // The timer is made inside `block_on`: it needs the runtime's context.
        let step =
            py.detach(|| rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK, &mut fut).await }));
        match step {
            Ok(out) => return Ok(out),
            Err(_elapsed) => {
                if let Err(raised) = py.check_signals() {
                    // Dropped inside the runtime: a cancelled acquire spawns the removal of its
                    // queue entry, and without a runtime that entry would stay for the session.
                    let _entered = rt.enter();
                    drop(fut);
                    return Err(raised);
                }
            }
        }
    }
}

/// What a call that runs its Python function beside a task (`run_exclusive`, `once`) learns
/// first: the task's go-ahead (`None`: the task let go of its sender without one), or the
/// task's end.
pub enum FirstOf<C, T> {
    /// The task sent its go-ahead (or dropped the sender).
    Sent(Option<C>),
    /// The task ended first.
    Finished(Result<T, tokio::task::JoinError>),
}

/// Waits (the GIL released) for whichever comes first, `rx` or the end of `task`. If a signal
/// handler raises meanwhile (Ctrl-C), `task` is aborted and the exception returned.
pub fn first_of<C, T>(
    py: Python<'_>,
    rx: &mut tokio::sync::oneshot::Receiver<C>,
    task: &mut tokio::task::JoinHandle<T>,
) -> PyResult<FirstOf<C, T>>
where
    C: Send,
    T: Send,
{
    let first = block_on(py, async {
        tokio::select! {
            sent = &mut *rx => FirstOf::Sent(sent.ok()),
            done = &mut *task => FirstOf::Finished(done),
        }
    });
    first.inspect_err(|_| task.abort())
}

/// Waits (the GIL released) for the end of `task`; aborted if a signal handler raises
/// meanwhile, as in [`first_of`].
pub fn join<T: Send>(
    py: Python<'_>,
    task: &mut tokio::task::JoinHandle<T>,
) -> PyResult<Result<T, tokio::task::JoinError>> {
    let done = block_on(py, &mut *task);
    done.inspect_err(|_| task.abort())
}

/// Drops `value` inside this process's runtime (a drop that spawns a cleanup task needs one),
/// or leaks it if it was made in another process (after a fork).
pub fn drop_in_runtime<T>(value: T, made_by: u32) {
    if made_by != std::process::id() {
        std::mem::forget(value);
        return;
    }
    match RUNTIME.get() {
        Some(rt) => {
            let _entered = rt.enter();
            drop(value);
        }
        None => std::mem::forget(value),
    }
}
