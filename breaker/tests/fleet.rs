//! The fleet breaker across 4 OS processes on a real redis-server (feature `fleet`).
//!
//! Each member process is this test binary re-executed with `--exact fleet_member` and the
//! `FLEET_MEMBER_*` variables: it calls an "upstream" whose behaviour the test sets in a file
//! (`ok 30` = succeed after 30 ms, `fail 0` = fail at once), and writes one line per thing it
//! sees, timestamped with the system clock in microseconds since the Unix epoch (the clock the
//! Redis server on this host reads for `TIME`):
//!
//! ```text
//! <us> call ok|fail          <us> reject <state> fleet=<Option<FleetState>>
//! <us> probe_start           <us> probe_end
//! <us> event <FleetEvent>
//! ```
//!
//! Waits are bounded and say what they waited for; the assertions on behaviour are exact.

#![cfg(feature = "fleet")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_breaker::fleet::{FleetBreaker, FleetError, FleetEvent, FleetState};
use palisade_breaker::{CircuitBreaker, ConfigError, State, Window};

/// The bound this crate states for spreading a transition to every process with the default
/// `sync_interval` (100 ms): pub/sub usually takes a few ms, the polling fallback
/// `sync_interval` + one round trip.
const PROPAGATION_BOUND: Duration = Duration::from_millis(200);
/// How long a wait for something that must happen may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The member process.

fn member_breaker(scenario: &str, url: &str) -> FleetBreaker {
    let b = CircuitBreaker::builder("upstream").failure_rate_threshold(0.5);
    let b = match scenario {
        // Local breakers that never open by themselves: every rejection is the fleet's.
        "open" => b
            .sliding_window(Window::Count(100_000))
            .minimum_calls(100_000)
            .wait_in_open(Duration::from_secs(600))
            .fleet(url)
            .minimum_calls(20),
        "probes" => b
            .sliding_window(Window::Count(100_000))
            .minimum_calls(100_000)
            .wait_in_open(Duration::from_millis(800))
            .half_open_permits(2)
            .fleet(url)
            .minimum_calls(10)
            .window(Duration::from_secs(2)),
        // A fleet that never opens on rates: the local breakers decide.
        "outage" => b
            .sliding_window(Window::Count(10))
            .minimum_calls(10)
            .wait_in_open(Duration::from_millis(500))
            .half_open_permits(1)
            .fleet(url)
            .minimum_calls(u32::MAX),
        other => panic!("unknown scenario {other}"),
    };
    b.build().expect("valid fleet breaker")
}

/// The upstream: the first word of the control file says `ok` or `fail`, the second the
/// latency in milliseconds. `None` once the file is gone (the test ended).
fn upstream(dir: &Path) -> Option<(bool, u64)> {
    let text = std::fs::read_to_string(dir.join("upstream")).ok()?;
    let mut words = text.split_whitespace();
    let ok = words.next()? == "ok";
    let latency = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    Some((ok, latency))
}

async fn member_main(scenario: String, url: String, dir: PathBuf, log: PathBuf) {
    use std::io::Write;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("member log");
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::LineWriter::new(file)));
    let line = {
        let out = out.clone();
        move |text: String| {
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "{} {text}", now_us());
        }
    };
    let breaker = member_breaker(&scenario, &url);
    let mut events = breaker.subscribe_fleet();
    let log_event = line.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            log_event(format!("event {e:?}"));
        }
    });
    let parent = std::os::unix::process::parent_id();
    while let Some((ok, latency)) = upstream(&dir) {
        if std::os::unix::process::parent_id() != parent {
            break;
        }
        match breaker.try_acquire() {
            Ok(permit) => {
                let probe = permit.is_probe();
                if probe {
                    line("probe_start".into());
                }
                let start = Instant::now();
                if latency > 0 {
                    tokio::time::sleep(Duration::from_millis(latency)).await;
                }
                if probe {
                    line("probe_end".into());
                }
                line(format!("call {}", if ok { "ok" } else { "fail" }));
                if ok {
                    permit.success(start.elapsed());
                } else {
                    permit.failure(start.elapsed());
                }
            }
            Err(r) => line(format!(
                "reject {} fleet={:?}",
                r.state(),
                breaker.fleet_state()
            )),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The entry point of a member process; a no-op in the ordinary test run.
#[test]
fn fleet_member() {
    let Ok(scenario) = std::env::var("FLEET_MEMBER_SCENARIO") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let (url, dir, log) = (
        var("FLEET_MEMBER_URL"),
        var("FLEET_MEMBER_DIR"),
        var("FLEET_MEMBER_LOG"),
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("member runtime")
        .block_on(member_main(scenario, url, dir.into(), log.into()));
}

// ---------------------------------------------------------------------------------------------
// The test side.

struct Member {
    child: Child,
    log: PathBuf,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
struct Line {
    us: u64,
    text: String,
}

impl Member {
    fn lines(&self) -> Vec<Line> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            // A line being written may be incomplete: every complete line has a timestamp and
            // a kind.
            .filter_map(|l| {
                let (us, text) = l.split_once(' ')?;
                Some(Line {
                    us: us.parse().ok()?,
                    text: text.to_string(),
                })
            })
            .collect()
    }
}

struct Fleet {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl Fleet {
    fn start(n: usize, scenario: &str, url: &str) -> Fleet {
        let dir = tempfile::tempdir().expect("temp dir");
        let fleet = Fleet {
            members: Vec::new(),
            dir,
        };
        fleet.set_upstream("ok 0");
        let exe = std::env::current_exe().expect("test binary");
        let members = (0..n)
            .map(|i| {
                let log = fleet.dir.path().join(format!("member-{i}.log"));
                let child = Command::new(&exe)
                    .args(["--exact", "fleet_member", "--nocapture", "--test-threads=1"])
                    .env("FLEET_MEMBER_SCENARIO", scenario)
                    .env("FLEET_MEMBER_URL", url)
                    .env("FLEET_MEMBER_DIR", fleet.dir.path())
                    .env("FLEET_MEMBER_LOG", &log)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start a member process");
                Member { child, log }
            })
            .collect();
        let mut fleet = fleet;
        fleet.members = members;
        fleet
    }

    fn set_upstream(&self, behaviour: &str) {
        // Written whole and renamed, so a member never reads half a file.
        let tmp = self.dir.path().join("upstream.tmp");
        std::fs::write(&tmp, behaviour).expect("write upstream control");
        std::fs::rename(&tmp, self.dir.path().join("upstream")).expect("rename upstream control");
    }

    /// Waits until every member has a line after `after_us` that satisfies `pred`, and returns
    /// the first such line of each.
    fn wait_each(&self, what: &str, after_us: u64, pred: impl Fn(&str) -> bool) -> Vec<Line> {
        wait_for(what, || {
            self.members
                .iter()
                .map(|m| {
                    m.lines()
                        .into_iter()
                        .find(|l| l.us >= after_us && pred(&l.text))
                })
                .collect()
        })
    }

    fn all_lines(&self) -> Vec<Vec<Line>> {
        self.members.iter().map(Member::lines).collect()
    }
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most [`WAIT`].
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} in vain for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn state_hash(url: &str, key: &str) -> HashMap<String, String> {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client.get_connection().expect("connect to redis");
    redis::cmd("HGETALL")
        .arg(key)
        .query(&mut conn)
        .expect("HGETALL the fleet state")
}

const STATE_KEY: &str = "palisade:breaker:{upstream}:state";

#[test]
fn all_members_reject_within_the_bound_once_the_fleet_opens() {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let url = redis.url();
    let fleet = Fleet::start(4, "open", &url);
    fleet.wait_each("every member joined the fleet", 0, |t| {
        t.starts_with("event Joined")
    });
    let failing_since = now_us();
    fleet.set_upstream("fail 0");
    let opened_ms: u64 = wait_for("the fleet state to open in Redis", || {
        let h = state_hash(&url, STATE_KEY);
        (h.get("state").map(String::as_str) == Some("open"))
            .then(|| h["opened"].parse().expect("opened is a number"))
    });
    let opened_us = opened_ms * 1000;
    assert!(
        opened_us >= failing_since / 1000 * 1000,
        "opened before the upstream failed"
    );
    let first_rejections = fleet.wait_each("every member rejects", 0, |t| t.starts_with("reject"));
    for (i, r) in first_rejections.iter().enumerate() {
        // No member rejected before the fleet opened (their local breakers cannot open), and
        // every one rejected because of the fleet.
        assert!(
            r.us + 1000 >= opened_us,
            "member {i} rejected at {} us, before the fleet opened at {opened_us} us",
            r.us
        );
        assert!(
            r.text.contains("reject open") && r.text.contains("fleet=Some(Open)"),
            "member {i}: {}",
            r.text
        );
        let delay = Duration::from_micros(r.us.saturating_sub(opened_us));
        eprintln!("member {i} first rejected {delay:?} after the fleet opened");
        assert!(
            delay <= PROPAGATION_BOUND,
            "member {i} first rejected {delay:?} after the fleet opened (bound {PROPAGATION_BOUND:?})"
        );
    }
    // And from then on every member rejects every call: no call after its first rejection.
    for (i, (lines, first)) in fleet.all_lines().iter().zip(&first_rejections).enumerate() {
        let late_calls = lines
            .iter()
            .filter(|l| l.us > first.us && l.text.starts_with("call"))
            .count();
        assert_eq!(
            late_calls, 0,
            "member {i} made calls while the fleet was open"
        );
    }
}

#[test]
fn fleet_wide_probes_never_exceed_the_permits() {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let url = redis.url();
    let fleet = Fleet::start(4, "probes", &url);
    fleet.wait_each("every member joined the fleet", 0, |t| {
        t.starts_with("event Joined")
    });
    // Slow calls, so that probes of different members would overlap if more were permitted.
    fleet.set_upstream("fail 60");
    // Failed probes reopen the fleet: let it go round a few half-open periods.
    let mut periods = 0;
    let mut last_gen = 0;
    wait_for("three half-open periods with failing probes", || {
        let h = state_hash(&url, STATE_KEY);
        let g: u64 = h.get("gen").and_then(|g| g.parse().ok()).unwrap_or(0);
        if h.get("state").map(String::as_str) == Some("half_open") && g != last_gen {
            periods += 1;
            last_gen = g;
        }
        (periods >= 3).then_some(())
    });
    let healthy_since = now_us();
    fleet.set_upstream("ok 60");
    wait_for("the fleet to close after successful probes", || {
        let h = state_hash(&url, STATE_KEY);
        let g: u64 = h.get("gen").and_then(|g| g.parse().ok()).unwrap_or(0);
        (h.get("state").map(String::as_str) == Some("closed") && g > last_gen).then_some(())
    });
    fleet.wait_each("every member saw the fleet close", healthy_since, |t| {
        t.contains("StateChanged") && t.contains("to: Closed")
    });
    let closed_at = now_us();
    fleet.wait_each("every member calls again", closed_at, |t| t == "call ok");

    // Every probe interval, from every member; the most that ran at once.
    let mut edges = Vec::new();
    let mut probes = 0;
    for (i, lines) in fleet.all_lines().iter().enumerate() {
        let mut open: Option<u64> = None;
        for l in lines {
            match l.text.as_str() {
                "probe_start" => {
                    assert!(open.is_none(), "member {i}: two probes at once");
                    open = Some(l.us);
                }
                "probe_end" => {
                    let start = open.take().expect("probe_end without probe_start");
                    edges.push((start, 1i32));
                    edges.push((l.us, -1));
                    probes += 1;
                }
                _ => {}
            }
        }
    }
    // At equal times, count the end first: the intervals are closed-open.
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut running, mut most) = (0, 0);
    for (_, d) in edges {
        running += d;
        most = most.max(running);
    }
    eprintln!("{probes} probes, at most {most} at once");
    assert!(probes >= 4, "only {probes} probes ran");
    assert!(
        most <= 2,
        "{most} probes ran at once across the fleet; half_open_permits is 2"
    );
}

#[test]
fn members_fall_back_to_local_breakers_while_redis_is_down_and_rejoin() {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let url = redis.url();
    let fleet = Fleet::start(4, "outage", &url);
    fleet.wait_each("every member joined the fleet", 0, |t| {
        t.starts_with("event Joined")
    });
    let killed = now_us();
    redis.kill().expect("kill redis-server");
    let unavailable = fleet.wait_each("every member reports Redis unavailable", killed, |t| {
        t.starts_with("event Unavailable")
    });
    // They keep working: each makes successful calls after it lost Redis.
    let after = unavailable.iter().map(|l| l.us).max().unwrap_or(killed);
    fleet.wait_each("every member calls without Redis", after, |t| {
        t == "call ok"
    });
    // Their local breakers still protect the upstream.
    let failing = now_us();
    fleet.set_upstream("fail 0");
    let rejections = fleet.wait_each("every local breaker opens", failing, |t| {
        t.starts_with("reject")
    });
    for (i, r) in rejections.iter().enumerate() {
        assert!(
            r.text.contains("reject open") && r.text.contains("fleet=None"),
            "member {i}: {}",
            r.text
        );
    }
    fleet.set_upstream("ok 0");
    let restarted = now_us();
    redis.restart().expect("restart redis-server");
    let rejoined = fleet.wait_each("every member rejoins the fleet", restarted, |t| {
        t.starts_with("event Rejoined")
    });
    for (i, r) in rejoined.iter().enumerate() {
        assert!(r.text.contains("state: Closed"), "member {i}: {}", r.text);
    }
    // And, the upstream healthy again, every member closes its local breaker and calls.
    let back = rejoined.iter().map(|l| l.us).max().unwrap_or(restarted);
    fleet.wait_each("every member calls after rejoining", back, |t| {
        t == "call ok"
    });
}

// ---------------------------------------------------------------------------------------------
// In one process: commands, events, configuration.

async fn wait_async<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} in vain for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn two_members(url: &str) -> (FleetBreaker, FleetBreaker) {
    let make = || {
        CircuitBreaker::builder("shared")
            .fleet(url)
            .build()
            .expect("valid fleet breaker")
    };
    (make(), make())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_open_disable_and_reset_apply_fleet_wide() {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let (a, b) = two_members(&redis.url());
    for m in [&a, &b] {
        wait_async("both joined", || {
            (m.fleet_state() == Some(FleetState::Closed)).then_some(())
        })
        .await;
    }
    a.force_open().await.expect("force_open");
    wait_async("b rejects after a forced the fleet open", || {
        b.call_blocking(|| Ok::<_, ()>(())).is_err().then_some(())
    })
    .await;
    let rejected = b.try_acquire().expect_err("forced open");
    assert_eq!(rejected.state(), State::ForcedOpen);
    assert_eq!(rejected.retry_after(), None);
    assert_eq!(b.state(), State::ForcedOpen);

    b.disable().await.expect("disable");
    wait_async("a is disabled", || {
        (a.state() == State::Disabled).then_some(())
    })
    .await;
    assert!(
        a.call_blocking(|| Err::<(), _>("boom"))
            .is_err_and(|e| !e.is_rejected())
    );
    assert_eq!(
        a.local().metrics().failed_calls,
        0,
        "disabled records nothing"
    );

    a.reset().await.expect("reset");
    for m in [&a, &b] {
        wait_async("closed again", || {
            (m.state() == State::Closed).then_some(())
        })
        .await;
        assert_eq!(m.fleet_state(), Some(FleetState::Closed));
        assert!(m.call_blocking(|| Ok::<_, ()>(())).is_ok());
    }
}

/// Waits (at most [`WAIT`]) for the first event that `pred` accepts, skipping the others.
async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<FleetEvent>,
    what: &str,
    pred: impl Fn(&FleetEvent) -> bool,
) -> FleetEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("fleet events closed while waiting for {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("waited {WAIT:?} in vain for the event: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_times_out_into_local_mode_and_commands_say_so() {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let breaker = CircuitBreaker::builder("paused")
        .fleet(redis.url())
        .redis_timeout(Duration::from_millis(300))
        .build()
        .expect("valid fleet breaker");
    let mut events = breaker.subscribe_fleet();
    wait_async("the breaker joined", || {
        (breaker.fleet_state() == Some(FleetState::Closed)).then_some(())
    })
    .await;
    redis.pause().expect("SIGSTOP redis-server");
    let event = next_event(&mut events, "Unavailable", |e| {
        matches!(e, FleetEvent::Unavailable { .. })
    })
    .await;
    assert!(
        matches!(&event, FleetEvent::Unavailable { error } if error.contains("did not answer")),
        "{event:?}"
    );
    assert_eq!(breaker.fleet_state(), None);
    // Calls go on, decided locally, without waiting for Redis.
    let started = Instant::now();
    for _ in 0..1000 {
        assert!(breaker.call_blocking(|| Ok::<_, ()>(())).is_ok());
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    let forced = breaker.force_open().await;
    assert!(
        matches!(forced, Err(FleetError::Timeout(_))),
        "force_open must time out while Redis is paused: {forced:?}"
    );
    redis.resume().expect("SIGCONT redis-server");
    let event = next_event(&mut events, "Rejoined", |e| {
        matches!(e, FleetEvent::Rejoined { .. })
    })
    .await;
    assert_eq!(
        event,
        FleetEvent::Rejoined {
            state: FleetState::Closed
        }
    );
    assert_eq!(breaker.fleet_state(), Some(FleetState::Closed));
}

#[tokio::test]
async fn build_rejects_bad_fleet_options_naming_them() {
    let url = "redis://127.0.0.1:1/";
    let option = |r: Result<FleetBreaker, ConfigError>| r.expect_err("must be rejected").option();
    let b = || CircuitBreaker::builder("api").fleet(url);
    assert_eq!(
        option(b().sync_interval(Duration::ZERO).build()),
        "sync_interval"
    );
    assert_eq!(
        option(b().report_interval(Duration::from_millis(10)).build()),
        "report_interval"
    );
    assert_eq!(
        option(b().window(Duration::from_millis(500)).build()),
        "window"
    );
    assert_eq!(
        option(b().window(Duration::from_secs(601)).build()),
        "window"
    );
    assert_eq!(option(b().minimum_calls(0).build()), "minimum_calls");
    assert_eq!(
        option(b().redis_timeout(Duration::ZERO).build()),
        "redis_timeout"
    );
    assert_eq!(
        option(b().half_open_timeout(Duration::ZERO).build()),
        "half_open_timeout"
    );
    assert_eq!(option(b().prefix("a{b}:").build()), "prefix");
    assert_eq!(
        option(CircuitBreaker::builder("a{b}").fleet(url).build()),
        "name"
    );
    assert_eq!(
        option(CircuitBreaker::builder("api").fleet("http://nope").build()),
        "redis_url"
    );
    // The local breaker's options are validated as ever.
    assert_eq!(
        option(
            CircuitBreaker::builder("api")
                .minimum_calls(0)
                .fleet(url)
                .build()
        ),
        "minimum_calls"
    );
    // An unreachable Redis is no build error: the breaker starts alone and says so.
    let alone = b().build().expect("builds without Redis");
    let mut events = alone.subscribe_fleet();
    next_event(&mut events, "Unavailable", |e| {
        matches!(e, FleetEvent::Unavailable { .. })
    })
    .await;
    assert_eq!(alone.fleet_state(), None);
    assert!(alone.call_blocking(|| Ok::<_, ()>(())).is_ok());
}

#[test]
fn build_outside_a_runtime_names_the_runtime() {
    let err = CircuitBreaker::builder("api")
        .fleet("redis://127.0.0.1:1/")
        .build()
        .expect_err("no runtime");
    assert_eq!(err.option(), "runtime");
}
