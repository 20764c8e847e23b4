//! FIFO and no herd on etcd: with 16 waiters, releases wake waiters in revision order and each
//! release wakes exactly one waiter. Alone in its test binary, because it reads process-wide
//! counters.
#![cfg(feature = "etcd")]

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_release_wakes_one_waiter_in_order() {
    let f = common::etcd(1).await;
    let before = palisade_lock::stats::wakeups();
    common::fifo(f, 16).await;
    let wakeups = palisade_lock::stats::wakeups() - before;
    assert_eq!(wakeups, 16, "16 releases must wake 16 waiters, one each");
}
