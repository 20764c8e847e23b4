//! The etcd backend: etcd's revision-ordered lock recipe on a kept-alive session lease.
//!
//! Keys (under the namespace, `palisade/` by default):
//! - `lock/<name>/<lease-hex>` (`<lease-hex>-<n>` when several tasks of one session contend
//!   for the same name at once): one key per holder or waiter, on the session's lease. The owner
//!   is the key with the lowest create revision; that revision is the fencing token. Key names
//!   are reused (as etcd's own recipe does), so the set of distinct keys, which every range over
//!   the prefix walks until a compaction, stays as small as the number of sessions.
//! - `election/<name>/<lease-hex>[-<n>]`: the same recipe for leader election, the value being
//!   the candidate's.
//! - `jobs/run/<lock>`: a running job (`JobInfo` as JSON) on the session's lease.
//! - `jobs/done/<lock>`: written in the same transaction that deletes `jobs/run/<lock>` when the
//!   job finishes, so watchers can tell `Finished` from `Expired`.

mod lock;
mod registry;
mod session;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::Client;
use futures::stream::BoxStream;

use crate::backend::{HeldLock, Holder, Kind, LockBackend, Registration};
use crate::coordinator::{Coordinator, Wait};
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::{Liveness, Session};

use self::session::EtcdSession;

/// Requests this process sent to etcd through palisade-lock (keepalives excluded).
static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// Times a waiter woke up because the key it watched was deleted.
static WAKEUPS: AtomicU64 = AtomicU64::new(0);

/// Times a registry watch or observer re-read everything after a compaction.
static RESYNCS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn count_resync() {
    RESYNCS.fetch_add(1, Ordering::Relaxed);
}

/// Counters for tests and benchmarks.
#[doc(hidden)]
pub mod stats {
    use super::*;
    /// Requests sent to etcd by the lock, registry and election code of this process.
    pub fn requests() -> u64 {
        REQUESTS.load(Ordering::Relaxed)
    }
    /// Re-reads of registry watches and observers after a compaction.
    pub fn resyncs() -> u64 {
        RESYNCS.load(Ordering::Relaxed)
    }
    /// Wake-ups of waiters by a deletion they watched.
    pub fn wakeups() -> u64 {
        WAKEUPS.load(Ordering::Relaxed)
    }
}

pub(crate) fn count_request() {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
}

/// Builds a [`Coordinator`] on etcd: `Coordinator::etcd(client).namespace("palisade/")
/// .lease_ttl(Duration::from_secs(10)).connect().await`.
#[derive(Clone)]
#[must_use]
pub struct EtcdBuilder {
    client: Client,
    namespace: String,
    lease_ttl: Duration,
    etcdctl_layout: bool,
}

impl std::fmt::Debug for EtcdBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBuilder")
            .field("namespace", &self.namespace)
            .field("lease_ttl", &self.lease_ttl)
            .field("etcdctl_layout", &self.etcdctl_layout)
            .finish_non_exhaustive()
    }
}

impl EtcdBuilder {
    pub(crate) fn new(client: Client) -> Self {
        EtcdBuilder {
            client,
            namespace: "palisade/".into(),
            lease_ttl: Duration::from_secs(10),
            etcdctl_layout: false,
        }
    }

    /// Lock keys in the layout of etcd's own lock recipe (Go's `concurrency.Mutex`, which
    /// `etcdctl lock NAME` uses): `NAME/<lease id in hex>`, outside the namespace, the owner
    /// being the key with the lowest create revision. palisade locks and Go or `etcdctl`
    /// holders of the same name then exclude each other, in one queue. A Go holder stores no
    /// value: `try_lock` reports it as `LockError::Held { holder: None }`, with no job in the
    /// registry (`palisade jobs` does not list it). Off by default; elections and the registry
    /// keep the namespace either way.
    pub fn etcdctl_layout(mut self, on: bool) -> Self {
        self.etcdctl_layout = on;
        self
    }

    /// The key prefix for everything this coordinator writes (default `palisade/`). Give each
    /// application its own, and grant its etcd user access to that prefix only.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The session lease TTL (default 10 s; whole seconds, at least 2). A holder whose process
    /// stops or loses etcd for longer loses its locks; a shorter TTL frees them sooner after a
    /// crash but tolerates shorter pauses.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Validates the configuration, grants the session lease and starts its keepalive.
    pub async fn connect(self) -> Result<Coordinator, LockError> {
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl.subsec_nanos() != 0 {
            return Err(LockError::Config {
                field: "lease_ttl",
                reason: format!(
                    "{:?} is not a whole number of seconds of at least 2 s (etcd lease TTLs are whole seconds)",
                    self.lease_ttl
                ),
            });
        }
        if self.namespace.chars().any(char::is_control) {
            return Err(LockError::Config {
                field: "namespace",
                reason: "contains control characters".into(),
            });
        }
        let backend = EtcdBackend {
            client: self.client,
            ns: self.namespace,
            etcdctl_layout: self.etcdctl_layout,
            ttl: self.lease_ttl,
            session: tokio::sync::Mutex::new(None),
            current: std::sync::Mutex::new(None),
            slots: Arc::new(Slots::default()),
        };
        backend.ensure_session().await?;
        Ok(Coordinator::from_backend(Arc::new(backend)))
    }
}

pub(crate) struct EtcdBackend {
    client: Client,
    ns: String,
    /// Lock keys as etcd's own recipe lays them out (see [`EtcdBuilder::etcdctl_layout`]).
    etcdctl_layout: bool,
    ttl: Duration,
    /// The session new locks are taken under; replaced when lost.
    session: tokio::sync::Mutex<Option<Arc<EtcdSession>>>,
    /// The same, for synchronous `session()`.
    current: std::sync::Mutex<Option<Arc<EtcdSession>>>,
    slots: Arc<Slots>,
}

/// Which key names each (lease, prefix) uses now. A name is reused only once its previous key
/// is known to be deleted: otherwise the acquire transaction ("create unless it exists") would
/// find the old key and take it for ours.
#[derive(Default)]
pub(crate) struct Slots(std::sync::Mutex<HashMap<(i64, String), BTreeSet<u32>>>);

impl Slots {
    pub(crate) fn take(self: &Arc<Self>, lease: i64, prefix: &str) -> Slot {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let used = map.entry((lease, prefix.to_string())).or_default();
        let index = (0..).find(|i| !used.contains(i)).unwrap_or(u32::MAX);
        used.insert(index);
        Slot {
            table: self.clone(),
            lease,
            prefix: prefix.to_string(),
            index,
            deleted: false,
        }
    }
}

/// One key name in use. Dropping it frees the name only if `deleted` was set (the key is gone
/// from etcd, or the lease is); a name whose key may survive stays taken.
pub(crate) struct Slot {
    table: Arc<Slots>,
    lease: i64,
    prefix: String,
    index: u32,
    deleted: bool,
}

impl Slot {
    /// Records whether the key is known to be gone (so the name may be reused on drop).
    pub(crate) fn set_deleted(&mut self, deleted: bool) {
        self.deleted = deleted;
    }

    pub(crate) fn key(&self) -> String {
        match self.index {
            0 => format!("{}{:016x}", self.prefix, self.lease),
            n => format!("{}{:016x}-{n}", self.prefix, self.lease),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.deleted {
            return;
        }
        let mut map = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (self.lease, std::mem::take(&mut self.prefix));
        if let Some(used) = map.get_mut(&key) {
            used.remove(&self.index);
            if used.is_empty() {
                map.remove(&key);
            }
        }
    }
}

impl EtcdBackend {
    /// The current session, or a new one if it was lost.
    async fn ensure_session(&self) -> Result<Arc<EtcdSession>, LockError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.liveness.is_lost()) {
            return Ok(s.clone());
        }
        let session = EtcdSession::grant(self.client.clone(), self.ttl, self.rpc_timeout()).await?;
        *slot = Some(session.clone());
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.clone());
        Ok(session)
    }

    /// The time one request may take before we retry it (elsewhere, with a new connection).
    fn rpc_timeout(&self) -> Duration {
        (self.ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(5))
    }

    fn prefix(&self, kind: Kind, name: &str) -> String {
        let k = match kind {
            Kind::Lock if self.etcdctl_layout => return format!("{name}/"),
            Kind::Lock => "lock",
            Kind::Election => "election",
        };
        format!("{}{k}/{name}/", self.ns)
    }
}

/// Whether an etcd error may go away on retry (connection lost, leader change, timeout).
pub(crate) fn transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        // gRPC codes: CANCELLED 1, UNKNOWN 2, DEADLINE_EXCEEDED 4, ABORTED 10, INTERNAL 13,
        // UNAVAILABLE 14 (numbers, to avoid depending on tonic for its enum).
        E::GRpcStatus(s) => matches!(i32::from(s.code()), 1 | 2 | 4 | 10 | 13 | 14),
        _ => false,
    }
}

/// Whether etcd refused a request because our lease no longer exists.
pub(crate) fn lease_gone(e: &etcd_client::Error) -> bool {
    // gRPC NOT_FOUND (5) with etcd's ErrLeaseNotFound message.
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if i32::from(s.code()) == 5 && s.message().contains("lease not found"))
}

/// Whether a TLS handshake failed on a certificate (ours or the server's): retrying cannot help.
#[cfg(feature = "tls")]
pub(crate) fn certificate_refused(e: &etcd_client::Error) -> bool {
    use rustls::AlertDescription as A;
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    // etcd_client::Error has no `source()`: start from the error it wraps.
    let mut next: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(transport) => Some(transport),
        etcd_client::Error::IoError(io) => Some(io),
        _ => return false,
    };
    // Bounded: error chains are short.
    for _ in 0..32 {
        let Some(mut current) = next else {
            return false;
        };
        if let Some(shared) = current.downcast_ref::<Shared>() {
            current = &**shared;
        }
        match current.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(_)) => return true,
            Some(rustls::Error::AlertReceived(
                A::BadCertificate
                | A::CertificateExpired
                | A::CertificateRequired
                | A::CertificateRevoked
                | A::CertificateUnknown
                | A::UnknownCA
                | A::UnsupportedCertificate,
            )) => return true,
            _ => {}
        }
        // `io::Error::source` skips the error it wraps (tonic's connect errors wrap rustls's).
        let wrapped = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        next = wrapped.or_else(|| current.source());
    }
    false
}

/// Without the `tls` feature there is no TLS: no certificate can be refused.
#[cfg(not(feature = "tls"))]
pub(crate) fn certificate_refused(_e: &etcd_client::Error) -> bool {
    false
}

/// A backoff schedule for retries against etcd.
pub(crate) fn backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs one request with a timeout, retrying transient failures with backoff until `give_up`
/// says stop (session lost, budget spent). Each attempt counts as one request. A request refused
/// because our lease is gone fails with [`LockError::Lost`].
pub(crate) async fn retry<T, F, Fut>(
    op: &'static str,
    rpc_timeout: Duration,
    give_up: impl Fn() -> bool,
    mut f: F,
) -> Result<T, LockError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delays = backoff();
    loop {
        count_request();
        let err = match tokio::time::timeout(rpc_timeout, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if lease_gone(&e) => return Err(LockError::Lost),
            Ok(Err(e)) if certificate_refused(&e) => {
                return Err(LockError::Tls {
                    op,
                    source: Box::new(e),
                });
            }
            Ok(Err(e)) if transient(&e) => LockError::backend(op, e),
            Ok(Err(e)) => return Err(LockError::backend(op, e)),
            Err(elapsed) => LockError::backend(op, elapsed),
        };
        if give_up() {
            return Err(err);
        }
        tracing::debug!(op, error = %err, "etcd request failed; retrying");
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
    }
}

/// A give-up rule: after `budget` has passed.
pub(crate) fn budget(budget: Duration) -> impl Fn() -> bool {
    let start = tokio::time::Instant::now();
    move || start.elapsed() >= budget
}

/// A give-up rule: once the session is lost.
pub(crate) fn while_alive(liveness: &Arc<Liveness>) -> impl Fn() -> bool + use<> {
    let liveness = liveness.clone();
    move || liveness.is_lost()
}

#[async_trait]
impl LockBackend for EtcdBackend {
    async fn close(&self) -> Result<(), LockError> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(session) = current else {
            return Ok(());
        };
        session.liveness.mark_lost();
        let mut client = self.client.clone();
        count_request();
        match tokio::time::timeout(self.rpc_timeout(), client.lease_revoke(session.lease)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if lease_gone(&e) => Ok(()),
            Ok(Err(e)) => Err(LockError::Backend {
                op: "revoke lease",
                source: e.into(),
            }),
            Err(_) => Err(LockError::Backend {
                op: "revoke lease",
                source: format!("etcd did not answer within {:?}", self.rpc_timeout()).into(),
            }),
        }
    }

    fn session(&self) -> Session {
        match self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(s) => s.handle(),
            None => Session::forever(),
        }
    }

    async fn acquire(
        &self,
        kind: Kind,
        name: &str,
        value: Vec<u8>,
        wait: Wait,
    ) -> Result<Box<dyn HeldLock>, LockError> {
        // Every wait is bounded, also when etcd does not answer at all (partitioned, paused,
        // down): the lease grant and the put are retried inside, and without this bound they
        // would go on for up to a TTL. An acquire cut short here leaves no key behind (its
        // pending key is deleted in the background, see lock.rs).
        let bound = match wait {
            Wait::No => Some(self.rpc_timeout()),
            Wait::Up(d) => Some(d + self.rpc_timeout()),
            Wait::Forever => None,
        };
        let acquire = lock::acquire(self, kind, name, value, wait);
        match bound {
            None => acquire.await,
            Some(bound) => match tokio::time::timeout(bound, acquire).await {
                Ok(result) => result,
                Err(_) => Err(LockError::Backend {
                    op: "acquire lock",
                    source: format!("etcd did not answer within {bound:?}").into(),
                }),
            },
        }
    }

    async fn holder(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        lock::holder(&self.client, &self.prefix(kind, name), self.rpc_timeout()).await
    }

    async fn queue_len(&self, kind: Kind, name: &str) -> Result<usize, LockError> {
        let prefix = self.prefix(kind, name);
        let resp = retry(
            "count waiters",
            self.rpc_timeout(),
            budget(self.rpc_timeout() * 3),
            || {
                let mut c = self.client.clone();
                let prefix = prefix.clone();
                async move {
                    c.get(
                        prefix,
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_count_only(),
                        ),
                    )
                    .await
                }
            },
        )
        .await?;
        Ok(usize::try_from(resp.count()).unwrap_or(0).saturating_sub(1))
    }

    fn observe(&self, kind: Kind, name: &str) -> BoxStream<'static, Option<Holder>> {
        registry::observe(
            self.client.clone(),
            self.prefix(kind, name),
            self.rpc_timeout(),
        )
    }

    async fn register(&self, job: JobInfo) -> Result<Box<dyn Registration>, LockError> {
        let session = self.ensure_session().await?;
        let result = registry::register(self, &session, job).await;
        if matches!(result, Err(LockError::Lost)) {
            session.liveness.mark_lost();
        }
        result
    }

    async fn running(&self) -> Result<Vec<JobInfo>, LockError> {
        registry::running(self).await
    }

    fn watch_jobs(&self) -> BoxStream<'static, JobEvent> {
        registry::watch(self.client.clone(), self.ns.clone(), self.rpc_timeout())
    }
}
