//! `palisade.RateLimiter`: palisade-ratelimit's limiters (Redis, one-host files, in-process).
//!
//! A `RateLimiter` object is its configuration. The limiter it stands for is built on first use
//! in each process: one Redis connection per process and URL (shared by every limiter on that
//! URL) for `acquire` and `acquire_async`, plus one per thread that calls `check` (its decisions
//! then need no hand-over between threads: `ratelimit_thread`); the file limiter's state is on
//! disk, an in-process limiter's state is this process's (each constructor call makes a new one;
//! its pickled copies share it within a process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_ratelimit::{
    Algorithm, Decision as RustDecision, Error, FileLimiter, Limit, LocalLimiter, Policy,
    RateLimiter as _, RedisLimiter,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors;
use crate::runtime::{PerProcess, block_on, runtime};

/// How long one Redis decision may take (the crate's `timeout`) unless the user says otherwise.
const DEFAULT_TIMEOUT: f64 = 1.0;

/// What a limiter is, as pickled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Config {
    Redis {
        /// The URL, or a cluster's node URLs joined by `,`.
        url: String,
        /// `url` names nodes of a Redis Cluster.
        cluster: bool,
        /// The CA (a PEM file) that a `rediss://` server's certificate must be signed by;
        /// `None`: the system's roots.
        tls_ca: Option<String>,
        limits: Vec<String>,
        algorithm: String,
        burst: Option<u32>,
        prefix: String,
        on_unavailable: String,
        timeout_ms: u64,
    },
    File {
        dir: String,
        limits: Vec<String>,
    },
    Local {
        limit: String,
        burst: Option<u32>,
        /// Tells apart the in-process limiters of one configuration.
        id: u64,
    },
}

#[derive(Clone)]
enum Built {
    Redis(RedisLimiter),
    RedisCluster(RedisLimiter<palisade_ratelimit::redis_crate::cluster_async::ClusterConnection>),
    File(FileLimiter),
    Local(LocalLimiter),
}

static BUILT: PerProcess<Arc<Mutex<HashMap<Config, Built>>>> = PerProcess::new();
/// A standalone connection's identity: its URL, its CA, and whether it connected lazily (an
/// "open" or "local" limiter's; a "closed" one connects when it is made, and says if it cannot).
type ConnectionId = (String, Option<Vec<u8>>, bool);
static CONNECTIONS: PerProcess<
    Arc<Mutex<HashMap<ConnectionId, palisade_ratelimit::redis_crate::aio::ConnectionManager>>>,
> = PerProcess::new();

pub(crate) fn limit_error(py: Python<'_>, e: Error) -> PyErr {
    let message = errors::chain(&e);
    match e {
        Error::InvalidConfig { .. } | Error::CostExceedsLimit { .. } => errors::config(py, message),
        Error::DeadlineExceeded(d) => {
            let err = errors::raise(py, "RateLimited", message);
            let _ = err
                .value(py)
                .setattr("retry_after", d.retry_after.map(|r| r.as_secs_f64()));
            err
        }
        Error::Timeout(_) | Error::Unavailable(_) => errors::raise(py, "Unavailable", message),
        // Refusals that retrying does not cure: a certificate, a password, an ACL permission.
        Error::Tls { .. } => errors::raise(py, "AuthError", message),
        Error::Redis(ref e) if palisade_ratelimit::is_refusal(e) => {
            errors::raise(py, "AuthError", message)
        }
        _ => errors::error(message),
    }
}

fn parse_limits(py: Python<'_>, limits: &[String]) -> PyResult<Vec<Limit>> {
    if limits.is_empty() {
        return Err(errors::config(
            py,
            "limits: give at least one, such as [\"100/min\"]",
        ));
    }
    limits
        .iter()
        .map(|l| l.parse::<Limit>().map_err(|e| limit_error(py, e)))
        .collect()
}

impl Config {
    fn build(&self, py: Python<'_>) -> PyResult<Built> {
        let all = BUILT.get_or_try_init(|| Ok::<_, PyErr>(Arc::default()))?;
        if let Some(b) = all.lock().unwrap_or_else(|p| p.into_inner()).get(self) {
            return Ok(b.clone());
        }
        let built = match self {
            Config::Local { limit, burst, .. } => {
                let limit = parse_limits(py, std::slice::from_ref(limit))?.remove(0);
                let local = match burst {
                    Some(b) => LocalLimiter::with_burst(limit, *b),
                    None => LocalLimiter::new(limit),
                };
                Built::Local(local.map_err(|e| limit_error(py, e))?)
            }
            Config::File { dir, limits } => Built::File(
                FileLimiter::with_limits(dir, parse_limits(py, limits)?)
                    .map_err(|e| limit_error(py, e))?,
            ),
            Config::Redis {
                url,
                cluster,
                tls_ca,
                limits,
                algorithm,
                burst,
                prefix,
                on_unavailable,
                timeout_ms,
            } => {
                let limits = parse_limits(py, limits)?;
                let algorithm = match (algorithm.as_str(), burst) {
                    ("sliding_log", _) => Algorithm::SlidingLog,
                    ("sliding_window", _) => Algorithm::SlidingWindowCounter,
                    ("gcra", Some(b)) => Algorithm::Gcra { burst: *b },
                    ("gcra", None) => Algorithm::Gcra {
                        burst: limits[0].max(),
                    },
                    (other, _) => {
                        return Err(errors::config(
                            py,
                            format!(
                                "algorithm={other:?}: expected \"sliding_log\", \"sliding_window\" \
                                 or \"gcra\""
                            ),
                        ));
                    }
                };
                let policy = match on_unavailable.as_str() {
                    "closed" => Policy::FailClosed,
                    "open" => Policy::FailOpen,
                    "local" => {
                        Policy::Local(LocalLimiter::new(limits[0]).map_err(|e| limit_error(py, e))?)
                    }
                    other => {
                        return Err(errors::config(
                            py,
                            format!(
                                "on_unavailable={other:?}: expected \"closed\", \"open\" or \"local\""
                            ),
                        ));
                    }
                };
                let timeout = Duration::from_millis(*timeout_ms);
                let parts = RedisParts {
                    limits,
                    algorithm,
                    prefix: prefix.clone(),
                    policy,
                    timeout,
                    tls_ca: read_ca(py, tls_ca.as_deref())?,
                };
                if *cluster {
                    let conn = cluster_connection(py, url, &parts)?;
                    Built::RedisCluster(parts.build(py, conn)?)
                } else {
                    let conn = connection(py, url, &parts)?;
                    let limiter = parts.build(py, conn)?;
                    crate::ratelimit_thread::remember(self, parts);
                    Built::Redis(limiter)
                }
            }
        };
        let mut map = all.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.entry(self.clone()).or_insert(built).clone())
    }
}

/// What a Redis limiter is made of, besides its connection: kept per process so that the
/// connections of other threads (`ratelimit_thread`) make the same limiter, with the same
/// local fallback (its state is shared by clones).
#[derive(Clone)]
pub(crate) struct RedisParts {
    limits: Vec<Limit>,
    algorithm: Algorithm,
    prefix: String,
    policy: Policy,
    pub(crate) timeout: Duration,
    /// The CA's PEM, read once per process.
    tls_ca: Option<Vec<u8>>,
}

impl RedisParts {
    /// A connection to the standalone Redis at `url` for this limiter (its CA, if any). With
    /// `on_unavailable` "open" or "local" it connects at the first decision, so that the policy
    /// answers from the start when Redis is down (an eager connect would raise instead).
    pub(crate) async fn connect(
        &self,
        url: &str,
    ) -> Result<palisade_ratelimit::redis_crate::aio::ConnectionManager, Error> {
        let timeout = self.connect_timeout();
        let lazy = self.has_fallback();
        let certs = |ca: &Vec<u8>| palisade_ratelimit::redis_crate::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        };
        match (&self.tls_ca, lazy) {
            (Some(ca), false) => {
                palisade_ratelimit::connect_with_tls(url, certs(ca), timeout).await
            }
            (Some(ca), true) => palisade_ratelimit::connect_with_tls_lazy(url, certs(ca), timeout),
            (None, false) => palisade_ratelimit::connect(url, timeout).await,
            (None, true) => palisade_ratelimit::connect_lazy(url, timeout),
        }
    }

    /// Whether the policy answers while Redis cannot ("open" or "local"): then connections are
    /// made lazily, so that a limiter can be made during an outage.
    fn has_fallback(&self) -> bool {
        !matches!(self.policy, Policy::FailClosed)
    }

    /// How long reaching Redis may take: the decision timeout, but at least 5 s (connecting
    /// takes more round trips than a decision).
    fn connect_timeout(&self) -> Duration {
        self.timeout.max(Duration::from_secs(5))
    }

    pub(crate) fn build<C>(&self, py: Python<'_>, conn: C) -> PyResult<RedisLimiter<C>>
    where
        C: palisade_ratelimit::redis_crate::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        RedisLimiter::builder(conn)
            .limits(self.limits.clone())
            .algorithm(self.algorithm)
            .prefix(self.prefix.clone())
            .on_unavailable(self.policy.clone())
            .timeout(self.timeout)
            .build()
            .map_err(|e| limit_error(py, e))
    }
}

/// The PEM at `path`, read now (a missing file is a configuration error here, not a TLS error
/// at the first decision).
fn read_ca(py: Python<'_>, path: Option<&str>) -> PyResult<Option<Vec<u8>>> {
    path.map(|p| {
        std::fs::read(p).map_err(|e| errors::config(py, format!("tls_ca: cannot read {p:?}: {e}")))
    })
    .transpose()
}

/// This process's connection to the standalone Redis at `url` (one per URL and CA).
fn connection(
    py: Python<'_>,
    url: &str,
    parts: &RedisParts,
) -> PyResult<palisade_ratelimit::redis_crate::aio::ConnectionManager> {
    let all = CONNECTIONS.get_or_try_init(|| Ok::<_, PyErr>(Arc::default()))?;
    let id = (url.to_string(), parts.tls_ca.clone(), parts.has_fallback());
    if let Some(c) = all.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return Ok(c.clone());
    }
    let (owned, parts_owned) = (url.to_string(), parts.clone());
    let conn = block_on(py, async move { parts_owned.connect(&owned).await })?
        .map_err(|e| limit_error(py, e))?;
    let mut map = all.lock().unwrap_or_else(|p| p.into_inner());
    Ok(map.entry(id).or_insert(conn).clone())
}

/// A connection to the Redis Cluster whose nodes (some of them) are `urls`, joined by `,`. It is
/// made now; with `on_unavailable` "open" or "local", a cluster that does not answer now (an
/// outage, not a refusal) gets a connection made in the background instead, so that the policy
/// answers until a node does.
fn cluster_connection(
    py: Python<'_>,
    urls: &str,
    parts: &RedisParts,
) -> PyResult<palisade_ratelimit::redis_crate::cluster_async::ClusterConnection> {
    if parts.tls_ca.is_some() {
        return Err(errors::config(
            py,
            "tls_ca: not supported with cluster=True yet; rediss:// node URLs trust the system's roots",
        ));
    }
    let nodes: Vec<String> = urls.split(',').map(str::to_string).collect();
    let lazy = parts.has_fallback();
    let timeout = parts.connect_timeout();
    // How long the limiter's making may wait for the cluster: with a policy to fall back on, a
    // second at most (a cluster that has not answered by then is connected in the background).
    let wait = if lazy {
        parts.timeout.max(Duration::from_secs(1))
    } else {
        timeout
    };
    let attempt = nodes.clone();
    let now = block_on(py, async move {
        tokio::time::timeout(wait, palisade_ratelimit::connect_cluster(attempt))
            .await
            .unwrap_or(Err(Error::Timeout(wait)))
    })?;
    match now {
        Ok(conn) => Ok(conn),
        Err(Error::Unavailable(_) | Error::Timeout(_)) if lazy => block_on(py, async move {
            // Inside the runtime: the connection's task is spawned there.
            palisade_ratelimit::connect_cluster_lazy(nodes, timeout)
        })?
        .map_err(|e| limit_error(py, e)),
        Err(e) => Err(limit_error(py, e)),
    }
}

impl Built {
    async fn acquire(
        &self,
        key: &str,
        cost: u32,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<RustDecision, Error> {
        match (self, deadline) {
            (Built::Redis(l), Some(d)) => l.acquire_with_deadline(key, cost, d).await,
            (Built::Redis(l), None) => l.acquire_n(key, cost).await,
            (Built::RedisCluster(l), Some(d)) => l.acquire_with_deadline(key, cost, d).await,
            (Built::RedisCluster(l), None) => l.acquire_n(key, cost).await,
            (Built::File(l), Some(d)) => l.acquire_with_deadline(key, cost, d).await,
            (Built::File(l), None) => l.acquire_n(key, cost).await,
            (Built::Local(l), Some(d)) => l.acquire_with_deadline(key, cost, d).await,
            (Built::Local(l), None) => l.acquire_n(key, cost).await,
        }
    }
}

/// A rate limiter. Make one with `RateLimiter.redis(...)` (shared by every process on the same
/// Redis and prefix), `RateLimiter.file(dir, ...)` (the processes of one host) or
/// `RateLimiter.local(...)` (this process). Limits are strings such as `"100/min"`, `"10/s"`,
/// `"5000/h"` or `"3/10s"`. Picklable (as its configuration).
#[pyclass(frozen, module = "palisade._palisade", name = "RateLimiter")]
pub struct RateLimiter {
    config: Config,
    /// This object's limiter in the process that built it: the hot path skips the per-process
    /// map (and hashing the configuration).
    built: Mutex<Option<(u32, Built)>>,
}

impl RateLimiter {
    fn new(config: Config) -> Self {
        RateLimiter {
            config,
            built: Mutex::new(None),
        }
    }

    /// This process's limiter for this object.
    fn built(&self, py: Python<'_>) -> PyResult<Built> {
        let pid = std::process::id();
        {
            let mut slot = self.built.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some((owner, b)) if *owner == pid => return Ok(b.clone()),
                Some(_) => {
                    // Built before a fork: its connection is the parent's.
                    if let Some(inherited) = slot.take() {
                        std::mem::forget(inherited);
                    }
                }
                None => {}
            }
        }
        // Not under the slot's lock: building may connect, with the GIL released, and a thread
        // waiting for the lock while holding the GIL would then never let it be taken back.
        let b = self.config.build(py)?;
        *self.built.lock().unwrap_or_else(|p| p.into_inner()) = Some((pid, b.clone()));
        Ok(b)
    }
}

/// `timeout` seconds as whole milliseconds (> 0).
fn timeout_ms(py: Python<'_>, s: f64) -> PyResult<u64> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .map(|d| d.as_millis().max(1) as u64)
        .ok_or_else(|| errors::config(py, format!("timeout: {s} is not a number of seconds > 0")))
}

#[pymethods]
impl RateLimiter {
    /// A limiter on Redis: every decision is one atomic script timed by Redis's clock.
    /// `algorithm`: "sliding_log" (exact), "sliding_window" (approximate, O(1) memory) or
    /// "gcra" (`burst` units back to back). `on_unavailable`: "closed" (raise `Unavailable`),
    /// "open" (admit) or "local" (decide in this process until Redis is back). With "closed" it
    /// connects now and raises `Unavailable` if Redis is down; with "open" or "local" it connects
    /// at the first decision, so that the policy answers from the start while Redis is down
    /// (with `cluster=True` it waits up to a second for the cluster, then connects in the
    /// background; a refused password raises `AuthError` whatever the policy).
    /// `url`: `redis://` or `rediss://` (TLS; `tls_ca`: a PEM file with the CA to trust instead
    /// of the system's roots, read by each process that uses the limiter); with `cluster=True`,
    /// one node's URL or a list of them (a Redis Cluster; every key's state is in one slot).
    #[staticmethod]
    #[pyo3(signature = (url, limits, *, algorithm="sliding_log", burst=None, prefix="palisade:rl:", on_unavailable="closed", timeout=DEFAULT_TIMEOUT, cluster=false, tls_ca=None))]
    #[allow(clippy::too_many_arguments)]
    fn redis(
        py: Python<'_>,
        url: Urls,
        limits: Limits,
        algorithm: &str,
        burst: Option<u32>,
        prefix: &str,
        on_unavailable: &str,
        timeout: f64,
        cluster: bool,
        tls_ca: Option<String>,
    ) -> PyResult<Self> {
        if url.0.len() != 1 && !cluster {
            return Err(errors::config(
                py,
                "url: several URLs name the nodes of a Redis Cluster: pass cluster=True",
            ));
        }
        if let Some(bad) = url.0.iter().find(|u| u.contains(',')) {
            return Err(errors::config(py, format!("url: {bad:?} contains ','")));
        }
        let l = RateLimiter::new(Config::Redis {
            url: url.0.join(","),
            cluster,
            tls_ca,
            limits: limits.0,
            algorithm: algorithm.to_string(),
            burst,
            prefix: prefix.to_string(),
            on_unavailable: on_unavailable.to_string(),
            timeout_ms: timeout_ms(py, timeout)?,
        });
        l.built(py)?;
        Ok(l)
    }

    /// A limiter for the processes of one host: a sliding log per key in a file under `dir`,
    /// updated under an exclusive `flock`.
    #[staticmethod]
    fn file(py: Python<'_>, dir: String, limits: Limits) -> PyResult<Self> {
        let l = RateLimiter::new(Config::File {
            dir,
            limits: limits.0,
        });
        l.built(py)?;
        Ok(l)
    }

    /// A limiter for this process (GCRA on governor): one limit, `burst` units back to back
    /// (default: the limit's count).
    #[staticmethod]
    #[pyo3(signature = (limits, *, burst=None))]
    fn local(py: Python<'_>, limits: Limits, burst: Option<u32>) -> PyResult<Self> {
        let [limit]: [String; 1] = limits.0.try_into().map_err(|_| {
            errors::config(py, "the local limiter takes one limit, such as \"100/min\"")
        })?;
        let l = RateLimiter::new(Config::Local {
            limit,
            burst,
            id: rand_id(),
        });
        l.built(py)?;
        Ok(l)
    }

    /// Decides `cost` units for `key` now (`cost=0` only looks). Never waits.
    #[pyo3(signature = (key, cost=1))]
    fn check(&self, py: Python<'_>, key: String, cost: u32) -> PyResult<Decision> {
        let built = self.built(py)?;
        let decided = match &built {
            // In memory: no I/O, no runtime, and too short to be worth releasing the GIL.
            Built::Local(l) => l.check_n_now(&key, cost),
            Built::File(l) => py.detach(|| l.check_n_blocking(&key, cost)),
            // On this thread's own connection, driven by this thread: no hop to the runtime.
            Built::Redis(_) => crate::ratelimit_thread::check(py, &self.config, &key, cost)?,
            Built::RedisCluster(l) => block_on(py, async move { l.check_n(&key, cost).await })?,
        };
        decided.map(Decision).map_err(|e| limit_error(py, e))
    }

    /// Waits until `cost` units for `key` are admitted, sleeping (GIL released) for each
    /// denial's `retry_after` rather than polling. With `timeout` (seconds), raises
    /// `RateLimited` as soon as it knows the wait would be longer.
    #[pyo3(signature = (key, cost=1, timeout=None))]
    fn acquire(
        &self,
        py: Python<'_>,
        key: String,
        cost: u32,
        timeout: Option<f64>,
    ) -> PyResult<Decision> {
        let built = self.built(py)?;
        let timeout = timeout.map(|t| seconds(py, t)).transpose()?;
        block_on(py, async move {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            built.acquire(&key, cost, deadline).await
        })?
        .map(Decision)
        .map_err(|e| limit_error(py, e))
    }

    /// `acquire` for asyncio: an awaitable that resolves to the decision. Cancelling it stops
    /// the wait.
    #[pyo3(signature = (key, cost=1, timeout=None))]
    fn acquire_async<'py>(
        &self,
        py: Python<'py>,
        key: String,
        cost: u32,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let built = self.built(py)?;
        let timeout = timeout.map(|t| seconds(py, t)).transpose()?;
        let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
        let future = event_loop.call_method0("create_future")?;
        let (loop_, fut) = (event_loop.unbind(), future.clone().unbind());
        let task = runtime()?.spawn(async move {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let decided = built.acquire(&key, cost, deadline).await;
            Python::attach(|py| {
                let (ok, value) = match decided {
                    Ok(d) => match Py::new(py, Decision(d)) {
                        Ok(d) => (true, d.into_any()),
                        Err(e) => (false, e.into_value(py).into_any()),
                    },
                    Err(e) => (false, limit_error(py, e).into_value(py).into_any()),
                };
                // The loop may be closed by now: then nobody waits for the answer.
                let _ = py
                    .import("palisade._aio")
                    .and_then(|aio| aio.getattr("complete"))
                    .and_then(|complete| {
                        loop_
                            .bind(py)
                            .call_method1("call_soon_threadsafe", (complete, fut, ok, value))
                    });
            });
        });
        let cancel = Py::new(
            py,
            AbortOnCancel {
                task: Mutex::new(Some(task.abort_handle())),
            },
        )?;
        future.call_method1("add_done_callback", (cancel,))?;
        Ok(future)
    }

    /// Forgets `key`'s history (all its limits).
    fn reset(&self, py: Python<'_>, key: String) -> PyResult<()> {
        let built = self.built(py)?;
        match built {
            Built::Local(l) => {
                l.reset(&key);
                Ok(())
            }
            Built::File(l) => py
                .detach(|| l.reset_blocking(&key))
                .map_err(|e| limit_error(py, e)),
            Built::Redis(l) => {
                block_on(py, async move { l.reset(&key).await })?.map_err(|e| limit_error(py, e))
            }
            Built::RedisCluster(l) => {
                block_on(py, async move { l.reset(&key).await })?.map_err(|e| limit_error(py, e))
            }
        }
    }

    /// Rebuilds a pickled limiter without connecting.
    #[staticmethod]
    fn _restore(state: &Bound<'_, PyTuple>) -> PyResult<Self> {
        let kind: String = state.get_item(0)?.extract()?;
        let config = match kind.as_str() {
            "redis" => Config::Redis {
                url: state.get_item(1)?.extract()?,
                limits: state.get_item(2)?.extract()?,
                algorithm: state.get_item(3)?.extract()?,
                burst: state.get_item(4)?.extract()?,
                prefix: state.get_item(5)?.extract()?,
                on_unavailable: state.get_item(6)?.extract()?,
                timeout_ms: state.get_item(7)?.extract()?,
                cluster: state.get_item(8)?.extract()?,
                tls_ca: state.get_item(9)?.extract()?,
            },
            "file" => Config::File {
                dir: state.get_item(1)?.extract()?,
                limits: state.get_item(2)?.extract()?,
            },
            _ => Config::Local {
                limit: state.get_item(1)?.extract()?,
                burst: state.get_item(2)?.extract()?,
                id: state.get_item(3)?.extract()?,
            },
        };
        Ok(RateLimiter::new(config))
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let state = match &slf.get().config {
            Config::Redis {
                url,
                cluster,
                tls_ca,
                limits,
                algorithm,
                burst,
                prefix,
                on_unavailable,
                timeout_ms,
            } => (
                "redis",
                url.clone(),
                limits.clone(),
                algorithm.clone(),
                *burst,
                prefix.clone(),
                on_unavailable.clone(),
                *timeout_ms,
                *cluster,
                tls_ca.clone(),
            )
                .into_pyobject(py)?
                .into_any(),
            Config::File { dir, limits } => ("file", dir.clone(), limits.clone())
                .into_pyobject(py)?
                .into_any(),
            Config::Local { limit, burst, id } => ("local", limit.clone(), *burst, *id)
                .into_pyobject(py)?
                .into_any(),
        };
        let restore = slf.get_type().getattr("_restore")?;
        PyTuple::new(py, [restore, PyTuple::new(py, [state])?.into_any()])
    }

    fn __repr__(&self) -> String {
        match &self.config {
            Config::Redis {
                limits, algorithm, ..
            } => format!("RateLimiter.redis(limits={limits:?}, algorithm={algorithm:?})"),
            Config::File { dir, limits } => format!("RateLimiter.file({dir:?}, {limits:?})"),
            Config::Local { limit, .. } => format!("RateLimiter.local({limit:?})"),
        }
    }
}

fn seconds(py: Python<'_>, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| errors::config(py, format!("timeout: {s} is not a number of seconds >= 0")))
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// URLs given as one string or a list of strings (a cluster's nodes).
struct Urls(Vec<String>);

impl<'a, 'py> FromPyObject<'a, 'py> for Urls {
    type Error = PyErr;

    fn extract(ob: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(one) = ob.extract::<String>() {
            return Ok(Urls(vec![one]));
        }
        match ob.extract::<Vec<String>>() {
            Ok(urls) if !urls.is_empty() => Ok(Urls(urls)),
            _ => Err(errors::config(
                ob.py(),
                "url: expected a redis:// or rediss:// URL, or a list of a cluster's node URLs",
            )),
        }
    }
}

/// Limits given as one string or a list of strings.
struct Limits(Vec<String>);

impl<'a, 'py> FromPyObject<'a, 'py> for Limits {
    type Error = PyErr;

    fn extract(ob: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(one) = ob.extract::<String>() {
            return Ok(Limits(vec![one]));
        }
        ob.extract::<Vec<String>>().map(Limits).map_err(|_| {
            errors::config(
                ob.py(),
                "limits: expected a string such as \"100/min\" or a list of them",
            )
        })
    }
}

/// Cancels the tokio task behind an asyncio future when the future is cancelled.
#[pyclass(frozen, module = "palisade._palisade")]
struct AbortOnCancel {
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

#[pymethods]
impl AbortOnCancel {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.extract::<bool>()?
            && let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            task.abort();
        }
        Ok(())
    }
}

/// A limiter's answer: `allowed`, `remaining`, `retry_after` (seconds, `None` if allowed),
/// `reset_after` (seconds until fully replenished), `limit`, `window` (seconds), and
/// `headers()` (the IETF `RateLimit` response headers).
#[pyclass(frozen, module = "palisade._palisade")]
pub struct Decision(RustDecision);

#[pymethods]
impl Decision {
    /// Whether the request was admitted (and its cost recorded).
    #[getter]
    fn allowed(&self) -> bool {
        self.0.allowed
    }

    /// Units still available in the window after this decision.
    #[getter]
    fn remaining(&self) -> u32 {
        self.0.remaining
    }

    /// If denied: seconds after which the same request would be admitted; `None` if allowed.
    #[getter]
    fn retry_after(&self) -> Option<f64> {
        self.0.retry_after.map(|d| d.as_secs_f64())
    }

    /// Seconds until the limit is fully replenished.
    #[getter]
    fn reset_after(&self) -> f64 {
        self.0.reset_after.as_secs_f64()
    }

    /// The units the limit admits per window.
    #[getter]
    fn limit(&self) -> u32 {
        self.0.limit
    }

    /// The window of the limit this decision describes, in seconds.
    #[getter]
    fn window(&self) -> f64 {
        self.0.window.as_secs_f64()
    }

    /// The IETF `RateLimit-Policy` and `RateLimit` header values, and `Retry-After` when
    /// denied, as a dict of header name to value.
    #[pyo3(signature = (name="default"))]
    fn headers<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        let h = self.0.headers_named(name);
        let d = PyDict::new(py);
        d.set_item("RateLimit-Policy", h.policy)?;
        d.set_item("RateLimit", h.rate_limit)?;
        if let Some(r) = h.retry_after {
            d.set_item("Retry-After", r)?;
        }
        Ok(d)
    }

    fn __bool__(&self) -> bool {
        self.0.allowed
    }

    fn __repr__(&self) -> String {
        let retry_after = self
            .retry_after()
            .map_or_else(|| "None".to_string(), |r| format!("{r:.3}"));
        format!(
            "Decision(allowed={}, remaining={}, retry_after={retry_after}, reset_after={:.3})",
            crate::errors::py_bool(self.0.allowed),
            self.0.remaining,
            self.reset_after()
        )
    }
}
