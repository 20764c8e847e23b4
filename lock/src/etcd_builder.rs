//! `Coordinator::etcd` and the builder it returns.
//!
//! Both live here, above the coordinator and the etcd backend, because each returns the other's
//! type: `Coordinator::etcd` returns the builder and the builder's `connect` returns a
//! `Coordinator`. Neither of those two modules imports this one.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;

use crate::backends::etcd::EtcdBackend;
use crate::coordinator::Coordinator;
use crate::error::LockError;

impl Coordinator {
    /// A builder for a coordinator on etcd. Endpoints, TLS and user/password are set on the
    /// `etcd_client::Client` (through `etcd_client::ConnectOptions`). Connect it with
    /// `ConnectOptions::with_require_leader(true)` (the `palisade` CLI does): then a member cut
    /// off from its cluster fails watches and requests at once instead of leaving a waiter
    /// watching a member that can no longer tell it anything.
    pub fn etcd(client: Client) -> EtcdBuilder {
        EtcdBuilder {
            client,
            namespace: "palisade/".into(),
            lease_ttl: Duration::from_secs(10),
            etcdctl_layout: false,
        }
    }
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
        let backend = EtcdBackend::connect(
            self.client,
            self.namespace,
            self.lease_ttl,
            self.etcdctl_layout,
        )
        .await?;
        Ok(Coordinator::from_backend(Arc::new(backend)))
    }
}
