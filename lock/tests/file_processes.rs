//! The file backend across OS processes: mutual exclusion with fencing, and a killed holder's
//! lock and registry entry. Child processes are this test binary run again with
//! `PALISADE_LOCK_FILE_CHILD` set.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use palisade_lock::{Coordinator, JobEvent, JobInfo, Wait};

const CHILD_ENV: &str = "PALISADE_LOCK_FILE_CHILD";
const BOUND: Duration = Duration::from_secs(30);

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

fn child(role: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "file_child_main",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, role)
        .env("PALISADE_LOCK_DIR", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child test process")
}

/// 8 tasks on 2 coordinators, 20 critical sections each; the log's only guard is the check that
/// tokens never decrease.
async fn contend(dir: &Path) {
    let log = dir.join("fenced.log");
    let coordinators = [
        Coordinator::file(dir.join("locks")).unwrap(),
        Coordinator::file(dir.join("locks")).unwrap(),
    ];
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = coordinators[i % 2].clone();
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let g = c.lock("fenced").await.unwrap();
                let enter = now_ns();
                let last = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .last()
                    .and_then(|l| l.split(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0);
                let verdict = if g.fencing_token() > last {
                    "ok"
                } else {
                    "VIOLATION"
                };
                let line = format!(
                    "{} {enter} {} {} {verdict}\n",
                    g.fencing_token(),
                    now_ns(),
                    std::process::id()
                );
                append(&log, &line);
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The entry point of child processes; does nothing in a normal test run.
#[test]
fn file_child_main() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(std::env::var("PALISADE_LOCK_DIR").unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        match role.as_str() {
            "contender" => contend(&dir).await,
            "sleeper" => {
                let c = Coordinator::file(dir.join("locks")).unwrap();
                let _ = c
                    .run_exclusive("sleeper", JobInfo::new("sleeper"), Wait::Forever, |_| {
                        std::future::pending::<()>()
                    })
                    .await;
            }
            other => panic!("unknown role {other}"),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_holds_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = child("contender", dir.path());
    contend(dir.path()).await;
    let status = tokio::task::spawn_blocking(move || other.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(dir.path().join("fenced.log")).unwrap();
    let entries: Vec<Vec<String>> = text
        .lines()
        .map(|l| l.split(' ').map(String::from).collect())
        .collect();
    assert_eq!(entries.len(), 320, "2 processes x 8 tasks x 20 rounds");
    let pids: std::collections::BTreeSet<&str> = entries.iter().map(|e| e[3].as_str()).collect();
    assert_eq!(pids.len(), 2);
    assert!(entries.iter().all(|e| e[4] == "ok"), "fencing violation");
    for w in entries.windows(2) {
        assert_eq!(w[0][4], "ok", "fencing violation: {w:?}");
        let (t0, t1): (u64, u64) = (w[0][0].parse().unwrap(), w[1][0].parse().unwrap());
        assert!(t0 < t1, "tokens not increasing: {w:?}");
        let (exit0, enter1): (u128, u128) = (w[0][2].parse().unwrap(), w[1][1].parse().unwrap());
        assert!(exit0 <= enter1, "critical sections overlap: {w:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_holder_frees_the_lock_and_expires_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::file(dir.path().join("locks")).unwrap();
    let mut events = c.registry().watch();
    let mut sleeper = child("sleeper", dir.path());
    match tokio::time::timeout(BOUND, events.next())
        .await
        .expect("Started in time")
        .unwrap()
    {
        JobEvent::Started(j) => assert_eq!(j.pid, sleeper.id()),
        other => panic!("expected Started, got {other:?}"),
    }
    let token = c.registry().running().await.unwrap()[0]
        .fencing_token
        .unwrap();
    assert!(c.try_lock("sleeper").await.is_err(), "held by the child");
    sleeper.kill().unwrap(); // SIGKILL: the kernel drops its flocks
    let _ = sleeper.wait();
    match tokio::time::timeout(BOUND, events.next())
        .await
        .expect("Expired in time")
        .unwrap()
    {
        JobEvent::Expired(j) => assert_eq!(j.lock, "sleeper"),
        other => panic!("expected Expired, got {other:?}"),
    }
    assert!(c.registry().running().await.unwrap().is_empty());
    let g = c
        .try_lock("sleeper")
        .await
        .expect("free after the holder died");
    assert!(g.fencing_token() > token, "the counter survived the holder");
}
