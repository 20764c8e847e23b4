//! A held lock on etcd: its key, which it watches so that it learns at once when the key goes,
//! and the conditional delete that releases it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};

use super::rpc::{retry, while_alive};
use super::session::EtcdSession;
use super::slots::Slot;
use super::stats::count_request;
use super::watch::{ResumableWatch, Watched};
use crate::backend::{HeldLock, LostSignalHandle, sealed::Sealed};
use crate::error::LockError;
use crate::session::{Liveness, LostSignal};

/// The comparison "`key` still has create revision `rev`", i.e. it is still the same key.
pub(super) fn owned_by(key: &str, rev: i64) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, rev)
}

/// Deletes `key` if `compare` holds (it still has our create revision, or is still on our
/// lease): never a newer holder's key, even when a lost response makes us retry.
pub(super) async fn delete_if(
    op: &'static str,
    client: &Client,
    key: &str,
    compare: Compare,
    give_up: impl Fn() -> bool,
    rpc_timeout: Duration,
) -> Result<(), LockError> {
    retry(op, rpc_timeout, give_up, || {
        let mut c = client.clone();
        let txn = Txn::new()
            .when([compare.clone()])
            .and_then([TxnOp::delete(key, None)]);
        async move { c.txn(txn).await }
    })
    .await
    .map(|_| ())
}

pub(super) struct EtcdHeld {
    client: Client,
    session: Arc<EtcdSession>,
    /// Lost with the session, or alone when our key is deleted (see [`watch_own_key`]).
    liveness: Arc<Liveness>,
    watcher: tokio::task::JoinHandle<()>,
    key: String,
    rev: i64,
    rpc_timeout: Duration,
    slot: Option<Slot>,
}

impl EtcdHeld {
    /// The lock held through `key` (create revision `rev`), whose key is watched from now on.
    pub(super) fn new(
        client: &Client,
        session: Arc<EtcdSession>,
        key: String,
        rev: i64,
        rpc_timeout: Duration,
        slot: Option<Slot>,
    ) -> Self {
        let liveness = Liveness::child(&session.liveness);
        let watcher = tokio::spawn(watch_own_key(
            client.clone(),
            key.clone(),
            rev,
            liveness.clone(),
            rpc_timeout,
        ));
        EtcdHeld {
            client: client.clone(),
            session,
            liveness,
            watcher,
            key,
            rev,
            rpc_timeout,
            slot,
        }
    }
}

/// Watches a held lock's key from its creation on, and marks the lock lost the moment the key
/// is deleted or replaced: an operator's `etcdctl lease revoke` (the usual way to break a stuck
/// lock) or `etcdctl del`, after which the next waiter owns the lock at once. Without it the
/// holder would learn of a revoke only at its next renewal, a third of the TTL later, and of a
/// deleted key never. The watch resumes from the last revision it saw when its stream fails;
/// after a compaction it reads the key instead.
async fn watch_own_key(
    client: Client,
    key: String,
    rev: i64,
    liveness: Arc<Liveness>,
    rpc_timeout: Duration,
) {
    // Opening the watch and the read after a compaction are bounded like every request: a
    // member that does not answer makes them retry, not hang.
    let mut watch = ResumableWatch::new(
        client.clone(),
        key.as_str(),
        WatchOptions::new(),
        Some(rpc_timeout),
        rev + 1,
    );
    loop {
        let resp = match watch.next(liveness.lost()).await {
            Watched::Stopped => return,
            Watched::Broken => continue,
            Watched::Ended(resp) if resp.compact_revision() > 0 => {
                // The events we missed are gone: the key itself tells whether it is ours.
                match still_ours(&client, &key, rev, rpc_timeout).await {
                    Some((true, seen)) => watch.resume_at(seen + 1),
                    Some((false, _)) => return lost_key(&liveness, &key),
                    None => {}
                }
                watch.pause(liveness.lost()).await;
                continue;
            }
            Watched::Ended(resp) | Watched::Events(resp) => resp,
        };
        let gone = resp.events().iter().any(|ev| {
            ev.event_type() == EventType::Delete
                || ev.kv().is_some_and(|kv| kv.create_revision() != rev)
        });
        if gone {
            return lost_key(&liveness, &key);
        }
        if let Some(header) = resp.header() {
            watch.advance(header.revision() + 1);
        }
        if resp.canceled() {
            watch.pause(liveness.lost()).await;
            continue;
        }
        watch.reset_backoff();
    }
}

fn lost_key(liveness: &Liveness, key: &str) {
    tracing::warn!(
        key,
        "the lock's key was deleted (lease revoked or key removed): lock lost"
    );
    liveness.mark_lost();
}

/// Whether `key` still has create revision `rev`, and the revision of that read; `None` when
/// etcd did not answer.
async fn still_ours(
    client: &Client,
    key: &str,
    rev: i64,
    rpc_timeout: Duration,
) -> Option<(bool, i64)> {
    let mut c = client.clone();
    count_request();
    let resp = tokio::time::timeout(rpc_timeout, c.get(key, None))
        .await
        .ok()?
        .ok()?;
    let ours = resp
        .kvs()
        .first()
        .is_some_and(|kv| kv.create_revision() == rev);
    Some((ours, resp.header().map_or(0, |h| h.revision())))
}

impl std::fmt::Debug for EtcdHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdHeld")
            .field("key", &self.key)
            .field("rev", &self.rev)
            .finish_non_exhaustive()
    }
}

impl Sealed for EtcdHeld {}

#[async_trait]
impl HeldLock for EtcdHeld {
    fn fencing_token(&self) -> u64 {
        u64::try_from(self.rev).unwrap_or(0)
    }
    fn lost_signal(&self) -> LostSignalHandle {
        LostSignalHandle(LostSignal(self.liveness.clone()))
    }
    async fn release(mut self: Box<Self>) -> Result<(), LockError> {
        self.watcher.abort();
        // Once the session is lost the key goes with the lease; stop retrying then.
        let alive = while_alive(&self.session.liveness);
        let owned = owned_by(&self.key, self.rev);
        let result = delete_if(
            "release lock",
            &self.client,
            &self.key,
            owned,
            alive,
            self.rpc_timeout,
        )
        .await;
        tracing::debug!(key = self.key, ok = result.is_ok(), "released");
        if let Some(slot) = self.slot.as_mut() {
            // The key is gone, or goes with the lost lease: its name may be reused.
            slot.set_deleted(result.is_ok() || self.session.liveness.is_lost());
        }
        match result {
            Err(_) if self.session.liveness.is_lost() => Ok(()),
            r => r,
        }
    }
    fn release_in_background(self: Box<Self>) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = self.release().await;
            });
        }
    }
    fn etcd_ownership(&self) -> Option<(Vec<u8>, i64)> {
        Some((self.key.clone().into_bytes(), self.rev))
    }
    fn left_with_slot(mut self: Box<Self>) {
        // The slot's transaction deleted our key (it compared it first): its name is free.
        self.watcher.abort();
        if let Some(slot) = self.slot.as_mut() {
            slot.set_deleted(true);
        }
    }
}
