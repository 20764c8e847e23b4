//! `FileLimiter`: exact across processes of one host, and crash-safe. Several tests run this
//! test binary again as child processes (`child_decisions`, which does nothing unless
//! `PALISADE_FILE_CHILD` is set), kill them with SIGKILL, and read what they left.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use palisade_ratelimit::{Error, FileLimiter, Limit, RateLimiter};

#[tokio::test]
async fn shared_exact_peek_reset_and_live_changes() {
    let dir = tempfile::tempdir().unwrap();
    let limit: Limit = "3/h".parse().unwrap();
    let a = FileLimiter::new(dir.path(), limit).unwrap();
    let b = FileLimiter::new(dir.path(), limit).unwrap();
    assert!(a.check("api/key").await.unwrap().allowed);
    assert_eq!(b.check_n("api/key", 2).await.unwrap().remaining, 0);
    let denied = a.check("api/key").await.unwrap();
    assert!(!denied.allowed);
    let retry = denied.retry_after.unwrap();
    assert!(retry > Duration::from_secs(3599) && retry <= Duration::from_secs(3600));
    assert!(
        b.check("other").await.unwrap().allowed,
        "keys are independent"
    );
    assert!(matches!(
        a.check_n("k", 4).await,
        Err(Error::CostExceedsLimit {
            cost: 4,
            capacity: 3
        })
    ));
    // A peek consumes nothing.
    let p = b.peek("other").await.unwrap();
    assert!(
        p.allowed && p.remaining == 2 && p.server_time.is_some(),
        "{p:?}"
    );
    assert_eq!(b.peek("other").await.unwrap().remaining, 2);
    // A raised max applies to the recorded history; a lowered one leaves the key over it.
    let raised = FileLimiter::new(dir.path(), "5/h".parse().unwrap()).unwrap();
    assert_eq!(raised.check("api/key").await.unwrap().remaining, 1);
    let lowered = FileLimiter::new(dir.path(), "2/h".parse().unwrap()).unwrap();
    let p = lowered.peek("api/key").await.unwrap();
    assert!(!p.allowed && p.remaining == 0, "{p:?}");
    // A reset clears every window of the key.
    let two = FileLimiter::with_limits(dir.path(), [limit, "10/min".parse().unwrap()]).unwrap();
    two.reset("api/key").await.unwrap();
    assert_eq!(a.check("api/key").await.unwrap().remaining, 2);
    assert_eq!(two.check("api/key").await.unwrap().remaining, 1);
    assert!(
        FileLimiter::with_limits(dir.path(), [limit, "9/60min".parse().unwrap()]).is_err(),
        "two limits of one window"
    );
}

#[tokio::test(start_paused = true)]
async fn acquire_with_deadline_gives_up_at_once_when_it_cannot_be_met() {
    let dir = tempfile::tempdir().unwrap();
    let l = FileLimiter::new(dir.path(), "1/h".parse().unwrap()).unwrap();
    assert!(l.check("k").await.unwrap().allowed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let started = tokio::time::Instant::now();
    let r = l.acquire_with_deadline("k", 1, deadline).await;
    assert!(matches!(r, Err(Error::DeadlineExceeded(_))), "{r:?}");
    assert_eq!(started.elapsed(), Duration::ZERO, "no sleep in vain");
}

/// Not a test of its own: the body of the child processes of the tests below.
#[tokio::test]
async fn child_decisions() {
    let Ok(dir) = std::env::var("PALISADE_FILE_CHILD") else {
        return;
    };
    let limit: Limit = std::env::var("PALISADE_FILE_LIMIT")
        .unwrap()
        .parse()
        .unwrap();
    let run_for =
        Duration::from_millis(std::env::var("PALISADE_FILE_MS").unwrap().parse().unwrap());
    let limiter = FileLimiter::new(dir, limit).unwrap();
    let deadline = tokio::time::Instant::now() + run_for;
    loop {
        match limiter.acquire_with_deadline("shared", 1, deadline).await {
            Ok(d) => {
                let at = d.server_time.unwrap().as_micros();
                // One line per admission, after it was recorded (println! flushes on newline
                // only for a terminal, so write through a locked stdout and flush).
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                writeln!(out, "admitted {at}").unwrap();
                out.flush().unwrap();
            }
            Err(Error::DeadlineExceeded(_)) => return,
            Err(e) => panic!("{e}"),
        }
    }
}

fn spawn_child(dir: &std::path::Path, limit: &str, ms: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_decisions",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("PALISADE_FILE_CHILD", dir)
        .env("PALISADE_FILE_LIMIT", limit)
        .env("PALISADE_FILE_MS", ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the test binary as a child")
}

/// The admission times a child printed, read until it exits or `stop_after` lines.
fn admissions(out: &mut impl BufRead, stop_after: usize) -> Vec<u128> {
    let mut times = Vec::new();
    for line in out.lines() {
        let Ok(line) = line else { break };
        // The first admission shares its line with libtest's `test child_decisions ... `, so
        // look for the word anywhere. (A line cut short by SIGKILL would not parse; it is not
        // counted as reported.)
        let at = line.rsplit_once("admitted ").map(|(_, at)| at);
        if let Some(at) = at.and_then(|at| at.parse().ok()) {
            times.push(at);
            if times.len() == stop_after {
                break;
            }
        }
    }
    times
}

#[test]
fn processes_sharing_a_directory_never_exceed_the_limit_in_any_window() {
    let dir = tempfile::tempdir().unwrap();
    let (max, window_us) = (10usize, 300_000u128);
    let mut children: Vec<Child> = (0..4)
        .map(|_| spawn_child(dir.path(), "10/300ms", 1500))
        .collect();
    let mut times: Vec<u128> = Vec::new();
    for child in &mut children {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        times.extend(admissions(&mut out, usize::MAX));
        assert!(child.wait().unwrap().success());
    }
    times.sort();
    // The window is (t - w, t]: count, for each admission, those in the window ending at it.
    let mut worst = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i] - times[j] >= window_us {
            j += 1;
        }
        worst = worst.max(i - j + 1);
    }
    println!(
        "{} admitted by 4 processes in 1.5 s, at most {worst} in any 300 ms",
        times.len()
    );
    assert!(worst <= max, "{worst} > {max} in one window");
    // More than one window's worth (each admission is a locked, fsynced write, which a slow
    // disk makes take tens of milliseconds, so the full 50 are not asked for).
    assert!(times.len() > max, "only {} admitted", times.len());
}

#[tokio::test]
async fn a_process_killed_mid_decisions_leaves_a_valid_exact_log() {
    let dir = tempfile::tempdir().unwrap();
    let limit = "100000/h";
    let reader = FileLimiter::new(dir.path(), limit.parse().unwrap()).unwrap();
    let mut reported = 0;
    for round in 0..10 {
        let mut child = spawn_child(dir.path(), limit, 60_000);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        // Kill it while it is deciding: after a varying number of admissions it printed.
        let mut seen = admissions(&mut out, 5 + 7 * round).len();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        seen += admissions(&mut out, usize::MAX).len(); // printed before it died
        reported += seen;
        // The log reads (no torn write), and holds what was admitted: every admission the
        // child reported, plus at most the one it may have recorded and not yet printed.
        let recorded = 100_000 - reader.peek("shared").await.unwrap().remaining as usize;
        assert!(
            recorded == reported || recorded == reported + 1,
            "round {round}: {recorded} recorded, {reported} reported"
        );
        reported = recorded;
    }
    println!(
        "10 processes killed mid-decisions; {reported} admissions recorded, none lost or torn"
    );
    // And decisions go on from it.
    assert!(reader.check("shared").await.unwrap().allowed);
}
