//! Semaphores on every backend: at most N inside, FIFO, one wake-up per release, tokens that
//! only grow, holders that disagree about N, the registry.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Fixture, bounded, eventually};
use futures::StreamExt;
use palisade_lock::{Coordinator, JobInfo, LockError, RunOutcome, Wait};

/// 24 tasks spread over the fixture's coordinators take a 3-slot semaphore 4 times each. Every
/// critical section records when its acquire was called, when it entered and when it left;
/// afterwards no instant is inside more than 3 of them, tokens are unique, and an acquisition
/// that began after another one had returned has the larger token (the order in which tasks
/// report their tokens proves nothing: a task can be scheduled late after its grant).
async fn never_more_than_n_inside(f: Fixture) {
    const PERMITS: u32 = 3;
    let start = Instant::now();
    let sections: Arc<Mutex<Vec<Section>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in f.clients.iter().cycle().take(24) {
        let sem = c.semaphore("backfill", PERMITS).unwrap();
        let sections = sections.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let asked = start.elapsed();
                let g = sem.acquire().await.expect("acquire");
                let enter = start.elapsed();
                tokio::time::sleep(Duration::from_millis(5)).await;
                let exit = start.elapsed();
                sections.lock().unwrap().push(Section {
                    asked,
                    enter,
                    exit,
                    token: g.fencing_token(),
                });
                g.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        bounded("every task finishes", t).await.expect("task");
    }
    let sections = sections.lock().unwrap().clone();
    assert_eq!(sections.len(), 96, "24 tasks x 4 rounds");
    // Sweep: +1 at each enter, -1 at each exit (exits first at equal times).
    let mut edges: Vec<(Duration, i32)> = sections
        .iter()
        .flat_map(|s| [(s.enter, 1), (s.exit, -1)])
        .collect();
    edges.sort();
    let (mut inside, mut most) = (0, 0);
    for (_, step) in edges {
        inside += step;
        most = most.max(inside);
    }
    assert!(most <= PERMITS as i32, "{most} holders inside at once");
    let mut tokens: Vec<u64> = sections.iter().map(|s| s.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 96, "every acquisition has its own token");
    for later in &sections {
        for earlier in sections.iter().filter(|e| e.enter < later.asked) {
            assert!(
                later.token > earlier.token,
                "an acquisition asked at {:?} got token {} after one that returned at {:?} \
                 with token {}",
                later.asked,
                later.token,
                earlier.enter,
                earlier.token
            );
        }
    }
}

/// One critical section of [`never_more_than_n_inside`].
#[derive(Clone, Copy, Debug)]
struct Section {
    asked: Duration,
    enter: Duration,
    exit: Duration,
    token: u64,
}

/// N slots are granted at once; the next contender is refused, and `holders` lists the N.
async fn admits_exactly_n(f: Fixture) {
    let sem = f.clients[0].semaphore("pool", 3).unwrap();
    let mut guards = Vec::new();
    for client in f.clients.iter().cycle().take(3) {
        let s = client.semaphore("pool", 3).unwrap();
        guards.push(
            bounded("a free slot", s.try_acquire())
                .await
                .expect("free slot"),
        );
    }
    match sem.try_acquire().await {
        Err(LockError::Held { .. }) => {}
        other => panic!("a fourth holder: {other:?}"),
    }
    let holders = sem.holders().await.unwrap();
    let mut observed = sem.observe();
    let first = bounded("observe's first report", observed.next())
        .await
        .unwrap();
    assert_eq!(first, holders, "observe starts with the holders now");
    let mut tokens: Vec<u64> = guards.iter().map(|g| g.fencing_token()).collect();
    tokens.sort_unstable();
    let listed: Vec<u64> = holders.iter().map(|h| h.fencing_token).collect();
    assert_eq!(listed, tokens, "holders, earliest first");
    // A timed-out waiter leaves the queue; a freed slot is then taken at once.
    match sem.acquire_timeout(Duration::from_millis(300)).await {
        Err(LockError::Timeout { .. }) => {}
        other => panic!("expected a timeout: {other:?}"),
    }
    eventually("the timed-out waiter left the queue", || async {
        sem.waiters().await.map(|w| w.is_empty()).unwrap_or(false)
    })
    .await;
    guards.pop().unwrap().release().await.unwrap();
    let g = bounded("the freed slot", sem.try_acquire())
        .await
        .expect("slot");
    assert!(guards.iter().all(|h| g.fencing_token() > h.fencing_token()));
}

/// A holder that asked for another number of permits makes the contender fail, naming both.
async fn disagreeing_permits_fail(f: Fixture) {
    let _held = f.clients[0]
        .semaphore("mixed", 3)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let other = f.clients[f.clients.len() - 1]
        .semaphore("mixed", 2)
        .unwrap();
    match bounded("the mismatch", other.acquire()).await {
        Err(LockError::PermitsMismatch { name, ours, theirs }) => {
            assert_eq!((name.as_str(), ours, theirs), ("mixed", 2, 3));
        }
        other => panic!("expected PermitsMismatch: {other:?}"),
    }
    assert!(matches!(
        f.clients[0].semaphore("mixed", 0),
        Err(LockError::Config {
            field: "permits",
            ..
        })
    ));
    // Right after a refused try: the refused contender left the queue before it returned, so
    // the next contender reaches the slots and learns of the mismatch.
    let full = f.clients[0].semaphore("full", 2).unwrap();
    let _held = [full.acquire().await.unwrap(), full.acquire().await.unwrap()];
    assert!(matches!(
        full.try_acquire().await,
        Err(LockError::Held { .. })
    ));
    let other = f.clients[0].semaphore("full", 1).unwrap();
    let got = other.try_acquire().await;
    assert!(
        matches!(
            got,
            Err(LockError::PermitsMismatch {
                ours: 1,
                theirs: 2,
                ..
            })
        ),
        "a mismatch, not Held because of the refused contender's queue entry: {got:?}"
    );
}

/// Waiters are served in arrival order: each queues only after the previous one is queued. The
/// grant order is read from the tokens (handed out in grant order), not from the order in which
/// the tasks report, which the scheduler may swap when two slots free up at once.
async fn fifo(f: Fixture) {
    let c = &f.clients[0];
    let sem = c.semaphore("queue", 2).unwrap();
    let held = vec![sem.acquire().await.unwrap(), sem.acquire().await.unwrap()];
    let order: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let s = f.clients[i % f.clients.len()]
            .semaphore("queue", 2)
            .unwrap();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let g = s.acquire().await.expect("acquire");
            order.lock().unwrap().push((g.fencing_token(), i));
            tokio::time::sleep(Duration::from_millis(20)).await;
            g.release().await.unwrap();
        }));
        eventually("the waiter is queued", || async {
            sem.waiters()
                .await
                .map(|w| w.len() == i + 1)
                .unwrap_or(false)
        })
        .await;
    }
    for g in held {
        g.release().await.unwrap();
    }
    for t in tasks {
        bounded("waiters finish", t).await.unwrap();
    }
    let mut order = order.lock().unwrap().clone();
    order.sort_unstable();
    let granted: Vec<usize> = order.iter().map(|&(_, i)| i).collect();
    assert_eq!(
        granted,
        vec![0, 1, 2, 3, 4],
        "grant order (by token): {order:?}"
    );
}

/// `run_limited` registers every holder under its own entry, with its permits and token.
async fn registry_lists_every_holder(f: Fixture) {
    let c = f.clients[0].clone();
    let release = Arc::new(tokio::sync::Notify::new());
    let mut runs = Vec::new();
    for i in 0..3 {
        let (c, release) = (f.clients[i % f.clients.len()].clone(), release.clone());
        runs.push(tokio::spawn(async move {
            c.run_limited(
                "nightly",
                3,
                JobInfo::new(format!("job-{i}")),
                Wait::Forever,
                |_| async move {
                    release.notified().await;
                },
            )
            .await
        }));
    }
    eventually("three holders registered", || async {
        c.registry()
            .running()
            .await
            .map(|r| r.len() == 3)
            .unwrap_or(false)
    })
    .await;
    let running = c.registry().running().await.unwrap();
    let mut tokens: Vec<u64> = running.iter().filter_map(|j| j.fencing_token).collect();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "{running:?}");
    assert!(
        running
            .iter()
            .all(|j| j.lock == "nightly" && j.permits == Some(3))
    );
    let skipped = c
        .run_limited("nightly", 3, JobInfo::new("fourth"), Wait::No, |_| async {})
        .await
        .unwrap();
    match skipped {
        RunOutcome::Skipped { holder: Some(h) } => assert!(h.name.starts_with("job-")),
        other => panic!("expected Skipped with a holder: {other:?}"),
    }
    release.notify_waiters();
    for r in runs {
        let out = bounded("the runs end", r).await.unwrap().unwrap();
        assert!(matches!(out, RunOutcome::Ran(())));
    }
    eventually("the entries are gone", || async {
        c.registry()
            .running()
            .await
            .map(|r| r.is_empty())
            .unwrap_or(false)
    })
    .await;
}

macro_rules! suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn never_more_than_n_inside() {
                super::never_more_than_n_inside($make(3).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn admits_exactly_n() {
                super::admits_exactly_n($make(3).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn disagreeing_permits_fail() {
                super::disagreeing_permits_fail($make(2).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn registry_lists_every_holder() {
                super::registry_lists_every_holder($make(3).await).await;
            }
        }
    };
}

suite!(memory, |n| async move { common::memory(n) });
suite!(file, |n| async move { common::file(n) });
#[cfg(feature = "etcd")]
suite!(etcd, common::etcd);

/// FIFO where the backend promises it: one process's tasks on every backend (the file
/// backend's queue is FIFO inside a process), and across sessions on etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_fifo() {
    fifo(common::memory(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_fifo_in_one_process() {
    let f = common::file(1);
    // One coordinator: its tasks queue in FIFO order; `waiters` shows the head only here.
    let c: &Coordinator = &f.clients[0];
    let sem = c.semaphore("queue", 1).unwrap();
    let held = sem.acquire().await.unwrap();
    let order: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (s, order) = (sem.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let g = s.acquire().await.expect("acquire");
            order.lock().unwrap().push(i);
            g.release().await.unwrap();
        }));
        // Each task is queued before the next starts: the first at the head of the queue, the
        // others waiting behind it.
        eventually("the waiter is queued", || async {
            let backend = c.backend();
            let head = backend
                .holder(palisade_lock::Kind::Semaphore, "queue")
                .await;
            let waiting = backend
                .queue_len(palisade_lock::Kind::Semaphore, "queue")
                .await;
            matches!(head, Ok(Some(_))) && waiting.is_ok_and(|n| n == i)
        })
        .await;
    }
    held.release().await.unwrap();
    for t in tasks {
        bounded("waiters finish", t).await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_fifo_across_sessions() {
    fifo(common::etcd(3).await).await;
}

/// One release wakes one waiter: with every slot held and five waiters queued, each release
/// wakes only the head of the queue (one slot wake-up), and its hand-over wakes only the next
/// waiter (one queue wake-up); a herd would wake every waiter on every release.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_one_wakeup_per_release() {
    use palisade_lock::stats;
    let f = common::etcd(3).await;
    let sem = f.clients[0].semaphore("herd", 3).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(sem.acquire().await.unwrap());
    }
    let acquired: Arc<Mutex<Vec<palisade_lock::LockGuard>>> = Arc::default();
    for i in 0..5 {
        let s = f.clients[i % 3].semaphore("herd", 3).unwrap();
        let acquired = acquired.clone();
        tokio::spawn(async move {
            let g = s.acquire().await.expect("acquire");
            acquired.lock().unwrap().push(g);
        });
        eventually("the waiter is queued", || async {
            sem.waiters()
                .await
                .map(|w| w.len() == i + 1)
                .unwrap_or(false)
        })
        .await;
    }
    let (slot_before, queue_before) = (stats::slot_wakeups(), stats::wakeups());
    for n in 1..=3 {
        held.pop().unwrap().release().await.unwrap();
        eventually("the head takes the freed slot", || async {
            acquired.lock().unwrap().len() == n
        })
        .await;
        eventually("the next waiter is the head", || async {
            sem.waiters()
                .await
                .map(|w| w.len() == 5 - n)
                .unwrap_or(false)
        })
        .await;
    }
    let slot_wakeups = stats::slot_wakeups() - slot_before;
    let queue_wakeups = stats::wakeups() - queue_before;
    // At most one each per release (the head may also find the slot free before it watches).
    assert!(
        slot_wakeups <= 3,
        "{slot_wakeups} slot wake-ups for 3 releases"
    );
    assert!(
        queue_wakeups <= 3,
        "{queue_wakeups} queue wake-ups for 3 hand-overs (a herd would wake every waiter)"
    );
}
