//! `palisade.CircuitBreaker`: palisade-breaker's breaker, called from Python.
//!
//! The breaker itself is pure memory (atomics), so it needs no runtime and survives a fork as a
//! copy. The Python subclass in `palisade/__init__.py` adds the decorator form and pickling; the
//! process-wide registry (`palisade.breaker`) is there too.

use std::time::Duration;

use palisade_breaker::{CircuitBreaker as Breaker, OpenBackoff, Outcome, Window};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors;

/// The options a breaker was built with, kept to pickle it as its configuration.
#[derive(Debug, Clone, Default, PartialEq)]
struct Options {
    failure_rate_threshold: Option<f64>,
    slow_call_rate_threshold: Option<f64>,
    slow_call_duration: Option<f64>,
    slow_call_detection: Option<bool>,
    sliding_window: Option<u32>,
    sliding_window_time: Option<f64>,
    minimum_calls: Option<u32>,
    wait_in_open: Option<f64>,
    open_backoff_max: Option<f64>,
    open_backoff_multiplier: Option<f64>,
    open_backoff_jitter: Option<f64>,
    half_open_permits: Option<u32>,
    max_wait_in_half_open: Option<f64>,
    automatic_half_open: Option<bool>,
    event_capacity: Option<usize>,
}

fn seconds(py: Python<'_>, option: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| {
        errors::config(
            py,
            format!(
                "invalid circuit breaker option `{option}`: {s} is not a number of seconds >= 0"
            ),
        )
    })
}

impl Options {
    fn build(&self, py: Python<'_>, name: &str) -> PyResult<Breaker> {
        let mut b = Breaker::builder(name);
        if let Some(v) = self.failure_rate_threshold {
            b = b.failure_rate_threshold(v);
        }
        if let Some(v) = self.slow_call_rate_threshold {
            b = b.slow_call_rate_threshold(v);
        }
        if let Some(v) = self.slow_call_duration {
            b = b.slow_call_duration(seconds(py, "slow_call_duration", v)?);
        }
        if let Some(v) = self.slow_call_detection {
            b = b.slow_call_detection(v);
        }
        match (self.sliding_window, self.sliding_window_time) {
            (Some(_), Some(_)) => {
                return Err(errors::config(
                    py,
                    "give either sliding_window (a number of calls) or sliding_window_time \
                     (seconds), not both",
                ));
            }
            (Some(n), None) => b = b.sliding_window(Window::Count(n)),
            (None, Some(s)) => {
                b = b.sliding_window(Window::Time(seconds(py, "sliding_window_time", s)?))
            }
            (None, None) => {}
        }
        if let Some(v) = self.minimum_calls {
            b = b.minimum_calls(v);
        }
        if let Some(v) = self.wait_in_open {
            b = b.wait_in_open(seconds(py, "wait_in_open", v)?);
        }
        if let Some(max) = self.open_backoff_max {
            let mut backoff = OpenBackoff::exponential(seconds(py, "open_backoff_max", max)?);
            if let Some(m) = self.open_backoff_multiplier {
                backoff = backoff.with_multiplier(m);
            }
            if let Some(j) = self.open_backoff_jitter {
                backoff = backoff.with_jitter(j);
            }
            b = b.open_backoff(backoff);
        } else if self.open_backoff_multiplier.is_some() || self.open_backoff_jitter.is_some() {
            return Err(errors::config(
                py,
                "open_backoff_multiplier and open_backoff_jitter need open_backoff_max",
            ));
        }
        if let Some(v) = self.half_open_permits {
            b = b.half_open_permits(v);
        }
        if let Some(v) = self.max_wait_in_half_open {
            b = b.max_wait_in_half_open(seconds(py, "max_wait_in_half_open", v)?);
        }
        if let Some(v) = self.automatic_half_open {
            b = b.automatic_half_open(v);
        }
        if let Some(v) = self.event_capacity {
            b = b.event_capacity(v);
        }
        b.build().map_err(|e| errors::config(py, e.to_string()))
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        macro_rules! put {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field {
                    d.set_item(stringify!($field), v)?;
                }
            )*};
        }
        put!(
            failure_rate_threshold,
            slow_call_rate_threshold,
            slow_call_duration,
            slow_call_detection,
            sliding_window,
            sliding_window_time,
            minimum_calls,
            wait_in_open,
            open_backoff_max,
            open_backoff_multiplier,
            open_backoff_jitter,
            half_open_permits,
            max_wait_in_half_open,
            automatic_half_open,
            event_capacity
        );
        Ok(d)
    }
}

/// A circuit breaker (palisade-breaker): after too many failures among recent calls it opens
/// and rejects calls with `BreakerOpen` for `wait_in_open` seconds, then lets a few probe calls
/// through (half-open) and closes again if they succeed.
///
/// Options are the Rust builder's, as keyword arguments; durations are seconds (float).
/// `record` (exception classes counted as failures; default: every exception) and `ignore`
/// (exception classes counted as neither success nor failure) classify what a call raises; an
/// exception that is neither recorded nor ignored counts as a success. The closed-state path
/// takes no lock: one breaker can be shared by every thread of a process.
#[pyclass(subclass, module = "palisade._palisade", name = "CircuitBreaker")]
pub struct CircuitBreaker {
    inner: Breaker,
    options: Options,
    /// Exception classes (a tuple) that count as failures; `None`: every exception.
    record: Option<Py<PyTuple>>,
    /// Exception classes (a tuple) that count as neither success nor failure.
    ignore: Option<Py<PyTuple>>,
}

fn classes<'py>(
    py: Python<'py>,
    what: &str,
    v: Option<Bound<'py, PyAny>>,
) -> PyResult<Option<Py<PyTuple>>> {
    let Some(v) = v else { return Ok(None) };
    let tuple = if let Ok(t) = v.cast::<PyTuple>() {
        t.clone()
    } else if v.is_instance_of::<pyo3::types::PyType>() {
        PyTuple::new(py, [v])?
    } else {
        PyTuple::new(py, v.try_iter()?.collect::<PyResult<Vec<_>>>()?)?
    };
    let base = py.get_type::<pyo3::exceptions::PyBaseException>();
    for item in tuple.iter() {
        let ok = item
            .cast::<pyo3::types::PyType>()
            .map(|t| t.is_subclass(&base).unwrap_or(false))
            .unwrap_or(false);
        if !ok {
            return Err(errors::config(
                py,
                format!("{what}= takes exception classes, not {}", item.repr()?),
            ));
        }
    }
    Ok(Some(tuple.unbind()))
}

#[pymethods]
impl CircuitBreaker {
    #[new]
    #[pyo3(signature = (
        name, *, failure_rate_threshold=None, slow_call_rate_threshold=None,
        slow_call_duration=None, slow_call_detection=None, sliding_window=None,
        sliding_window_time=None, minimum_calls=None, wait_in_open=None, open_backoff_max=None,
        open_backoff_multiplier=None, open_backoff_jitter=None, half_open_permits=None,
        max_wait_in_half_open=None, automatic_half_open=None, event_capacity=None, record=None,
        ignore=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: &str,
        failure_rate_threshold: Option<f64>,
        slow_call_rate_threshold: Option<f64>,
        slow_call_duration: Option<f64>,
        slow_call_detection: Option<bool>,
        sliding_window: Option<u32>,
        sliding_window_time: Option<f64>,
        minimum_calls: Option<u32>,
        wait_in_open: Option<f64>,
        open_backoff_max: Option<f64>,
        open_backoff_multiplier: Option<f64>,
        open_backoff_jitter: Option<f64>,
        half_open_permits: Option<u32>,
        max_wait_in_half_open: Option<f64>,
        automatic_half_open: Option<bool>,
        event_capacity: Option<usize>,
        record: Option<Bound<'_, PyAny>>,
        ignore: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let options = Options {
            failure_rate_threshold,
            slow_call_rate_threshold,
            slow_call_duration,
            slow_call_detection,
            sliding_window,
            sliding_window_time,
            minimum_calls,
            wait_in_open,
            open_backoff_max,
            open_backoff_multiplier,
            open_backoff_jitter,
            half_open_permits,
            max_wait_in_half_open,
            automatic_half_open,
            event_capacity,
        };
        Ok(CircuitBreaker {
            inner: options.build(py, name)?,
            options,
            record: classes(py, "record", record)?,
            ignore: classes(py, "ignore", ignore)?,
        })
    }

    /// Calls `fn(*args, **kwargs)` if the breaker permits it and records how it ended; raises
    /// `BreakerOpen` (with `retry_after`) without calling `fn` otherwise. What `fn` raises is
    /// re-raised unchanged.
    #[pyo3(signature = (fn_, /, *args, **kwargs))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        fn_: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let classify = |r: &PyResult<Bound<'py, PyAny>>| match r {
            Ok(_) => Outcome::Success,
            Err(e) => self.classify(py, e),
        };
        match self
            .inner
            .call_blocking_with(classify, || fn_.call(args.clone(), kwargs))
        {
            Ok(v) => Ok(v),
            Err(e) => match e.rejected() {
                Some(r) => Err(errors::breaker_open(py, self.inner.name(), r)),
                None => Err(e
                    .into_inner()
                    .unwrap_or_else(|| errors::error("circuit breaker: unexpected error"))),
            },
        }
    }

    /// A subscription to this breaker's events from now on (a `BreakerEvents`: iterate it,
    /// or `get(timeout)` / `drain()`). Events cost the breaker nothing while nobody subscribes.
    fn events(&self) -> crate::breaker_events::BreakerEvents {
        crate::breaker_events::BreakerEvents::new(&self.inner)
    }

    /// The breaker's name.
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The current state: "closed", "open", "half_open", "forced_open", "disabled" or
    /// "metrics_only".
    #[getter]
    fn state(&self) -> &'static str {
        self.inner.state().as_str()
    }

    /// A snapshot of the counts, as a dict (state, failure_rate, slow_call_rate,
    /// buffered_calls, failed_buffered_calls, slow_buffered_calls, successful_calls,
    /// failed_calls, slow_calls, ignored_calls, not_permitted_calls).
    #[getter]
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.inner.metrics();
        let d = PyDict::new(py);
        d.set_item("state", m.state.as_str())?;
        d.set_item("failure_rate", m.failure_rate)?;
        d.set_item("slow_call_rate", m.slow_call_rate)?;
        d.set_item("buffered_calls", m.buffered_calls)?;
        d.set_item("failed_buffered_calls", m.failed_buffered_calls)?;
        d.set_item("slow_buffered_calls", m.slow_buffered_calls)?;
        d.set_item("successful_calls", m.successful_calls)?;
        d.set_item("failed_calls", m.failed_calls)?;
        d.set_item("slow_calls", m.slow_calls)?;
        d.set_item("ignored_calls", m.ignored_calls)?;
        d.set_item("not_permitted_calls", m.not_permitted_calls)?;
        Ok(d)
    }

    /// The keyword options the breaker was built with (for pickling and logs).
    #[getter]
    fn options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.options.to_dict(py)
    }

    /// The exception classes counted as failures (`None`: every exception).
    #[getter]
    fn record(&self, py: Python<'_>) -> Option<Py<PyTuple>> {
        self.record.as_ref().map(|t| t.clone_ref(py))
    }

    /// The exception classes counted as neither success nor failure.
    #[getter]
    fn ignore(&self, py: Python<'_>) -> Option<Py<PyTuple>> {
        self.ignore.as_ref().map(|t| t.clone_ref(py))
    }

    /// Rejects every call until `reset()`, `disable()` or `metrics_only()`.
    fn force_open(&self) {
        self.inner.force_open();
    }

    /// Permits every call and records nothing until another state is set.
    fn disable(&self) {
        self.inner.disable();
    }

    /// Permits every call and records outcomes, never changing state by itself.
    fn metrics_only(&self) {
        self.inner.metrics_only();
    }

    /// Back to closed with an empty window.
    fn reset(&self) {
        self.inner.reset();
    }

    fn __repr__(&self) -> String {
        format!(
            "CircuitBreaker({:?}, state={:?})",
            self.inner.name(),
            self.inner.state().as_str()
        )
    }
}

impl CircuitBreaker {
    /// How an exception counts: ignored if it is an instance of an `ignore` class; a failure if
    /// `record` is unset or it is an instance of a `record` class; otherwise a success.
    fn classify(&self, py: Python<'_>, e: &PyErr) -> Outcome {
        let is = |classes: &Py<PyTuple>| e.value(py).is_instance(classes.bind(py)).unwrap_or(false);
        if self.ignore.as_ref().is_some_and(is) {
            return Outcome::Ignored;
        }
        match &self.record {
            None => Outcome::Failure,
            Some(classes) if is(classes) => Outcome::Failure,
            Some(_) => Outcome::Success,
        }
    }
}
