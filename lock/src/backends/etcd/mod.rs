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
//! - `sem/<name>/queue/<lease-hex>[-<n>]`: a semaphore's queue, the lock recipe again; its head
//!   takes a slot `sem/<name>/slot/<permits>/<lease-hex>[-<n>]` (see `sem`).
//! - `jobs/run/<lock>`: a running job (`JobInfo` as JSON) on the session's lease.
//! - `jobs/done/<lock>`: written in the same transaction that deletes `jobs/run/<lock>` when the
//!   job finishes, so watchers can tell `Finished` from `Expired`.
//!
//! Modules, each using only those listed before it: `stats` (request counters), `rpc` (the
//! retry loop), `slots` (key names), `session` (the lease and its keepalive), `watch` (a watch
//! that resumes where it left off), `backend` (the client, configuration and current session),
//! `held` (a held lock), `lock` (the recipe), `sem` (a semaphore's slots), `registry` (jobs and observers); the
//! `LockBackend` impl below puts them together.

mod backend;
mod held;
mod lock;
mod registry;
mod rpc;
mod sem;
mod session;
mod slots;
#[doc(hidden)]
pub mod stats;
mod watch;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub(crate) use self::backend::EtcdBackend;
use self::rpc::{budget, lease_gone, retry};
use self::stats::count_request;
use crate::backend::{
    HeldLock, Holder, Kind, LockBackend, Registration, SlotTry, Wait, sealed::Sealed,
};
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::Session;

impl Sealed for EtcdBackend {}

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

    async fn contenders(&self, kind: Kind, name: &str) -> Result<Vec<Holder>, LockError> {
        lock::contenders(&self.client, &self.prefix(kind, name), self.rpc_timeout()).await
    }

    async fn break_lock(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        lock::break_holder(&self.client, &self.prefix(kind, name), self.rpc_timeout()).await
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

    async fn take_slot(
        &self,
        name: &str,
        permits: u32,
        value: Vec<u8>,
        queue: &dyn HeldLock,
    ) -> Result<SlotTry, LockError> {
        sem::take_slot(self, name, permits, value, queue).await
    }

    async fn slot_freed(&self, name: &str, seen: u64) -> Result<(), LockError> {
        sem::slot_freed(self, name, seen).await
    }

    async fn slot_holders(&self, name: &str) -> Result<Vec<Holder>, LockError> {
        sem::slot_holders(self, name).await
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
