//! The distributed engine: one atomic Lua script per decision on Redis or Redis Cluster.

mod cache;
mod connect;
mod keys;
pub(crate) mod scripts;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionLike, ConnectionManager};
use tokio::time::Instant;

use crate::algorithm::{Params, Verdict};
use crate::{Algorithm, Decision, Error, Limit, LocalLimiter, RateLimiter, stats};
use cache::DenialCache;
use connect::classify;
pub use connect::{connect, connect_cluster, connect_cluster_lazy, connect_lazy, is_refusal};
#[cfg(feature = "tls")]
pub use connect::{connect_with_tls, connect_with_tls_lazy};

static SLIDING_LOG: LazyLock<Script> =
    LazyLock::new(|| Script::new(&scripts::full(scripts::SLIDING_LOG)));
static WINDOW_COUNTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(&scripts::full(scripts::WINDOW_COUNTER)));
static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(&scripts::full(scripts::GCRA)));

/// The default bound on one decision's round trip.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// What a [`RedisLimiter`] answers when Redis is unreachable or does not answer within
/// `.timeout`.
#[derive(Debug, Clone, Default)]
pub enum Policy {
    /// Admit the request (a decision with `allowed: true`, `remaining` = the limit, no
    /// `server_time`). Availability over protection.
    FailOpen,
    /// Return [`Error::Timeout`] or [`Error::Unavailable`]: nothing is admitted while Redis is
    /// away, and the caller learns why. The default.
    #[default]
    FailClosed,
    /// Decide with this in-process limiter until Redis is back (each process then enforces the
    /// limit on its own, so a fleet of N admits up to N times the limit meanwhile).
    Local(LocalLimiter),
}

/// A rate limiter shared by every process that uses the same Redis and prefix.
///
/// Each decision is one `EVALSHA` of an atomic Lua script (reloaded by itself after `NOSCRIPT`,
/// e.g. after a restart, failover or `SCRIPT FLUSH`), timed by the server's clock. The Redis keys
/// of one user key are `<prefix>{<key>}:<algorithm>:<window µs>` (the user key escaped so that it
/// holds no brace): they share one hash tag, so several limits are decided together on Redis
/// Cluster too, and no two (prefix, key) pairs share a Redis key. `max` is not part of the key, so
/// a changed `max` applies to the history already recorded; a changed window starts an empty
/// history for that limit. Cloning is cheap and shares the connection.
///
/// `C` is the connection: a [`ConnectionManager`] for standalone Redis (see [`connect`]), a
/// [`redis::cluster_async::ClusterConnection`] for Redis Cluster (see [`connect_cluster`]), or
/// any other cloneable async connection.
pub struct RedisLimiter<C = ConnectionManager> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for RedisLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<C> std::fmt::Debug for RedisLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.inner.prefix)
            .field("limits", &self.inner.limits)
            .field("algorithm", &self.inner.algorithm)
            .field("timeout", &self.inner.timeout)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

struct Inner<C> {
    conn: C,
    prefix: String,
    limits: Vec<Limit>,
    algorithm: Algorithm,
    /// `max, window_us, burst` of every limit, as script arguments, in order.
    args: Vec<i64>,
    /// The key suffix of every limit: algorithm and window, not `max` (see [`keys`]).
    suffixes: Vec<String>,
    /// The window of every limit (µs), for `reset`.
    windows: Vec<i64>,
    /// What each limit reports in a `Decision`: its capacity and window.
    reported: Vec<(u32, Duration)>,
    capacity: u32,
    script: &'static Script,
    policy: Policy,
    timeout: Duration,
    cache: Option<DenialCache>,
}

/// Configures a [`RedisLimiter`]; see [`RedisLimiter::builder`].
#[derive(Debug)]
#[must_use]
pub struct RedisLimiterBuilder<C> {
    conn: C,
    limits: Vec<Limit>,
    algorithm: Algorithm,
    prefix: String,
    policy: Policy,
    timeout: Duration,
    cache_denials: bool,
}

impl<C> RedisLimiterBuilder<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Adds one limit (call several times, or use [`limits`](Self::limits), to decide several
    /// limits together).
    pub fn limit(mut self, limit: Limit) -> Self {
        self.limits.push(limit);
        self
    }

    /// Adds several limits, decided together and atomically: a request is admitted only if
    /// every limit admits it, and nothing is recorded in any of them otherwise.
    pub fn limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        self.limits.extend(limits);
        self
    }

    /// The algorithm (default: [`Algorithm::SlidingLog`], exact).
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// The namespace of every key this limiter writes (default `palisade:rl`). Limiters with the
    /// same prefix, limits and algorithm share their counts.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// What to answer when Redis is unreachable or slow (default [`Policy::FailClosed`]).
    pub fn on_unavailable(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The bound on one decision's round trip (default 500 ms); past it the policy answers.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Remember denials in this process: a key denied with `retry_after = t` is denied locally
    /// for `t` (for the same or a larger cost) without asking Redis. Default off.
    pub fn cache_denials(mut self, on: bool) -> Self {
        self.cache_denials = on;
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<RedisLimiter<C>, Error> {
        if self.limits.is_empty() {
            return Err(Error::InvalidConfig {
                field: "limits",
                reason: "is empty; add at least one with `.limit(Limit::per_second(..)?)`".into(),
            });
        }
        if self.limits.len() > 16 {
            return Err(Error::InvalidConfig {
                field: "limits",
                reason: format!(
                    "has {} limits; at most 16 are decided together",
                    self.limits.len()
                ),
            });
        }
        for (i, a) in self.limits.iter().enumerate() {
            if let Some(b) = self.limits[..i].iter().find(|b| b.window() == a.window()) {
                return Err(Error::InvalidConfig {
                    field: "limits",
                    reason: format!(
                        "has two limits with the window {:?} ({b:?} and {a:?}); the stricter alone decides, keep only it",
                        a.window()
                    ),
                });
            }
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(Error::InvalidConfig {
                field: "prefix",
                reason: "must be non-empty and contain no `{` or `}` (they delimit the Cluster hash tag)".into(),
            });
        }
        if self.timeout.is_zero() {
            return Err(Error::InvalidConfig {
                field: "timeout",
                reason: "must be longer than zero".into(),
            });
        }
        let (script, burst): (&'static Script, Option<u32>) = match self.algorithm {
            Algorithm::SlidingLog => (&SLIDING_LOG, None),
            Algorithm::SlidingWindowCounter => (&WINDOW_COUNTER, None),
            Algorithm::Gcra { burst: 0 } => {
                return Err(Error::InvalidConfig {
                    field: "algorithm",
                    reason: "Gcra { burst: 0 } admits nothing; burst must be at least 1".into(),
                });
            }
            Algorithm::Gcra { burst } => (&GCRA, Some(burst)),
        };
        let mut args = Vec::new();
        let mut suffixes = Vec::new();
        let mut reported = Vec::new();
        for l in &self.limits {
            let p = Params {
                max: l.max(),
                window_us: l.window_us(),
                burst: burst.unwrap_or(l.max()),
            };
            args.extend([i64::from(p.max), p.window_us, i64::from(p.burst)]);
            suffixes.push(keys::suffix(self.algorithm, p.window_us));
            reported.push(match burst {
                None => (l.max(), l.window()),
                Some(b) => {
                    let t = crate::algorithm::Gcra::emission_us(&p) as u64;
                    (b, Duration::from_micros(t * u64::from(b)))
                }
            });
        }
        let capacity = reported.iter().map(|r| r.0).min().unwrap_or(1);
        let windows = self.limits.iter().map(Limit::window_us).collect();
        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                conn: self.conn,
                prefix: self.prefix,
                limits: self.limits,
                algorithm: self.algorithm,
                args,
                windows,
                suffixes,
                reported,
                capacity,
                script,
                policy: self.policy,
                timeout: self.timeout,
                cache: self.cache_denials.then(DenialCache::default),
            }),
        })
    }
}

impl<C> RedisLimiter<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Starts configuring a limiter over `conn`.
    pub fn builder(conn: C) -> RedisLimiterBuilder<C> {
        RedisLimiterBuilder {
            conn,
            limits: Vec::new(),
            algorithm: Algorithm::default(),
            prefix: "palisade:rl".into(),
            policy: Policy::default(),
            timeout: DEFAULT_TIMEOUT,
            cache_denials: false,
        }
    }

    /// The limits decided together, in order.
    pub fn limits(&self) -> &[Limit] {
        &self.inner.limits
    }

    /// The most units one request may cost (the smallest capacity among the limits).
    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    /// The SHA1 of the script this limiter calls with `EVALSHA`.
    pub fn script_sha(&self) -> &'static str {
        self.inner.script.get_hash()
    }

    /// The Redis keys of `key`'s limits, in order (all in one Cluster slot).
    pub fn redis_keys(&self, key: &str) -> Vec<String> {
        let base = keys::base(&self.inner.prefix, key);
        self.inner
            .suffixes
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect()
    }

    /// Clears `key`: deletes (`UNLINK`) its Redis keys for every limit of this limiter under
    /// every algorithm, forgets its remembered denial, and clears it in a [`Policy::Local`]
    /// fallback limiter. Other processes' denial caches still deny it until their cached
    /// `retry_after` passes (see `cache_denials`). Not subject to the unavailability policy: an
    /// unreachable Redis is an error.
    pub async fn reset(&self, key: &str) -> Result<(), Error> {
        if let Some(cache) = &self.inner.cache {
            cache.remove(key);
        }
        if let Policy::Local(local) = &self.inner.policy {
            local.reset(key);
        }
        let base = keys::base(&self.inner.prefix, key);
        let mut cmd = redis::cmd("UNLINK");
        for w in &self.inner.windows {
            for a in keys::ALL {
                cmd.arg(format!("{base}{}", keys::suffix(a, *w)));
            }
        }
        let mut conn = self.inner.conn.clone();
        let unlinked = tokio::time::timeout(self.inner.timeout, cmd.query_async::<i64>(&mut conn));
        match unlinked.await {
            Err(_elapsed) => Err(Error::Timeout(self.inner.timeout)),
            Ok(Err(e)) => Err(classify(e)),
            Ok(Ok(_)) => {
                tracing::info!(key, "rate limit: key reset");
                Ok(())
            }
        }
    }

    /// The arguments of one script call (after the keys): time (empty = server `TIME`), cost,
    /// then `max, window_us, burst` per limit.
    fn invocation(
        &self,
        key: &str,
        n: u32,
        now_us: Option<i64>,
    ) -> redis::ScriptInvocation<'static> {
        let mut inv = self.inner.script.prepare_invoke();
        for k in self.redis_keys(key) {
            inv.key(k);
        }
        match now_us {
            Some(t) => inv.arg(t),
            None => inv.arg(""),
        };
        inv.arg(n);
        inv.arg(&self.inner.args[..]);
        inv
    }

    async fn run_script(&self, key: &str, n: u32, now_us: Option<i64>) -> Result<Decision, Error> {
        let inv = self.invocation(key, n, now_us);
        let mut conn = self.inner.conn.clone();
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let reply: Vec<i64> =
            match tokio::time::timeout(self.inner.timeout, inv.invoke_async(&mut conn)).await {
                Err(_elapsed) => return Err(Error::Timeout(self.inner.timeout)),
                Ok(Err(e)) => return Err(classify(e)),
                Ok(Ok(reply)) => reply,
            };
        #[cfg(feature = "metrics")]
        metrics::histogram!("palisade_ratelimit_redis_seconds")
            .record(started.elapsed().as_secs_f64());
        self.parse(&reply)
    }

    fn parse(&self, reply: &[i64]) -> Result<Decision, Error> {
        let n = self.inner.limits.len();
        if reply.len() != 2 + 3 * n {
            return Err(Error::UnexpectedReply(format!(
                "{} integers for {n} limits",
                reply.len()
            )));
        }
        let verdicts: Vec<Verdict> = reply[2..]
            .chunks_exact(3)
            .map(|c| Verdict {
                allowed: c[1] == 0,
                remaining: c[0].clamp(0, i64::from(u32::MAX)) as u32,
                retry_after_us: c[1],
                reset_after_us: c[2],
            })
            .collect();
        let allowed = reply[0] == 1;
        let server_time = Duration::from_micros(reply[1].max(0) as u64);
        Ok(Decision::combine(
            allowed,
            &verdicts,
            &self.inner.reported,
            Some(server_time),
        ))
    }

    /// Any cost up to the capacity; 0 is a peek.
    fn validate_cost(&self, n: u32) -> Result<(), Error> {
        if n > self.inner.capacity {
            return Err(Error::CostExceedsLimit {
                cost: n,
                capacity: self.inner.capacity,
            });
        }
        Ok(())
    }

    /// Decides with an injected time (µs) instead of the server's clock; tests only.
    #[cfg(test)]
    pub(crate) async fn check_at(
        &self,
        key: &str,
        n: u32,
        now_us: i64,
    ) -> Result<(bool, Vec<Verdict>), Error> {
        self.validate_cost(n)?;
        let inv = self.invocation(key, n, Some(now_us));
        let mut conn = self.inner.conn.clone();
        let reply: Vec<i64> = inv.invoke_async(&mut conn).await.map_err(Error::Redis)?;
        let verdicts = reply[2..]
            .chunks_exact(3)
            .map(|c| Verdict {
                allowed: c[1] == 0,
                remaining: c[0] as u32,
                retry_after_us: c[1],
                reset_after_us: c[2],
            })
            .collect();
        Ok((reply[0] == 1, verdicts))
    }

    async fn decide(&self, key: &str, n: u32) -> Result<Decision, Error> {
        self.validate_cost(n)?;
        if let Some(cache) = &self.inner.cache
            && let Some(d) = cache.lookup(key, n, Instant::now())
        {
            stats::decided(&self.inner.prefix, n, &d); // never a peek: n >= the cached cost > 0
            return Ok(d);
        }
        match self.run_script(key, n, None).await {
            Ok(d) => {
                if n == 0 {
                    return Ok(d);
                }
                if !d.allowed
                    && let (Some(cache), Some(retry)) = (&self.inner.cache, d.retry_after)
                {
                    cache.insert(key, n, d, Instant::now() + retry);
                }
                stats::decided(&self.inner.prefix, n, &d);
                if !d.allowed {
                    tracing::debug!(key, cost = n, retry_after = ?d.retry_after, "rate limit: denied");
                }
                Ok(d)
            }
            Err(e @ (Error::Timeout(_) | Error::Unavailable(_))) => {
                tracing::warn!(key, error = %e, policy = ?self.inner.policy_name(), "rate limit: Redis unavailable, applying policy");
                let answer = match &self.inner.policy {
                    Policy::FailClosed => Err(e),
                    Policy::FailOpen => {
                        let (limit, window) = self.inner.reported[0];
                        Ok(Decision {
                            allowed: true,
                            limit,
                            remaining: limit,
                            retry_after: None,
                            reset_after: Duration::ZERO,
                            window,
                            server_time: None,
                        })
                    }
                    Policy::Local(local) => local.check_n_now(key, n),
                };
                if n > 0 {
                    // Peeks count nothing, here as when Redis answers.
                    let admitted = answer.as_ref().ok().map(|d| d.allowed);
                    stats::unavailable(&self.inner.prefix, admitted);
                }
                answer
            }
            Err(e) => Err(e),
        }
    }
}

impl<C> Inner<C> {
    fn policy_name(&self) -> &'static str {
        match self.policy {
            Policy::FailOpen => "fail_open",
            Policy::FailClosed => "fail_closed",
            Policy::Local(_) => "local",
        }
    }
}

impl<C> RateLimiter for RedisLimiter<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn check_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send {
        use tracing::Instrument;
        let span = tracing::debug_span!("ratelimit.decide", key, cost = n);
        self.decide(key, n).instrument(span)
    }
}
