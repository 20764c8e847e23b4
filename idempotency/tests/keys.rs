//! One suite of run-once guarantees, run against MemoryStore, FileStore and RedisStore (a real
//! redis-server from palisade-testkit).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use palisade_idempotency::{
    Claim, Error, FileStore, IdempotencyStore, MemoryStore, OnceOptions, Outcome, RedisStore,
};

type Store = Arc<dyn IdempotencyStore>;
/// Makes a new handle on the same records: for files and Redis this is what a restarted process
/// gets; for memory it is a clone of the same map (memory does not survive a restart).
type Factory = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Store> + Send>> + Send + Sync>;

/// The claim lifetime of the runners that die in these tests.
const IN_PROGRESS_TTL: Duration = Duration::from_secs(1);

/// Live runners claim for long enough that a loaded machine (slow fsyncs) never lets their own
/// claim lapse mid-test.
fn opts() -> OnceOptions {
    OnceOptions::default()
        .ttl(Duration::from_secs(60))
        .in_progress_ttl(Duration::from_secs(30))
}

/// Options of a runner that is going to die: its claim lapses after `IN_PROGRESS_TTL`.
fn dying() -> OnceOptions {
    opts().in_progress_ttl(IN_PROGRESS_TTL)
}

async fn suite(name: &str, factory: Factory) {
    let store = factory().await;
    exactly_once_under_32_concurrent_calls(name, &store).await;
    replay_after_restart(name, &store, &factory).await;
    fingerprint_mismatch(name, &store).await;
    failed_job_records_nothing(name, &store).await;
    killed_runner_is_reclaimed_after_in_progress_ttl(name, &store).await;
    live_runner_keeps_its_claim_past_in_progress_ttl(name, &store).await;
    presumed_dead_owner_cannot_overwrite(name, &store).await;
    missing_key(name, &store).await;
}

async fn exactly_once_under_32_concurrent_calls(name: &str, store: &Store) {
    let runs = Arc::new(AtomicUsize::new(0));
    let waiting = opts().wait(Duration::from_secs(20));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (store, runs, waiting) = (store.clone(), runs.clone(), waiting.clone());
        tasks.push(tokio::spawn(async move {
            store
                .once("concurrent", "fp", &waiting, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    // Hold the claim a little so the others really overlap with it.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::io::Error>("result".to_string())
                })
                .await
        }));
    }
    let mut executed = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Outcome::Executed(v) => {
                executed += 1;
                assert_eq!(v, "result");
            }
            Outcome::Replayed(v) => assert_eq!(v, "result"),
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "{name}: the job ran more than once"
    );
    assert_eq!(executed, 1, "{name}");

    // Without waiting, a duplicate during the run is InProgress (HTTP 409).
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let s = store.clone();
    let first = tokio::spawn(async move {
        s.once("busy", "fp", &opts(), || async move {
            let _ = started_tx.send(());
            let _ = finish_rx.await;
            Ok::<_, std::io::Error>(1)
        })
        .await
    });
    started_rx.await.unwrap();
    let dup = store
        .once("busy", "fp", &opts(), || async {
            Ok::<_, std::io::Error>(2)
        })
        .await;
    assert!(
        matches!(dup, Err(Error::InProgress { .. })),
        "{name}: {dup:?}"
    );
    finish_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Outcome::Executed(1));
}

async fn replay_after_restart(name: &str, store: &Store, factory: &Factory) {
    let r = store
        .once("restart", "fp", &opts(), || async {
            Ok::<_, std::io::Error>(vec![1, 2, 3])
        })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Executed(vec![1, 2, 3]));
    let restarted = factory().await;
    let r = restarted
        .once("restart", "fp", &opts(), || async {
            panic!("{name}: must not run again after a restart");
            #[allow(unreachable_code)]
            Ok::<Vec<i32>, std::io::Error>(vec![])
        })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Replayed(vec![1, 2, 3]), "{name}");
}

async fn fingerprint_mismatch(name: &str, store: &Store) {
    store
        .once("fp-key", "request-a", &opts(), || async {
            Ok::<_, std::io::Error>(1)
        })
        .await
        .unwrap();
    let err = store
        .once("fp-key", "request-b", &opts(), || async {
            Ok::<_, std::io::Error>(2)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::FingerprintMismatch { .. }),
        "{name}: {err}"
    );
    // Also while in progress.
    let Claim::Acquired(_owner) = store
        .claim("fp-busy", "request-a", IN_PROGRESS_TTL)
        .await
        .unwrap()
    else {
        panic!("{name}: fresh key not acquired");
    };
    let err = store
        .once("fp-busy", "request-b", &opts(), || async {
            Ok::<_, std::io::Error>(2)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::FingerprintMismatch { .. }),
        "{name}: {err}"
    );
}

async fn failed_job_records_nothing(name: &str, store: &Store) {
    let err = store
        .once("fails", "fp", &opts(), || async {
            Err::<i32, _>(std::io::Error::other("upstream 500"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Job(_)), "{name}: {err}");
    let r = store
        .once("fails", "fp", &opts(), || async {
            Ok::<_, std::io::Error>(5)
        })
        .await
        .unwrap();
    assert_eq!(
        r,
        Outcome::Executed(5),
        "{name}: a failed job must be retryable at once"
    );
}

async fn killed_runner_is_reclaimed_after_in_progress_ttl(name: &str, store: &Store) {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    // The claim is made after this instant, so it cannot lapse before it + IN_PROGRESS_TTL
    // (renewals only push its end further), however long the claim's write takes.
    let claimed_after = tokio::time::Instant::now();
    let s = store.clone();
    let runner = tokio::spawn(async move {
        let options = dying();
        let mut run = Box::pin(s.once("killed", "fp", &options, || async move {
            let _ = started_tx.send(());
            futures::future::pending::<()>().await;
            Ok::<_, std::io::Error>(0)
        }));
        tokio::select! {
            _ = &mut run => panic!("the job never ends"),
            _ = kill_rx => {}
        }
        // The runner dies mid-run: its `once` is never polled again and runs no clean-up (as
        // with SIGKILL; a dropped `once` would release its claim).
        std::mem::forget(run);
    });
    started_rx.await.unwrap();
    kill_tx.send(()).unwrap();
    runner.await.unwrap();

    let now = store
        .once("killed", "fp", &opts(), || async {
            Ok::<_, std::io::Error>(1)
        })
        .await;
    if claimed_after.elapsed() < IN_PROGRESS_TTL {
        assert!(
            matches!(now, Err(Error::InProgress { .. })),
            "{name}: {now:?}"
        );
    }
    // Bounded wait for the claim to lapse.
    let deadline = tokio::time::Instant::now() + IN_PROGRESS_TTL + Duration::from_secs(10);
    loop {
        match store
            .once("killed", "fp", &opts(), || async {
                Ok::<_, std::io::Error>(1)
            })
            .await
        {
            Ok(r) => {
                assert_eq!(r, Outcome::Executed(1), "{name}");
                // A few milliseconds for stores that keep expiries in whole milliseconds.
                assert!(
                    claimed_after.elapsed() >= IN_PROGRESS_TTL - Duration::from_millis(5),
                    "{name}: reclaimed {:?} after the claim, before in_progress_ttl",
                    claimed_after.elapsed()
                );
                break;
            }
            Err(Error::InProgress { .. }) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: the dead runner's claim never lapsed"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

/// A runner that is alive renews its claim while its job runs, however long it takes: nobody
/// takes the key over after `in_progress_ttl`, and the result is recorded.
async fn live_runner_keeps_its_claim_past_in_progress_ttl(name: &str, store: &Store) {
    const TTL: Duration = Duration::from_secs(2);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let s = store.clone();
    let runner = tokio::spawn(async move {
        s.once("long", "fp", &opts().in_progress_ttl(TTL), || async move {
            let _ = started_tx.send(());
            let _ = finish_rx.await;
            Ok::<_, std::io::Error>(7)
        })
        .await
    });
    started_rx.await.unwrap();
    // Well past the claim's lifetime: without renewal it would have lapsed twice over.
    tokio::time::sleep(TTL * 7 / 3).await;
    let other = store
        .once("long", "fp", &opts(), || async {
            Ok::<_, std::io::Error>(8)
        })
        .await;
    assert!(
        matches!(other, Err(Error::InProgress { .. })),
        "{name}: the live runner's claim was taken over: {other:?}"
    );
    finish_tx.send(()).unwrap();
    assert_eq!(
        runner.await.unwrap().unwrap(),
        Outcome::Executed(7),
        "{name}"
    );
    let replay = store
        .once("long", "fp", &opts(), || async {
            Ok::<_, std::io::Error>(9)
        })
        .await
        .unwrap();
    assert_eq!(replay, Outcome::Replayed(7), "{name}");
}

async fn presumed_dead_owner_cannot_overwrite(name: &str, store: &Store) {
    let Claim::Acquired(old) = store
        .claim("owner", "fp", Duration::from_millis(100))
        .await
        .unwrap()
    else {
        panic!("{name}: not acquired");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let new = loop {
        match store
            .claim("owner", "fp", Duration::from_secs(30))
            .await
            .unwrap()
        {
            Claim::Acquired(o) => break o,
            Claim::InProgress { .. } if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{name}: {other:?}"),
        }
    };
    // The old owner comes back: it can neither complete nor release the new owner's claim.
    let err = store
        .complete("owner", &old, "\"stale\"", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::OwnershipLost { .. }), "{name}: {err}");
    store.release("owner", &old).await.unwrap();
    assert!(matches!(
        store.claim("owner", "fp", IN_PROGRESS_TTL).await.unwrap(),
        Claim::InProgress { .. }
    ));
    store
        .complete("owner", &new, "\"fresh\"", Duration::from_secs(60))
        .await
        .unwrap();
    let r: Outcome<String> = store
        .once("owner", "fp", &opts(), || async {
            Ok::<_, std::io::Error>("again".into())
        })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Replayed("fresh".into()), "{name}");
}

async fn missing_key(name: &str, store: &Store) {
    let err = store
        .once("", "fp", &opts(), || async { Ok::<_, std::io::Error>(1) })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MissingKey), "{name}: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_store() {
    let shared = MemoryStore::new();
    suite(
        "memory",
        Box::new(move || {
            let s = shared.clone();
            Box::pin(async move { Arc::new(s) as Store })
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    suite(
        "file",
        Box::new(move || {
            let p = path.clone();
            Box::pin(async move { Arc::new(FileStore::open(p).unwrap()) as Store })
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_store() {
    let redis = tokio::task::spawn_blocking(palisade_testkit::Redis::start)
        .await
        .unwrap()
        .expect("start redis-server");
    let url = redis.url();
    suite(
        "redis",
        Box::new(move || {
            let u = url.clone();
            Box::pin(async move { Arc::new(RedisStore::connect(&u).await.unwrap()) as Store })
        }),
    )
    .await;
    drop(redis);
}

#[tokio::test(start_paused = true)]
async fn memory_expiry_follows_paused_time() {
    let store = MemoryStore::new();
    let o = OnceOptions::default()
        .ttl(Duration::from_secs(3600))
        .in_progress_ttl(Duration::from_secs(60));
    let Claim::Acquired(_) = store.claim("k", "fp", o.in_progress_ttl).await.unwrap() else {
        panic!()
    };
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(matches!(
        store.claim("k", "fp", o.in_progress_ttl).await.unwrap(),
        Claim::InProgress { .. }
    ));
    tokio::time::advance(Duration::from_secs(2)).await;
    let r = store
        .once("k", "fp", &o, || async { Ok::<_, std::io::Error>(1) })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Executed(1));
    tokio::time::advance(Duration::from_secs(3599)).await;
    let r = store
        .once("k", "fp", &o, || async { Ok::<_, std::io::Error>(2) })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Replayed(1));
    tokio::time::advance(Duration::from_secs(2)).await;
    let r = store
        .once("k", "fp", &o, || async { Ok::<_, std::io::Error>(3) })
        .await
        .unwrap();
    assert_eq!(r, Outcome::Executed(3), "an expired result runs again");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_store() {
    let cluster = tokio::task::spawn_blocking(|| palisade_testkit::RedisCluster::start(3))
        .await
        .unwrap()
        .expect("start a 3-master redis cluster");
    let urls = cluster.urls();
    suite(
        "redis-cluster",
        Box::new(move || {
            let u = urls.clone();
            Box::pin(
                async move { Arc::new(RedisStore::connect_cluster(&u).await.unwrap()) as Store },
            )
        }),
    )
    .await;
    drop(cluster);
}

const CHILD_ENV: &str = "PALISADE_IDEMPOTENCY_KEYS_CHILD";
/// The claim lifetime of the runner process that is killed.
const PROCESS_TTL: Duration = Duration::from_secs(2);

/// The child side of the killed-runner test: claims the key through `once` with a job that never
/// ends, and waits to be killed. A no-op in a normal test run.
#[test]
fn runner_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store: Store = match spec.split_once(':') {
            Some(("file", dir)) => Arc::new(FileStore::open(dir).unwrap()),
            _ => Arc::new(RedisStore::connect(&spec).await.unwrap()),
        };
        // `wait`: if the parent's probe holds the key for a moment, claim it right after.
        let _ = store
            .once(
                "killed-process",
                "fp",
                // A longer claim than `dying()`, so the parent surely sees it before it lapses.
                &opts()
                    .in_progress_ttl(PROCESS_TTL)
                    .wait(Duration::from_secs(20)),
                || async {
                    futures::future::pending::<()>().await;
                    Ok::<_, std::io::Error>(0)
                },
            )
            .await;
    });
}

/// A runner process SIGKILLed mid-run leaves its claim, which lapses after `in_progress_ttl`.
async fn killed_process_is_reclaimed(name: &str, spec: String, store: Store) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["runner_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until the child holds the claim.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store
            .claim("killed-process", "fp", Duration::from_millis(1))
            .await
            .unwrap()
        {
            Claim::InProgress { .. } => break,
            Claim::Acquired(probe) => {
                // Not claimed yet: give the key back at once.
                store.release("killed-process", &probe).await.unwrap();
            }
            Claim::Completed { .. } => panic!("{name}: the child cannot complete"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: child never claimed the key"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL: no cleanup runs in the child
    child.wait().unwrap();
    let killed_at = tokio::time::Instant::now();
    let deadline = killed_at + PROCESS_TTL + Duration::from_secs(10);
    loop {
        match store
            .once("killed-process", "fp", &opts(), || async {
                Ok::<_, std::io::Error>(9)
            })
            .await
        {
            Ok(r) => {
                assert_eq!(r, Outcome::Executed(9), "{name}");
                break;
            }
            Err(Error::InProgress { .. }) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: claim never lapsed"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_runner_process_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap()) as Store;
    killed_process_is_reclaimed("file", format!("file:{}", dir.path().display()), store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_runner_process_redis_store() {
    let redis = tokio::task::spawn_blocking(palisade_testkit::Redis::start)
        .await
        .unwrap()
        .expect("start redis-server");
    let store = Arc::new(RedisStore::connect(&redis.url()).await.unwrap()) as Store;
    killed_process_is_reclaimed("redis", redis.url(), store).await;
}
