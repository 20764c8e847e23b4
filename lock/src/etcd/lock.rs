//! The lock recipe: one key per contender, owner = lowest create revision, each waiter watches
//! only its predecessor (and its own key).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::time::Instant;

use super::session::EtcdSession;
use super::{EtcdBackend, Slot, WAKEUPS, backoff, budget, count_request, retry, while_alive};
use crate::backend::{HeldLock, Holder, Kind, LostSignalHandle};
use crate::coordinator::Wait;
use crate::error::LockError;
use crate::job::JobInfo;
use crate::session::{Liveness, LostSignal};

fn first_created() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
}

/// The two keys created last: ours (just put in the same transaction) and its predecessor.
fn last_two_created() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Descend)
        .with_limit(2)
}

/// The key created just before `rev` under `prefix` (etcd's `WithLastCreate` +
/// `WithMaxCreateRev(rev - 1)`).
fn predecessor(rev: i64) -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Descend)
        .with_max_create_revision(rev - 1)
        .with_limit(1)
}

fn range_kvs(resp: Option<&TxnOpResponse>) -> Vec<etcd_client::KeyValue> {
    match resp {
        Some(TxnOpResponse::Get(g)) => g.kvs().to_vec(),
        _ => Vec::new(),
    }
}

fn owned_by(key: &str, rev: i64) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, rev)
}

/// Deletes `key` if it still has create revision `rev`: never a newer holder's key, even when a
/// lost response makes us retry.
async fn delete_owned(
    client: &Client,
    key: &str,
    rev: i64,
    give_up: impl Fn() -> bool,
    rpc_timeout: Duration,
) -> Result<(), LockError> {
    retry("release lock", rpc_timeout, give_up, || {
        let mut c = client.clone();
        let txn = Txn::new()
            .when([owned_by(key, rev)])
            .and_then([TxnOp::delete(key, None)]);
        async move { c.txn(txn).await }
    })
    .await
    .map(|_| ())
}

/// Deletes `key` if it is still on `lease`: our key from a put whose answer we never saw (the
/// put may have landed or not; the key name belongs to this acquire alone, so a key on our lease
/// under it is ours).
async fn delete_leased(
    client: &Client,
    key: &str,
    lease: i64,
    give_up: impl Fn() -> bool,
    rpc_timeout: Duration,
) -> Result<(), LockError> {
    retry("abandon acquire", rpc_timeout, give_up, || {
        let mut c = client.clone();
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        async move { c.txn(txn).await }
    })
    .await
    .map(|_| ())
}

/// Our key from the moment its put is sent until we hold the lock: if the acquire is dropped
/// (a `timeout` or `select!` around `lock()`), times out or fails, the key is deleted from a
/// background task, also when the put was still in flight (it may land after we stopped
/// waiting), so an abandoned acquire never leaves a key that blocks the lock while the session
/// lives. The clean-up retries for as long as the session lives: once it is lost, the key goes
/// with the lease anyway.
struct PendingKey {
    client: Client,
    key: String,
    lease: i64,
    /// The key's create revision, once the put's answer told it.
    rev: Option<i64>,
    liveness: Arc<Liveness>,
    rpc_timeout: Duration,
    /// `Some` while the acquire may still fail.
    slot: Option<Slot>,
}

impl PendingKey {
    fn new(backend: &EtcdBackend, session: &EtcdSession, slot: Slot) -> PendingKey {
        PendingKey {
            client: backend.client.clone(),
            key: slot.key(),
            lease: session.lease,
            rev: None,
            liveness: session.liveness.clone(),
            rpc_timeout: backend.rpc_timeout(),
            slot: Some(slot),
        }
    }

    /// The key is known to be gone (its lease is): nothing to clean up.
    fn forget(mut self) {
        if let Some(mut slot) = self.slot.take() {
            slot.set_deleted(true);
        }
    }
}

impl Drop for PendingKey {
    fn drop(&mut self) {
        let Some(mut slot) = self.slot.take() else {
            return;
        };
        let client = self.client.clone();
        let key = std::mem::take(&mut self.key);
        let (lease, rev, rpc_timeout) = (self.lease, self.rev, self.rpc_timeout);
        let liveness = self.liveness.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tracing::debug!(key, "acquire abandoned: deleting our waiter key");
                let alive = while_alive(&liveness);
                let deleted = match rev {
                    Some(rev) => delete_owned(&client, &key, rev, alive, rpc_timeout).await,
                    None => delete_leased(&client, &key, lease, alive, rpc_timeout).await,
                };
                slot.set_deleted(deleted.is_ok() || liveness.is_lost());
            });
        }
    }
}

pub(crate) async fn acquire(
    backend: &EtcdBackend,
    kind: Kind,
    name: &str,
    value: Vec<u8>,
    wait: Wait,
) -> Result<Box<dyn HeldLock>, LockError> {
    let started = Instant::now();
    let rpc_timeout = backend.rpc_timeout();
    let prefix = backend.prefix(kind, name);
    let mut fresh_session = false;
    let (session, mut pending, resp) = loop {
        let session = backend.ensure_session().await?;
        // One key per acquire: a session may hold or wait for the same name from several tasks.
        let pending = PendingKey::new(
            backend,
            &session,
            backend.slots.take(session.lease, &prefix),
        );
        match put_key(
            backend,
            &session,
            &prefix,
            &pending.key,
            &value,
            rpc_timeout,
        )
        .await
        {
            Ok(resp) => break (session, pending, resp),
            // Our lease is gone (revoked, or expired before the keepalive noticed): start a
            // new session, once.
            Err(LockError::Lost) if !fresh_session => {
                session.liveness.mark_lost();
                pending.forget();
                fresh_session = true;
            }
            Err(e) => return Err(e),
        }
    };
    let key = pending.key.clone();
    let ops = resp.op_responses();
    let rev = if resp.succeeded() {
        resp.header().map_or(0, |h| h.revision())
    } else {
        range_kvs(ops.first())
            .first()
            .map_or(0, |kv| kv.create_revision())
    };
    if rev == 0 {
        return Err(LockError::Lost);
    }
    pending.rev = Some(rev);
    let owner = range_kvs(ops.get(1)).into_iter().next();
    let owned = owner.as_ref().is_some_and(|kv| kv.create_revision() == rev);
    if !owned {
        if wait == Wait::No {
            drop(pending); // deletes our key in the background
            return Err(LockError::Held {
                holder: owner.and_then(|kv| {
                    JobInfo::from_holder(&Holder {
                        value: kv.value().to_vec(),
                        fencing_token: u64::try_from(kv.create_revision()).unwrap_or(0),
                    })
                }),
            });
        }
        // Fresh put: the transaction also read the key just before ours (the last two created,
        // ours being the last), so the wait starts with a watch, not another read.
        let known = if resp.succeeded() {
            range_kvs(ops.get(2))
                .into_iter()
                .find(|kv| kv.create_revision() < rev)
                .map(|kv| (kv.key().to_vec(), rev))
        } else {
            None
        };
        let waited = wait_turn(
            &backend.client,
            &session,
            &prefix,
            &key,
            rev,
            known,
            rpc_timeout,
        );
        let result = match wait {
            Wait::Up(d) => {
                let left = d.saturating_sub(started.elapsed());
                tokio::select! {
                    r = waited => r,
                    _ = tokio::time::sleep(left) => Err(LockError::Timeout { name: name.to_string(), waited: d }),
                }
            }
            _ => waited.await,
        };
        result?;
    }
    if session.liveness.is_lost() {
        return Err(LockError::Lost);
    }
    let slot = pending.slot.take();
    let liveness = Liveness::child(&session.liveness);
    let watcher = tokio::spawn(watch_own_key(
        backend.client.clone(),
        key.clone(),
        rev,
        liveness.clone(),
    ));
    Ok(Box::new(EtcdHeld {
        client: backend.client.clone(),
        session,
        liveness,
        watcher,
        key,
        rev,
        rpc_timeout,
        slot,
    }))
}

/// Puts our key (unless a retried request already did) and reads the owner, in one request.
async fn put_key(
    backend: &EtcdBackend,
    session: &Arc<EtcdSession>,
    prefix: &str,
    key: &str,
    value: &[u8],
    rpc_timeout: Duration,
) -> Result<etcd_client::TxnResponse, LockError> {
    let alive = while_alive(&session.liveness);
    retry("acquire lock", rpc_timeout, &alive, || {
        let mut c = backend.client.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key,
                    value.to_vec(),
                    Some(PutOptions::new().with_lease(session.lease)),
                ),
                TxnOp::get(prefix, Some(first_created())),
                TxnOp::get(prefix, Some(last_two_created())),
            ])
            .or_else([
                TxnOp::get(key, None),
                TxnOp::get(prefix, Some(first_created())),
            ]);
        async move { c.txn(txn).await }
    })
    .await
}

/// Waits until no key created before ours remains, watching only the one just before ours and
/// our own key. Returns once our key is the owner (checked in the same read that found no
/// predecessor); fails with `Lost` if our key or our session disappears meanwhile.
async fn wait_turn(
    client: &Client,
    session: &Arc<EtcdSession>,
    prefix: &str,
    key: &str,
    rev: i64,
    known: Option<(Vec<u8>, i64)>,
    rpc_timeout: Duration,
) -> Result<(), LockError> {
    let alive = while_alive(&session.liveness);
    let mut delays = backoff();
    // The predecessor the acquire transaction already read, and at which revision.
    let mut known = known;
    loop {
        if session.liveness.is_lost() {
            return Err(LockError::Lost);
        }
        if let Some((pred_key, seen)) = known.take() {
            match watch_deletion(client, session, &pred_key, key, seen, rpc_timeout).await {
                Ok(Deleted::Predecessor) => {
                    WAKEUPS.fetch_add(1, Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    metrics::counter!("palisade_lock_wakeups_total").increment(1);
                    tracing::debug!(key, "predecessor released: re-checking");
                }
                Ok(Deleted::Ours) => {
                    tracing::warn!(key, "our waiter key was deleted while waiting");
                    return Err(LockError::Lost);
                }
                Ok(Deleted::Resync) => {}
                Err(LockError::Lost) => return Err(LockError::Lost),
                Err(e) => {
                    tracing::debug!(key, error = %e, "watch failed; re-reading");
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = session.liveness.lost() => return Err(LockError::Lost),
                    }
                }
            }
            continue;
        }
        let resp = retry("wait for lock", rpc_timeout, &alive, || {
            let mut c = client.clone();
            let txn = Txn::new().and_then([
                TxnOp::get(prefix, Some(predecessor(rev))),
                TxnOp::get(key, None),
            ]);
            async move { c.txn(txn).await }
        })
        .await?;
        let ops = resp.op_responses();
        if range_kvs(ops.get(1)).is_empty() {
            // Our key is gone: our lease expired or someone deleted it. Do not wait for the
            // others (etcd issue 19597), and never report it as acquired (Jepsen).
            tracing::warn!(key, "our waiter key vanished while waiting");
            return Err(LockError::Lost);
        }
        let Some(pred) = range_kvs(ops.first()).into_iter().next() else {
            return Ok(());
        };
        let seen = resp.header().map_or(0, |h| h.revision());
        let pred_key = pred.key().to_vec();
        tracing::trace!(key, predecessor = %String::from_utf8_lossy(&pred_key), "waiting for predecessor");
        match watch_deletion(client, session, &pred_key, key, seen, rpc_timeout).await {
            Ok(Deleted::Predecessor) => {
                WAKEUPS.fetch_add(1, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                metrics::counter!("palisade_lock_wakeups_total").increment(1);
                tracing::debug!(key, "predecessor released: re-checking");
                delays = backoff();
            }
            Ok(Deleted::Ours) => {
                tracing::warn!(key, "our waiter key was deleted while waiting");
                return Err(LockError::Lost);
            }
            Ok(Deleted::Resync) => {}
            Err(e) => {
                tracing::debug!(key, error = %e, "watch failed; re-reading");
                let delay = delays.next().unwrap_or(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = session.liveness.lost() => return Err(LockError::Lost),
                }
            }
        }
    }
}

enum Deleted {
    Predecessor,
    Ours,
    /// The watch was compacted or cancelled: read again.
    Resync,
}

/// One watch stream with two watches, both from the revision after `seen`: the predecessor's
/// key and our own.
async fn watch_deletion(
    client: &Client,
    session: &Arc<EtcdSession>,
    pred: &[u8],
    ours: &str,
    seen: i64,
    rpc_timeout: Duration,
) -> Result<Deleted, LockError> {
    let mut c = client.clone();
    // Creating the watches is bounded like every request: a member that accepted the connection
    // but does not answer (partitioned, paused) must not hold the waiter here.
    let create = async {
        count_request();
        let mut stream = c
            .watch(
                pred,
                Some(WatchOptions::new().with_start_revision(seen + 1)),
            )
            .await
            .map_err(|e| LockError::backend("watch predecessor", e))?;
        count_request();
        stream
            .watch(
                ours,
                Some(WatchOptions::new().with_start_revision(seen + 1)),
            )
            .await
            .map_err(|e| LockError::backend("watch own key", e))?;
        Ok::<_, LockError>(stream)
    };
    let mut stream = tokio::time::timeout(rpc_timeout, create)
        .await
        .map_err(|elapsed| LockError::backend("create watch", elapsed))??;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = session.liveness.lost() => return Err(LockError::Lost),
        };
        let Some(resp) = msg.map_err(|e| LockError::backend("watch", e))? else {
            return Err(LockError::Backend {
                op: "watch",
                source: "watch stream ended".into(),
            });
        };
        if resp.compact_revision() > 0 || resp.canceled() {
            return Ok(Deleted::Resync);
        }
        for ev in resp.events() {
            if ev.event_type() != EventType::Delete {
                continue;
            }
            let Some(kv) = ev.kv() else { continue };
            if kv.key() == ours.as_bytes() {
                return Ok(Deleted::Ours);
            }
            if kv.key() == pred {
                return Ok(Deleted::Predecessor);
            }
        }
    }
}

pub(crate) async fn holder(
    client: &Client,
    prefix: &str,
    rpc_timeout: Duration,
) -> Result<Option<Holder>, LockError> {
    let resp = retry(
        "read lock holder",
        rpc_timeout,
        budget(rpc_timeout * 3),
        || {
            let mut c = client.clone();
            async move { c.get(prefix, Some(first_created())).await }
        },
    )
    .await?;
    Ok(resp.kvs().first().map(|kv| Holder {
        value: kv.value().to_vec(),
        fencing_token: u64::try_from(kv.create_revision()).unwrap_or(0),
    }))
}

/// Watches a held lock's key from its creation on, and marks the lock lost the moment the key
/// is deleted or replaced: an operator's `etcdctl lease revoke` (the usual way to break a stuck
/// lock) or `etcdctl del`, after which the next waiter owns the lock at once. Without it the
/// holder would learn of a revoke only at its next renewal, a third of the TTL later, and of a
/// deleted key never. The watch resumes from the last revision it saw when its stream fails;
/// after a compaction it reads the key instead.
async fn watch_own_key(client: Client, key: String, rev: i64, liveness: Arc<Liveness>) {
    let mut delays = backoff();
    let mut from = rev + 1;
    loop {
        if liveness.is_lost() {
            return;
        }
        let mut c = client.clone();
        count_request();
        let options = WatchOptions::new().with_start_revision(from);
        let opened = tokio::select! {
            opened = c.watch(key.as_str(), Some(options)) => opened,
            () = liveness.lost() => return,
        };
        if let Ok(mut stream) = opened {
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    () = liveness.lost() => return,
                };
                let Ok(Some(resp)) = message else { break };
                if resp.compact_revision() > 0 {
                    // The events we missed are gone: the key itself tells whether it is ours.
                    match still_ours(&client, &key, rev).await {
                        Some((true, seen)) => from = seen + 1,
                        Some((false, _)) => return lost_key(&liveness, &key),
                        None => {}
                    }
                    break;
                }
                let gone = resp.events().iter().any(|ev| {
                    ev.event_type() == EventType::Delete
                        || ev.kv().is_some_and(|kv| kv.create_revision() != rev)
                });
                if gone {
                    return lost_key(&liveness, &key);
                }
                if let Some(header) = resp.header() {
                    from = from.max(header.revision() + 1);
                }
                if resp.canceled() {
                    break;
                }
                delays = backoff();
            }
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            () = liveness.lost() => return,
        }
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
async fn still_ours(client: &Client, key: &str, rev: i64) -> Option<(bool, i64)> {
    let mut c = client.clone();
    count_request();
    let resp = c.get(key, None).await.ok()?;
    let ours = resp
        .kvs()
        .first()
        .is_some_and(|kv| kv.create_revision() == rev);
    Some((ours, resp.header().map_or(0, |h| h.revision())))
}

struct EtcdHeld {
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

impl std::fmt::Debug for EtcdHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdHeld")
            .field("key", &self.key)
            .field("rev", &self.rev)
            .finish_non_exhaustive()
    }
}

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
        let result = delete_owned(&self.client, &self.key, self.rev, alive, self.rpc_timeout).await;
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
}
