//! A semaphore's slots on etcd. The queue is the lock recipe under `sem/<name>/queue/`; only its
//! head takes slots, so the count it reads cannot grow before its put lands (slots only go).
//!
//! A slot is the key `sem/<name>/slot/<permits>/<lease-hex>[-n]` on the session lease, put in a
//! transaction that compares the head's queue key (its create revision), so a head that lost
//! its place never takes a slot, and deletes that key, so the head leaves the queue in the same
//! step. Its create revision is the fencing token. While every slot is
//! held, the head alone watches the slot prefix for a deletion: one release wakes one waiter.

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};

use super::backend::EtcdBackend;
use super::held::EtcdHeld;
use super::lock::{PendingKey, arrivals, contenders, holder_of};
use super::rpc::{retry, while_alive};
use super::stats::{count_request, count_slot_wakeup};
use crate::backend::{HeldLock, Holder, SlotTry};
use crate::error::LockError;

/// The permits a slot key was put with (the path segment after the slot prefix).
fn permits_of(key: &[u8], prefix: &str) -> Option<u32> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    let end = rest.iter().position(|b| *b == b'/')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

pub(super) async fn take_slot(
    backend: &EtcdBackend,
    name: &str,
    permits: u32,
    value: Vec<u8>,
    queue: &dyn HeldLock,
) -> Result<SlotTry, LockError> {
    let Some((queue_key, queue_rev)) = queue.etcd_ownership() else {
        return Err(LockError::Lost);
    };
    let prefix = backend.slot_prefix(name);
    let (slots, seen) = arrivals(
        "read semaphore slots",
        &backend.client,
        &prefix,
        backend.rpc_timeout(),
    )
    .await?;
    if let Some(theirs) = slots
        .iter()
        .filter_map(|kv| permits_of(kv.key(), &prefix))
        .find(|p| *p != permits)
    {
        return Err(LockError::PermitsMismatch {
            name: name.to_string(),
            ours: permits,
            theirs,
        });
    }
    if slots.len() >= permits as usize {
        return Ok(SlotTry::Full {
            seen: u64::try_from(seen).unwrap_or(0),
            holder: slots.first().map(holder_of),
        });
    }
    let session = backend.ensure_session().await?;
    let rpc_timeout = backend.rpc_timeout();
    let mut pending = PendingKey::new(
        backend,
        &session,
        backend
            .slots
            .take(session.lease, &format!("{prefix}{permits}/")),
    );
    let key = pending.key.clone();
    let head = Compare::create_revision(queue_key.clone(), CompareOp::Equal, queue_rev);
    let resp = retry(
        "take semaphore slot",
        rpc_timeout,
        while_alive(&session.liveness),
        || {
            let mut c = backend.client.clone();
            let txn = Txn::new()
                .when([
                    head.clone(),
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(
                        key.as_str(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(session.lease)),
                    ),
                    // Leave the queue in the same step: the next contender is the head at once.
                    TxnOp::delete(queue_key.clone(), None),
                ])
                .or_else([TxnOp::get(key.as_str(), None)]);
            async move { c.txn(txn).await }
        },
    )
    .await?;
    let rev = if resp.succeeded() {
        resp.header().map_or(0, |h| h.revision())
    } else {
        // Either a retried put had landed (our key, on our lease), or we are no longer the
        // head of the queue (our queue key is gone: lease revoked, key deleted).
        match resp.op_responses().first() {
            Some(etcd_client::TxnOpResponse::Get(g)) => g
                .kvs()
                .first()
                .filter(|kv| kv.lease() == session.lease)
                .map_or(0, |kv| kv.create_revision()),
            _ => 0,
        }
    };
    if rev == 0 {
        return Err(LockError::Lost);
    }
    pending.rev = Some(rev);
    let slot = pending.slot.take();
    Ok(SlotTry::Taken(Box::new(EtcdHeld::new(
        &backend.client,
        session,
        key,
        rev,
        rpc_timeout,
        slot,
    ))))
}

/// Resolves at the first deletion of a slot key after revision `seen` (a release, a revoked
/// or expired lease, an operator's delete).
pub(super) async fn slot_freed(
    backend: &EtcdBackend,
    name: &str,
    seen: u64,
) -> Result<(), LockError> {
    let prefix = backend.slot_prefix(name);
    let start = i64::try_from(seen).unwrap_or(i64::MAX).saturating_add(1);
    let mut c = backend.client.clone();
    count_request();
    let mut stream = tokio::time::timeout(
        backend.rpc_timeout(),
        c.watch(
            prefix.as_str(),
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        ),
    )
    .await
    .map_err(|elapsed| LockError::backend("watch semaphore slots", elapsed))?
    .map_err(|e| LockError::backend("watch semaphore slots", e))?;
    loop {
        let Some(resp) = stream
            .message()
            .await
            .map_err(|e| LockError::backend("watch semaphore slots", e))?
        else {
            return Err(LockError::Backend {
                op: "watch semaphore slots",
                source: "watch stream ended".into(),
            });
        };
        // Compacted past `seen` or cancelled: read the slots again.
        if resp.compact_revision() > 0 || resp.canceled() {
            return Ok(());
        }
        if resp
            .events()
            .iter()
            .any(|ev| ev.event_type() == EventType::Delete)
        {
            count_slot_wakeup();
            return Ok(());
        }
    }
}

pub(super) async fn slot_holders(
    backend: &EtcdBackend,
    name: &str,
) -> Result<Vec<Holder>, LockError> {
    let prefix = backend.slot_prefix(name);
    contenders(&backend.client, &prefix, backend.rpc_timeout()).await
}

#[cfg(test)]
mod tests {
    use super::permits_of;

    #[test]
    fn a_slot_key_tells_its_permits() {
        let prefix = "palisade/sem/backfill/slot/";
        assert_eq!(
            permits_of(b"palisade/sem/backfill/slot/3/694d8a1f", prefix),
            Some(3)
        );
        assert_eq!(
            permits_of(b"palisade/sem/backfill/slot/x/694d8a1f", prefix),
            None
        );
        assert_eq!(
            permits_of(b"palisade/sem/other/slot/3/694d8a1f", prefix),
            None
        );
    }
}
