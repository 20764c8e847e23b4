//! Semaphores: at most `permits` holders of one name at once, served in arrival order.
//!
//! One algorithm for every backend. Contenders queue with the lock recipe under
//! [`Kind::Semaphore`]; the head of the queue alone takes a free slot
//! ([`LockBackend::take_slot`]), and when every slot is held it alone waits for one to be freed
//! ([`LockBackend::slot_freed`]), so a release wakes one waiter, not all of them. Once it holds
//! a slot it leaves the queue, and the next contender becomes the head.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::time::Instant;

use crate::backend::{HeldLock, Holder, Kind, LockBackend, SlotTry, Wait};
use crate::error::LockError;
use crate::guard::LockGuard;

/// How long `try_acquire` waits for a head of the queue that is taking a free slot.
const PASSING_THROUGH: Duration = Duration::from_secs(2);

/// How often [`Semaphore::observe`] reads the holders.
const OBSERVE_POLL: Duration = Duration::from_millis(100);

/// How long the head of a queue waits before it reads the slots again after a failed wait.
const RETRY_WAIT: Duration = Duration::from_millis(100);

/// A semaphore: at most [`permits`](Self::permits) holders of its name at once, across every
/// process that uses the same backend (see [`Coordinator::semaphore`](crate::Coordinator::semaphore)).
///
/// Its guards are [`LockGuard`]s: each has a fencing token, strictly greater than the token of
/// every earlier acquisition of this semaphore, a lost signal, and `release`. Waiters are served
/// in arrival order (on the file backend: the tasks of one process; between processes `flock`
/// decides, as for locks). Every holder of one name must ask for the same number of permits: a
/// contender that finds a holder with another number fails with
/// [`LockError::PermitsMismatch`].
#[derive(Clone)]
pub struct Semaphore {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) name: String,
    pub(crate) permits: u32,
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.name)
            .field("permits", &self.permits)
            .finish_non_exhaustive()
    }
}

/// Our place in the semaphore's queue; dropping it leaves the queue (also when the acquire is
/// cancelled).
struct QueueTurn(Option<Box<dyn HeldLock>>);

impl QueueTurn {
    fn held(&self) -> &dyn HeldLock {
        self.0.as_deref().expect("held until dropped")
    }

    /// Leaves the queue now (not in the background), so that the next acquisition of this
    /// process does not find our entry still there; returns `error`, why we leave.
    async fn leave(mut self, error: LockError) -> LockError {
        if let Some(entry) = self.0.take() {
            let _ = entry.release().await;
        }
        error
    }
}

impl Drop for QueueTurn {
    fn drop(&mut self) {
        if let Some(held) = self.0.take() {
            held.release_in_background();
        }
    }
}

impl Semaphore {
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many holders it admits at once.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// Waits (in arrival order) until a slot is free and takes it.
    pub async fn acquire(&self) -> Result<LockGuard, LockError> {
        self.acquire_with(Vec::new(), Wait::Forever).await
    }

    /// Like [`acquire`](Self::acquire), but gives up with [`LockError::Timeout`] after
    /// `timeout`, leaving the queue.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard, LockError> {
        self.acquire_with(Vec::new(), Wait::Up(timeout)).await
    }

    /// Takes a slot if one is free and nobody waits before us; otherwise fails at once with
    /// [`LockError::Held`], naming the earliest holder's job when it registered one.
    pub async fn try_acquire(&self) -> Result<LockGuard, LockError> {
        self.acquire_with(Vec::new(), Wait::No).await
    }

    /// The current holders, earliest first (their values are their jobs under `run_limited`:
    /// [`Holder::job_info`]).
    pub async fn holders(&self) -> Result<Vec<Holder>, LockError> {
        self.backend.slot_holders(&self.name).await
    }

    /// The holders now and after every change (earliest first), for dashboards: read every
    /// 100 ms and yielded when they changed. The stream ends at the first
    /// read that fails.
    pub fn observe(&self) -> BoxStream<'static, Vec<Holder>> {
        let (backend, name) = (self.backend.clone(), self.name.clone());
        futures::stream::unfold(
            (backend, name, None::<Vec<Holder>>),
            |(backend, name, last)| async move {
                loop {
                    let now = backend.slot_holders(&name).await.ok()?;
                    if last.as_ref() != Some(&now) {
                        return Some((now.clone(), (backend, name, Some(now))));
                    }
                    tokio::time::sleep(OBSERVE_POLL).await;
                }
            },
        )
        .boxed()
    }

    /// Everyone waiting for a slot, in arrival order (the head of the queue first). On the file
    /// backend only the head, as for locks.
    pub async fn waiters(&self) -> Result<Vec<Holder>, LockError> {
        self.backend.contenders(Kind::Semaphore, &self.name).await
    }

    /// Our place in the queue. Without waiting (`Wait::No`), a contender at the head that is
    /// only passing through (a slot is free, it is taking one) is waited for, briefly: only
    /// a full semaphore refuses us.
    async fn join_queue(&self, value: &[u8], wait: Wait) -> Result<Box<dyn HeldLock>, LockError> {
        let started = Instant::now();
        loop {
            let joined = self
                .backend
                .acquire(Kind::Semaphore, &self.name, value.to_vec(), wait)
                .await;
            let Err(LockError::Held { .. }) = joined else {
                return joined;
            };
            // Someone is at the head: refuse if every slot is held (name a holder, not the
            // waiter), else look again.
            let holders = self.holders().await?;
            if holders.len() >= self.permits as usize || started.elapsed() >= PASSING_THROUGH {
                return Err(Self::held_error(holders.into_iter().next()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn held_error(holder: Option<Holder>) -> LockError {
        LockError::Held {
            holder: holder.and_then(|h| h.job()),
        }
    }

    /// Takes a slot with `value` as the holder's value, waiting as `wait` says.
    pub(crate) async fn acquire_with(
        &self,
        value: Vec<u8>,
        wait: Wait,
    ) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let timeout = |waited| LockError::Timeout {
            name: self.name.clone(),
            waited,
        };
        let queue = QueueTurn(Some(self.join_queue(&value, wait).await?));
        let lost = queue.held().lost_signal().0;
        loop {
            let tried = self
                .backend
                .take_slot(&self.name, self.permits, value.clone(), queue.held())
                .await?;
            let (seen, holder) = match tried {
                SlotTry::Taken(held) => {
                    // We leave the queue: the next contender becomes the head.
                    let mut queue = queue;
                    if let Some(entry) = queue.0.take() {
                        entry.left_with_slot();
                    }
                    return Ok(LockGuard::new(&self.name, held));
                }
                SlotTry::Full { seen, holder } => (seen, holder),
            };
            let left = match wait {
                Wait::No => return Err(queue.leave(Self::held_error(holder)).await),
                Wait::Forever => Duration::MAX,
                Wait::Up(d) => match d.checked_sub(started.elapsed()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Err(queue.leave(timeout(d)).await),
                },
            };
            let give_up = tokio::time::sleep(left.min(Duration::from_secs(86_400 * 365)));
            tokio::select! {
                freed = self.backend.slot_freed(&self.name, seen) => {
                    if let Err(e) = freed {
                        tracing::debug!(semaphore = self.name, error = %e, "waiting for a slot failed; reading again");
                        tokio::time::sleep(RETRY_WAIT.min(left)).await;
                    }
                }
                _ = lost.0.lost() => return Err(LockError::Lost),
                _ = give_up => {
                    if let Wait::Up(d) = wait {
                        return Err(queue.leave(timeout(d)).await);
                    }
                }
            }
        }
    }
}
