//! The Rust errors as the Python exceptions of `palisade._errors` (a Python module, so that the
//! classes can have two bases, such as `LockTimeout(LockError, TimeoutError)`).

use palisade_breaker::Rejected;
use palisade_lock::LockError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// An instance of `palisade.<class>` with `message`, as a `PyErr`. Falls back to `RuntimeError`
/// if the Python half of the package cannot be imported (a broken install).
pub fn raise(py: Python<'_>, class: &str, message: impl Into<String>) -> PyErr {
    let message = message.into();
    let made = ERRORS
        .get_or_try_init(py, || py.import("palisade._errors").map(Bound::unbind))
        .and_then(|m| m.bind(py).getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// `palisade.Error(message)`, for failures that have no finer class.
pub fn error(message: impl Into<String>) -> PyErr {
    Python::attach(|py| raise(py, "Error", message))
}

/// `palisade.ConfigError(message)`: a bad argument (also a `ValueError`).
pub fn config(py: Python<'_>, message: impl Into<String>) -> PyErr {
    raise(py, "ConfigError", message)
}

/// The message of `e` followed by its sources, as `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A palisade-lock error as its Python class.
pub fn lock(py: Python<'_>, e: LockError) -> PyErr {
    let message = chain(&e);
    match e {
        LockError::Held { holder } => {
            let err = raise(py, "LockHeld", message);
            let holder = holder
                .map(|h| crate::coordinator::job_info(py, &h))
                .transpose();
            if let Ok(Some(h)) = holder {
                let _ = err.value(py).setattr("holder", h);
            }
            err
        }
        LockError::Timeout { .. } => raise(py, "LockTimeout", message),
        LockError::Lost => raise(py, "LeaseLost", message),
        LockError::InvalidName { .. }
        | LockError::Config { .. }
        | LockError::PermitsMismatch { .. } => config(py, message),
        LockError::Backend { .. } if refused(&message) => raise(py, "AuthError", message),
        LockError::Backend { .. } | LockError::Tls { .. } => raise(py, "Unavailable", message),
        _ => raise(py, "LockError", message),
    }
}

/// Whether etcd's answer (in `message`) refuses our credentials or permissions.
fn refused(message: &str) -> bool {
    [
        "authentication failed",
        "user name is empty",
        "permission denied",
    ]
    .iter()
    .any(|said| message.contains(said))
}

/// A palisade-idempotency error as its Python class.
pub fn idempotency(py: Python<'_>, e: palisade_idempotency::Error) -> PyErr {
    let message = chain(&e);
    raise(py, idempotency_class(&e), message)
}

/// A palisade-idempotency error as its Python class, its message prefixed with `context` (such
/// as which store it came from).
pub fn idempotency_in(py: Python<'_>, context: &str, e: palisade_idempotency::Error) -> PyErr {
    let message = format!("{context}: {}", chain(&e));
    raise(py, idempotency_class(&e), message)
}

fn idempotency_class(e: &palisade_idempotency::Error) -> &'static str {
    use palisade_idempotency::Error as E;
    match e {
        E::MissingKey
        | E::InvalidKey { .. }
        | E::Config { .. }
        | E::UnsupportedUrl { .. }
        | E::Source { .. } => "ConfigError",
        E::InProgress { .. } => "InProgress",
        E::FingerprintMismatch { .. } => "FingerprintMismatch",
        E::OwnershipLost { .. } => "OwnershipLost",
        E::ClaimLost { .. } => "ClaimLost",
        E::NotRecorded { .. } => "NotRecorded",
        E::Redis { source, .. } if palisade_ratelimit::is_refusal(source) => "AuthError",
        E::Redis { .. } => "Unavailable",
        E::Fenced { .. } | E::FencingTokenRequired { .. } => "Fenced",
        E::Conflict { .. } => "Conflict",
        _ => "Error",
    }
}

/// A breaker's rejection as `palisade.BreakerOpen`, with `retry_after` (seconds or `None`) and
/// `state`.
pub fn breaker_open(py: Python<'_>, name: &str, r: &Rejected) -> PyErr {
    let err = raise(py, "BreakerOpen", format!("circuit breaker {name:?}: {r}"));
    let value = err.value(py);
    let _ = value.setattr("retry_after", r.retry_after().map(|d| d.as_secs_f64()));
    let _ = value.setattr("state", r.state().as_str());
    let _ = value.setattr("breaker", name);
    err
}

/// `True` or `False`, as Python writes them (for `__repr__`).
pub fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}
