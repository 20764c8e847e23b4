//! The file backend under what the rest of the host does to it: a process that polls the lock
//! (`palisade jobs`, `observe()`), waiters that give up, a lock file deleted or replaced under
//! its holder (a tmp cleaner), and a lock directory shared by separate coordinators (as separate
//! processes share it: each opens its own descriptors).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use palisade_lock::{Coordinator, JobInfo, LockError, Wait};

const BOUND: Duration = Duration::from_secs(30);

/// Threads of this process, from /proc.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_the_lock_never_makes_a_try_lock_of_a_free_lock_fail() {
    let dir = tempfile::tempdir().unwrap();
    let poller = Coordinator::file(dir.path()).unwrap();
    let taker = Coordinator::file(dir.path()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // What `palisade jobs --watch` and observe() do: look at the holder again and again.
    let polling = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut looks = 0u64;
            runtime.block_on(async {
                while !stop.load(Ordering::Relaxed) {
                    let _ = poller.queue_len("free").await;
                    let mut holders = poller.backend().observe(palisade_lock::Kind::Lock, "free");
                    let _ = holders.next().await;
                    let _ = poller.registry().running().await;
                    looks += 1;
                }
            });
            looks
        })
    };
    let mut spurious = 0;
    for _ in 0..10_000 {
        match taker.try_lock("free").await {
            Ok(guard) => guard.release().await.unwrap(),
            Err(LockError::Held { .. }) => spurious += 1,
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let looks = polling.join().unwrap();
    assert!(
        looks > 10,
        "the poller must have run meanwhile ({looks} looks)"
    );
    assert_eq!(
        spurious, 0,
        "try_lock of a free lock failed {spurious} times beside a poller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_give_up_leave_no_thread_behind() {
    let dir = tempfile::tempdir().unwrap();
    let holder = Coordinator::file(dir.path()).unwrap();
    let _held = holder.lock("busy").await.unwrap();
    let before = threads();
    for _ in 0..50 {
        // A separate coordinator for each waiter, as separate processes would be: each waits on
        // the flock itself, not in this process's queue.
        let waiter = Coordinator::file(dir.path()).unwrap();
        let result = waiter.lock_timeout("busy", Duration::from_millis(20)).await;
        assert!(
            matches!(result, Err(LockError::Timeout { .. })),
            "{result:?}"
        );
        let dropped = tokio::time::timeout(Duration::from_millis(20), waiter.lock("busy")).await;
        assert!(dropped.is_err());
    }
    let after = threads();
    assert!(
        after <= before + 4,
        "100 waiters that gave up left {} threads behind ({before} before, {after} after)",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_file_deleted_under_its_holder_never_gives_two_holders() {
    let dir = tempfile::tempdir().unwrap();
    let a = Coordinator::file(dir.path()).unwrap();
    let b = Coordinator::file(dir.path()).unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let running = tokio::spawn(async move {
        a.run_exclusive("etl", JobInfo::new("a"), Wait::No, |ctx| async move {
            let _ = started_tx.send(ctx.fencing_token());
            std::future::pending::<()>().await
        })
        .await
    });
    let token_a = tokio::time::timeout(BOUND, started_rx)
        .await
        .unwrap()
        .unwrap();

    // A tmp cleaner removes the lock file (and the holder file) while A holds the lock.
    for entry in std::fs::read_dir(dir.path().join("lock")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    // B can now lock a new file at the same path; A must find out and stop.
    let outcome = tokio::time::timeout(BOUND, running)
        .await
        .expect("A's job must be cancelled once its lock file is gone")
        .unwrap();
    assert!(matches!(outcome, Err(LockError::Lost)), "{outcome:?}");
    let guard = tokio::time::timeout(BOUND, b.lock("etl"))
        .await
        .unwrap()
        .unwrap();
    // The counter went with the file: a deleted lock directory cannot keep tokens increasing,
    // which is why the default directory is not under /tmp (see the crate docs).
    assert!(guard.fencing_token() >= 1 && token_a >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_never_holds_a_lock_file_that_was_replaced_while_it_waited() {
    let dir = tempfile::tempdir().unwrap();
    let a = Coordinator::file(dir.path()).unwrap();
    let b = Coordinator::file(dir.path()).unwrap();
    let c = Coordinator::file(dir.path()).unwrap();
    let guard_a = a.lock("x").await.unwrap();
    // B waits while A holds the file.
    let waiting = tokio::spawn(async move { b.lock("x").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    // The file is deleted under A, then A lets go of it.
    let lock_file = std::fs::read_dir(dir.path().join("lock"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "lock"))
        .unwrap();
    std::fs::remove_file(&lock_file).unwrap();
    drop(guard_a);
    let b_holds = tokio::time::timeout(Duration::from_secs(5), async {
        while !waiting.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok();
    // Exactly one of B and a newcomer C holds the lock now: whoever locked the file that is at
    // the path. (A waiter blocked on the old, deleted file used to get it and hold it beside C.)
    match c.try_lock("x").await {
        Ok(_guard_c) => assert!(!b_holds, "B and C both hold the lock"),
        Err(LockError::Held { .. }) => {
            assert!(b_holds, "nobody holds the lock, yet C cannot take it")
        }
        Err(e) => panic!("{e}"),
    }
    if b_holds {
        let guard_b = waiting.await.unwrap().unwrap();
        assert!(guard_b.fencing_token() > 0);
    } else {
        waiting.abort();
    }
}
