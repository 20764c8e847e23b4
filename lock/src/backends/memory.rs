//! The in-process backend: a FIFO queue per name behind one mutex.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{broadcast, oneshot, watch};

use super::memory_sem::MemSlots;
use crate::backend::{
    HeldLock, Holder, Kind, LockBackend, LostSignalHandle, Registration, SlotTry, Wait,
    sealed::Sealed,
};
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::{LostSignal, Session};

type SlotKey = (Kind, String);

struct Waiter {
    id: u64,
    value: Vec<u8>,
    grant: oneshot::Sender<u64>,
}

struct Slot {
    /// The holder's ticket id and public description.
    holder: Option<(u64, Holder)>,
    /// Waiters in arrival order; the front one is granted next.
    queue: VecDeque<Waiter>,
    /// The last token handed out; tokens only grow, so slots are never removed.
    last_token: u64,
    observers: watch::Sender<Option<Holder>>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            holder: None,
            queue: VecDeque::new(),
            last_token: 0,
            observers: watch::Sender::new(None),
        }
    }

    fn grant(&mut self, id: u64, value: Vec<u8>) -> u64 {
        self.last_token += 1;
        let holder = Holder {
            value,
            fencing_token: self.last_token,
        };
        self.observers.send_replace(Some(holder.clone()));
        self.holder = Some((id, holder));
        self.last_token
    }

    /// Hands the lock to the first waiter that is still waiting.
    fn release(&mut self, id: u64) {
        if self.holder.as_ref().map(|(h, _)| *h) != Some(id) {
            return;
        }
        self.holder = None;
        while let Some(waiter) = self.queue.pop_front() {
            let token = self.grant(waiter.id, waiter.value);
            if waiter.grant.send(token).is_ok() {
                return;
            }
            self.holder = None;
        }
        self.observers.send_replace(None);
    }
}

pub(crate) struct Inner {
    slots: Mutex<HashMap<SlotKey, Slot>>,
    next_id: AtomicU64,
    jobs: Mutex<BTreeMap<String, (u64, JobInfo)>>,
    events: broadcast::Sender<JobEvent>,
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, HashMap<SlotKey, Slot>> {
        // A panic while holding this mutex leaves the maps consistent (every update is a single
        // step), so a poisoned mutex is still usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jobs(&self) -> MutexGuard<'_, BTreeMap<String, (u64, JobInfo)>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, key: &SlotKey, id: u64) {
        if let Some(slot) = self.slots().get_mut(key) {
            slot.release(id);
        }
    }

    /// Called when a waiter gives up: leave the queue, or pass on a grant that came too late.
    fn abandon(&self, key: &SlotKey, id: u64) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(key) {
            slot.queue.retain(|w| w.id != id);
            slot.release(id);
        }
    }
}

/// One process, many tasks: strict FIFO, fencing tokens from a counter per name, a session that
/// is never lost.
pub(crate) struct MemoryBackend {
    inner: Arc<Inner>,
    sems: MemSlots,
}

impl MemoryBackend {
    pub(crate) fn new() -> Self {
        MemoryBackend {
            inner: Arc::new(Inner {
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                jobs: Mutex::new(BTreeMap::new()),
                events: broadcast::channel(1024).0,
            }),
            sems: MemSlots::default(),
        }
    }
}

/// Removes a waiter from the queue if its acquire is dropped or times out.
struct WaitTicket {
    inner: Arc<Inner>,
    key: SlotKey,
    id: u64,
    done: bool,
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        if !self.done {
            self.inner.abandon(&self.key, self.id);
        }
    }
}

#[derive(Debug)]
struct MemoryHeld {
    inner: Arc<Inner>,
    key: SlotKey,
    id: u64,
    token: u64,
    lost: LostSignal,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

impl Sealed for MemoryHeld {}

#[async_trait]
impl HeldLock for MemoryHeld {
    fn fencing_token(&self) -> u64 {
        self.token
    }
    fn lost_signal(&self) -> LostSignalHandle {
        LostSignalHandle(self.lost.clone())
    }
    async fn release(self: Box<Self>) -> Result<(), LockError> {
        self.inner.release(&self.key, self.id);
        Ok(())
    }
    fn release_in_background(self: Box<Self>) {
        self.inner.release(&self.key, self.id);
    }
}

#[derive(Debug)]
struct MemoryRegistration {
    inner: Arc<Inner>,
    lock: String,
    id: u64,
    finished: bool,
}

impl MemoryRegistration {
    fn remove(&mut self, finished: bool) {
        let mut jobs = self.inner.jobs();
        let removed = match jobs.get(&self.lock) {
            Some((id, _)) if *id == self.id => jobs.remove(&self.lock).map(|(_, j)| j),
            _ => None,
        };
        if let Some(job) = removed {
            let event = if finished {
                JobEvent::Finished(job)
            } else {
                JobEvent::Expired(job)
            };
            let _ = self.inner.events.send(event);
        }
        drop(jobs);
        self.finished = true;
    }
}

impl Sealed for MemoryRegistration {}

#[async_trait]
impl Registration for MemoryRegistration {
    async fn finish(mut self: Box<Self>) -> Result<(), LockError> {
        self.remove(true);
        Ok(())
    }
}

impl Drop for MemoryRegistration {
    fn drop(&mut self) {
        if !self.finished {
            self.remove(false);
        }
    }
}

impl Sealed for MemoryBackend {}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn session(&self) -> Session {
        Session::forever()
    }

    async fn acquire(
        &self,
        kind: Kind,
        name: &str,
        value: Vec<u8>,
        wait: Wait,
    ) -> Result<Box<dyn HeldLock>, LockError> {
        let key = (kind, name.to_string());
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let held = |token| -> Box<dyn HeldLock> {
            Box::new(MemoryHeld {
                inner: self.inner.clone(),
                key: key.clone(),
                id,
                token,
                lost: LostSignal::never(),
            })
        };
        let rx = {
            let mut slots = self.inner.slots();
            let slot = slots.entry(key.clone()).or_insert_with(Slot::new);
            if slot.holder.is_none() && slot.queue.is_empty() {
                let token = slot.grant(id, value);
                return Ok(held(token));
            }
            if wait == Wait::No {
                let holder = slot.holder.as_ref().and_then(|(_, h)| h.job());
                return Err(LockError::Held { holder });
            }
            let (tx, rx) = oneshot::channel();
            slot.queue.push_back(Waiter {
                id,
                value,
                grant: tx,
            });
            rx
        };
        let mut ticket = WaitTicket {
            inner: self.inner.clone(),
            key: key.clone(),
            id,
            done: false,
        };
        let token = match wait {
            Wait::Up(d) => match tokio::time::timeout(d, rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(LockError::Timeout {
                        name: name.to_string(),
                        waited: d,
                    });
                }
            },
            _ => rx.await,
        };
        // The sender lives in the queue until it is used, so an error means the slot vanished,
        // which does not happen; report it as lost rather than panic.
        let token = token.map_err(|_| LockError::Lost)?;
        ticket.done = true;
        Ok(held(token))
    }

    async fn holder(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        let slots = self.inner.slots();
        Ok(slots
            .get(&(kind, name.to_string()))
            .and_then(|s| s.holder.as_ref().map(|(_, h)| h.clone())))
    }

    async fn break_lock(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        // The holder lives in this very process: it releases the lock itself.
        match self.holder(kind, name).await? {
            Some(h) => Err(LockError::Held { holder: h.job() }),
            None => Ok(None),
        }
    }

    async fn contenders(&self, kind: Kind, name: &str) -> Result<Vec<Holder>, LockError> {
        let slots = self.inner.slots();
        let Some(slot) = slots.get(&(kind, name.to_string())) else {
            return Ok(Vec::new());
        };
        let holder = slot.holder.iter().map(|(_, h)| h.clone());
        let waiters = slot.queue.iter().map(|w| Holder {
            value: w.value.clone(),
            fencing_token: 0,
        });
        Ok(holder.chain(waiters).collect())
    }

    async fn queue_len(&self, kind: Kind, name: &str) -> Result<usize, LockError> {
        let slots = self.inner.slots();
        Ok(slots
            .get(&(kind, name.to_string()))
            .map_or(0, |s| s.queue.len()))
    }

    fn observe(&self, kind: Kind, name: &str) -> BoxStream<'static, Option<Holder>> {
        let rx = {
            let mut slots = self.inner.slots();
            slots
                .entry((kind, name.to_string()))
                .or_insert_with(Slot::new)
                .observers
                .subscribe()
        };
        futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            if !first {
                rx.changed().await.ok()?;
            }
            let value = rx.borrow_and_update().clone();
            Some((value, (rx, false)))
        })
        .boxed()
    }

    async fn take_slot(
        &self,
        name: &str,
        permits: u32,
        value: Vec<u8>,
        queue: &dyn HeldLock,
    ) -> Result<SlotTry, LockError> {
        self.sems.take(name, permits, queue.fencing_token(), value)
    }

    async fn slot_freed(&self, name: &str, seen: u64) -> Result<(), LockError> {
        self.sems.freed(name, seen).await;
        Ok(())
    }

    async fn slot_holders(&self, name: &str) -> Result<Vec<Holder>, LockError> {
        Ok(self.sems.holders(name))
    }

    async fn register(&self, job: JobInfo) -> Result<Box<dyn Registration>, LockError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let lock = job.registry_key();
        {
            // Sent under the lock, so a watcher's snapshot and its subscription agree.
            let mut jobs = self.inner.jobs();
            jobs.insert(lock.clone(), (id, job.clone()));
            let _ = self.inner.events.send(JobEvent::Started(job));
        }
        Ok(Box::new(MemoryRegistration {
            inner: self.inner.clone(),
            lock,
            id,
            finished: false,
        }))
    }

    async fn running(&self) -> Result<Vec<JobInfo>, LockError> {
        Ok(self.inner.jobs().values().map(|(_, j)| j.clone()).collect())
    }

    fn watch_jobs(&self) -> BoxStream<'static, JobEvent> {
        let (running, rx) = {
            let jobs = self.inner.jobs();
            let running: VecDeque<JobEvent> = jobs
                .values()
                .map(|(_, j)| JobEvent::Started(j.clone()))
                .collect();
            (running, self.inner.events.subscribe())
        };
        futures::stream::unfold((running, rx), |(mut running, mut rx)| async move {
            if let Some(event) = running.pop_front() {
                return Some((event, (running, rx)));
            }
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, (running, rx))),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Pending<'a> = futures::future::BoxFuture<'a, Result<Box<dyn HeldLock>, LockError>>;

    #[derive(Debug, Clone)]
    enum Op {
        /// Client `i` tries to take the lock, or queues for it.
        Take { client: usize, queue: bool },
        /// Client `i` releases (or gives up waiting).
        Let { client: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, any::<bool>()).prop_map(|(client, queue)| Op::Take { client, queue }),
            (0..4usize).prop_map(|client| Op::Let { client }),
        ]
    }

    proptest! {
        /// Whatever clients do, at most one holds the lock, grants follow arrival order, and
        /// tokens strictly increase.
        #[test]
        fn one_holder_fifo_and_growing_tokens(ops in proptest::collection::vec(op(), 1..60)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let backend = MemoryBackend::new();
                // Per client: a held lock, or a pending acquire (polled by hand).
                let mut held: Vec<Option<Box<dyn HeldLock>>> = (0..4).map(|_| None).collect();
                let mut waiting: Vec<Option<Pending<'_>>> = (0..4).map(|_| None).collect();
                let mut arrival: VecDeque<usize> = VecDeque::new();
                let mut last = 0;
                for op in ops {
                    match op {
                        Op::Take { client, queue } => {
                            if held[client].is_some() || waiting[client].is_some() {
                                continue;
                            }
                            let wait = if queue { Wait::Forever } else { Wait::No };
                            let mut fut = backend.acquire(Kind::Lock, "x", Vec::new(), wait);
                            match futures::poll!(&mut fut) {
                                std::task::Poll::Ready(Ok(h)) => held[client] = Some(h),
                                std::task::Poll::Ready(Err(LockError::Held { .. })) => prop_assert!(!queue),
                                std::task::Poll::Ready(Err(e)) => panic!("{e}"),
                                std::task::Poll::Pending => {
                                    waiting[client] = Some(fut);
                                    arrival.push_back(client);
                                }
                            }
                        }
                        Op::Let { client } => {
                            if let Some(h) = held[client].take() {
                                h.release().await.unwrap();
                            } else if waiting[client].take().is_some() {
                                arrival.retain(|c| *c != client);
                            }
                        }
                    }
                    // Poll every waiter: the first in arrival order may have been granted.
                    for c in 0..4 {
                        if let Some(fut) = waiting[c].as_mut()
                            && let std::task::Poll::Ready(r) = futures::poll!(fut)
                        {
                            waiting[c] = None;
                            prop_assert_eq!(arrival.pop_front(), Some(c), "granted out of order");
                            held[c] = Some(r.unwrap());
                        }
                    }
                    let holders: Vec<u64> = held.iter().flatten().map(|h| h.fencing_token()).collect();
                    prop_assert!(holders.len() <= 1, "two holders: {:?}", holders);
                    if let Some(t) = holders.first() {
                        prop_assert!(*t >= last);
                        last = *t;
                    }
                }
                Ok(())
            })?;
        }
    }
}
