//! The etcd backend's state: the client, its configuration and the current session. The lock
//! recipe and the registry work on it; its `LockBackend` impl (in `mod.rs`) puts them together.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;

use super::session::EtcdSession;
use super::slots::Slots;
use crate::backend::Kind;
use crate::error::LockError;

/// The etcd backend: one client, one namespace, one session lease at a time.
pub(crate) struct EtcdBackend {
    pub(super) client: Client,
    pub(super) ns: String,
    /// Lock keys as etcd's own recipe lays them out (see
    /// [`EtcdBuilder::etcdctl_layout`](crate::EtcdBuilder::etcdctl_layout)).
    etcdctl_layout: bool,
    ttl: Duration,
    /// The session new locks are taken under; replaced when lost.
    session: tokio::sync::Mutex<Option<Arc<EtcdSession>>>,
    /// The same, for synchronous `session()`.
    pub(super) current: std::sync::Mutex<Option<Arc<EtcdSession>>>,
    pub(super) slots: Arc<Slots>,
}

impl EtcdBackend {
    /// A backend on `client` whose session lease is granted (configuration validated by the
    /// builder).
    pub(crate) async fn connect(
        client: Client,
        ns: String,
        ttl: Duration,
        etcdctl_layout: bool,
    ) -> Result<Self, LockError> {
        let backend = EtcdBackend {
            client,
            ns,
            etcdctl_layout,
            ttl,
            session: tokio::sync::Mutex::new(None),
            current: std::sync::Mutex::new(None),
            slots: Arc::new(Slots::default()),
        };
        backend.ensure_session().await?;
        Ok(backend)
    }

    /// The current session, or a new one if it was lost.
    pub(super) async fn ensure_session(&self) -> Result<Arc<EtcdSession>, LockError> {
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
    pub(super) fn rpc_timeout(&self) -> Duration {
        (self.ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(5))
    }

    /// The key prefix under which the contenders for `name` put their keys.
    pub(super) fn prefix(&self, kind: Kind, name: &str) -> String {
        let k = match kind {
            Kind::Lock if self.etcdctl_layout => return format!("{name}/"),
            Kind::Lock => "lock",
            Kind::Election => "election",
            Kind::Semaphore => return format!("{}sem/{name}/queue/", self.ns),
        };
        format!("{}{k}/{name}/", self.ns)
    }

    /// The key prefix under which the holders of semaphore `name` put their slot keys, each
    /// under `<permits>/` (so holders that disagree about the permits can tell).
    pub(super) fn slot_prefix(&self, name: &str) -> String {
        format!("{}sem/{name}/slot/", self.ns)
    }
}
