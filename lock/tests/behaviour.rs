//! One behavioural suite, run against every backend.

mod common;

macro_rules! suite {
    ($backend:ident, $make:expr, $fifo_waiters:expr) => {
        mod $backend {
            use super::common;
            #[allow(unused_imports)]
            use super::common::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn mutual_exclusion() {
                common::mutual_exclusion($make(3).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn try_lock_names_holder() {
                common::try_lock_names_holder($make(2).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn timeout_cleans_up() {
                common::timeout_cleans_up($make(2).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn fifo() {
                common::fifo($make(1).await, $fifo_waiters).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn registry_lists_jobs() {
                common::registry_lists_jobs($make(2).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn watch_reports_running_jobs_first() {
                common::watch_reports_running_jobs_first($make(2).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn drop_then_relock() {
                common::drop_then_relock($make(1).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn election() {
                common::election($make(2).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn observe_follows_the_holder() {
                common::observe_follows_the_holder($make(2).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn invalid_names() {
                common::invalid_names($make(1).await).await;
            }
        }
    };
}

suite!(memory, |n| async move { common::memory(n) }, 16);
suite!(file, |n| async move { common::file(n) }, 16);
#[cfg(feature = "etcd")]
suite!(etcd, common::etcd, 16);
