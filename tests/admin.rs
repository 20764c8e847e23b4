//! Lock administration: `palisade unlock` breaks a stuck holder's lock (etcd) or refuses while
//! the holder lives (file), and `palisade jobs --waiters` shows who waits.

mod common;

use common::{Palisade, wait_bounded, wait_for_file};
use palisade_testkit::Etcd;
use std::time::{Duration, Instant};

/// Exit codes (cli/src/exit.rs).
const HELD: i32 = 75;
const LEASE_LOST: i32 = 76;
const CONFIG: i32 = 78;

/// `palisade jobs --waiters --json` until `lock`'s job lists `n` waiters.
fn wait_for_waiters(p: &Palisade, lock: &str, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = p.output(&["jobs", "--waiters", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let job: serde_json::Value = serde_json::from_str(line).expect("one JSON per line");
            if job["lock"] == lock && job["waiters"].as_array().map(Vec::len) == Some(n) {
                return job;
            }
        }
        assert!(
            Instant::now() < deadline,
            "lock {lock} never had {n} waiters: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The state letter and start time (clock ticks since boot) of process `pid`, if it exists.
fn stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm)": state is the first field, starttime the twentieth.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Whether the process `pid` that started at `started` is gone (or a zombie: dead, not yet
/// reaped by whoever inherited it); a new process that reuses the pid does not count.
fn gone(pid: u32, started: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match stat(pid) {
            None | Some(('Z', _)) => return true,
            Some((_, other)) if other != started => return true,
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unlock_on_etcd_revokes_the_holder_its_command_stops_and_the_waiter_runs() {
    let etcd = Etcd::start().expect("etcd starts");
    let p = Palisade::new(Some(&etcd));
    let holder = p.spawn(&[
        "run",
        "--lock",
        "stuck",
        "--ttl",
        "30s",
        "--",
        "sh",
        "-c",
        "echo $$ > command; touch holding; exec sleep 600",
    ]);
    wait_for_file(
        &p.dir.path().join("holding"),
        "the holder's command to start",
    );
    let command = std::fs::read_to_string(p.dir.path().join("command")).expect("command's pid");
    let command: u32 = command.trim().parse().expect("a pid");
    let (_, command_started) = stat(command).expect("the holder's command runs");
    let waiter = p.spawn(&[
        "run",
        "--lock",
        "stuck",
        "--wait-for",
        "60s",
        "--",
        "touch",
        "second",
    ]);
    let job = wait_for_waiters(&p, "stuck", 1);
    let queued = &job["waiters"][0];
    assert_eq!(queued["pid"], waiter.id(), "{job}");
    assert_eq!(queued["command"][0], "touch", "{job}");
    let out = p.output(&["jobs", "--waiters"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("WAITING FOR") && table.contains("touch second"),
        "{table}"
    );

    // Without --yes and without a terminal to ask on: refused, nothing broken.
    let out = p.output(&["unlock", "stuck"]);
    assert_eq!(out.status.code(), Some(CONFIG), "{out:?}");
    assert!(!p.dir.path().join("second").exists());

    let started = Instant::now();
    let out = p.output(&["unlock", "stuck", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("broke lock")
            && said.contains(&holder.id().to_string())
            && said.contains("sleep 600"),
        "names the holder: {said}"
    );
    let out = wait_bounded(holder, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(LEASE_LOST),
        "the holder saw its lease revoked: {out:?}"
    );
    assert!(
        gone(command, command_started),
        "the holder's command (sleep 600, pid {command}) still runs after its lease was revoked"
    );
    let out = wait_bounded(waiter, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(0),
        "the waiter got the lock: {out:?}"
    );
    assert!(p.dir.path().join("second").exists());
    eprintln!(
        "holder stopped and waiter ran {:?} after unlock",
        started.elapsed()
    );

    let out = p.output(&["unlock", "stuck", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("free"),
        "{out:?}"
    );
}

#[test]
fn unlock_on_the_file_backend_refuses_while_the_holder_lives_and_names_it() {
    let p = Palisade::new(None);
    let mut holder = p.spawn(&[
        "run",
        "--lock",
        "stuck",
        "--",
        "sh",
        "-c",
        "touch holding; exec sleep 600",
    ]);
    wait_for_file(
        &p.dir.path().join("holding"),
        "the holder's command to start",
    );
    let out = p.output(&["unlock", "stuck", "--yes"]);
    assert_eq!(out.status.code(), Some(HELD), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&holder.id().to_string()) && err.contains("stop the process"),
        "{err}"
    );
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the holder still runs"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The command inherited the lock descriptor (like flock(1)); once it is gone too, the lock
    // is free.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = p.output(&["unlock", "stuck", "--yes"]);
        if out.status.code() == Some(0) {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("free"),
                "{out:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lock never became free: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A semaphore's waiters are listed once, however many holders it has.
#[test]
fn jobs_waiters_lists_a_semaphores_queue_once() {
    let etcd = Etcd::start().expect("etcd starts");
    let p = Palisade::new(Some(&etcd));
    let mut holders = Vec::new();
    for i in 0..2 {
        let script = format!("touch holding-{i}; exec sleep 600");
        holders.push(p.spawn(&[
            "run", "--lock", "pool", "--slots", "2", "--ttl", "30s", "--", "sh", "-c", &script,
        ]));
        wait_for_file(
            &p.dir.path().join(format!("holding-{i}")),
            "a holder's command to start",
        );
    }
    let waiter = p.spawn(&[
        "run",
        "--lock",
        "pool",
        "--slots",
        "2",
        "--wait-for",
        "60s",
        "--",
        "touch",
        "third",
    ]);
    let job = wait_for_waiters(&p, "pool", 1);
    assert_eq!(job["waiters"][0]["pid"], waiter.id(), "{job}");
    let out = p.output(&["jobs", "--waiters", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON per line"))
        .collect();
    assert_eq!(lines.len(), 2, "two holders: {lines:?}");
    assert!(
        lines
            .iter()
            .all(|j| j["waiters"].as_array().map(Vec::len) == Some(1)),
        "each holder's line shows the one waiter: {lines:?}"
    );
    let out = p.output(&["jobs", "--waiters"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        table.matches("touch third").count(),
        1,
        "the waiter is listed once:\n{table}"
    );
    for holder in holders {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        wait_bounded(holder, Duration::from_secs(30));
    }
    let out = wait_bounded(waiter, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "the waiter got a slot: {out:?}");
    assert!(p.dir.path().join("third").exists());
}
