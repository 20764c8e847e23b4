//! The behavioural suite every backend passes, and the fixtures that build coordinators.
#![allow(dead_code)]

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use palisade_lock::{Coordinator, JobEvent, JobInfo, LockError, RunOutcome, Wait};

/// Several coordinators that share one backend (one store), as separate clients would.
pub struct Fixture {
    pub clients: Vec<Coordinator>,
    /// Keeps the server or directory alive.
    pub _keep: Box<dyn Any + Send>,
}

/// How long a behaviour may wait for a state before failing.
pub const BOUND: Duration = Duration::from_secs(20);

pub fn memory(n: usize) -> Fixture {
    let c = Coordinator::memory();
    Fixture {
        clients: vec![c; n],
        _keep: Box::new(()),
    }
}

pub fn file(n: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let clients = (0..n)
        .map(|_| Coordinator::file(dir.path()).expect("file coordinator"))
        .collect();
    Fixture {
        clients,
        _keep: Box::new(dir),
    }
}

#[cfg(feature = "etcd")]
pub async fn etcd_server() -> palisade_testkit::Etcd {
    tokio::task::spawn_blocking(palisade_testkit::Etcd::start)
        .await
        .expect("join")
        .expect("start etcd (is etcd installed? scripts/setup installs it)")
}

#[cfg(feature = "etcd")]
pub async fn etcd_coordinator(endpoints: &[String], ttl_secs: u64) -> Coordinator {
    let client = etcd_client::Client::connect(endpoints, None)
        .await
        .expect("connect to etcd");
    Coordinator::etcd(client)
        .namespace("test/")
        .lease_ttl(Duration::from_secs(ttl_secs))
        .connect()
        .await
        .expect("etcd coordinator")
}

#[cfg(feature = "etcd")]
pub async fn etcd(n: usize) -> Fixture {
    let server = etcd_server().await;
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(etcd_coordinator(&server.endpoints(), 3).await);
    }
    Fixture {
        clients,
        _keep: Box::new(server),
    }
}

/// Polls `cond` until it holds, failing with `what` after [`BOUND`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {BOUND:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?} waiting for: {what}"))
}

/// Contenders on every client take the lock many times; inside, a check that no one else is
/// inside and that tokens strictly increase.
pub async fn mutual_exclusion(f: Fixture) {
    #[derive(Default)]
    struct Log {
        inside: bool,
        last: u64,
        entries: usize,
    }
    let log = Arc::new(Mutex::new(Log::default()));
    let mut tasks = Vec::new();
    for (i, c) in f.clients.iter().cycle().take(8).enumerate() {
        let c = c.clone();
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let g = c.lock("shared").await.expect("lock");
                {
                    let mut l = log.lock().unwrap();
                    assert!(
                        !l.inside,
                        "two holders inside the critical section (task {i})"
                    );
                    assert!(
                        g.fencing_token() > l.last,
                        "token {} after {}",
                        g.fencing_token(),
                        l.last
                    );
                    l.inside = true;
                    l.last = g.fencing_token();
                }
                tokio::task::yield_now().await;
                log.lock().unwrap().inside = false;
                l_entries(&log);
                g.release().await.expect("release");
            }
        }));
    }
    fn l_entries(log: &Arc<Mutex<Log>>) {
        log.lock().unwrap().entries += 1;
    }
    for t in tasks {
        bounded("contenders finish", t)
            .await
            .expect("contender panicked");
    }
    assert_eq!(log.lock().unwrap().entries, 80);
}

/// `try_lock` and `run_exclusive(Wait::No)` see the holder and name its job.
pub async fn try_lock_names_holder(f: Fixture) {
    let (a, b) = (&f.clients[0], &f.clients[f.clients.len() - 1]);
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let a2 = a.clone();
    let running = tokio::spawn(async move {
        a2.run_exclusive(
            "etl",
            JobInfo::new("nightly").meta("owner", "data"),
            Wait::No,
            |ctx| async move {
                let _ = entered_tx.send(ctx.fencing_token());
                let _ = finish_rx.await;
                "done"
            },
        )
        .await
    });
    let token = bounded("job starts", entered_rx)
        .await
        .expect("job started");
    match b.try_lock("etl").await {
        Err(LockError::Held { holder: Some(job) }) => {
            assert_eq!(job.name, "nightly");
            assert_eq!(job.lock, "etl");
            assert_eq!(job.metadata.get("owner").map(String::as_str), Some("data"));
            assert_eq!(job.fencing_token, Some(token), "the holder's fencing token");
        }
        other => panic!("expected Held with the job, got {other:?}"),
    }
    let skipped = b
        .run_exclusive("etl", JobInfo::new("second"), Wait::No, |_| async { "ran" })
        .await
        .expect("run_exclusive");
    match skipped {
        RunOutcome::Skipped { holder: Some(job) } => {
            assert_eq!(job.name, "nightly");
            assert_eq!(job.fencing_token, Some(token), "the holder's fencing token");
        }
        other => panic!("expected Skipped, got {other:?}"),
    }
    finish_tx.send(()).unwrap();
    let out = bounded("job ends", running).await.unwrap().expect("run");
    assert_eq!(out, RunOutcome::Ran("done"));
    let g = bounded("lock free after the job", b.lock("etl"))
        .await
        .expect("lock");
    assert!(g.fencing_token() > token);
}

/// A timed-out waiter leaves no trace: the next contender gets the lock once it is released.
pub async fn timeout_cleans_up(f: Fixture) {
    let (a, b) = (&f.clients[0], &f.clients[f.clients.len() - 1]);
    let g = a.lock("t").await.expect("lock");
    let started = tokio::time::Instant::now();
    match b.lock_timeout("t", Duration::from_millis(300)).await {
        Err(LockError::Timeout { name, .. }) => assert_eq!(name, "t"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    // A cancelled acquire (dropped future) is cleaned up too.
    let cancelled = tokio::time::timeout(Duration::from_millis(100), b.lock("t")).await;
    assert!(cancelled.is_err());
    // Both abandoned entries leave the queue (on etcd: their keys are deleted in the background).
    eventually("abandoned waiters leave the queue", || async {
        a.queue_len("t").await.expect("queue_len") == 0
    })
    .await;
    // run_exclusive with a wait that runs out skips, naming no job (a plain lock holds it).
    let skipped = b
        .run_exclusive(
            "t",
            JobInfo::new("late"),
            Wait::Up(Duration::from_millis(100)),
            |_| async {},
        )
        .await
        .expect("run_exclusive");
    assert_eq!(skipped, RunOutcome::Skipped { holder: None });
    let token = g.fencing_token();
    g.release().await.expect("release");
    let g2 = bounded("lock after timed-out waiters", a.lock("t"))
        .await
        .expect("lock");
    assert!(g2.fencing_token() > token);
    drop(g2); // released in the background
    let g3 = bounded("lock after a dropped guard", b.lock("t"))
        .await
        .expect("lock");
    g3.release().await.unwrap();
}

/// Waiters are served in arrival order, and `queue_len` counts them.
pub async fn fifo(f: Fixture, waiters: usize) {
    let c = &f.clients[0];
    let holder = c.lock("q").await.expect("lock");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..waiters {
        let c2 = c.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let g = c2.lock("q").await.expect("waiter lock");
            order.lock().unwrap().push((i, g.fencing_token()));
            g.release().await.expect("release");
        }));
        eventually(&format!("waiter {i} queued"), || async {
            c.queue_len("q").await.expect("queue_len") == i + 1
        })
        .await;
    }
    holder.release().await.unwrap();
    for t in tasks {
        bounded("waiters finish", t).await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        ids,
        (0..waiters).collect::<Vec<_>>(),
        "waiters served out of arrival order"
    );
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens not increasing: {order:?}"
    );
}

/// The registry lists a running job and reports it started and finished.
pub async fn registry_lists_jobs(f: Fixture) {
    let (a, b) = (&f.clients[0], &f.clients[f.clients.len() - 1]);
    let mut events = b.registry().watch();
    let reg = b.registry();
    let out = a
        .run_exclusive(
            "report",
            JobInfo::new("report").command(["make", "report"]),
            Wait::Forever,
            |ctx| async move {
                let started = bounded("Started event", events.next())
                    .await
                    .expect("event");
                match &started {
                    JobEvent::Started(j) => {
                        assert_eq!(j.lock, "report");
                        assert_eq!(j.fencing_token, Some(ctx.fencing_token()));
                        assert_eq!(j.command, vec!["make", "report"]);
                    }
                    other => panic!("expected Started, got {other:?}"),
                }
                let running = reg.running().await.expect("running");
                assert_eq!(running.len(), 1, "{running:?}");
                assert_eq!(running[0].pid, std::process::id());
                events
            },
        )
        .await
        .expect("run");
    let RunOutcome::Ran(mut events) = out else {
        panic!("job skipped")
    };
    match bounded("Finished event", events.next())
        .await
        .expect("event")
    {
        JobEvent::Finished(j) => assert_eq!(j.lock, "report"),
        other => panic!("expected Finished, got {other:?}"),
    }
    assert!(b.registry().running().await.unwrap().is_empty());
}

/// One leader at a time; resigning hands over to the next candidate; observers see both.
pub async fn election(f: Fixture) {
    let (a, b) = (&f.clients[0], &f.clients[f.clients.len() - 1]);
    let mut observed = b.election().observe("leader");
    let lead_a = a
        .election()
        .campaign("leader", "a:1")
        .await
        .expect("campaign a");
    let now = b
        .election()
        .leader("leader")
        .await
        .unwrap()
        .expect("a leads");
    assert_eq!(now.value_str(), "a:1");
    assert_eq!(now.fencing_token, lead_a.fencing_token());
    let b2 = b.clone();
    let campaign_b = tokio::spawn(async move { b2.election().campaign("leader", "b:2").await });
    // Leaders seen by the observer until b leads.
    let mut seen = Vec::new();
    loop {
        let next = bounded("observer", observed.next()).await.expect("stream");
        if let Some(h) = next {
            seen.push(h.value_str().into_owned());
            if h.value_str() == "a:1" {
                break;
            }
        }
    }
    assert!(!campaign_b.is_finished());
    lead_a.resign().await.unwrap();
    let lead_b = bounded("b leads", campaign_b)
        .await
        .unwrap()
        .expect("campaign b");
    loop {
        let next = bounded("observer sees b", observed.next())
            .await
            .expect("stream");
        if next.is_some_and(|h| h.value_str() == "b:2") {
            break;
        }
    }
    assert!(lead_b.fencing_token() > 0);
    lead_b.resign().await.unwrap();
}

pub async fn invalid_names(f: Fixture) {
    let c = &f.clients[0];
    assert!(matches!(
        c.lock("a/b").await,
        Err(LockError::InvalidName { .. })
    ));
    assert!(matches!(
        c.try_lock("").await,
        Err(LockError::InvalidName { .. })
    ));
}

/// A watch started while a job runs reports that job first.
pub async fn watch_reports_running_jobs_first(f: Fixture) {
    let (a, b) = (&f.clients[0], &f.clients[f.clients.len() - 1]);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let a2 = a.clone();
    let job = tokio::spawn(async move {
        a2.run_exclusive("early", JobInfo::new("early"), Wait::No, |_| async move {
            let _ = started_tx.send(());
            let _ = finish_rx.await;
        })
        .await
    });
    bounded("job starts", started_rx).await.unwrap();
    let mut events = b.registry().watch();
    match bounded("running job reported", events.next())
        .await
        .unwrap()
    {
        JobEvent::Started(j) => assert_eq!(j.lock, "early"),
        other => panic!("expected Started, got {other:?}"),
    }
    finish_tx.send(()).unwrap();
    let _ = bounded("job ends", job).await.unwrap().unwrap();
    match bounded("Finished", events.next()).await.unwrap() {
        JobEvent::Finished(j) => assert_eq!(j.lock, "early"),
        other => panic!("expected Finished, got {other:?}"),
    }
}

/// A guard dropped (released in the background) and the lock taken again at once by the same
/// client: never the old holder's key or token.
pub async fn drop_then_relock(f: Fixture) {
    let c = &f.clients[0];
    let mut last = 0;
    for _ in 0..20 {
        let g = bounded("relock", c.lock("again")).await.expect("lock");
        assert!(
            g.fencing_token() > last,
            "token {} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        drop(g);
    }
}

/// `holder` and `observe` follow a lock: free, then A with A's token, then B with B's, then free
/// again. Polling backends may skip a state that lasts less than a poll, so each step waits for
/// the state it caused before causing the next.
pub async fn observe_follows_the_holder(f: Fixture) {
    let (a, b) = (&f.clients[0], &f.clients[f.clients.len() - 1]);
    assert!(
        b.holder("watched").await.unwrap().is_none(),
        "free at first"
    );
    let mut seen = b.observe("watched").unwrap();
    let first = bounded("observe's first report", seen.next())
        .await
        .expect("observe reports the state now");
    assert!(first.is_none(), "free at first: {first:?}");

    async fn until(
        seen: &mut futures::stream::BoxStream<'static, Option<palisade_lock::Holder>>,
        want: Option<u64>,
    ) {
        loop {
            let holder = bounded(&format!("observe to report {want:?}"), seen.next())
                .await
                .expect("observe's stream ended");
            if holder.map(|h| h.fencing_token) == want {
                return;
            }
        }
    }
    let ga = a.lock("watched").await.unwrap();
    until(&mut seen, Some(ga.fencing_token())).await;
    let now = b.holder("watched").await.unwrap();
    assert_eq!(now.map(|h| h.fencing_token), Some(ga.fencing_token()));
    ga.release().await.unwrap();
    let gb = b.lock("watched").await.unwrap();
    until(&mut seen, Some(gb.fencing_token())).await;
    gb.release().await.unwrap();
    until(&mut seen, None).await;
    assert!(b.holder("watched").await.unwrap().is_none());
}
