//! `palisade.Coordinator`: palisade-lock's locks with fencing tokens, exclusive jobs and the job
//! registry, on etcd or on lock files of one host.
//!
//! A `Coordinator` object is its configuration; the connection (etcd client and session lease)
//! is made on first use in each process and shared by every object with the same configuration
//! in that process. Pickling ships the configuration only, so a coordinator captured in a Spark
//! closure or sent to a `multiprocessing` worker connects there, once per process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use palisade_lock::{
    Coordinator as Inner, JobContext as Ctx, JobInfo, LockGuard, RunOutcome, Wait,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use tokio::sync::oneshot;

use crate::errors;
use crate::runtime::{FirstOf, PerProcess, block_on, drop_in_runtime, first_of, join, runtime};

/// How long connecting to etcd (client and session lease) may take before it is reported as
/// unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the coordinator keeps its locks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Config {
    File {
        dir: PathBuf,
    },
    Etcd {
        endpoints: Vec<String>,
        ttl: u64,
        user: Option<String>,
        password: Option<String>,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        tls: bool,
        namespace: String,
    },
}

/// The connected coordinators of this process, by configuration.
static CONNECTED: PerProcess<Arc<Mutex<HashMap<Config, Inner>>>> = PerProcess::new();

impl Config {
    /// This process's coordinator for this configuration, connecting on first use.
    fn connect(&self, py: Python<'_>) -> PyResult<Inner> {
        let all = CONNECTED.get_or_try_init(|| Ok::<_, PyErr>(Arc::default()))?;
        if let Some(c) = all.lock().unwrap_or_else(|p| p.into_inner()).get(self) {
            return Ok(c.clone());
        }
        // Connect without holding the map: other threads may use other coordinators meanwhile.
        let made = match self {
            Config::File { dir } => Inner::file(dir.clone()).map_err(|e| errors::lock(py, e))?,
            Config::Etcd { .. } => self.connect_etcd(py)?,
        };
        let mut map = all.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = map.get(self) {
            // Another thread connected meanwhile: keep one connection per configuration.
            let first = first.clone();
            drop(map);
            drop_in_runtime(made, std::process::id());
            return Ok(first);
        }
        map.insert(self.clone(), made.clone());
        Ok(made)
    }

    fn connect_etcd(&self, py: Python<'_>) -> PyResult<Inner> {
        let Config::Etcd {
            endpoints,
            ttl,
            user,
            password,
            ca,
            cert,
            key,
            tls,
            namespace,
        } = self
        else {
            unreachable!("connect_etcd on a file coordinator")
        };
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            // A member cut off from its cluster fails requests at once instead of serving stale
            // reads or hanging.
            .with_require_leader(true);
        if let Some(user) = user {
            options = options.with_user(user.clone(), password.clone().unwrap_or_default());
        }
        if *tls || ca.is_some() || cert.is_some() {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p).map_err(|e| {
                    errors::config(
                        py,
                        format!("tls {what} {}: cannot read it: {e}", p.display()),
                    )
                })
            };
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read(ca, "ca")?));
            }
            match (cert, key) {
                (Some(c), Some(k)) => {
                    t = t.identity(etcd_client::Identity::from_pem(
                        read(c, "cert")?,
                        read(k, "key")?,
                    ))
                }
                (None, None) => {}
                _ => {
                    return Err(errors::config(
                        py,
                        "tls: give both cert and key for a client certificate",
                    ));
                }
            }
            options = options.with_tls(t);
        }
        let (endpoints, namespace, ttl) = (endpoints.clone(), namespace.clone(), *ttl);
        let shown = endpoints.join(",");
        let connected = block_on(py, async move {
            tokio::time::timeout(CONNECT_TIMEOUT, async move {
                let client = etcd_client::Client::connect(endpoints, Some(options))
                    .await
                    .map_err(Connect::Client)?;
                Inner::etcd(client)
                    .namespace(namespace)
                    .lease_ttl(Duration::from_secs(ttl))
                    .connect()
                    .await
                    .map_err(Connect::Session)
            })
            .await
        })?;
        match connected {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(Connect::Client(e))) => Err(etcd_refusal(py, &e, user.as_deref())
                .unwrap_or_else(|| {
                    errors::raise(
                        py,
                        "Unavailable",
                        format!("cannot reach etcd at {shown}: {}", errors::chain(&e)),
                    )
                })),
            Ok(Err(Connect::Session(e))) => Err(errors::lock(py, e)),
            Err(_) => Err(errors::raise(
                py,
                "Unavailable",
                format!(
                    "cannot reach etcd at {shown} within {}s: check the endpoints and that etcd \
                     is running",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )),
        }
    }
}

/// Where connecting to etcd failed.
enum Connect {
    /// The client (connection, authentication).
    Client(etcd_client::Error),
    /// The session (lease grant), or a refused option.
    Session(palisade_lock::LockError),
}

/// etcd's refusal of our credentials as `palisade.AuthError`, naming the user but never the
/// password; `None` for other errors.
fn etcd_refusal(py: Python<'_>, e: &etcd_client::Error, user: Option<&str>) -> Option<PyErr> {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return None;
    };
    let said = status.message();
    let who = user.map_or_else(|| "no user".to_string(), |u| format!("user {u:?}"));
    let what = if said.contains("authentication failed") {
        "etcd rejected the user and password"
    } else if said.contains("user name is empty") {
        "etcd requires a user (its auth is enabled): pass user= and password="
    } else if said.contains("permission denied") {
        "etcd refused the request: grant the user's role readwrite on the namespace prefix"
    } else {
        return None;
    };
    Some(errors::raise(
        py,
        "AuthError",
        format!("{what} ({who}; etcd said: {said})"),
    ))
}

/// A coordinator of locks and exclusive jobs: `Coordinator.etcd(...)` for many hosts,
/// `Coordinator.file(dir)` for the processes of one host.
///
/// Picklable: it pickles as its configuration (including an etcd password, if given: prefer
/// short-lived credentials when pickles travel), and connects lazily in each process.
#[pyclass(frozen, module = "palisade._palisade", name = "Coordinator")]
pub struct Coordinator {
    config: Config,
}

fn seconds(py: Python<'_>, what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| errors::config(py, format!("{what}: {s} is not a number of seconds >= 0")))
}

fn parse_wait(py: Python<'_>, wait: Option<&Bound<'_, PyAny>>) -> PyResult<Wait> {
    let Some(wait) = wait.filter(|w| !w.is_none()) else {
        return Ok(Wait::No);
    };
    if let Ok(s) = wait.extract::<String>() {
        if s == "forever" {
            return Ok(Wait::Forever);
        }
    } else if let Ok(s) = wait.extract::<f64>() {
        return Ok(Wait::Up(seconds(py, "wait", s)?));
    }
    Err(errors::config(
        py,
        format!(
            "wait={}: expected None (do not wait), a number of seconds, or \"forever\"",
            wait.repr()?
        ),
    ))
}

#[pymethods]
impl Coordinator {
    /// A coordinator on etcd. `endpoints`: one URL or a list (`http://127.0.0.1:2379`; `https://`
    /// with `tls`). `ttl`: the session lease in whole seconds (>= 2): a holder that stops
    /// renewing loses its locks after it. `tls`: `True` (system roots), or a dict with `ca`,
    /// and `cert` + `key` (PEM file paths) for a private CA and a client certificate.
    /// Connects now, so that a wrong endpoint fails here.
    #[staticmethod]
    #[pyo3(signature = (endpoints, *, ttl=10, user=None, password=None, tls=None, namespace="palisade/"))]
    fn etcd(
        py: Python<'_>,
        endpoints: &Bound<'_, PyAny>,
        ttl: u64,
        user: Option<String>,
        password: Option<String>,
        tls: Option<&Bound<'_, PyAny>>,
        namespace: &str,
    ) -> PyResult<Self> {
        let endpoints: Vec<String> = match endpoints.extract::<String>() {
            Ok(one) => one.split(',').map(|s| s.trim().to_string()).collect(),
            Err(_) => endpoints
                .extract()
                .map_err(|_| errors::config(py, "endpoints: expected a URL or a list of URLs"))?,
        };
        if endpoints.is_empty() || endpoints.iter().any(String::is_empty) {
            return Err(errors::config(py, "endpoints: give at least one etcd URL"));
        }
        let (mut use_tls, mut ca, mut cert, mut key) = (false, None, None, None);
        if let Some(tls) = tls.filter(|t| !t.is_none()) {
            if let Ok(on) = tls.extract::<bool>() {
                use_tls = on;
            } else if let Ok(d) = tls.cast::<PyDict>() {
                use_tls = true;
                for (k, v) in d.iter() {
                    let k: String = k.extract()?;
                    let v: PathBuf = v.extract()?;
                    match k.as_str() {
                        "ca" => ca = Some(v),
                        "cert" => cert = Some(v),
                        "key" => key = Some(v),
                        other => {
                            return Err(errors::config(
                                py,
                                format!("tls: unknown key {other:?} (expected ca, cert, key)"),
                            ));
                        }
                    }
                }
            } else {
                return Err(errors::config(
                    py,
                    "tls: expected True or a dict {\"ca\": path, \"cert\": path, \"key\": path}",
                ));
            }
        }
        let c = Coordinator {
            config: Config::Etcd {
                endpoints,
                ttl,
                user,
                password,
                ca,
                cert,
                key,
                tls: use_tls,
                namespace: namespace.to_string(),
            },
        };
        c.config.connect(py)?;
        Ok(c)
    }

    /// A coordinator for the processes of one host: `flock` files under `dir` (created if
    /// missing). The kernel releases a lock when its holder's process dies.
    #[staticmethod]
    fn file(py: Python<'_>, dir: PathBuf) -> PyResult<Self> {
        let c = Coordinator {
            config: Config::File { dir },
        };
        c.config.connect(py)?;
        Ok(c)
    }

    /// Rebuilds a pickled coordinator without connecting (it connects on first use).
    #[staticmethod]
    fn _restore(state: &Bound<'_, PyTuple>) -> PyResult<Self> {
        let kind: String = state.get_item(0)?.extract()?;
        let config = if kind == "file" {
            Config::File {
                dir: state.get_item(1)?.extract()?,
            }
        } else {
            Config::Etcd {
                endpoints: state.get_item(1)?.extract()?,
                ttl: state.get_item(2)?.extract()?,
                user: state.get_item(3)?.extract()?,
                password: state.get_item(4)?.extract()?,
                ca: state.get_item(5)?.extract()?,
                cert: state.get_item(6)?.extract()?,
                key: state.get_item(7)?.extract()?,
                tls: state.get_item(8)?.extract()?,
                namespace: state.get_item(9)?.extract()?,
            }
        };
        Ok(Coordinator { config })
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let state = match &slf.get().config {
            Config::File { dir } => ("file", dir.clone()).into_pyobject(py)?.into_any(),
            Config::Etcd {
                endpoints,
                ttl,
                user,
                password,
                ca,
                cert,
                key,
                tls,
                namespace,
            } => (
                "etcd",
                endpoints.clone(),
                *ttl,
                user.clone(),
                password.clone(),
                ca.clone(),
                cert.clone(),
                key.clone(),
                *tls,
                namespace.clone(),
            )
                .into_pyobject(py)?
                .into_any(),
        };
        let restore = slf.get_type().getattr("_restore")?;
        PyTuple::new(py, [restore, PyTuple::new(py, [state])?.into_any()])
    }

    /// A lock on `name`, to use as a context manager: `with coordinator.lock("daily") as
    /// guard: ... guard.fencing_token ...`. `timeout`: `None` waits until the lock is free
    /// (in arrival order), `0` fails at once with `LockHeld` if it is held, a number of seconds
    /// fails with `LockTimeout` after that long. Leaving the block releases the lock, and raises
    /// `LeaseLost` if the lease was lost while the block ran.
    #[pyo3(signature = (name, timeout=None))]
    fn lock(&self, py: Python<'_>, name: String, timeout: Option<f64>) -> PyResult<Lock> {
        let timeout = timeout.map(|t| seconds(py, "timeout", t)).transpose()?;
        Ok(Lock {
            config: self.config.clone(),
            name,
            permits: None,
            timeout,
            guard: Mutex::new(None),
        })
    }

    /// A semaphore: at most `permits` holders of `name` at once, across every process on this
    /// coordinator's backend. A context manager like `lock`: `with coordinator.semaphore(
    /// "partner-api", 8) as slot: ... slot.fencing_token ...` (tokens strictly increase across
    /// acquisitions). `timeout` as for `lock` (`0`: `LockHeld` when every slot is held). Every
    /// holder of one name must give the same `permits`: another number raises `ConfigError`.
    #[pyo3(signature = (name, permits, timeout=None))]
    fn semaphore(
        &self,
        py: Python<'_>,
        name: String,
        permits: u32,
        timeout: Option<f64>,
    ) -> PyResult<Lock> {
        if permits == 0 {
            return Err(errors::config(py, "permits: a semaphore needs at least 1"));
        }
        let timeout = timeout.map(|t| seconds(py, "timeout", t)).transpose()?;
        Ok(Lock {
            config: self.config.clone(),
            name,
            permits: Some(permits),
            timeout,
            guard: Mutex::new(None),
        })
    }

    /// Runs `fn(*args, **kwargs)` while holding the lock `name`, registered as a running job.
    ///
    /// `wait`: `None` skips at once if the lock is held, a number of seconds waits that long,
    /// `"forever"` waits until it is free. Returns `Ran(value, fencing_token)` or
    /// `Skipped(holder)` (holder: the running job's info, or `None`). Raises `LeaseLost` if the
    /// lease was lost while `fn` ran: Python code cannot be stopped from outside, so `fn` runs to
    /// its end, and should call `palisade.current_job().check()` (or read `.lost`) before each
    /// write, passing `.fencing_token` to the storage it writes. What `fn` raises is re-raised
    /// after the lock is released.
    #[pyo3(signature = (name, fn_, /, *args, wait=None, **kwargs))]
    fn run_exclusive<'py>(
        &self,
        py: Python<'py>,
        name: String,
        fn_: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        wait: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.run_job(py, name, None, fn_, args, wait, kwargs)
    }

    /// `run_exclusive` on one of `permits` slots of the semaphore `name`: at most `permits`
    /// such jobs run at once (every holder registered as a running job). Returns `Ran` or
    /// `Skipped` (every slot held and `wait` ran out), raises `LeaseLost` as `run_exclusive`.
    #[pyo3(signature = (name, permits, fn_, /, *args, wait=None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn run_limited<'py>(
        &self,
        py: Python<'py>,
        name: String,
        permits: u32,
        fn_: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        wait: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.run_job(py, name, Some(permits), fn_, args, wait, kwargs)
    }

    /// The jobs running under `run_exclusive` (this coordinator's backend; on files: this
    /// host), as dicts: name, lock, host, pid, started_at (Unix seconds), command, metadata,
    /// fencing_token.
    fn running_jobs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let coordinator = self.config.connect(py)?;
        let jobs = block_on(py, async move { coordinator.registry().running().await })?
            .map_err(|e| errors::lock(py, e))?;
        let list = PyList::empty(py);
        for job in &jobs {
            list.append(job_info(py, job)?)?;
        }
        Ok(list)
    }

    fn __repr__(&self) -> String {
        match &self.config {
            Config::File { dir } => format!("Coordinator.file({:?})", dir.display().to_string()),
            Config::Etcd { endpoints, ttl, .. } => {
                format!("Coordinator.etcd({endpoints:?}, ttl={ttl})")
            }
        }
    }
}

type Done = Result<Result<RunOutcome<()>, palisade_lock::LockError>, tokio::task::JoinError>;

/// The Python value of how `run_exclusive` ended. `ran`: the fencing token and what the
/// function returned or raised, when it ran.
fn outcome(
    py: Python<'_>,
    name: &str,
    done: Done,
    ran: Option<(u64, PyResult<Py<PyAny>>)>,
) -> PyResult<Py<PyAny>> {
    let done = done.map_err(|e| errors::error(format!("run_exclusive {name:?}: {e}")))?;
    match (done, ran) {
        (Ok(RunOutcome::Ran(())), Some((token, value))) => Ok(Py::new(
            py,
            Ran {
                value: value?,
                fencing_token: token,
            },
        )?
        .into_any()),
        (Ok(RunOutcome::Skipped { holder }), _) => {
            let holder = holder.map(|h| job_info(py, &h)).transpose()?;
            Ok(Py::new(
                py,
                Skipped {
                    holder: holder.map(|h| h.into_any().unbind()),
                },
            )?
            .into_any())
        }
        (Err(e), ran) => {
            let err = errors::lock(py, e);
            if let Some((_, Err(raised))) = ran {
                err.set_cause(py, Some(raised));
            }
            Err(err)
        }
        (Ok(RunOutcome::Ran(())), None) => Err(errors::error(format!(
            "run_exclusive {name:?}: the job finished without running the function"
        ))),
    }
}

/// A job's info as a dict.
pub fn job_info<'py>(py: Python<'py>, job: &JobInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &job.name)?;
    d.set_item("lock", &job.lock)?;
    d.set_item("host", &job.host)?;
    d.set_item("pid", job.pid)?;
    let started = job
        .started_at()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    d.set_item("started_at", started)?;
    d.set_item("command", job.command.clone())?;
    d.set_item("metadata", job.metadata.clone())?;
    d.set_item("fencing_token", job.fencing_token)?;
    Ok(d)
}

/// `run_exclusive`'s result when the function ran: its return value and the fencing token.
#[pyclass(frozen, get_all, module = "palisade._palisade")]
pub struct Ran {
    /// What the function returned.
    value: Py<PyAny>,
    /// The lock's fencing token during the run.
    fencing_token: u64,
}

#[pymethods]
impl Ran {
    /// Always `True`.
    #[getter]
    fn ran(&self) -> bool {
        true
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Ran(value={}, fencing_token={})",
            self.value.bind(py).repr()?,
            self.fencing_token
        ))
    }
}

/// `run_exclusive`'s result when the lock was held: the holder's job info (a dict) or `None`.
#[pyclass(frozen, get_all, module = "palisade._palisade")]
pub struct Skipped {
    /// The running job's info (see `running_jobs`), when it registered one.
    holder: Option<Py<PyAny>>,
}

#[pymethods]
impl Skipped {
    /// Always `False`.
    #[getter]
    fn ran(&self) -> bool {
        false
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let holder = match &self.holder {
            Some(h) => h.bind(py).repr()?.to_string(),
            None => "None".to_string(),
        };
        Ok(format!("Skipped(holder={holder})"))
    }
}

thread_local! {
    /// The jobs running under `run_exclusive` on this thread, innermost last.
    static CURRENT: std::cell::RefCell<Vec<Py<JobContext>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The job `run_exclusive` is running on this thread (the innermost one), or `None`.
#[pyfunction]
pub fn current_job(py: Python<'_>) -> Option<Py<JobContext>> {
    CURRENT.with(|c| c.borrow().last().map(|j| j.clone_ref(py)))
}

/// What a function running under `run_exclusive` can see of its lock.
#[pyclass(frozen, module = "palisade._palisade")]
pub struct JobContext {
    ctx: Ctx,
}

#[pymethods]
impl JobContext {
    /// The lock name.
    #[getter]
    fn name(&self) -> &str {
        self.ctx.lock_name()
    }

    /// The fencing token to pass to the storage the job writes.
    #[getter]
    fn fencing_token(&self) -> u64 {
        self.ctx.fencing_token()
    }

    /// Whether the lease is lost: stop writing, `run_exclusive` raises `LeaseLost` at the end.
    #[getter]
    fn lost(&self) -> bool {
        self.ctx.is_cancelled()
    }

    /// Raises `LeaseLost` if the lease is lost. Call it before each write.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        if self.ctx.is_cancelled() {
            return Err(errors::lock(py, palisade_lock::LockError::Lost));
        }
        Ok(())
    }
}

/// `coordinator.lock(name)` (or `.semaphore(name, permits)`): a context manager whose
/// `__enter__` takes the lock (one slot of the semaphore).
#[pyclass(module = "palisade._palisade")]
pub struct Lock {
    config: Config,
    name: String,
    /// `Some(n)`: one of the `n` slots of a semaphore.
    permits: Option<u32>,
    timeout: Option<Duration>,
    guard: Mutex<Option<Py<Guard>>>,
}

#[pymethods]
impl Lock {
    fn __enter__(&self, py: Python<'_>) -> PyResult<Py<Guard>> {
        let coordinator = self.config.connect(py)?;
        let (name, timeout) = (self.name.clone(), self.timeout);
        let semaphore = match self.permits {
            Some(n) => Some(
                coordinator
                    .semaphore(&name, n)
                    .map_err(|e| errors::lock(py, e))?,
            ),
            None => None,
        };
        let taken = block_on(py, async move {
            match (semaphore, timeout) {
                (Some(s), None) => s.acquire().await,
                (Some(s), Some(t)) if t.is_zero() => s.try_acquire().await,
                (Some(s), Some(t)) => s.acquire_timeout(t).await,
                (None, None) => coordinator.lock(&name).await,
                (None, Some(t)) if t.is_zero() => coordinator.try_lock(&name).await,
                (None, Some(t)) => coordinator.lock_timeout(&name, t).await,
            }
        })?
        .map_err(|e| errors::lock(py, e))?;
        let guard = Py::new(
            py,
            Guard {
                name: self.name.clone(),
                fencing_token: taken.fencing_token(),
                held: Mutex::new(Some((std::process::id(), taken))),
            },
        )?;
        *self.guard.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard.clone_ref(py));
        Ok(guard)
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let guard = self.guard.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(guard) = guard {
            let was_lost = guard.get().lost();
            guard.get().release(py)?;
            if was_lost && exc_type.is_none_or(|t| t.is_none()) {
                return Err(errors::lock(py, palisade_lock::LockError::Lost));
            }
        }
        Ok(false)
    }
}

/// A held lock: its `fencing_token`, whether it is `lost`, and `release()`.
#[pyclass(frozen, module = "palisade._palisade")]
pub struct Guard {
    name: String,
    fencing_token: u64,
    /// The guard and the pid that took it (a forked child must not release the parent's lock).
    held: Mutex<Option<(u32, LockGuard)>>,
}

#[pymethods]
impl Guard {
    /// The lock name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Strictly increasing per lock name: pass it to the storage you write, so that a write
    /// from an older holder (one that lost its lease while paused) can be refused.
    #[getter]
    fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Whether the lease behind the lock is lost (the lock may be held by someone else now).
    /// False once released.
    #[getter]
    fn lost(&self) -> bool {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().is_some_and(|(_, g)| g.is_lost())
    }

    /// Releases the lock now (leaving the `with` block does it too). Idempotent.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((pid, guard)) = taken else {
            return Ok(());
        };
        if pid != std::process::id() {
            // A forked child's copy of the parent's guard: the lock is the parent's.
            std::mem::forget(guard);
            return Ok(());
        }
        block_on(py, guard.release())?.map_err(|e| errors::lock(py, e))
    }

    fn __repr__(&self) -> String {
        format!(
            "Guard({:?}, fencing_token={}, lost={})",
            self.name,
            self.fencing_token,
            errors::py_bool(self.lost())
        )
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let taken = self
            .held
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((pid, guard)) = taken {
            drop_in_runtime(guard, pid);
        }
    }
}

impl Coordinator {
    /// `run_exclusive` (`permits: None`) and `run_limited`.
    #[allow(clippy::too_many_arguments)]
    fn run_job<'py>(
        &self,
        py: Python<'py>,
        name: String,
        permits: Option<u32>,
        fn_: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        wait: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let wait = parse_wait(py, wait)?;
        let coordinator = self.config.connect(py)?;
        let rt = runtime()?;
        let qualname = fn_
            .getattr("__qualname__")
            .and_then(|q| q.extract::<String>())
            .unwrap_or_else(|_| "<callable>".to_string());
        let info = JobInfo::new(name.clone()).meta("python", qualname);
        let (ctx_tx, mut ctx_rx) = oneshot::channel::<Ctx>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let lock_name = name.clone();
        let mut task = rt.spawn(async move {
            let job = move |ctx| async move {
                let _ = ctx_tx.send(ctx);
                // The Python function runs on the caller's thread; this job ends when it
                // returns (or is dropped when the lease is lost).
                let _ = done_rx.await;
            };
            match permits {
                Some(n) => {
                    coordinator
                        .run_limited(&lock_name, n, info, wait, job)
                        .await
                }
                None => coordinator.run_exclusive(&lock_name, info, wait, job).await,
            }
        });
        let (ctx, value) = match first_of(py, &mut ctx_rx, &mut task)? {
            FirstOf::Finished(done) => return outcome(py, &name, done, None),
            FirstOf::Sent(None) => return outcome(py, &name, join(py, &mut task)?, None),
            FirstOf::Sent(Some(ctx)) => {
                let job = Py::new(py, JobContext { ctx: ctx.clone() })?;
                CURRENT.with(|c| c.borrow_mut().push(job.clone_ref(py)));
                let value = fn_.call(args.clone(), kwargs).map(Bound::unbind);
                CURRENT.with(|c| c.borrow_mut().pop());
                (ctx, value)
            }
        };
        drop(done_tx);
        let done = join(py, &mut task)?;
        outcome(py, &name, done, Some((ctx.fencing_token(), value)))
    }
}
