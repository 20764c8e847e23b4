//! `palisade.once`: palisade-idempotency's run-once keys, with the job in Python.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_idempotency::{
    ClaimContext, Error, FileStore, IdempotencyStore, MemoryStore, OnceOptions, Outcome, RedisStore,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::sync::oneshot;

use crate::errors;
use crate::runtime::{FirstOf, PerProcess, block_on, drop_in_runtime, first_of, join, runtime};

/// How long connecting to Redis may take before it is reported as unavailable (the connection
/// manager retries a refused connection; this bounds it).
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A run-once store, by URL.
#[derive(Clone)]
enum Store {
    File(FileStore),
    Redis(RedisStore),
    Memory(MemoryStore),
}

/// This process's stores, by URL: one Redis connection per process and URL.
static STORES: PerProcess<Arc<Mutex<HashMap<String, Store>>>> = PerProcess::new();

fn open(py: Python<'_>, url: &str) -> PyResult<Store> {
    let all = STORES.get_or_try_init(|| Ok::<_, PyErr>(Arc::default()))?;
    if let Some(s) = all.lock().unwrap_or_else(|p| p.into_inner()).get(url) {
        return Ok(s.clone());
    }
    let store = if let Some(path) = url.strip_prefix("file://") {
        if path.is_empty() {
            return Err(errors::config(
                py,
                "store=\"file://\" needs a directory: file:///path",
            ));
        }
        Store::File(FileStore::open(path).map_err(|e| errors::idempotency(py, e))?)
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        let owned = url.to_string();
        let connected = block_on(py, async move {
            tokio::time::timeout(REDIS_CONNECT_TIMEOUT, RedisStore::connect(&owned)).await
        })?;
        match connected {
            Ok(Ok(s)) => Store::Redis(s),
            Ok(Err(e)) => {
                return Err(errors::idempotency_in(
                    py,
                    &format!("Redis at {}", redact(url)),
                    e,
                ));
            }
            Err(_) => {
                return Err(errors::raise(
                    py,
                    "Unavailable",
                    format!(
                        "cannot reach Redis at {} within {}s: check the URL and that Redis is running",
                        redact(url),
                        REDIS_CONNECT_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
    } else if url == "memory://" {
        Store::Memory(MemoryStore::new())
    } else {
        return Err(errors::config(
            py,
            format!(
                "store={:?}: expected file:///dir, redis://host:port[/db], rediss://... or memory://",
                redact(url)
            ),
        ));
    };
    let mut map = all.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(first) = map.get(url) {
        // Another thread connected meanwhile: keep one connection per URL.
        let first = first.clone();
        drop(map);
        drop_in_runtime(store, std::process::id());
        return Ok(first);
    }
    map.insert(url.to_string(), store.clone());
    Ok(store)
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

type JobResult = Result<serde_json::Value, String>;

async fn run<S: IdempotencyStore + Clone + 'static>(
    store: S,
    key: String,
    fingerprint: String,
    options: OnceOptions,
    claimed: oneshot::Sender<ClaimContext>,
    finished: oneshot::Receiver<JobResult>,
) -> Result<Outcome<serde_json::Value>, Error> {
    store
        .once_with_claim(&key, &fingerprint, &options, move |claim| async move {
            let _ = claimed.send(claim);
            match finished.await {
                Ok(r) => r,
                Err(_) => Err("the Python job was abandoned".to_string()),
            }
        })
        .await
}

/// Runs `fn(*args, **kwargs)` once per `key`: the first call runs it and records its result
/// (which must be JSON-serialisable) in `store`; later calls with the same key return the
/// recorded result without running `fn`, for `ttl` seconds.
///
/// `store`: `"file:///dir"` (one host), `"redis://host:port/db"` (many hosts) or `"memory://"`
/// (this process). `fingerprint` names the request (default: the function's qualified name): a
/// key reused for another request raises `FingerprintMismatch`. A key whose first call is still
/// running raises `InProgress`, or waits up to `wait` seconds. `fn` runs at least once, not
/// exactly once: see palisade-idempotency's contract. What `fn` raises is re-raised, and
/// nothing is recorded (a retry runs it again).
#[pyfunction]
#[pyo3(signature = (key, fn_, /, *args, store, ttl=86400.0, in_progress_ttl=300.0, wait=None, fingerprint=None, **kwargs))]
#[allow(clippy::too_many_arguments)]
pub fn once<'py>(
    py: Python<'py>,
    key: String,
    fn_: &Bound<'py, PyAny>,
    args: &Bound<'py, PyTuple>,
    store: &str,
    ttl: f64,
    in_progress_ttl: f64,
    wait: Option<f64>,
    fingerprint: Option<String>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let secs = |what: &str, s: f64| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| errors::config(py, format!("{what}: {s} is not a number of seconds >= 0")))
    };
    let mut options = OnceOptions::default()
        .ttl(secs("ttl", ttl)?)
        .in_progress_ttl(secs("in_progress_ttl", in_progress_ttl)?);
    if let Some(w) = wait {
        options = options.wait(secs("wait", w)?);
    }
    let fingerprint = match fingerprint {
        Some(f) => f,
        None => {
            let module: String = fn_
                .getattr("__module__")
                .and_then(|m| m.extract())
                .unwrap_or_default();
            let name: String = fn_
                .getattr("__qualname__")
                .and_then(|m| m.extract())
                .unwrap_or_else(|_| "<callable>".to_string());
            format!("{module}.{name}")
        }
    };
    let store = open(py, store)?;
    let rt = runtime()?;
    let (claimed_tx, mut claimed_rx) = oneshot::channel();
    let (finished_tx, finished_rx) = oneshot::channel::<JobResult>();
    let mut task = rt.spawn(async move {
        match store {
            Store::File(s) => run(s, key, fingerprint, options, claimed_tx, finished_rx).await,
            Store::Redis(s) => run(s, key, fingerprint, options, claimed_tx, finished_rx).await,
            Store::Memory(s) => run(s, key, fingerprint, options, claimed_tx, finished_rx).await,
        }
    });
    let mut raised = None;
    // Finished first: the task ended without running the job (replayed, in progress, an error).
    let done = match first_of(py, &mut claimed_rx, &mut task)? {
        FirstOf::Finished(done) => done,
        FirstOf::Sent(claimed) => {
            if claimed.is_some() {
                let json = py.import("json")?;
                let result = fn_
                    .call(args.clone(), kwargs)
                    .and_then(|v| json.call_method1("dumps", (v,)))
                    .and_then(|s| s.extract::<String>())
                    .and_then(|s| {
                        serde_json::from_str::<serde_json::Value>(&s)
                            .map_err(|e| errors::error(format!("once: the result's JSON: {e}")))
                    });
                let sent = match result {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        let text = e.to_string();
                        raised = Some(e);
                        Err(text)
                    }
                };
                let _ = finished_tx.send(sent);
            } else {
                drop(finished_tx);
            }
            join(py, &mut task)?
        }
    };
    let done = done.map_err(|e| errors::error(format!("once: {e}")))?;
    match done {
        Ok(outcome) => {
            let text = outcome.into_inner().to_string();
            Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
        }
        Err(Error::Job(_)) if raised.is_some() => Err(raised.take().expect("checked")),
        Err(e) => {
            let err = errors::idempotency(py, e);
            if let Some(r) = raised {
                err.set_cause(py, Some(r));
            }
            Err(err)
        }
    }
}
