//! Guarantees that need a real etcd and its faults: paused holders, killed processes, etcd
//! restarts, a lost cluster leader, compaction under a watch, contention across processes.
//!
//! Child processes are this test binary run again with `PALISADE_LOCK_CHILD` set (see
//! `child_main`), so the tests need no other program.
#![cfg(feature = "etcd")]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{bounded, etcd_coordinator, etcd_server, eventually};
use futures::StreamExt;
use palisade_lock::{JobEvent, JobInfo, LockError, RunOutcome, Wait};
use rustix::process::{Pid, Signal, kill_process};

const CHILD_ENV: &str = "PALISADE_LOCK_CHILD";

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn spawn_child(role: &str, endpoint: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_main", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env("PALISADE_LOCK_ETCD", endpoint)
        .env("PALISADE_LOCK_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child test process")
}

fn signal(child: &Child, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    kill_process(pid, sig).expect("signal child");
}

/// Waits (bounded) for a child to exit and returns its stdout.
async fn child_output(child: Child) -> String {
    bounded(
        "child process exits",
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .unwrap()
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .expect("child output")
}

/// The entry point of child processes; does nothing in a normal test run.
#[test]
fn child_main() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let endpoint = std::env::var("PALISADE_LOCK_ETCD").unwrap();
    let dir = PathBuf::from(std::env::var("PALISADE_LOCK_DIR").unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match role.as_str() {
            "contender" => contend(&[endpoint], &dir, 16, 16).await,
            "holder" => {
                let c = etcd_coordinator(&[endpoint], 2).await;
                let job = |ctx| write_until_cancelled(dir.join("writes.log"), ctx);
                let outcome = c
                    .run_exclusive("paused", JobInfo::new("paused-holder"), Wait::Forever, job)
                    .await;
                report(outcome);
            }
            "sem_holder" => {
                // One of the two slots of `sem`, writing while it holds it.
                let c = etcd_coordinator(&[endpoint], 2).await;
                let job = |ctx| write_until_cancelled(dir.join("writes.log"), ctx);
                let outcome = c
                    .run_limited("sem", 2, JobInfo::new("sem-holder"), Wait::Forever, job)
                    .await;
                report(outcome);
            }
            "sleeper" => {
                let c = etcd_coordinator(&[endpoint], 2).await;
                let _ = c
                    .run_exclusive("sleeper", JobInfo::new("sleeper"), Wait::Forever, |_| {
                        std::future::pending::<()>()
                    })
                    .await;
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

/// A child's job: appends `child <token> <time>` to `log` every 20 ms until it is cancelled.
async fn write_until_cancelled(log: PathBuf, ctx: palisade_lock::JobContext) {
    loop {
        let line = format!("child {} {}\n", ctx.fencing_token(), now_ns());
        append(&log, &line);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints a child's outcome for the test to read.
fn report(outcome: Result<RunOutcome<()>, LockError>) {
    match outcome {
        Err(LockError::Lost) => println!("OUTCOME Lost at {}", now_ns()),
        other => println!("OUTCOME {other:?}"),
    }
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

/// `tasks` contenders over 4 sessions, `rounds` critical sections each. Inside: the only guard
/// of the shared log is the check that tokens never decrease; each entry records its enter and
/// exit times.
async fn contend(endpoints: &[String], dir: &Path, tasks: usize, rounds: usize) {
    let mut coordinators = Vec::new();
    for _ in 0..4 {
        coordinators.push(etcd_coordinator(endpoints, 5).await);
    }
    let log = Arc::new(dir.join("fenced.log"));
    let mut handles = Vec::new();
    for i in 0..tasks {
        let c = coordinators[i % 4].clone();
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let g = c.lock("fenced").await.expect("lock");
                let enter = now_ns();
                let last = std::fs::read_to_string(&*log)
                    .unwrap_or_default()
                    .lines()
                    .last()
                    .and_then(|l| l.split(' ').next().and_then(|t| t.parse::<u64>().ok()))
                    .unwrap_or(0);
                let verdict = if g.fencing_token() > last {
                    "ok"
                } else {
                    "VIOLATION"
                };
                let exit = now_ns();
                append(
                    &log,
                    &format!(
                        "{} {enter} {exit} {} {verdict}\n",
                        g.fencing_token(),
                        std::process::id()
                    ),
                );
                g.release().await.expect("release");
            }
        }));
    }
    for h in handles {
        h.await.expect("contender");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_holds_across_processes() {
    let etcd = etcd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_child("contender", &etcd.endpoint(), dir.path());
    contend(&etcd.endpoints(), dir.path(), 16, 16).await;
    child_output(child).await;
    let text = std::fs::read_to_string(dir.path().join("fenced.log")).unwrap();
    let mut entries: Vec<(u64, u128, u128, u32)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[4], "ok", "fencing violation: {line}");
        entries.push((
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[3].parse().unwrap(),
        ));
    }
    assert_eq!(entries.len(), 512, "32 contenders x 16 rounds");
    let pids: std::collections::BTreeSet<u32> = entries.iter().map(|e| e.3).collect();
    assert_eq!(pids.len(), 2, "both processes took the lock");
    // In log order tokens strictly increase, and no two critical sections overlap.
    for w in entries.windows(2) {
        assert!(w[0].0 < w[1].0, "tokens not increasing: {w:?}");
        assert!(w[0].2 <= w[1].1, "critical sections overlap: {w:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_holder_is_fenced_and_cancelled() {
    let etcd = etcd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let c = etcd_coordinator(&etcd.endpoints(), 2).await;
    let mut child = Some(spawn_child("holder", &etcd.endpoint(), dir.path()));
    let reg = c.registry();
    eventually("the child's job is registered", || async {
        reg.running().await.map(|r| r.len() == 1).unwrap_or(false)
    })
    .await;
    let child_token = reg.running().await.unwrap()[0].fencing_token.unwrap();
    // The state the fault needs: the child's job has written (registration comes first, and on
    // a busy machine the first write can lag it).
    let log = dir.path().join("writes.log");
    eventually("the child's first write", || async {
        std::fs::metadata(&log).is_ok_and(|m| m.len() > 0)
    })
    .await;
    let proc = child.take().unwrap();
    palisade_testkit::pause_process(proc.id()).expect("pause the child");
    // The child's lease runs out (TTL 2 s) and we get the lock with a larger token.
    let guard = bounded(
        "lock after the holder's lease expired",
        c.lock_timeout("paused", Duration::from_secs(15)),
    )
    .await
    .expect("acquire after the paused holder's lease expired");
    let acquired_at = now_ns();
    assert!(guard.fencing_token() > child_token);
    palisade_testkit::resume_process(proc.id()).expect("resume the child");
    let out = child_output(proc).await;
    assert!(out.contains("OUTCOME Lost"), "child output: {out}");
    // Not one write of the child happened after we acquired: it saw the loss first.
    let writes = std::fs::read_to_string(dir.path().join("writes.log")).unwrap();
    assert!(!writes.is_empty());
    for line in writes.lines() {
        let t: u128 = line.split(' ').nth(2).unwrap().parse().unwrap();
        assert!(
            t < acquired_at,
            "the paused holder wrote after losing its lease: {line}"
        );
    }
    guard.release().await.unwrap();
}

/// Starts the `sem_holder` child beside a holder of the other slot (returned), and waits for
/// the state the faults need: the child registered (its token) and wrote.
async fn semaphore_full_with_child(
    c: &palisade_lock::Coordinator,
    etcd: &palisade_testkit::Etcd,
    dir: &Path,
) -> (palisade_lock::LockGuard, Child, u64) {
    let sem = c.semaphore("sem", 2).unwrap();
    let ours = sem.acquire().await.unwrap();
    let child = spawn_child("sem_holder", &etcd.endpoint(), dir);
    let reg = c.registry();
    eventually("the child holds a slot", || async {
        reg.running().await.map(|r| r.len() == 1).unwrap_or(false)
    })
    .await;
    let job = reg.running().await.unwrap().remove(0);
    assert_eq!(job.permits, Some(2));
    let log = dir.join("writes.log");
    eventually("the child's first write", || async {
        std::fs::metadata(&log).is_ok_and(|m| m.len() > 0)
    })
    .await;
    assert!(
        matches!(sem.try_acquire().await, Err(LockError::Held { .. })),
        "both slots are held"
    );
    (ours, child, job.fencing_token.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn semaphore_slot_of_a_killed_holder_is_freed_after_its_ttl() {
    let etcd = etcd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let c = etcd_coordinator(&etcd.endpoints(), 3).await;
    let (_ours, mut child, child_token) = semaphore_full_with_child(&c, &etcd, dir.path()).await;
    signal(&child, Signal::KILL);
    let _ = child.wait();
    // The child's lease (TTL 2 s) runs out and its slot is ours, with a larger token.
    let sem = c.semaphore("sem", 2).unwrap();
    let guard = bounded(
        "the killed holder's slot",
        sem.acquire_timeout(Duration::from_secs(15)),
    )
    .await
    .expect("slot after the killed holder's lease expired");
    assert!(guard.fencing_token() > child_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn semaphore_paused_holder_loses_its_slot_and_its_job() {
    let etcd = etcd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let c = etcd_coordinator(&etcd.endpoints(), 3).await;
    let (_ours, child, child_token) = semaphore_full_with_child(&c, &etcd, dir.path()).await;
    palisade_testkit::pause_process(child.id()).expect("pause the child");
    let sem = c.semaphore("sem", 2).unwrap();
    let guard = bounded(
        "the paused holder's slot",
        sem.acquire_timeout(Duration::from_secs(15)),
    )
    .await
    .expect("slot after the paused holder's lease expired");
    let acquired_at = now_ns();
    assert!(guard.fencing_token() > child_token);
    palisade_testkit::resume_process(child.id()).expect("resume the child");
    let out = child_output(child).await;
    assert!(out.contains("OUTCOME Lost"), "child output: {out}");
    let writes = std::fs::read_to_string(dir.path().join("writes.log")).unwrap();
    for line in writes.lines() {
        let t: u128 = line.split(' ').nth(2).unwrap().parse().unwrap();
        assert!(
            t < acquired_at,
            "the paused holder wrote after losing its slot: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_entry_expires_when_process_is_killed() {
    let etcd = etcd_server().await;
    let dir = tempfile::tempdir().unwrap();
    let c = etcd_coordinator(&etcd.endpoints(), 2).await;
    let mut events = c.registry().watch();
    let mut child = spawn_child("sleeper", &etcd.endpoint(), dir.path());
    match bounded("Started", events.next()).await.unwrap() {
        JobEvent::Started(j) => assert_eq!(j.pid, child.id()),
        other => panic!("expected Started, got {other:?}"),
    }
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    match bounded("Expired", events.next()).await.unwrap() {
        JobEvent::Expired(j) => assert_eq!(j.lock, "sleeper"),
        other => panic!("expected Expired, got {other:?}"),
    }
    assert!(c.registry().running().await.unwrap().is_empty());
    bounded("lock free", c.lock("sleeper")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_restart_within_ttl_keeps_sessions() {
    // A TTL of 20 s: the restart (kill, start, health check) and the client's reconnect take
    // a few seconds on a busy machine, all of it within the TTL.
    let etcd = Arc::new(etcd_server().await);
    let c = etcd_coordinator(&etcd.endpoints(), 20).await;
    let other = etcd_coordinator(&etcd.endpoints(), 20).await;
    let guard = c.lock("survive").await.unwrap();
    let e2 = etcd.clone();
    let restarting = tokio::time::Instant::now();
    tokio::task::spawn_blocking(move || e2.restart())
        .await
        .unwrap()
        .expect("restart etcd");
    let session = c.session();
    renewed_after(&session, restarting, 20, "the restart").await;
    assert!(!guard.is_lost() && !session.is_lost());
    assert!(matches!(
        other.try_lock("survive").await,
        Err(LockError::Held { .. })
    ));
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let g = bounded("lock after restart", other.lock("survive"))
        .await
        .unwrap();
    assert!(g.fencing_token() > token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_down_beyond_ttl_loses_sessions_and_frees_locks() {
    let etcd = Arc::new(etcd_server().await);
    let c = etcd_coordinator(&etcd.endpoints(), 2).await;
    let guard = c.lock("down").await.unwrap();
    let old_lease = c.session().lease_id();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let job = {
        let c = c.clone();
        tokio::spawn(async move {
            c.run_exclusive("down-job", JobInfo::new("j"), Wait::No, |_| async move {
                let _ = started_tx.send(());
                std::future::pending::<()>().await
            })
            .await
        })
    };
    bounded("job starts", started_rx).await.unwrap();
    let e2 = etcd.clone();
    tokio::task::spawn_blocking(move || e2.kill())
        .await
        .unwrap()
        .unwrap();
    bounded("guard reports lost", guard.lost()).await;
    let outcome = bounded("job cancelled", job).await.unwrap();
    assert!(matches!(outcome, Err(LockError::Lost)), "{outcome:?}");
    let e2 = etcd.clone();
    tokio::task::spawn_blocking(move || e2.restart())
        .await
        .unwrap()
        .expect("restart etcd");
    // The same coordinator starts a new session, and the old holder's keys are gone or expire.
    let g = bounded(
        "lock free again",
        c.lock_timeout("down", Duration::from_secs(15)),
    )
    .await
    .expect("lock after the outage");
    assert_ne!(c.session().lease_id(), old_lease);
    assert!(g.fencing_token() > guard.fencing_token());
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_keeps_working_without_its_leader() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| palisade_testkit::EtcdCluster::start(3))
            .await
            .unwrap()
            .expect("start a 3-member etcd cluster"),
    );
    // A TTL of 15 s: the election of a new leader and the client's move to another member
    // take a few seconds on a busy machine, all of it within the TTL.
    let c = etcd_coordinator(&cluster.endpoints(), 15).await;
    c.lock("ha").await.unwrap().release().await.unwrap();
    let cl = cluster.clone();
    let killing = tokio::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let leader = cl.leader()?;
        cl.member(leader).kill()
    })
    .await
    .unwrap()
    .expect("kill the leader");
    let mut last = 0;
    for _ in 0..5 {
        let g = bounded("lock through the other members", c.lock("ha"))
            .await
            .unwrap();
        assert!(g.fencing_token() > last);
        last = g.fencing_token();
        g.release().await.unwrap();
    }
    // The session's keepalive goes on through the other members.
    renewed_after(&c.session(), killing, 15, "the leader was killed").await;
    assert!(!c.session().is_lost());
}

/// Waits (bounded) until `session` has a renewal acknowledged that was sent after `since`. A
/// deadline is a renewal's send time + 99 % of the TTL, so only such a renewal gets it past
/// `since` + 99 % of `ttl_secs` (the lease's grant or a renewal sent before `since` does not).
async fn renewed_after(
    session: &palisade_lock::Session,
    since: tokio::time::Instant,
    ttl_secs: u64,
    fault: &str,
) {
    let ttl = Duration::from_secs(ttl_secs);
    let bound = since + (ttl - ttl / 100);
    eventually(&format!("a renewal acknowledged after {fault}"), || {
        let s = session.clone();
        async move { s.deadline().is_some_and(|d| d > bound) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_survive_restart_and_compaction() {
    let etcd = Arc::new(etcd_server().await);
    let c = etcd_coordinator(&etcd.endpoints(), 10).await;
    let mut events = c.registry().watch();
    let mut leaders = c.election().observe("boss");
    assert_eq!(
        bounded("initial leader", leaders.next()).await.unwrap(),
        None
    );

    let (finish_a, finish_a_rx) = tokio::sync::oneshot::channel::<()>();
    let ca = c.clone();
    let job_a = tokio::spawn(async move {
        ca.run_exclusive("a", JobInfo::new("a"), Wait::No, |_| async move {
            let _ = finish_a_rx.await;
        })
        .await
    });
    assert!(
        matches!(bounded("Started a", events.next()).await.unwrap(), JobEvent::Started(j) if j.lock == "a")
    );

    // Restart etcd, then at once change the registry and compact past the watchers' revision,
    // while they are still reconnecting.
    let e2 = etcd.clone();
    tokio::task::spawn_blocking(move || e2.restart())
        .await
        .unwrap()
        .expect("restart");
    finish_a.send(()).unwrap();
    assert!(matches!(
        bounded("job a", job_a).await.unwrap(),
        Ok(RunOutcome::Ran(()))
    ));
    let lead = c.election().campaign("boss", "me").await.unwrap();
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let rev = raw
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(rev, None).await.unwrap();

    match bounded("Finished a after restart", events.next())
        .await
        .unwrap()
    {
        JobEvent::Finished(j) => assert_eq!(j.lock, "a"),
        other => panic!("expected Finished, got {other:?}"),
    }
    loop {
        let seen = bounded("leader after restart", leaders.next())
            .await
            .unwrap();
        if seen.is_some_and(|h| h.value_str() == "me") {
            break;
        }
    }
    // And they keep following changes after the compaction.
    let (finish_b, finish_b_rx) = tokio::sync::oneshot::channel::<()>();
    let cb = c.clone();
    let job_b = tokio::spawn(async move {
        cb.run_exclusive("b", JobInfo::new("b"), Wait::No, |_| async move {
            let _ = finish_b_rx.await;
        })
        .await
    });
    assert!(
        matches!(bounded("Started b", events.next()).await.unwrap(), JobEvent::Started(j) if j.lock == "b")
    );
    finish_b.send(()).unwrap();
    let _ = job_b.await.unwrap().unwrap();
    assert!(
        matches!(bounded("Finished b", events.next()).await.unwrap(), JobEvent::Finished(j) if j.lock == "b")
    );
    lead.resign().await.unwrap();
    assert_eq!(bounded("no leader", leaders.next()).await.unwrap(), None);
    // Whether the watchers reconnected before or after the compaction depends on their backoff;
    // both paths must give the events above. Shown for whoever reads the output.
    eprintln!(
        "re-reads after compaction: {}",
        palisade_lock::stats::resyncs()
    );
}

/// Every key we write is on our session's kept-alive lease (never lease 0), and release and
/// `guard.txn()` compare the key's create revision, so they never touch a newer key of the same
/// name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_leased_and_writes_compare_create_revision() {
    let etcd = etcd_server().await;
    let c = etcd_coordinator(&etcd.endpoints(), 5).await;
    let lease = c.session().lease_id().expect("an etcd session has a lease");
    assert_ne!(lease, 0);
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let guard = c.lock("fenced-txn").await.unwrap();
    let keys = raw
        .get(
            "test/lock/fenced-txn/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(keys.kvs().len(), 1);
    let kv = &keys.kvs()[0];
    assert_eq!(kv.lease(), lease, "the lock key is on our session lease");
    assert_eq!(
        u64::try_from(kv.create_revision()).unwrap(),
        guard.fencing_token()
    );
    let key = kv.key().to_vec();
    // A fenced write through the guard applies while we own the lock.
    let ok = raw
        .txn(
            guard
                .txn()
                .unwrap()
                .and_then([etcd_client::TxnOp::put("out", "1", None)]),
        )
        .await
        .unwrap();
    assert!(ok.succeeded());
    // The key is replaced behind our back (as after a lease loss and a new holder).
    raw.delete(key.clone(), None).await.unwrap();
    raw.put(key.clone(), "newer", None).await.unwrap();
    let stale = raw
        .txn(
            guard
                .txn()
                .unwrap()
                .and_then([etcd_client::TxnOp::put("out", "2", None)]),
        )
        .await
        .unwrap();
    assert!(
        !stale.succeeded(),
        "a fenced write of a replaced holder must not apply"
    );
    guard.release().await.unwrap();
    let still = raw.get(key, None).await.unwrap();
    assert_eq!(
        still.kvs()[0].value(),
        b"newer",
        "release deleted a newer key"
    );
    // Registry entries are leased too.
    let c2 = c.clone();
    let _ = c2
        .run_exclusive("leased-job", JobInfo::new("j"), Wait::No, |_| async {
            let entry = raw.get("test/jobs/run/leased-job", None).await.unwrap();
            assert_eq!(entry.kvs()[0].lease(), lease);
        })
        .await
        .unwrap();
}

/// A watcher whose etcd member is down while the registry changes and the history is
/// compacted: on reconnecting it gets `Compacted`, re-reads, and reports what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_rereads_after_compaction_while_disconnected() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| palisade_testkit::EtcdCluster::start(3))
            .await
            .unwrap()
            .expect("start a 3-member etcd cluster"),
    );
    let endpoints = cluster.endpoints();
    let watcher = etcd_coordinator(&endpoints[..1], 10).await;
    let worker = etcd_coordinator(&endpoints[1..], 10).await;
    let mut events = watcher.registry().watch();
    let mut leaders = watcher.election().observe("boss");
    assert_eq!(
        bounded("initial leader", leaders.next()).await.unwrap(),
        None
    );

    let hold = |name: &'static str| {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let w = worker.clone();
        let job = tokio::spawn(async move {
            w.run_exclusive(name, JobInfo::new(name), Wait::No, |_| async move {
                let _ = rx.await;
            })
            .await
        });
        (tx, job)
    };
    let (finish_a, job_a) = hold("a");
    assert!(
        matches!(bounded("Started a", events.next()).await.unwrap(), JobEvent::Started(j) if j.lock == "a")
    );

    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.member(0).kill())
        .await
        .unwrap()
        .unwrap();
    let before = palisade_lock::stats::resyncs();
    finish_a.send(()).unwrap();
    assert!(matches!(
        bounded("job a", job_a).await.unwrap(),
        Ok(RunOutcome::Ran(()))
    ));
    let (finish_b, job_b) = hold("b");
    let lead = worker.election().campaign("boss", "worker").await.unwrap();
    eventually("b registered", || async {
        worker
            .registry()
            .running()
            .await
            .map(|r| r.len() == 1)
            .unwrap_or(false)
    })
    .await;
    let mut raw = etcd_client::Client::connect(&endpoints[1..], None)
        .await
        .unwrap();
    let rev = raw
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(rev, None).await.unwrap();
    let cl = cluster.clone();
    tokio::task::spawn_blocking(move || cl.member(0).restart())
        .await
        .unwrap()
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        match bounded("events after the compaction", events.next())
            .await
            .unwrap()
        {
            JobEvent::Finished(j) => seen.push(format!("finished {}", j.lock)),
            JobEvent::Started(j) => seen.push(format!("started {}", j.lock)),
            other => seen.push(format!("{other:?}")),
        }
    }
    seen.sort();
    assert_eq!(seen, ["finished a", "started b"]);
    loop {
        let now = bounded("leader after the compaction", leaders.next())
            .await
            .unwrap();
        if now.is_some_and(|h| h.value_str() == "worker") {
            break;
        }
    }
    assert!(
        palisade_lock::stats::resyncs() > before,
        "the watchers never saw the compaction"
    );
    finish_b.send(()).unwrap();
    let _ = job_b.await.unwrap().unwrap();
    lead.resign().await.unwrap();
}

/// etcd issue 19597: a waiter whose own key disappears (its lease expired or was revoked) fails
/// at once instead of waiting for everyone ahead of it, and is never granted the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiter_fails_at_once_when_its_key_vanishes() {
    let etcd = etcd_server().await;
    let holder = etcd_coordinator(&etcd.endpoints(), 10).await;
    let waiter = etcd_coordinator(&etcd.endpoints(), 10).await;
    let guard = holder.lock("q").await.unwrap();
    let w = waiter.clone();
    let waiting = tokio::spawn(async move { w.lock("q").await });
    eventually("the waiter is queued", || async {
        holder.queue_len("q").await.unwrap() == 1
    })
    .await;
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    raw.lease_revoke(waiter.session().lease_id().unwrap())
        .await
        .unwrap();
    let result = bounded("the waiter gives up", waiting).await.unwrap();
    assert!(matches!(result, Err(LockError::Lost)), "{result:?}");
    assert!(!guard.is_lost(), "the holder is unaffected");
    // The waiter's coordinator starts a new session and can queue again.
    guard.release().await.unwrap();
    bounded("lock with a new session", waiter.lock("q"))
        .await
        .unwrap();
}

/// A lock held for several TTLs stays held: the session lease is kept alive (a lock on a
/// lease nobody renews would be taken by a second holder after the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_outlives_its_ttl_while_kept_alive() {
    let etcd = etcd_server().await;
    // A TTL of 4 s: renewals every 1.3 s, so a busy machine's stalls of a second or two do not
    // lose the lease (with a TTL of 2 s, a stall of 1.3 s would).
    let holder = etcd_coordinator(&etcd.endpoints(), 4).await;
    let other = etcd_coordinator(&etcd.endpoints(), 4).await;
    let guard = holder.lock("long").await.unwrap();
    let started = tokio::time::Instant::now();
    // Over two TTLs; the other client keeps trying meanwhile.
    while started.elapsed() < Duration::from_secs(9) {
        assert!(
            matches!(other.try_lock("long").await, Err(LockError::Held { .. })),
            "a second holder got the lock after {:?}",
            started.elapsed()
        );
        assert!(!guard.is_lost());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    guard.release().await.unwrap();
    other.try_lock("long").await.unwrap();
}

/// What an operator does to break a stuck lock, `etcdctl lease revoke` or `etcdctl del` of the
/// holder's key, is noticed by the holder at once (its key is watched), not at its next renewal
/// a third of the TTL later, and never for a deleted key. It takes a few milliseconds; the
/// bound asserted is 2 s, a fifth of the time to the next renewal, so that a busy machine's
/// scheduling delays do not fail the test while a holder that relied on renewals would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_lease_or_a_deleted_key_is_noticed_long_before_a_renewal() {
    const NOTICE: Duration = Duration::from_secs(2);
    let etcd = etcd_server().await;
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    for fault in ["revoke", "delete"] {
        // A TTL of 30 s: the keepalive would notice a revoke only after 10 s.
        let holder = etcd_coordinator(&etcd.endpoints(), 30).await;
        let waiter = etcd_coordinator(&etcd.endpoints(), 30).await;
        let name = format!("broken-{fault}");
        let guard = holder.lock(&name).await.unwrap();
        let w = waiter.clone();
        let n = name.clone();
        let next = tokio::spawn(async move { w.lock(&n).await });
        eventually("the waiter is queued", || async {
            holder.queue_len(&name).await.unwrap() == 1
        })
        .await;
        let started = std::time::Instant::now();
        match fault {
            "revoke" => {
                raw.lease_revoke(holder.session().lease_id().unwrap())
                    .await
                    .unwrap();
            }
            _ => {
                let key = format!("test/lock/{name}/");
                let held = raw
                    .get(
                        key.as_str(),
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await
                    .unwrap();
                let first = held
                    .kvs()
                    .iter()
                    .min_by_key(|kv| kv.create_revision())
                    .expect("the holder's key")
                    .key()
                    .to_vec();
                raw.delete(first, None).await.unwrap();
            }
        }
        let noticed = tokio::time::timeout(NOTICE, guard.lost()).await;
        assert!(
            noticed.is_ok(),
            "{fault}: the holder did not notice within {NOTICE:?}"
        );
        assert!(guard.is_lost(), "{fault}");
        println!("{fault}: noticed after {:?}", started.elapsed());
        // The waiter is the owner now, with a higher fencing token.
        let taken = bounded("the waiter takes over", next)
            .await
            .unwrap()
            .unwrap();
        assert!(taken.fencing_token() > guard.fencing_token());
    }
}

/// A coordinator whose every request goes through `proxy`.
async fn proxied_coordinator(
    proxy: &palisade_testkit::FaultProxy,
    ttl_secs: u64,
) -> palisade_lock::Coordinator {
    etcd_coordinator(&[format!("http://{}", proxy.addr())], ttl_secs).await
}

/// try_lock, lock_timeout and run_exclusive with Wait::Up return within their bound plus the
/// request timeout (a third of the TTL, at most 5 s) when etcd does not answer: partitioned
/// (blackholed), paused, or down. (The lease grant and the put used to be retried for up to a
/// TTL outside the bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_wait_is_bounded_when_etcd_does_not_answer() {
    const TTL: u64 = 15; // request timeout 5 s
    let slack = Duration::from_secs(2);
    let etcd = etcd_server().await;
    for fault in ["blackhole", "pause", "down"] {
        let proxy = etcd.proxy().expect("proxy");
        let coordinator = proxied_coordinator(&proxy, TTL).await;
        coordinator
            .try_lock("warm")
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        match fault {
            "blackhole" => proxy.blackhole(),
            "pause" => etcd.pause().unwrap(),
            _ => proxy.reset(),
        }
        let bound = Duration::from_secs(TTL / 3);
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), coordinator.try_lock("x")).await;
        let took = started.elapsed();
        assert!(matches!(r, Ok(Err(_))), "{fault}: try_lock {r:?}");
        assert!(took <= bound + slack, "{fault}: try_lock took {took:?}");

        let wait = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), coordinator.lock_timeout("x", wait))
            .await;
        let took = started.elapsed();
        assert!(matches!(r, Ok(Err(_))), "{fault}: lock_timeout {r:?}");
        assert!(
            took <= wait + bound + slack,
            "{fault}: lock_timeout took {took:?}"
        );

        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            coordinator.run_exclusive("x", JobInfo::new("j"), Wait::Up(wait), |_| async {}),
        )
        .await;
        let took = started.elapsed();
        assert!(
            matches!(r, Ok(Err(_)) | Ok(Ok(RunOutcome::Skipped { .. }))),
            "{fault}: run_exclusive {r:?}"
        );
        assert!(
            took <= wait + bound + slack,
            "{fault}: run_exclusive took {took:?}"
        );
        if fault == "pause" {
            etcd.resume().unwrap();
        }
        println!("{fault}: bounded");
    }
}

/// Acquires cancelled at every stage (a `timeout` around `lock()` while the put is in flight,
/// while waiting, just after acquiring) leave no key that blocks the lock while their session
/// lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_acquires_leave_no_key_behind() {
    let etcd = etcd_server().await;
    let proxy = etcd.proxy().expect("proxy");
    let cancelled = proxied_coordinator(&proxy, 30).await;
    proxy.latency(Duration::from_millis(1));
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..1000 {
        // xorshift: a 0-3 ms timeout, so that some cancel before the put is sent, some while it
        // is in flight and some after the lock was taken.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let timeout = Duration::from_micros(seed % 3000);
        if let Ok(Ok(guard)) = tokio::time::timeout(timeout, cancelled.lock("orphans")).await {
            drop(guard);
        }
    }
    proxy.pass();
    let other = etcd_coordinator(&etcd.endpoints(), 30).await;
    let started = std::time::Instant::now();
    // The clean-up deletes the orphans one by one in the background; a leaked key would block
    // for as long as the cancelled acquires' session lives, i.e. for ever here.
    let guard = tokio::time::timeout(Duration::from_secs(20), other.lock("orphans"))
        .await
        .expect("another coordinator must get the lock within 20 s while the cancelled acquires' session lives")
        .unwrap();
    println!("acquired after {:?}", started.elapsed());
    assert!(
        !cancelled.session().is_lost(),
        "the cancelled acquires' session must still live"
    );
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_breaks_a_lock_its_holder_is_told_and_the_first_waiter_gets_it() {
    let etcd = etcd_server().await;
    let endpoints = vec![etcd.endpoint()];
    let (a, b, ops) = (
        etcd_coordinator(&endpoints, 30).await,
        etcd_coordinator(&endpoints, 30).await,
        etcd_coordinator(&endpoints, 30).await,
    );
    let held = a.lock("stuck").await.unwrap();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.lock("stuck").await });
    eventually("b waits for stuck", || async {
        ops.contenders("stuck").await.unwrap().len() == 2
    })
    .await;
    let contenders = ops.contenders("stuck").await.unwrap();
    assert_eq!(
        contenders[0].fencing_token,
        held.fencing_token(),
        "the holder comes first"
    );
    assert!(contenders[1].fencing_token > contenders[0].fencing_token);
    assert_eq!(
        ops.holder("stuck").await.unwrap(),
        Some(contenders[0].clone())
    );

    let broken = ops.break_lock("stuck").await.unwrap().expect("it was held");
    assert_eq!(broken.fencing_token, held.fencing_token());
    bounded("the holder sees its lock lost", held.lost()).await;
    let next = bounded("the waiter gets the lock", waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(next.fencing_token() > broken.fencing_token);
    // Breaking the next holder's lock, then a free lock: nothing to break.
    drop(next);
    eventually("stuck is free", || async {
        ops.holder("stuck").await.unwrap().is_none()
    })
    .await;
    assert_eq!(ops.break_lock("stuck").await.unwrap(), None);
}
