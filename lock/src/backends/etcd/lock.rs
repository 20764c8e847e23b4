//! The lock recipe: one key per contender, owner = lowest create revision, each waiter watches
//! only its predecessor (and its own key).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::time::Instant;

use super::backend::EtcdBackend;
use super::held::{EtcdHeld, delete_if, owned_by};
use super::rpc::{backoff, budget, retry, while_alive};
use super::session::EtcdSession;
use super::slots::Slot;
use super::stats::{count_request, count_wakeup};
use crate::backend::{HeldLock, Holder, Kind, Wait};
use crate::error::LockError;
use crate::session::Liveness;

/// The key created first under a prefix: the owner.
pub(super) fn first_created() -> GetOptions {
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

/// The holder that a contender's key describes.
pub(super) fn holder_of(kv: &KeyValue) -> Holder {
    Holder {
        value: kv.value().to_vec(),
        fencing_token: u64::try_from(kv.create_revision()).unwrap_or(0),
    }
}

/// When an abandoned acquire deletes its key a second time (see [`PendingKey`]).
const ABANDON_RECHECK: Duration = Duration::from_millis(200);

/// Our key from the moment its put is sent until we hold the lock: if the acquire is dropped
/// (a `timeout` or `select!` around `lock()`), times out or fails, the key is deleted from a
/// background task, also when the put was still in flight (it may land after we stopped
/// waiting), so an abandoned acquire never leaves a key that blocks the lock while the session
/// lives. The clean-up retries for as long as the session lives: once it is lost, the key goes
/// with the lease anyway.
pub(super) struct PendingKey {
    client: Client,
    pub(super) key: String,
    lease: i64,
    /// The key's create revision, once the put's answer told it.
    pub(super) rev: Option<i64>,
    liveness: Arc<Liveness>,
    rpc_timeout: Duration,
    /// `Some` while the acquire may still fail; taking it out disarms the clean-up.
    pub(super) slot: Option<Slot>,
}

impl PendingKey {
    pub(super) fn new(backend: &EtcdBackend, session: &EtcdSession, slot: Slot) -> PendingKey {
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
                // Once the answer to our put told its create revision, compare that (as a
                // release does); before, the key name belongs to this acquire alone, so a key
                // on our lease under it is ours (the put may have landed or not).
                let deleted = match rev {
                    Some(rev) => {
                        let ours = owned_by(&key, rev);
                        delete_if("release lock", &client, &key, ours, &alive, rpc_timeout).await
                    }
                    None => {
                        let ours = || Compare::lease(key.as_str(), CompareOp::Equal, lease);
                        // The put we gave up on travels on a gRPC stream of its own: etcd may
                        // apply it after a delete sent later (concurrent streams are not
                        // ordered), for as long as a request can take. So delete now, soon
                        // after, and once more when no request of ours can still be pending.
                        let mut result = Ok(());
                        for wait in [Duration::ZERO, ABANDON_RECHECK, rpc_timeout] {
                            tokio::time::sleep(wait).await;
                            let once = delete_if(
                                "abandon acquire",
                                &client,
                                &key,
                                ours(),
                                &alive,
                                rpc_timeout,
                            )
                            .await;
                            result = result.and(once);
                        }
                        result
                    }
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
                holder: owner.and_then(|kv| holder_of(&kv).job()),
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
    Ok(Box::new(EtcdHeld::new(
        &backend.client,
        session,
        key,
        rev,
        rpc_timeout,
        slot,
    )))
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
        let (pred_key, seen) = match known.take() {
            Some(known) => known,
            None => {
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
                    // Our key is gone: our lease expired or someone deleted it. Do not wait for
                    // the others (etcd issue 19597), and never report it as acquired (Jepsen).
                    tracing::warn!(key, "our waiter key vanished while waiting");
                    return Err(LockError::Lost);
                }
                let Some(pred) = range_kvs(ops.first()).into_iter().next() else {
                    return Ok(());
                };
                let pred_key = pred.key().to_vec();
                tracing::trace!(key, predecessor = %String::from_utf8_lossy(&pred_key), "waiting for predecessor");
                (pred_key, resp.header().map_or(0, |h| h.revision()))
            }
        };
        match watch_deletion(client, session, &pred_key, key, seen, rpc_timeout).await {
            Ok(Deleted::Predecessor) => {
                count_wakeup();
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
            // Only when the session is lost.
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
    }
}

enum Deleted {
    Predecessor,
    Ours,
    /// The watch was compacted or cancelled: read again.
    Resync,
}

/// One watch stream with two watches, both from the revision after `seen`: the predecessor's
/// key and our own. It ends at the first deletion of either, or at the first failure, and
/// `wait_turn` then reads the queue again (the next predecessor, or ownership), so unlike the
/// watches in `registry` and `held` it has nothing to resume and is no `ResumableWatch`.
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
    Ok(holder_key(client, prefix, rpc_timeout)
        .await?
        .as_ref()
        .map(holder_of))
}

/// The holder's key under `prefix` (the first created), if any.
async fn holder_key(
    client: &Client,
    prefix: &str,
    rpc_timeout: Duration,
) -> Result<Option<KeyValue>, LockError> {
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
    Ok(resp.kvs().first().cloned())
}

/// Everyone holding or waiting under `prefix`, in arrival (create revision) order.
pub(crate) async fn contenders(
    client: &Client,
    prefix: &str,
    rpc_timeout: Duration,
) -> Result<Vec<Holder>, LockError> {
    let (kvs, _) = arrivals("read lock contenders", client, prefix, rpc_timeout).await?;
    Ok(kvs.iter().map(holder_of).collect())
}

/// Every key under `prefix` in arrival (create revision) order, and the revision of the read.
pub(super) async fn arrivals(
    op: &'static str,
    client: &Client,
    prefix: &str,
    rpc_timeout: Duration,
) -> Result<(Vec<KeyValue>, i64), LockError> {
    let resp = retry(op, rpc_timeout, budget(rpc_timeout * 3), || {
        let mut c = client.clone();
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        async move { c.get(prefix, Some(options)).await }
    })
    .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    Ok((resp.kvs().to_vec(), rev))
}

/// Revokes the lease of the holder under `prefix` (an operator breaking the lock): every key of
/// that session goes, and its owner sees its lease lost. Returns the holder, `None` if free.
pub(crate) async fn break_holder(
    client: &Client,
    prefix: &str,
    rpc_timeout: Duration,
) -> Result<Option<Holder>, LockError> {
    let Some(kv) = holder_key(client, prefix, rpc_timeout).await? else {
        return Ok(None);
    };
    let (holder, lease) = (holder_of(&kv), kv.lease());
    let revoked = retry(
        "revoke the holder's lease",
        rpc_timeout,
        budget(rpc_timeout * 3),
        || {
            let mut c = client.clone();
            async move { c.lease_revoke(lease).await }
        },
    )
    .await;
    match revoked {
        Ok(_) => Ok(Some(holder)),
        // The lease is gone already (expired or revoked meanwhile): the lock is free either way.
        Err(LockError::Lost) => Ok(Some(holder)),
        Err(e) => Err(e),
    }
}
