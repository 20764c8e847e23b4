//! `CircuitBreaker.events()`: a subscription to a breaker's events, read from Python.

use std::sync::Mutex;
use std::time::Duration;

use palisade_breaker::events::RecvError;
use palisade_breaker::{CircuitBreaker, Event, EventReceiver};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors;
use crate::runtime::block_on;

/// A breaker's events from the moment `CircuitBreaker.events()` was called, in order. Each event
/// is a dict with a `type`: `state_transition` (`from`, `to`), `rejected` (`state`),
/// `success` / `error` (`elapsed`, seconds), `ignored_error`, `slow_call` (`elapsed`,
/// `failed`), `reset`, and `lagged` (`missed`: events dropped because this reader fell more
/// than the buffer behind). Iterating blocks for the next event (the GIL released); `get` takes
/// a timeout; `drain` returns what is waiting without blocking.
#[pyclass(module = "palisade._palisade", name = "BreakerEvents")]
pub struct BreakerEvents {
    /// `None` while a `get` of another thread holds the receiver.
    rx: Mutex<Option<EventReceiver>>,
    /// To subscribe again when a wait was interrupted (its receiver went with it).
    breaker: CircuitBreaker,
}

impl BreakerEvents {
    pub fn new(breaker: &CircuitBreaker) -> Self {
        BreakerEvents {
            rx: Mutex::new(Some(breaker.subscribe())),
            breaker: breaker.clone(),
        }
    }

    fn take(&self, py: Python<'_>) -> PyResult<EventReceiver> {
        self.rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| errors::config(py, "another thread is reading these events: subscribe once per reader with CircuitBreaker.events()"))
    }

    fn put_back(&self, rx: EventReceiver) {
        *self.rx.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
    }
}

fn to_dict<'py>(py: Python<'py>, event: &Event) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match event {
        Event::StateTransition { from, to } => {
            d.set_item("type", "state_transition")?;
            d.set_item("from", from.as_str())?;
            d.set_item("to", to.as_str())?;
        }
        Event::Rejected { state } => {
            d.set_item("type", "rejected")?;
            d.set_item("state", state.as_str())?;
        }
        Event::Success { elapsed } => {
            d.set_item("type", "success")?;
            d.set_item("elapsed", elapsed.as_secs_f64())?;
        }
        Event::Error { elapsed } => {
            d.set_item("type", "error")?;
            d.set_item("elapsed", elapsed.as_secs_f64())?;
        }
        Event::IgnoredError => d.set_item("type", "ignored_error")?,
        Event::SlowCall { elapsed, failed } => {
            d.set_item("type", "slow_call")?;
            d.set_item("elapsed", elapsed.as_secs_f64())?;
            d.set_item("failed", *failed)?;
        }
        Event::Reset => d.set_item("type", "reset")?,
        _ => d.set_item("type", "other")?,
    }
    Ok(d)
}

/// What one wait for an event ended with.
enum Next {
    Event(Event),
    Lagged(u64),
    Closed,
    TimedOut,
}

impl BreakerEvents {
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Next> {
        let wait = match timeout {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(errors::config(
                    py,
                    format!("timeout must be a number of seconds >= 0, not {t}"),
                ));
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        let mut rx = self.take(py)?;
        let result = block_on(py, async {
            let next = match wait {
                Some(w) => tokio::time::timeout(w, rx.recv()).await.ok(),
                None => Some(rx.recv().await),
            };
            (next, rx)
        });
        let (next, rx) = match result {
            Ok(done) => done,
            // Interrupted (KeyboardInterrupt): the receiver went with the dropped wait; the next
            // read starts from a new subscription.
            Err(e) => {
                self.put_back(self.breaker.subscribe());
                return Err(e);
            }
        };
        self.put_back(rx);
        Ok(match next {
            Some(Ok(event)) => Next::Event(event),
            Some(Err(RecvError::Lagged(n))) => Next::Lagged(n),
            Some(Err(RecvError::Closed)) => Next::Closed,
            None => Next::TimedOut,
        })
    }

    fn as_object<'py>(py: Python<'py>, next: Next) -> PyResult<Option<Bound<'py, PyDict>>> {
        match next {
            Next::Event(e) => to_dict(py, &e).map(Some),
            Next::Lagged(n) => {
                let d = PyDict::new(py);
                d.set_item("type", "lagged")?;
                d.set_item("missed", n)?;
                Ok(Some(d))
            }
            Next::Closed | Next::TimedOut => Ok(None),
        }
    }
}

#[pymethods]
impl BreakerEvents {
    /// The next event, waiting at most `timeout` seconds (`None`: for ever); `None` when the
    /// wait ran out.
    #[pyo3(signature = (timeout=None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let next = self.next(py, timeout)?;
        Self::as_object(py, next)
    }

    /// Every event waiting now, without blocking.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let mut rx = self.take(py)?;
        let events = rx.drain();
        self.put_back(rx);
        events.iter().map(|e| to_dict(py, e)).collect()
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let next = self.next(py, None)?;
        Self::as_object(py, next)
    }
}
