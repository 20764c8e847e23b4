//! The entry point: locks, exclusive jobs, the registry and elections over one backend.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::backend::{Holder, Kind, LockBackend, Wait};
use crate::backends::file::FileBackend;
use crate::backends::memory::MemoryBackend;
use crate::election::Election;
use crate::error::{LockError, validate_name};
use crate::guard::LockGuard;
use crate::job::JobInfo;
use crate::registry::JobRegistry;
use crate::semaphore::Semaphore;
use crate::session::{LostSignal, Session};
use futures::stream::BoxStream;

/// What `run_exclusive` did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum RunOutcome<T> {
    /// The job ran to completion while holding the lock; here is what it returned.
    Ran(T),
    /// The job did not run: the lock was held (and `Wait` ran out).
    Skipped {
        /// The holder's job, when it registered one.
        holder: Option<JobInfo>,
    },
}

impl<T> RunOutcome<T> {
    /// The job's result, if it ran.
    pub fn ran(self) -> Option<T> {
        match self {
            RunOutcome::Ran(t) => Some(t),
            RunOutcome::Skipped { .. } => None,
        }
    }
}

/// What a job running under `run_exclusive` can see of its lock.
#[derive(Debug, Clone)]
pub struct JobContext {
    name: String,
    token: u64,
    lost: LostSignal,
    lock_fd: Option<std::os::fd::RawFd>,
}

impl JobContext {
    /// The lock name.
    pub fn lock_name(&self) -> &str {
        &self.name
    }

    /// The fencing token to pass to the storage the job writes.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Resolves when the lease is lost. The job's own future is dropped at that moment; this is
    /// for work the job handed to other tasks, threads or processes, to stop them.
    pub async fn cancelled(&self) {
        self.lost.0.lost().await;
    }

    /// Whether the lease is lost now (local monotonic clock). Check it before each write from
    /// blocking code.
    pub fn is_cancelled(&self) -> bool {
        self.lost.0.is_lost()
    }

    /// The instant (local monotonic clock) at which the job is cancelled unless the lease is
    /// renewed before: the send time of the last renewal etcd acknowledged plus its TTL, which is
    /// never later than etcd's own expiry of the lease. `None` on the file and memory backends.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.lost.0.deadline()
    }

    /// Resolves once renewals have failed for so long that the job will be cancelled within
    /// `margin` (now >= [`deadline`](Self::deadline) - `margin`), or the lease is lost: the moment
    /// to ask work outside this future to stop, so that it has stopped before another process
    /// can hold the lock. Never resolves on the file and memory backends.
    pub async fn expiring(&self, margin: std::time::Duration) {
        self.lost.0.expiring(margin).await;
    }

    /// On the file backend, the descriptor that holds the lock's `flock`, valid while the job
    /// runs (`None` on etcd and in memory). A child process that inherits it (clear
    /// `FD_CLOEXEC` before `exec`) keeps the lock held for as long as it or any process it
    /// passes the descriptor to lives, as `flock(1)` does, even if this process dies first.
    pub fn lock_fd(&self) -> Option<std::os::fd::RawFd> {
        self.lock_fd
    }
}

/// Takes locks, runs exclusive jobs, lists them and elects leaders, over one backend: etcd
/// (`Coordinator::etcd`), files on one host (`Coordinator::file`) or one process
/// (`Coordinator::memory`). Cloning is cheap and shares the session.
#[derive(Clone)]
pub struct Coordinator {
    backend: Arc<dyn LockBackend>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").finish_non_exhaustive()
    }
}

impl Coordinator {
    /// A coordinator for the tasks of this process only.
    pub fn memory() -> Self {
        Coordinator::from_backend(Arc::new(MemoryBackend::new()))
    }

    /// A coordinator for the processes of one host, with `flock` files under `dir` (created if
    /// missing). See the crate docs for what it guarantees.
    pub fn file(dir: impl Into<PathBuf>) -> Result<Self, LockError> {
        Ok(Coordinator::from_backend(Arc::new(FileBackend::open(
            dir.into(),
        )?)))
    }

    // `Coordinator::etcd` is in etcd_builder.rs, beside the builder it returns: the builder's
    // `connect` returns a `Coordinator`, and this module does not import the builder back.

    /// A coordinator over a backend of this crate (another coordinator's
    /// [`backend`](Self::backend), say): [`LockBackend`] is sealed.
    pub fn from_backend(backend: Arc<dyn LockBackend>) -> Self {
        Coordinator { backend }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.backend
    }

    /// The current session.
    pub fn session(&self) -> Session {
        self.backend.session()
    }

    /// Gives up this process's session at once, for a process about to exit (on a signal, say):
    /// on etcd the lease is revoked, so its held locks, its waiters' places in queues and its
    /// registry entries are deleted now, and the next contender need not wait for the TTL.
    /// Guards and waits of this coordinator are lost or fail afterwards.
    pub async fn close(&self) -> Result<(), LockError> {
        self.backend.close().await
    }

    /// Waits (in arrival order) until `name` is free and takes it.
    pub async fn lock(&self, name: &str) -> Result<LockGuard, LockError> {
        self.acquire(name, Vec::new(), Wait::Forever).await
    }

    /// Like [`Coordinator::lock`], but gives up with [`LockError::Timeout`] after `timeout`. Our
    /// queue entry is removed in the background, so a grant that arrives late is released.
    pub async fn lock_timeout(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<LockGuard, LockError> {
        self.acquire(name, Vec::new(), Wait::Up(timeout)).await
    }

    /// Takes `name` if it is free; otherwise fails at once with [`LockError::Held`], naming the
    /// holder's job when it registered one.
    pub async fn try_lock(&self, name: &str) -> Result<LockGuard, LockError> {
        self.acquire(name, Vec::new(), Wait::No).await
    }

    async fn acquire(
        &self,
        name: &str,
        value: Vec<u8>,
        wait: Wait,
    ) -> Result<LockGuard, LockError> {
        validate_name(name)?;
        let span = tracing::debug_span!("palisade_lock.acquire", lock = name, ?wait);
        async {
            let held = self.backend.acquire(Kind::Lock, name, value, wait).await?;
            let guard = LockGuard::new(name, held);
            tracing::debug!(fencing_token = guard.fencing_token(), "acquired");
            #[cfg(feature = "metrics")]
            metrics::counter!("palisade_lock_acquired_total").increment(1);
            Ok(guard)
        }
        .instrument(span)
        .await
    }

    /// How many contenders wait for `name` behind its holder (on the file backend: the waiters
    /// of this process only).
    pub async fn queue_len(&self, name: &str) -> Result<usize, LockError> {
        validate_name(name)?;
        self.backend.queue_len(Kind::Lock, name).await
    }

    /// The holder of `name` now (`None` while free): its fencing token, and its job when it
    /// registered one ([`Holder::job_info`]).
    pub async fn holder(&self, name: &str) -> Result<Option<Holder>, LockError> {
        validate_name(name)?;
        self.backend.holder(Kind::Lock, name).await
    }

    /// The holder of `name` now and after every change (`None` while free), for dashboards and
    /// for waiting on a lock without contending for it.
    pub fn observe(&self, name: &str) -> Result<BoxStream<'static, Option<Holder>>, LockError> {
        validate_name(name)?;
        Ok(self.backend.observe(Kind::Lock, name))
    }

    /// The holder and the waiters of `name`, in arrival order (on the file backend only the
    /// holder: `flock` does not tell about waiters).
    pub async fn contenders(&self, name: &str) -> Result<Vec<Holder>, LockError> {
        validate_name(name)?;
        self.backend.contenders(Kind::Lock, name).await
    }

    /// Breaks `name` for an operator (`palisade unlock`): on etcd the holder's session lease is
    /// revoked, so all its keys go and its `run_exclusive` (or `palisade run`) sees the lease
    /// lost and stops its job; on the file and memory backends it is refused with
    /// [`LockError::Held`] while the holder lives (stop that process instead). Returns the holder
    /// it broke, `None` if `name` was free.
    pub async fn break_lock(&self, name: &str) -> Result<Option<Holder>, LockError> {
        validate_name(name)?;
        let broken = self.backend.break_lock(Kind::Lock, name).await?;
        if let Some(h) = &broken {
            tracing::warn!(
                lock = name,
                fencing_token = h.fencing_token,
                "lock broken by an operator"
            );
        }
        Ok(broken)
    }

    /// Runs `job` while holding `name`, registered in the [`JobRegistry`] as `info`.
    ///
    /// - `Ok(RunOutcome::Ran(t))`: the job completed under the lock.
    /// - `Ok(RunOutcome::Skipped { holder })`: the lock was held and `wait` ran out (at once for
    ///   `Wait::No`); `holder` is the running job, when it registered one.
    /// - `Err(LockError::Lost)`: the lease was lost mid-run. The job's future was dropped at that
    ///   moment (before it was polled again), and `ctx.cancelled()` fired for work it spawned.
    pub async fn run_exclusive<F, Fut, T>(
        &self,
        name: &str,
        info: JobInfo,
        wait: Wait,
        job: F,
    ) -> Result<RunOutcome<T>, LockError>
    where
        F: FnOnce(JobContext) -> Fut,
        Fut: Future<Output = T>,
    {
        validate_name(name)?;
        let mut info = info;
        info.lock = name.to_string();
        let guard = match self.acquire(name, info.to_bytes(), wait).await {
            Ok(guard) => guard,
            Err(e) => {
                let current = async { self.backend.holder(Kind::Lock, name).await.ok().flatten() };
                return skipped(name, e, current).await;
            }
        };
        self.run_holding(name, guard, info, job).await
    }

    /// Takes one of `permits` slots of semaphore `name` and runs `job` while holding it,
    /// registered in the [`JobRegistry`] as `info` (each holder under its own entry,
    /// `<name>/<fencing token>`). Outcomes as for [`run_exclusive`](Self::run_exclusive):
    /// `Skipped` when every slot was held and `wait` ran out, `Err(LockError::Lost)` when the
    /// lease was lost mid-run (the job's future is dropped at that moment).
    pub async fn run_limited<F, Fut, T>(
        &self,
        name: &str,
        permits: u32,
        info: JobInfo,
        wait: Wait,
        job: F,
    ) -> Result<RunOutcome<T>, LockError>
    where
        F: FnOnce(JobContext) -> Fut,
        Fut: Future<Output = T>,
    {
        let semaphore = self.semaphore(name, permits)?;
        let mut info = info;
        info.lock = name.to_string();
        info.permits = Some(permits);
        let guard = match semaphore.acquire_with(info.to_bytes(), wait).await {
            Ok(guard) => guard,
            Err(e) => {
                let current = async { semaphore.holders().await.ok()?.into_iter().next() };
                return skipped(name, e, current).await;
            }
        };
        self.run_holding(name, guard, info, job).await
    }

    /// A semaphore: at most `permits` holders of `name` at once (see [`Semaphore`]). Fails with
    /// [`LockError::Config`] when `permits` is 0.
    pub fn semaphore(&self, name: &str, permits: u32) -> Result<Semaphore, LockError> {
        validate_name(name)?;
        if permits == 0 {
            return Err(LockError::Config {
                field: "permits",
                reason: "a semaphore needs at least 1 permit".into(),
            });
        }
        Ok(Semaphore {
            backend: self.backend.clone(),
            name: name.to_string(),
            permits,
        })
    }

    /// Runs `job` under `guard` (held for `name`), registered as `info`: the part of
    /// `run_exclusive` and `run_limited` after the acquisition.
    async fn run_holding<F, Fut, T>(
        &self,
        name: &str,
        guard: LockGuard,
        mut info: JobInfo,
        job: F,
    ) -> Result<RunOutcome<T>, LockError>
    where
        F: FnOnce(JobContext) -> Fut,
        Fut: Future<Output = T>,
    {
        info.fencing_token = Some(guard.fencing_token());
        let registration = match self.backend.register(info).await {
            Ok(r) => r,
            Err(e) => {
                let _ = guard.release().await;
                return Err(e);
            }
        };
        let lost = guard.lost_signal();
        let ctx = JobContext {
            name: name.to_string(),
            token: guard.fencing_token(),
            lost: lost.clone(),
            lock_fd: guard.lock_fd(),
        };
        let span = tracing::info_span!(
            "palisade_lock.run_exclusive",
            lock = name,
            fencing_token = guard.fencing_token()
        );
        let job = job(ctx);
        let outcome = async {
            tokio::select! {
                // Polled first on every wake-up: a job resumed after its lease ran out is dropped
                // before it runs another step.
                biased;
                _ = lost.0.lost() => None,
                out = job => Some(out),
            }
        }
        .instrument(span)
        .await;
        match outcome {
            Some(out) => {
                let finished = registration.finish().await;
                let released = guard.release().await;
                finished?;
                released?;
                Ok(RunOutcome::Ran(out))
            }
            None => {
                tracing::warn!(lock = name, "lease lost mid-run: job cancelled");
                #[cfg(feature = "metrics")]
                metrics::counter!("palisade_lock_lost_total").increment(1);
                drop(registration);
                drop(guard);
                Err(LockError::Lost)
            }
        }
    }

    /// The registry of jobs running under `run_exclusive`.
    pub fn registry(&self) -> JobRegistry {
        JobRegistry {
            backend: self.backend.clone(),
        }
    }

    /// Leader election on the same backend and session.
    pub fn election(&self) -> Election {
        Election {
            backend: self.backend.clone(),
        }
    }
}

/// What `run_exclusive` and `run_limited` make of a failed acquisition: `Held` and `Timeout`
/// mean the job is skipped (naming the holder's job: the one the refusal named, or for a
/// timeout the one `current` finds now), anything else is an error.
async fn skipped<T>(
    name: &str,
    error: LockError,
    current: impl Future<Output = Option<Holder>>,
) -> Result<RunOutcome<T>, LockError> {
    let holder = match error {
        LockError::Held { holder } => holder,
        LockError::Timeout { .. } => current.await.and_then(|h| h.job()),
        other => return Err(other),
    };
    tracing::info!(lock = name, "skipped: held by another job");
    Ok(RunOutcome::Skipped {
        holder: holder.map(|h| *h),
    })
}
