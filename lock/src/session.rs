//! The session: the liveness of everything a process holds, and how its loss is signalled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Shared liveness of a lease.
///
/// Invariant: once `lost` is true it never becomes false again, and `deadline` only moves forward
/// while `lost` is false. A lease is alive only while `lost` is false *and* the local monotonic
/// clock is before `deadline` (the send time of the last renewal etcd acknowledged plus the TTL it
/// granted), so a paused or partitioned process finds its lease lost the moment it looks, even
/// before its keepalive task has run.
///
/// A child liveness (one held lock) is lost when its own flag is set (its key was deleted) or
/// its parent (the session) is lost; its deadline is the parent's.
///
/// The deadline is kept on two clocks: tokio's (CLOCK_MONOTONIC, which tests can pause and which
/// stops while the machine is suspended) and CLOCK_BOOTTIME (which counts the suspension). etcd
/// expires a lease on its own clock while a laptop or VM sleeps; on waking, the boot-time deadline
/// finds the lease lost at once, where the monotonic one would believe it alive for as long as
/// the machine slept.
#[derive(Debug)]
pub(crate) struct Liveness {
    lost: watch::Sender<bool>,
    deadline: Mutex<Option<Deadline>>,
    parent: Option<Arc<Liveness>>,
}

/// One instant on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deadline {
    monotonic: Instant,
    /// Time since boot, suspensions included (CLOCK_BOOTTIME).
    boot: Duration,
}

impl Deadline {
    fn at(monotonic: Instant) -> Deadline {
        let left = monotonic.saturating_duration_since(Instant::now());
        Deadline {
            monotonic,
            boot: boot_now() + left,
        }
    }

    /// Whether the deadline has passed on either clock.
    fn passed(&self, monotonic: Instant, boot: Duration) -> bool {
        monotonic >= self.monotonic || boot >= self.boot
    }
}

/// Time since boot, including time the machine spent suspended.
fn boot_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// How long a wait for the deadline sleeps at most before it looks at the boot clock again: a
/// sleep on tokio's clock does not count a suspension, so after waking it would fire late by
/// as long as the machine slept.
const BOOT_CHECK: Duration = Duration::from_secs(1);

/// Sleeps until `deadline` or for [`BOOT_CHECK`], whichever comes first.
async fn sleep_towards(deadline: Instant) {
    tokio::time::sleep_until(deadline.min(Instant::now() + BOOT_CHECK)).await;
}

impl Liveness {
    /// A liveness that is never lost (memory and file backends: the lock lives as long as the
    /// process, and the kernel releases a `flock` when the process dies).
    pub(crate) fn forever() -> Arc<Self> {
        Arc::new(Liveness {
            lost: watch::Sender::new(false),
            deadline: Mutex::new(None),
            parent: None,
        })
    }

    /// A liveness that is lost when `parent` is, or when marked lost itself.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn child(parent: &Arc<Liveness>) -> Arc<Self> {
        Arc::new(Liveness {
            lost: watch::Sender::new(false),
            deadline: Mutex::new(None),
            parent: Some(parent.clone()),
        })
    }

    /// A liveness that is lost at `deadline` unless renewed.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn until(deadline: Instant) -> Arc<Self> {
        Arc::new(Liveness {
            lost: watch::Sender::new(false),
            deadline: Mutex::new(Some(Deadline::at(deadline))),
            parent: None,
        })
    }

    /// Moves the deadline forward (never backward).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn renew(&self, deadline: Instant) {
        let mut d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none_or(|old| old.monotonic < deadline) {
            *d = Some(Deadline::at(deadline));
        }
    }

    /// Marks the lease lost for good.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn mark_lost(&self) {
        self.lost.send_replace(true);
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.both_deadlines().map(|d| d.monotonic)
    }

    fn both_deadlines(&self) -> Option<Deadline> {
        match &self.parent {
            Some(parent) => parent.both_deadlines(),
            None => *self.deadline.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Whether the deadline has passed, on the monotonic or on the boot clock.
    fn deadline_passed(&self) -> bool {
        self.both_deadlines()
            .is_some_and(|d| d.passed(Instant::now(), boot_now()))
    }

    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
            || self.parent.as_ref().is_some_and(|p| p.is_lost())
            || self.deadline_passed()
    }

    /// Resolves when this liveness's own flag is set.
    async fn flagged(&self) {
        let mut rx = self.lost.subscribe();
        if rx.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once the lease is lost or will be within `margin` unless a renewal is
    /// acknowledged first (now >= deadline - margin), following renewals while it waits; never
    /// resolves for a liveness that is never lost.
    pub(crate) async fn expiring(&self, margin: Duration) {
        if let Some(parent) = &self.parent {
            return tokio::select! {
                () = self.flagged() => {}
                () = Box::pin(parent.expiring(margin)) => {}
            };
        }
        let mut rx = self.lost.subscribe();
        loop {
            if *rx.borrow_and_update() {
                return;
            }
            match self.deadline() {
                Some(deadline) => {
                    let warn_at = deadline.checked_sub(margin).unwrap_or(deadline);
                    let warn_boot = self.both_deadlines().map(|d| d.boot.saturating_sub(margin));
                    if Instant::now() >= warn_at || warn_boot.is_some_and(|b| boot_now() >= b) {
                        return;
                    }
                    tokio::select! {
                        _ = rx.changed() => {}
                        _ = sleep_towards(warn_at) => {}
                    }
                }
                None => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    /// Resolves when the lease is lost; never resolves for a liveness that is never lost.
    pub(crate) async fn lost(&self) {
        // Lost is "expiring with no margin left".
        self.expiring(Duration::ZERO).await;
    }
}

/// A cheap, cloneable view of whether a lease is still alive.
#[derive(Debug, Clone)]
pub(crate) struct LostSignal(pub(crate) Arc<Liveness>);

impl LostSignal {
    pub(crate) fn never() -> Self {
        LostSignal(Liveness::forever())
    }
}

/// A session: the lease under which a process holds its locks, registry entries and
/// leaderships, kept alive in the background.
///
/// On etcd the session is a lease renewed about every third of its TTL (over another endpoint,
/// with backoff, when one fails). [`Session::lost`] resolves when the lease can no longer be
/// proven alive: revoked, expired, or no renewal acknowledged by etcd within the TTL, measured on
/// the local monotonic clock from the send time of the last acknowledged renewal. After that the
/// coordinator starts a new session for new locks; guards taken under the old one stay lost.
///
/// The file and memory backends have a session that is never lost: their locks live exactly as
/// long as the process.
#[derive(Debug, Clone)]
pub struct Session {
    pub(crate) liveness: Arc<Liveness>,
    pub(crate) lease_id: Option<i64>,
    pub(crate) ttl: Option<Duration>,
}

impl Session {
    pub(crate) fn forever() -> Self {
        Session {
            liveness: Liveness::forever(),
            lease_id: None,
            ttl: None,
        }
    }

    /// Resolves when the session's lease can no longer be proven alive.
    pub async fn lost(&self) {
        self.liveness.lost().await;
    }

    /// Whether the lease is lost now (checked against the local clock, not only the keepalive).
    pub fn is_lost(&self) -> bool {
        self.liveness.is_lost()
    }

    /// The etcd lease id, if the session is an etcd lease.
    pub fn lease_id(&self) -> Option<i64> {
        self.lease_id
    }

    /// The TTL etcd granted, if the session is an etcd lease.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// The instant (local monotonic clock) after which the lease counts as lost unless renewed:
    /// the send time of the last renewal etcd acknowledged plus 99 % of the TTL it granted (the
    /// 1 % margin covers a local clock slower than etcd's). The same deadline is also kept on
    /// CLOCK_BOOTTIME, so a machine that was suspended finds its lease lost the moment it wakes
    /// (a plain monotonic deadline would not count the time asleep).
    pub fn deadline(&self) -> Option<Instant> {
        self.liveness.deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lost_at_the_deadline_unless_renewed() {
        let start = Instant::now();
        let l = Liveness::until(start + Duration::from_secs(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!l.is_lost());
        l.renew(start + Duration::from_secs(5));
        // An older deadline never moves it back.
        l.renew(start + Duration::from_secs(4));
        assert_eq!(l.deadline(), Some(start + Duration::from_secs(5)));
        let lost = tokio::spawn({
            let l = l.clone();
            async move {
                l.lost().await;
                Instant::now()
            }
        });
        let at = lost.await.unwrap();
        assert_eq!(at, start + Duration::from_secs(5));
        assert!(l.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn expiring_fires_the_margin_before_the_deadline_and_follows_renewals() {
        let start = Instant::now();
        let l = Liveness::until(start + Duration::from_secs(10));
        let margin = Duration::from_secs(3);
        let waiter = tokio::spawn({
            let l = l.clone();
            async move {
                l.expiring(margin).await;
                Instant::now()
            }
        });
        tokio::time::advance(Duration::from_secs(5)).await;
        l.renew(start + Duration::from_secs(12)); // a renewal moves the warning to 9 s
        assert_eq!(waiter.await.unwrap(), start + Duration::from_secs(9));
        // A margin longer than what is left fires at once; a lost lease fires at once.
        tokio::time::timeout(Duration::ZERO, l.expiring(Duration::from_secs(60)))
            .await
            .expect("within the margin already");
        let forever = Liveness::forever();
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), forever.expiring(margin))
                .await
                .is_err()
        );
    }

    #[test]
    fn a_suspended_machine_passes_the_deadline_on_the_boot_clock() {
        // The monotonic clock stood still for the 60 s the machine slept; the boot clock did not.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mono = Instant::now();
            let d = Deadline {
                monotonic: mono + Duration::from_secs(10),
                boot: Duration::from_secs(1000),
            };
            assert!(!d.passed(mono, Duration::from_secs(995)));
            assert!(
                d.passed(mono, Duration::from_secs(1060)),
                "asleep past the deadline"
            );
            assert!(d.passed(mono + Duration::from_secs(10), Duration::from_secs(995)));
            // Both clocks agree on a fresh deadline.
            let fresh = Deadline::at(mono + Duration::from_secs(10));
            assert!(fresh.boot >= boot_now() + Duration::from_secs(9));
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_process_sees_the_loss_without_any_task_running() {
        let start = Instant::now();
        let l = Liveness::until(start + Duration::from_secs(3));
        // No task runs while "paused"; the clock alone decides.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(l.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn mark_lost_wakes_waiters_and_forever_never_fires() {
        let l = Liveness::until(Instant::now() + Duration::from_secs(60));
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.lost().await }
        });
        l.mark_lost();
        waiter.await.unwrap();
        let forever = Liveness::forever();
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), forever.lost())
                .await
                .is_err()
        );
        assert!(!forever.is_lost());
    }
}
