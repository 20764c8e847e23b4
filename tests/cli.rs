//! End-to-end tests of the `palisade` command, with real etcd from the testkit.
//!
//! They run the `palisade` binary that `cargo test --workspace` / `cargo nextest run
//! --workspace` build next to this test (scripts/test does both).

mod common;

use common::{Palisade, wait_for_file};
use palisade_testkit::Etcd;
use std::time::Duration;

/// A command that says it started, then runs until `release` appears in the working directory.
const HOLD: &str = "echo $PALISADE_FENCING_TOKEN > started.$$; touch started; \
                    while [ ! -e release ]; do sleep 0.05; done";

fn backends() -> Vec<(&'static str, Option<Etcd>)> {
    vec![
        ("file", None),
        ("etcd", Some(Etcd::start().expect("etcd starts"))),
    ]
}

#[test]
fn a_second_run_of_a_held_lock_exits_75_and_names_the_holder() {
    for (label, etcd) in backends() {
        let p = Palisade::new(etcd.as_ref());
        let holder = p.spawn(&[
            "run",
            "--lock",
            "x",
            "--meta",
            "owner=tests",
            "--",
            "sh",
            "-c",
            HOLD,
        ]);
        wait_for_file(
            &p.dir.path().join("started"),
            "the holder's command to start",
        );

        let second = p.output(&["run", "--lock", "x", "--", "sh", "-c", "touch second-ran"]);
        assert_eq!(second.status.code(), Some(75), "[{label}] {second:?}");
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(
            stderr.contains(&format!("pid {}", holder.id())) || stderr.contains("held by job `x`"),
            "[{label}] the refusal names the holder: {stderr}"
        );
        assert!(
            !p.dir.path().join("second-ran").exists(),
            "[{label}] the second command never ran"
        );

        std::fs::write(p.dir.path().join("release"), "").unwrap();
        let status = p.finish(holder);
        assert_eq!(
            status.code(),
            Some(0),
            "[{label}] the holder's command exit code is passed on"
        );
    }
}

#[test]
fn waiting_runs_one_after_the_other_with_increasing_fencing_tokens() {
    for (label, etcd) in backends() {
        let p = Palisade::new(etcd.as_ref());
        let first = p.spawn(&["run", "--lock", "x", "--", "sh", "-c", HOLD]);
        wait_for_file(&p.dir.path().join("started"), "the first command to start");
        let token_first: u64 = read_token(&p, first.id());

        let script = "echo $PALISADE_FENCING_TOKEN > second-token; \
                      if [ -e release ]; then echo after > order; else echo overlap > order; fi";
        let second = p.spawn(&["run", "--lock", "x", "--wait", "--", "sh", "-c", script]);
        std::fs::write(p.dir.path().join("release"), "").unwrap();
        assert_eq!(p.finish(first).code(), Some(0));
        assert_eq!(p.finish(second).code(), Some(0));
        let order = std::fs::read_to_string(p.dir.path().join("order")).unwrap();
        assert_eq!(order.trim(), "after", "[{label}] the runs did not overlap");
        let token_second: u64 = std::fs::read_to_string(p.dir.path().join("second-token"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            token_second > token_first,
            "[{label}] tokens increase: {token_first} then {token_second}"
        );
    }
}

fn read_token(p: &Palisade, _palisade_pid: u32) -> u64 {
    // `HOLD` writes its token into started.<shell pid>; there is one such file per holder.
    let entry = std::fs::read_dir(p.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("started."))
        .expect("the holder wrote its token");
    std::fs::read_to_string(entry.path())
        .unwrap()
        .trim()
        .parse()
        .expect("a numeric token")
}

#[test]
fn jobs_lists_a_running_job_and_not_a_finished_one() {
    for (label, etcd) in backends() {
        let p = Palisade::new(etcd.as_ref());
        let holder = p.spawn(&[
            "run",
            "--lock",
            "nightly",
            "--meta",
            "team=data",
            "--",
            "sh",
            "-c",
            HOLD,
        ]);
        wait_for_file(&p.dir.path().join("started"), "the job to start");

        let listed = p.output(&["jobs", "--json"]);
        assert_eq!(listed.status.code(), Some(0), "[{label}] {listed:?}");
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON lines"))
            .collect();
        assert_eq!(lines.len(), 1, "[{label}] one running job: {lines:?}");
        assert_eq!(lines[0]["lock"], "nightly");
        assert_eq!(lines[0]["metadata"]["team"], "data");
        assert_eq!(lines[0]["pid"], holder.id());

        let table = p.output(&["jobs"]);
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table.starts_with("NAME"),
            "[{label}] a table with a header: {table}"
        );
        assert!(table.contains("nightly"), "[{label}] {table}");

        std::fs::write(p.dir.path().join("release"), "").unwrap();
        assert_eq!(p.finish(holder).code(), Some(0));
        let after = p.output(&["jobs", "--json"]);
        assert!(
            String::from_utf8_lossy(&after.stdout).trim().is_empty(),
            "[{label}] a finished job is not listed: {after:?}"
        );
    }
}

#[test]
fn a_paused_holder_loses_its_lease_and_its_command_is_terminated() {
    paused_holder(&["--lock", "x"]);
}

/// The same for a semaphore's holder (`--slots`): one slot, so that B needs A's.
#[test]
fn a_paused_slot_holder_loses_its_slot_and_its_command_is_terminated() {
    paused_holder(&["--lock", "pool", "--slots", "1"]);
}

fn paused_holder(lock: &[&str]) {
    let etcd = Etcd::start().expect("etcd starts");
    let p = Palisade::new(Some(&etcd));
    let script = "echo $$ > command; touch started; while true; do sleep 0.05; done";
    let a = p.spawn(
        &[
            &["run"][..],
            lock,
            &["--ttl", "2s", "--grace", "1s", "--", "sh", "-c", script],
        ]
        .concat(),
    );
    wait_for_file(&p.dir.path().join("started"), "A's command to start");

    // A stops answering (as a process stuck in swap or on a frozen VM would) past its TTL.
    palisade_testkit::pause_process(a.id()).expect("pause A");
    let b = p.output(
        &[
            &["run"][..],
            lock,
            &["--wait-for", "20s", "--", "sh", "-c", "touch b-ran"],
        ]
        .concat(),
    );
    assert_eq!(
        b.status.code(),
        Some(0),
        "B takes the lock once A's lease expired: {b:?}"
    );
    assert!(p.dir.path().join("b-ran").exists());

    palisade_testkit::resume_process(a.id()).expect("resume A");
    let output = a.wait_with_output().expect("A exits");
    assert_eq!(
        output.status.code(),
        Some(76),
        "A exits with the lease-lost code: {output:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lease"), "A says why: {stderr}");
    // A resumed past its lease deadline: the command is killed at once (B may be running).
    let pid = std::fs::read_to_string(p.dir.path().join("command")).expect("pid");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
    assert!(
        stat.is_err() || stat.is_ok_and(|s| s.contains(") Z")),
        "A's command still runs after A exited"
    );
}

#[test]
fn errors_are_one_line_with_distinct_codes() {
    let p = Palisade::new(None);
    // etcd that nobody listens on: a connection error, not a hang or a panic.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = p.output(&[
        "run",
        "--lock",
        "x",
        "--etcd",
        &format!("http://127.0.0.1:{port}"),
        "--connect-timeout",
        "1s",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("within 1s"),
        "--connect-timeout bounds the start: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("palisade: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = p.output(&["run", "--lock", "x", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");

    let out = p.output(&["run", "--lock", "x", "--ttl", "soon", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad flag value is a usage error: {out:?}"
    );

    let out = p.output(&["run", "--lock", "x", "--", "sh", "-c", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's own exit code: {out:?}"
    );
}

fn once_stores() -> Vec<(&'static str, Option<palisade_testkit::Redis>)> {
    vec![
        ("file", None),
        (
            "redis",
            Some(palisade_testkit::Redis::start().expect("redis starts")),
        ),
    ]
}

#[test]
fn once_runs_a_command_once_across_eight_concurrent_invocations() {
    for (label, redis) in once_stores() {
        let p = Palisade::new(None);
        let mut args = vec!["once", "--key", "load-2024-01-31"];
        let url = redis.as_ref().map(|r| r.url());
        if let Some(url) = &url {
            args.extend(["--store", url]);
        }
        // The run takes a while, so the other invocations find it in progress and wait.
        args.extend([
            "--",
            "sh",
            "-c",
            "echo \"$PALISADE_ONCE_KEY $PALISADE_ONCE_TOKEN\" >> runs; sleep 0.5",
        ]);
        let children: Vec<_> = (0..8).map(|_| p.spawn(&args)).collect();
        let outputs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("palisade once exits"))
            .collect();
        for output in &outputs {
            assert_eq!(output.status.code(), Some(0), "[{label}] {output:?}");
        }
        let runs = std::fs::read_to_string(p.dir.path().join("runs")).unwrap();
        assert_eq!(
            runs.lines().count(),
            1,
            "[{label}] exactly one run: {runs:?}"
        );
        let (key, token) = runs.trim().split_once(' ').expect("key and token");
        assert_eq!(key, "load-2024-01-31", "[{label}] PALISADE_ONCE_KEY");
        assert!(
            token.len() == 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
            "[{label}] PALISADE_ONCE_TOKEN is the claim's token: {token:?}"
        );
        let replayed = outputs
            .iter()
            .filter(|o| String::from_utf8_lossy(&o.stderr).contains("already ran"))
            .count();
        assert_eq!(replayed, 7, "[{label}] seven invocations say they replayed");

        // Another command under the same key is refused rather than silently replayed.
        let mut other = args[..args.len() - 4].to_vec();
        other.extend(["--", "true"]);
        let mismatch = p.output(&other);
        assert_eq!(mismatch.status.code(), Some(65), "[{label}] {mismatch:?}");
    }
}

#[test]
fn once_replays_a_recorded_exit_code_and_retries_an_unrecorded_failure() {
    let p = Palisade::new(None);
    let fail = [
        "once",
        "--key",
        "k1",
        "--",
        "sh",
        "-c",
        "echo ran >> runs-1; exit 3",
    ];
    assert_eq!(p.output(&fail).status.code(), Some(3));
    assert_eq!(p.output(&fail).status.code(), Some(3));
    let runs = std::fs::read_to_string(p.dir.path().join("runs-1")).unwrap();
    assert_eq!(
        runs.lines().count(),
        2,
        "a failure records nothing: it runs again"
    );

    let recorded = [
        "once",
        "--key",
        "k2",
        "--record-failures",
        "--",
        "sh",
        "-c",
        "echo ran >> runs-2; exit 4",
    ];
    assert_eq!(p.output(&recorded).status.code(), Some(4));
    let replay = p.output(&recorded);
    assert_eq!(
        replay.status.code(),
        Some(4),
        "the recorded exit code is replayed"
    );
    assert!(String::from_utf8_lossy(&replay.stderr).contains("exit code 4"));
    let runs = std::fs::read_to_string(p.dir.path().join("runs-2")).unwrap();
    assert_eq!(runs.lines().count(), 1);
}

#[test]
fn once_without_waiting_exits_75_while_the_key_runs_elsewhere() {
    let p = Palisade::new(None);
    let holder = p.spawn(&["once", "--key", "k", "--", "sh", "-c", HOLD]);
    wait_for_file(&p.dir.path().join("started"), "the first run to start");
    let busy = p.output(&["once", "--key", "k", "--no-wait", "--", "sh", "-c", HOLD]);
    assert_eq!(busy.status.code(), Some(75), "{busy:?}");
    std::fs::write(p.dir.path().join("release"), "").unwrap();
    assert_eq!(p.finish(holder).code(), Some(0));
}

#[test]
fn limit_admits_no_more_than_n_per_period_across_eight_concurrent_loops() {
    for (label, redis) in once_stores() {
        let p = Palisade::new(None);
        let redis_flag = redis
            .as_ref()
            .map(|r| format!("--redis {}", r.url()))
            .unwrap_or_default();
        let binary = common::binary();
        // Each loop runs the command twice through the limit; the command records when it was
        // admitted, on the limit's own clock (PALISADE_LIMIT_ADMITTED_AT_US): a start time
        // would add process start-up, which on a busy machine can bunch admissions that were
        // spaced, or spread ones that were not.
        let script = format!(
            "for i in 1 2; do {} limit --key api --rate 4/1s {redis_flag} -- \
             sh -c 'echo $PALISADE_LIMIT_ADMITTED_AT_US >> starts' || exit 1; done",
            binary.display()
        );
        let loops: Vec<_> = (0..8)
            .map(|_| {
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&script)
                    .current_dir(p.dir.path())
                    .env("PALISADE_DIR", p.dir.path().join(".palisade"))
                    .spawn()
                    .expect("a shell loop starts")
            })
            .collect();
        for mut shell in loops {
            assert!(
                shell.wait().expect("the loop ends").success(),
                "[{label}] every run was admitted"
            );
        }
        let mut starts: Vec<u64> = std::fs::read_to_string(p.dir.path().join("starts"))
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().expect("microseconds"))
            .collect();
        starts.sort_unstable();
        assert_eq!(starts.len(), 16, "[{label}] all 16 runs happened");
        // Exactly, on the limit's clock: no window of 1 s, (t - 1 s, t], holds more than 4.
        for (i, &t) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .take_while(|&&u| u < t + 1_000_000)
                .count();
            assert!(
                in_window <= 4,
                "[{label}] {in_window} admissions within 1 s of {t} us: {starts:?}"
            );
        }
        let span = Duration::from_micros(starts[15] - starts[0]);
        assert!(
            span >= Duration::from_millis(2900),
            "[{label}] 16 runs at 4/s need 3 s, took {span:?}"
        );
    }
}

#[test]
fn jobs_watch_reports_a_job_starting_and_finishing() {
    use std::io::BufRead;
    for (label, etcd) in backends() {
        let p = Palisade::new(etcd.as_ref());
        let mut watcher = p.spawn(&["jobs", "--watch", "--json"]);
        let stdout = watcher.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Run jobs until the watcher reports the start and the finish of one of them. It may
        // subscribe a moment after it was spawned, so it can miss a job's start (or all of it):
        // only a job seen both starting and finishing counts.
        let mut events: Vec<serde_json::Value> = Vec::new();
        let both = |events: &[serde_json::Value]| {
            events.iter().find_map(|s| {
                let finished = events.iter().find(|f| {
                    s["event"] == "started" && f["event"] == "finished" && f["lock"] == s["lock"]
                })?;
                Some((s.clone(), finished.clone()))
            })
        };
        for attempt in 0..20 {
            let run = p.output(&[
                "run",
                "--lock",
                &format!("job-{attempt}"),
                "--",
                "sh",
                "-c",
                "sleep 0.3",
            ]);
            assert_eq!(run.status.code(), Some(0), "[{label}] {run:?}");
            while both(&events).is_none() {
                let Ok(line) = rx.recv_timeout(Duration::from_millis(1500)) else {
                    break;
                };
                events.push(serde_json::from_str(&line).expect("JSON lines"));
            }
            if both(&events).is_some() {
                break;
            }
        }
        let _ = watcher.kill();
        let _ = watcher.wait();
        let (started, finished) = both(&events)
            .unwrap_or_else(|| panic!("[{label}] no job seen starting and finishing: {events:?}"));
        assert_eq!(started["lock"], finished["lock"], "[{label}] {events:?}");
        assert_eq!(started["command"][0], "sh", "[{label}] {events:?}");
    }
}

#[test]
fn once_keeps_the_key_of_a_run_that_outlasts_its_claim_ttl() {
    let p = Palisade::new(None);
    let holder = p.spawn(&[
        "once",
        "--key",
        "k",
        "--claim-ttl",
        "3s",
        "--",
        "sh",
        "-c",
        HOLD,
    ]);
    wait_for_file(&p.dir.path().join("started"), "the first run to start");
    // Well past --claim-ttl: the claim would have lapsed twice over if palisade did not renew it.
    // (A TTL of 3 s: renewals every second, each an fsynced write, survive a busy machine's
    // stalls.)
    std::thread::sleep(Duration::from_millis(7000));
    let busy = p.output(&["once", "--key", "k", "--no-wait", "--", "sh", "-c", HOLD]);
    assert_eq!(
        busy.status.code(),
        Some(75),
        "the live run keeps its key: {busy:?}"
    );
    std::fs::write(p.dir.path().join("release"), "").unwrap();
    assert_eq!(p.finish(holder).code(), Some(0));
}

#[test]
fn limit_gives_up_at_once_when_wait_for_cannot_be_met_and_refuses_bad_rates() {
    let p = Palisade::new(None);
    let ran = |name: &str| p.dir.path().join(name).exists();
    let first = p.output(&[
        "limit", "--key", "k", "--rate", "1/h", "--", "touch", "first",
    ]);
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    assert!(ran("first"));
    let started = std::time::Instant::now();
    let second = p.output(&[
        "limit",
        "--key",
        "k",
        "--rate",
        "1/h",
        "--wait-for",
        "30s",
        "--",
        "touch",
        "second",
    ]);
    assert_eq!(second.status.code(), Some(75), "{second:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the next admission is an hour away: no waiting in vain"
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("would not admit"));
    assert!(!ran("second"));
    let bad = p.output(&["limit", "--key", "k", "--rate", "5/fortnight", "--", "true"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("100/min"),
        "the error shows the form: {stderr}"
    );
}

#[test]
fn once_kills_the_command_when_its_claim_is_taken_over() {
    let p = Palisade::new(None);
    let store = p.dir.path().join("store");
    let store_url = format!("file://{}", store.display());
    let holder = p.spawn(&[
        "once",
        "--key",
        "k",
        "--claim-ttl",
        "1s",
        "--store",
        &store_url,
        "--",
        "sh",
        "-c",
        "echo $$ > pid; touch started; while true; do sleep 0.05; done",
    ]);
    wait_for_file(&p.dir.path().join("started"), "the command to start");
    // An operator resets the key while the command runs: the next renewal (within a third of
    // --claim-ttl) finds the claim gone, and the command must not run on beside a new run.
    for entry in std::fs::read_dir(&store).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let out = common::wait_bounded(holder, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(76), "{out:?}");
    assert!(
        stderr.contains("claim") && stderr.contains("was stopped"),
        "{stderr}"
    );
    let pid: i32 = std::fs::read_to_string(p.dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command (pid {pid}) still runs after palisade lost its claim"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_with_slots_admits_n_commands_at_once_and_refuses_the_next() {
    for (label, etcd) in backends() {
        let p = Palisade::new(etcd.as_ref());
        let slots = ["run", "--lock", "pool", "--slots", "2", "--"];
        let hold = |name: &str| {
            let script = format!(
                "echo $PALISADE_FENCING_TOKEN > token.{name}; touch started.{name}; \
                 while [ ! -e release ]; do sleep 0.05; done"
            );
            p.spawn(&[&slots[..], &["sh", "-c", &script]].concat())
        };
        let (a, b) = (hold("a"), hold("b"));
        for name in ["a", "b"] {
            wait_for_file(
                &p.dir.path().join(format!("started.{name}")),
                "both holders' commands to start",
            );
        }
        // Both slots are held: a third run without --wait exits 75 and does not run.
        let third = p.output(&[&slots[..], &["touch", "third-ran"]].concat());
        assert_eq!(third.status.code(), Some(75), "[{label}] {third:?}");
        let stderr = String::from_utf8_lossy(&third.stderr);
        assert!(
            stderr.contains("all 2 slots of `pool` are held"),
            "[{label}] {stderr}"
        );
        assert!(!p.dir.path().join("third-ran").exists());
        // With a bounded wait that runs out: 75 too, after the wait, and the command never ran.
        let started = std::time::Instant::now();
        let bounded = p.output(&[
            "run",
            "--lock",
            "pool",
            "--slots",
            "2",
            "--wait-for",
            "1s",
            "--",
            "touch",
            "late-ran",
        ]);
        assert_eq!(bounded.status.code(), Some(75), "[{label}] {bounded:?}");
        assert!(
            started.elapsed() >= std::time::Duration::from_secs(1),
            "[{label}] gave up after {:?}, before its --wait-for",
            started.elapsed()
        );
        assert!(!p.dir.path().join("late-ran").exists());
        // A run that asks for another number of slots is refused as a configuration error.
        let other = p.output(&["run", "--lock", "pool", "--slots", "3", "--", "true"]);
        assert_eq!(other.status.code(), Some(78), "[{label}] {other:?}");
        // `palisade jobs` shows each holder.
        let jobs = p.output(&["jobs", "--json"]);
        let holders = String::from_utf8_lossy(&jobs.stdout)
            .lines()
            .filter(|l| l.contains("\"permits\":2"))
            .count();
        assert_eq!(holders, 2, "[{label}] {jobs:?}");
        // A waiting run gets a slot once one is freed, with a larger token.
        let waiting = p.spawn(
            &[
                &["run", "--lock", "pool", "--slots", "2", "--wait", "--"][..],
                &["sh", "-c", "echo $PALISADE_FENCING_TOKEN > token.c"],
            ]
            .concat(),
        );
        std::fs::write(p.dir.path().join("release"), "").unwrap();
        for child in [a, b, waiting] {
            assert_eq!(p.finish(child).code(), Some(0), "[{label}]");
        }
        let token = |name: &str| -> u64 {
            std::fs::read_to_string(p.dir.path().join(format!("token.{name}")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert!(
            token("c") > token("a").max(token("b")),
            "[{label}] tokens grow"
        );
    }
}
