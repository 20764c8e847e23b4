//! The run-once contract when the claim or the store misbehaves: a claim lost mid-run cancels
//! the job, recording a result is retried, a dropped `once` gives its claim back, and the
//! embedded stores do not grow with keys that are never used again.
//!
//! Faults come from [`Faulty`], a store that delegates to a real one (MemoryStore, FileStore, or
//! RedisStore on a real redis-server) and fails `extend` or `complete` as told. MemoryStore tests
//! run on tokio's paused clock; the others wait with bounds and say what they waited for.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use palisade_idempotency::{
    Claim, Error, FileStore, IdempotencyStore, MemoryStore, OnceOptions, Outcome, OwnerToken,
    RedisStore, Result,
};

/// What [`Faulty`] does wrong, changed by the test as it goes.
#[derive(Debug, Default)]
struct Faults {
    /// The next this-many `extend` calls fail with an error (`usize::MAX`: every one).
    extend_errors: AtomicUsize,
    /// The next this-many `complete` calls fail without reaching the store.
    complete_errors: AtomicUsize,
    /// The next this-many `complete` calls are applied, and then fail (a lost reply).
    complete_applied_errors: AtomicUsize,
    /// Each applied `complete` takes this many more milliseconds to answer (a slow reply).
    complete_reply_delay_ms: std::sync::atomic::AtomicU64,
    /// How many `complete` calls were made.
    complete_calls: AtomicUsize,
    /// The owner token of the last claim acquired through this store.
    last_owner: Mutex<Option<OwnerToken>>,
}

/// A real store, with the faults in `faults`.
#[derive(Clone)]
struct Faulty<S> {
    inner: S,
    faults: Arc<Faults>,
}

impl<S> Faulty<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Arc::default(),
        }
    }

    fn last_owner(&self) -> OwnerToken {
        self.faults
            .last_owner
            .lock()
            .unwrap()
            .clone()
            .expect("a claim was acquired")
    }
}

/// Takes one from a fault counter; whether a fault is due.
fn due(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            0 => None,
            usize::MAX => Some(usize::MAX),
            n => Some(n - 1),
        })
        .is_ok()
}

fn injected(op: &'static str) -> Error {
    Error::Io {
        op,
        path: "injected-fault".into(),
        source: std::io::Error::other("injected by the test"),
    }
}

#[async_trait]
impl<S: IdempotencyStore> IdempotencyStore for Faulty<S> {
    async fn claim(&self, key: &str, fingerprint: &str, ttl: Duration) -> Result<Claim> {
        let claim = self.inner.claim(key, fingerprint, ttl).await?;
        if let Claim::Acquired(owner) = &claim {
            *self.faults.last_owner.lock().unwrap() = Some(owner.clone());
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &str,
        owner: &OwnerToken,
        result: &str,
        ttl: Duration,
    ) -> Result<()> {
        self.faults.complete_calls.fetch_add(1, Ordering::SeqCst);
        if due(&self.faults.complete_errors) {
            return Err(injected("complete"));
        }
        let done = self.inner.complete(key, owner, result, ttl).await;
        let delay = self.faults.complete_reply_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if done.is_ok() && due(&self.faults.complete_applied_errors) {
            return Err(injected("complete (applied)"));
        }
        done
    }

    async fn release(&self, key: &str, owner: &OwnerToken) -> Result<()> {
        self.inner.release(key, owner).await
    }

    async fn extend(&self, key: &str, owner: &OwnerToken, ttl: Duration) -> Result<bool> {
        if due(&self.faults.extend_errors) {
            return Err(injected("extend"));
        }
        self.inner.extend(key, owner, ttl).await
    }
}

/// Sets a flag when dropped: shows that a job's future was dropped (cancelled).
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A job that signals its start and then runs until it is dropped.
fn endless_job(
    started: tokio::sync::oneshot::Sender<()>,
    dropped: Arc<AtomicBool>,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<u32>> + Send>> + Send {
    move || {
        Box::pin(async move {
            let _flag = DropFlag(dropped);
            let _ = started.send(());
            futures::future::pending::<()>().await;
            Ok(0)
        })
    }
}

fn opts(in_progress_ttl: Duration) -> OnceOptions {
    OnceOptions::default()
        .ttl(Duration::from_secs(600))
        .in_progress_ttl(in_progress_ttl)
}

/// Bounds a wait for a `once` that should end: fails with `what` instead of hanging.
async fn ends<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(t) => t,
        Err(_) => panic!("{what}: still running after {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A claim taken over mid-run cancels the job.

/// The key is taken over while the job runs (the claim is released under the runner, as an
/// operator deleting the record would, and another runner claims it): the next renewal finds the
/// key taken, the job's future is dropped, the call fails with `ClaimLost`, and the new owner's
/// claim is untouched.
async fn taken_over_claim_cancels_the_job<S>(name: &str, store: Faulty<S>, ttl: Duration)
where
    S: IdempotencyStore + Clone + 'static,
{
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let dropped = Arc::new(AtomicBool::new(false));
    let s = store.clone();
    let job = endless_job(started_tx, dropped.clone());
    let runner = tokio::spawn(async move { s.once("taken", "fp", &opts(ttl), job).await });
    started_rx.await.expect("the job starts");
    let old = store.last_owner();
    store.inner.release("taken", &old).await.unwrap();
    let Claim::Acquired(new) = store
        .inner
        .claim("taken", "fp", Duration::from_secs(600))
        .await
        .unwrap()
    else {
        panic!("{name}: the released key is not free");
    };
    // The next renewal (a third of the TTL away) finds the key taken; the 10 s are for a busy
    // machine, where a renewal's fsync can take long.
    let ran = ends(
        ttl * 3 + Duration::from_secs(10),
        &format!("{name}: the job whose claim was taken over"),
        runner,
    )
    .await
    .unwrap();
    assert!(
        matches!(ran, Err(Error::ClaimLost { .. })),
        "{name}: {ran:?}"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "{name}: the job was not cancelled"
    );
    // The new owner still holds the key and records its result.
    store
        .inner
        .complete("taken", &new, "7", Duration::from_secs(600))
        .await
        .unwrap();
    let replay = store
        .once("taken", "fp", &opts(ttl), || async {
            Ok::<_, std::io::Error>(8)
        })
        .await
        .unwrap();
    assert_eq!(replay, Outcome::Replayed(7), "{name}");
}

#[tokio::test(start_paused = true)]
async fn taken_over_claim_cancels_the_job_memory() {
    let store = Faulty::new(MemoryStore::new());
    taken_over_claim_cancels_the_job("memory", store, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn taken_over_claim_cancels_the_job_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Faulty::new(FileStore::open(dir.path()).unwrap());
    taken_over_claim_cancels_the_job("file", store, Duration::from_millis(900)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn taken_over_claim_cancels_the_job_redis() {
    let redis = tokio::task::spawn_blocking(palisade_testkit::Redis::start)
        .await
        .unwrap()
        .expect("start redis-server");
    let store = Faulty::new(RedisStore::connect(&redis.url()).await.unwrap());
    taken_over_claim_cancels_the_job("redis", store, Duration::from_millis(900)).await;
}

// ---------------------------------------------------------------------------------------------
// A claim that cannot be renewed cancels the job before it can have run out.

#[tokio::test(start_paused = true)]
async fn unrenewable_claim_cancels_the_job_by_its_deadline() {
    let ttl = Duration::from_secs(30);
    let store = Faulty::new(MemoryStore::new());
    store
        .faults
        .extend_errors
        .store(usize::MAX, Ordering::SeqCst);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let dropped = Arc::new(AtomicBool::new(false));
    let s = store.clone();
    let job = endless_job(started_tx, dropped.clone());
    let start = tokio::time::Instant::now();
    let runner = tokio::spawn(async move { s.once("cut-off", "fp", &opts(ttl), job).await });
    started_rx.await.unwrap();
    let ran = ends(ttl * 3, "the job whose claim cannot be renewed", runner)
        .await
        .unwrap();
    let ended = start.elapsed();
    match &ran {
        Err(Error::ClaimLost { source, .. }) => assert!(
            source.is_some(),
            "the renewal's error is the source: {ran:?}"
        ),
        other => panic!("expected ClaimLost, got {other:?}"),
    }
    assert!(dropped.load(Ordering::SeqCst), "the job was not cancelled");
    // Cancelled by the claim's deadline, so it never runs when another runner may hold the key.
    assert!(
        ended <= ttl,
        "cancelled {ended:?} after the claim, past its ttl {ttl:?}"
    );
}

/// Renewals that fail for a while and then succeed keep the claim: the job completes.
#[tokio::test(start_paused = true)]
async fn renewal_errors_that_recover_keep_the_claim() {
    let ttl = Duration::from_secs(30);
    let store = Faulty::new(MemoryStore::new());
    store.faults.extend_errors.store(2, Ordering::SeqCst);
    let ran = ends(
        ttl * 4,
        "a job that outlasts its ttl",
        store.once("flaky-renewals", "fp", &opts(ttl), || async move {
            tokio::time::sleep(ttl * 2).await;
            Ok::<_, std::io::Error>(1)
        }),
    )
    .await;
    assert_eq!(ran.unwrap(), Outcome::Executed(1));
}

// ---------------------------------------------------------------------------------------------
// The ClaimContext a job is handed.

#[tokio::test(start_paused = true)]
async fn the_job_gets_its_claim_and_its_cancellation_signal() {
    let ttl = Duration::from_secs(30);
    let store = Faulty::new(MemoryStore::new());
    store
        .faults
        .extend_errors
        .store(usize::MAX, Ordering::SeqCst);
    let (ctx_tx, ctx_rx) = tokio::sync::oneshot::channel();
    let s = store.clone();
    let start = tokio::time::Instant::now();
    let runner = tokio::spawn(async move {
        s.once_with_claim("ctx", "fp", &opts(ttl), |claim| async move {
            let _ = ctx_tx.send(claim);
            futures::future::pending::<()>().await;
            Ok::<_, std::io::Error>(0)
        })
        .await
    });
    let claim = ctx_rx.await.unwrap();
    assert_eq!(claim.key(), "ctx");
    assert_eq!(
        claim.token(),
        &store.last_owner(),
        "the job gets the claim's own token"
    );
    assert!(!claim.is_cancelled());
    assert_eq!(claim.deadline(), start + ttl, "no renewal succeeded yet");
    // Work the job handed elsewhere is told to stop `margin` before the deadline, then at it.
    ends(ttl, "expiring", claim.expiring(Duration::from_secs(5))).await;
    let at = start.elapsed();
    assert!(
        at >= ttl - Duration::from_secs(5) && at < ttl - Duration::from_secs(4),
        "expiring fired {at:?} after the claim"
    );
    assert!(!claim.is_cancelled());
    ends(ttl, "cancelled", claim.cancelled()).await;
    assert!(claim.is_cancelled());
    let at = start.elapsed();
    assert!(
        at > ttl - Duration::from_secs(1) && at <= ttl,
        "cancelled {at:?} after the claim"
    );
    let ran = ends(ttl, "once", runner).await.unwrap();
    assert!(matches!(ran, Err(Error::ClaimLost { .. })), "{ran:?}");
}

#[tokio::test(start_paused = true)]
async fn a_renewed_claim_moves_its_deadline() {
    let ttl = Duration::from_secs(30);
    let store = MemoryStore::new();
    let (ctx_tx, ctx_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let s = store.clone();
    let start = tokio::time::Instant::now();
    let runner = tokio::spawn(async move {
        s.once_with_claim("renewed", "fp", &opts(ttl), |claim| async move {
            let _ = ctx_tx.send(claim);
            let _ = finish_rx.await;
            Ok::<_, std::io::Error>(1)
        })
        .await
    });
    let claim = ctx_rx.await.unwrap();
    tokio::time::sleep(ttl * 2).await;
    assert!(
        claim.deadline() > start + ttl * 2,
        "renewals move the deadline: {:?} after the start",
        claim.deadline() - start
    );
    assert!(!claim.is_cancelled());
    finish_tx.send(()).unwrap();
    assert_eq!(runner.await.unwrap().unwrap(), Outcome::Executed(1));
}

// ---------------------------------------------------------------------------------------------
// Recording the result is retried.

async fn complete_is_retried<S>(name: &str, store: Faulty<S>)
where
    S: IdempotencyStore + Clone + 'static,
{
    let ttl = Duration::from_secs(30);
    store.faults.complete_errors.store(3, Ordering::SeqCst);
    let ran = ends(
        Duration::from_secs(60),
        name,
        store.once("retried", "fp", &opts(ttl), || async {
            Ok::<_, std::io::Error>(3)
        }),
    )
    .await;
    assert_eq!(ran.unwrap(), Outcome::Executed(3), "{name}");
    assert_eq!(store.faults.complete_calls.load(Ordering::SeqCst), 4);

    // A complete the store applied but whose reply was lost: its retry succeeds.
    store
        .faults
        .complete_applied_errors
        .store(1, Ordering::SeqCst);
    let ran = ends(
        Duration::from_secs(60),
        name,
        store.once("applied", "fp", &opts(ttl), || async {
            Ok::<_, std::io::Error>(4)
        }),
    )
    .await;
    assert_eq!(ran.unwrap(), Outcome::Executed(4), "{name}");
    let replay = store
        .once("applied", "fp", &opts(ttl), || async {
            Ok::<_, std::io::Error>(5)
        })
        .await
        .unwrap();
    assert_eq!(replay, Outcome::Replayed(4), "{name}");
}

#[tokio::test(start_paused = true)]
async fn complete_is_retried_memory() {
    complete_is_retried("memory", Faulty::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_is_retried_file() {
    let dir = tempfile::tempdir().unwrap();
    complete_is_retried("file", Faulty::new(FileStore::open(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_is_retried_redis() {
    let redis = tokio::task::spawn_blocking(palisade_testkit::Redis::start)
        .await
        .unwrap()
        .expect("start redis-server");
    let store = Faulty::new(RedisStore::connect(&redis.url()).await.unwrap());
    complete_is_retried("redis", store).await;
}

/// A result that can never be recorded: `once` gives up with `NotRecorded` after its retries,
/// and gives the key back so that a retry runs the job again at once.
#[tokio::test(start_paused = true)]
async fn a_result_that_cannot_be_recorded_is_reported_and_the_key_freed() {
    let ttl = Duration::from_secs(30);
    let store = Faulty::new(MemoryStore::new());
    store
        .faults
        .complete_errors
        .store(usize::MAX, Ordering::SeqCst);
    let ran = ends(
        Duration::from_secs(120),
        "once with a store that never records",
        store.once("never", "fp", &opts(ttl), || async {
            Ok::<_, std::io::Error>(1)
        }),
    )
    .await;
    match ran {
        Err(Error::NotRecorded { attempts, .. }) => {
            assert!(attempts > 1, "retried: {attempts}");
            assert_eq!(attempts, store.faults.complete_calls.load(Ordering::SeqCst));
        }
        other => panic!("expected NotRecorded, got {other:?}"),
    }
    // The claim was given back (at once, not after in_progress_ttl).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    store.faults.complete_errors.store(0, Ordering::SeqCst);
    let again = store
        .once("never", "fp", &opts(ttl), || async {
            Ok::<_, std::io::Error>(2)
        })
        .await;
    assert_eq!(again.unwrap(), Outcome::Executed(2));
}

/// A renewal that reaches the store after the result was recorded, while the reply of `complete`
/// is still on its way, finds the key completed: the run is still `Executed`, not a lost claim.
#[tokio::test(start_paused = true)]
async fn a_renewal_racing_a_slow_complete_reply_is_not_a_lost_claim() {
    let ttl = Duration::from_secs(30);
    let store = Faulty::new(MemoryStore::new());
    // The reply comes after the next renewal (every third of the ttl) has gone out.
    store
        .faults
        .complete_reply_delay_ms
        .store(15_000, Ordering::SeqCst);
    let ran = ends(
        ttl * 2,
        "once with a slow complete reply",
        store.once("slow-reply", "fp", &opts(ttl), || async {
            Ok::<_, std::io::Error>(6)
        }),
    )
    .await;
    assert_eq!(ran.unwrap(), Outcome::Executed(6));
}

/// A complete refused because the claim is someone else's is not retried.
#[tokio::test(start_paused = true)]
async fn ownership_lost_is_not_retried() {
    let ttl = Duration::from_secs(30);
    let store = Faulty::new(MemoryStore::new());
    let s = store.clone();
    let ran = store
        .once("stolen", "fp", &opts(ttl), || async move {
            // The key is taken over between the job's end and the recording of its result.
            let old = s.last_owner();
            s.inner.release("stolen", &old).await.unwrap();
            s.inner
                .claim("stolen", "fp", Duration::from_secs(600))
                .await
                .unwrap();
            Ok::<_, std::io::Error>(1)
        })
        .await;
    assert!(matches!(ran, Err(Error::OwnershipLost { .. })), "{ran:?}");
    assert_eq!(store.faults.complete_calls.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// A dropped `once` gives its claim back.

async fn dropped_once_releases_its_claim<S>(name: &str, store: S)
where
    S: IdempotencyStore + Clone + 'static,
{
    // Far longer than the test: only a release frees the key in time.
    let ttl = Duration::from_secs(300);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let dropped = Arc::new(AtomicBool::new(false));
    let s = store.clone();
    let job = endless_job(started_tx, dropped.clone());
    let runner = tokio::spawn(async move { s.once("dropped", "fp", &opts(ttl), job).await });
    started_rx.await.unwrap();
    runner.abort(); // the caller gives up: the `once` future is dropped
    let _ = runner.await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "{name}: the job was dropped"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store
            .claim("dropped", "fp", Duration::from_secs(60))
            .await
            .unwrap()
        {
            Claim::Acquired(_) => break,
            Claim::InProgress { .. } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: the dropped run's claim was not released (it would block the key \
                     for {ttl:?})"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_once_releases_its_claim_memory() {
    dropped_once_releases_its_claim("memory", MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_once_releases_its_claim_file() {
    let dir = tempfile::tempdir().unwrap();
    dropped_once_releases_its_claim("file", FileStore::open(dir.path()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_once_releases_its_claim_redis() {
    let redis = tokio::task::spawn_blocking(palisade_testkit::Redis::start)
        .await
        .unwrap()
        .expect("start redis-server");
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    dropped_once_releases_its_claim("redis", store).await;
}

// ---------------------------------------------------------------------------------------------
// The embedded stores purge what they no longer need.

#[tokio::test(start_paused = true)]
async fn memory_store_purges_expired_records_as_it_goes() {
    let store = MemoryStore::new();
    let short = OnceOptions::default()
        .ttl(Duration::from_secs(1))
        .in_progress_ttl(Duration::from_secs(1));
    for i in 0..100 {
        store
            .once(&format!("old-{i}"), "fp", &short, || async {
                Ok::<_, std::io::Error>(i)
            })
            .await
            .unwrap();
    }
    // Claims that lapsed (runners that died) go too.
    for i in 0..20 {
        store
            .claim(&format!("dead-{i}"), "fp", Duration::from_secs(1))
            .await
            .unwrap();
    }
    assert_eq!(store.len(), 120);
    tokio::time::advance(Duration::from_secs(2)).await;
    // Calls on one other key: each looks at a few records, so a bounded number of them removes
    // every expired one.
    for _ in 0..40 {
        store
            .once("live", "fp", &OnceOptions::default(), || async {
                Ok::<_, std::io::Error>(0)
            })
            .await
            .unwrap();
    }
    assert_eq!(store.len(), 1, "only the live key is left");

    for i in 0..10 {
        store
            .claim(&format!("again-{i}"), "fp", Duration::from_secs(1))
            .await
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.purge_expired(), 10);
    assert_eq!(store.len(), 1);
}

/// The store directory's entries, sorted.
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Leaves in `dir` what a crash leaves: a staging file of a key's record, and one of the old
/// naming, an hour old.
fn plant_leftovers(dir: &std::path::Path) {
    let hash = blake3::hash(b"crashed").to_hex();
    std::fs::write(dir.join(format!(".{hash}.00000000000000aa.tmp")), b"{").unwrap();
    let legacy = dir.join(".tmp-00000000000000bb");
    std::fs::write(&legacy, b"{").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&legacy)
        .unwrap()
        .set_modified(old)
        .unwrap();
}

/// Records that expired, claims released after failed jobs and claims of runners that died leave
/// files (records, lock files, staging files of a crash); calls on other keys remove them, a few
/// entries each.
#[tokio::test(flavor = "multi_thread")]
async fn file_store_purges_expired_records_and_leftover_files_as_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    // Results kept for 1 ms; the runs themselves hold their claims well beyond their length.
    let short = OnceOptions::default()
        .ttl(Duration::from_millis(1))
        .in_progress_ttl(Duration::from_secs(30));
    for i in 0..30 {
        store
            .once(&format!("old-{i}"), "fp", &short, || async {
                Ok::<_, std::io::Error>(i)
            })
            .await
            .unwrap();
        // A failed job: its claim is released, its lock file stays.
        let _ = store
            .once(&format!("failed-{i}"), "fp", &short, || async {
                Err::<u32, _>(std::io::Error::other("boom"))
            })
            .await;
        // A runner that died: its claim lapses.
        store
            .claim(&format!("dead-{i}"), "fp", Duration::from_millis(1))
            .await
            .unwrap();
    }
    plant_leftovers(dir.path());
    // Everything above has expired 1 ms after it was written; wait (bounded) for the last one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut calls = 0;
    let live: Vec<String> = {
        let h = blake3::hash(b"live").to_hex();
        vec![format!("{h}.json"), format!("{h}.lock")]
    };
    loop {
        store
            .once("live", "fp", &OnceOptions::default(), || async {
                Ok::<_, std::io::Error>(0)
            })
            .await
            .unwrap();
        calls += 1;
        let left = entries(dir.path());
        if left == live {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after {calls} calls the store still holds {} entries besides the live key's: {:?}",
            left.len().saturating_sub(2),
            left.iter().take(10).collect::<Vec<_>>()
        );
    }
    // 30 * (2 + 1 + 2) + 2 + 2 entries at 8 a call, each visited once per pass: a few passes.
    assert!(calls < 100, "{calls} calls to clean up");
}

#[tokio::test(flavor = "multi_thread")]
async fn file_store_purge_expired_removes_records_and_leftover_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    for i in 0..5 {
        store
            .claim(&format!("dead-{i}"), "fp", Duration::from_millis(1))
            .await
            .unwrap();
    }
    store
        .once("live", "fp", &OnceOptions::default(), || async {
            Ok::<_, std::io::Error>(0)
        })
        .await
        .unwrap();
    plant_leftovers(dir.path());
    // The claims above expire 1 ms after they were made (the calls' own sweeps may take some).
    let h = blake3::hash(b"live").to_hex();
    let live = vec![format!("{h}.json"), format!("{h}.lock")];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut purged = 0;
    loop {
        purged += store.purge_expired().await.unwrap();
        if entries(dir.path()) == live {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "purge_expired left {:?}",
            entries(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        purged <= 5,
        "only the 5 expired records are purged: {purged}"
    );
    let replay = store
        .once("live", "fp", &OnceOptions::default(), || async {
            Ok::<_, std::io::Error>(1)
        })
        .await
        .unwrap();
    assert_eq!(replay, Outcome::Replayed(0));
}

/// Sweeps remove lock files of free keys while other calls wait on them: a key is still held by
/// at most one claim at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_store_lock_file_removal_keeps_claims_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let holders: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for t in 0..8 {
        // A store of its own per task, as each process has: their sweeps run side by side.
        let (store, holders) = (FileStore::open(dir.path()).unwrap(), holders.clone());
        tasks.push(tokio::spawn(async move {
            let mut acquired = 0;
            for i in 0..60 {
                let k = (t + i) % 3;
                let key = format!("contended-{k}");
                if let Claim::Acquired(owner) = store
                    .claim(&key, "fp", Duration::from_secs(60))
                    .await
                    .unwrap()
                {
                    acquired += 1;
                    let before = holders[k].fetch_add(1, Ordering::SeqCst);
                    assert_eq!(before, 0, "two claims held {key} at once");
                    tokio::task::yield_now().await;
                    holders[k].fetch_sub(1, Ordering::SeqCst);
                    // Released: the key's lock file is left for a sweep to remove.
                    store.release(&key, &owner).await.unwrap();
                }
            }
            acquired
        }));
    }
    let mut acquired = 0;
    for t in tasks {
        acquired += t.await.unwrap();
    }
    assert!(acquired > 0);
}
