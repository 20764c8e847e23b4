//! `palisade run` under faults from outside its own code: `kill -9` of palisade itself, the stop
//! signals a scheduler sends while it waits, a partition from etcd while the command runs, and a
//! `--grace` that cannot work. Each checks that a guarded command never runs beside another.

mod common;

use common::{Palisade, wait_bounded, wait_for_file};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use palisade_testkit::Etcd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn backends() -> Vec<(&'static str, Option<Etcd>)> {
    vec![
        ("file", None),
        ("etcd", Some(Etcd::start().expect("etcd starts"))),
    ]
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: it runs no more code).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) still runs 10 s after palisade died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_pid(path: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).expect("signal");
}

#[test]
fn kill_9_of_palisade_kills_its_command_and_everything_the_command_started() {
    for (backend, etcd) in backends() {
        let p = Palisade::new(etcd.as_ref());
        let script = "sleep 300 & echo $! > grandchild; echo $$ > command; wait";
        let mut a = p.spawn(&[
            "run", "--lock", "x", "--ttl", "3s", "--", "sh", "-c", script,
        ]);
        let command = read_pid(&p.dir.path().join("command"));
        let grandchild = read_pid(&p.dir.path().join("grandchild"));

        a.kill().expect("kill -9 palisade");
        a.wait().expect("reap palisade");
        wait_gone(command, &format!("{backend}: the command"));
        wait_gone(
            grandchild,
            &format!("{backend}: a process the command started"),
        );

        // The next run gets the lock (on etcd once the unrevoked lease of A has expired).
        let b = p.output(&["run", "--lock", "x", "--wait-for", "20s", "--", "true"]);
        assert_eq!(b.status.code(), Some(0), "{backend}: {b:?}");
    }
}

#[test]
fn on_the_file_backend_the_command_holds_the_lock_descriptor_like_flock_1() {
    let p = Palisade::new(None);
    // A process that leaves the command's process group (and so is not killed with it) keeps
    // the lock for as long as it lives, because it inherited the locked descriptor.
    // (The command waits until that process has left its group, or the SIGKILL palisade sends
    // to what is left of the group when the command exits could reach it first.)
    // The escaped process lives until the test creates `free` (at most a minute, should the
    // test fail before).
    let script = "ls -l /proc/$$/fd > fds; \
                  setsid sh -c 'touch escaped; i=0; \
                                while [ ! -e free ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i+1)); done' \
                    </dev/null >/dev/null 2>&1 & \
                  while [ ! -e escaped ]; do sleep 0.01; done";
    let a = p.output(&["run", "--lock", "x", "--", "sh", "-c", script]);
    assert_eq!(a.status.code(), Some(0), "{a:?}");
    let fds = std::fs::read_to_string(p.dir.path().join("fds")).expect("fds");
    assert!(
        fds.contains("x.lock"),
        "the command does not hold the lock file open:\n{fds}"
    );

    let b = p.output(&["run", "--lock", "x", "--", "true"]);
    assert_eq!(
        b.status.code(),
        Some(75),
        "the escaped process still holds the lock: {b:?}"
    );
    std::fs::write(p.dir.path().join("free"), "").expect("write free");
    let c = p.output(&["run", "--lock", "x", "--wait-for", "20s", "--", "true"]);
    assert_eq!(c.status.code(), Some(0), "free once it exited: {c:?}");
}

/// The keys under the lock's prefix in etcd, read with the real `etcdctl`.
fn lock_keys(etcd: &Etcd, lock: &str) -> usize {
    let out = Command::new("etcdctl")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "get",
            "--prefix",
            "--keys-only",
            &format!("palisade/lock/{lock}/"),
        ])
        .output()
        .expect("etcdctl runs (Debian package etcd-client, installed by scripts/setup)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

fn wait_keys(etcd: &Etcd, lock: &str, count: usize, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = lock_keys(etcd, lock);
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} keys under the lock, expected {count} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stop_signal_while_waiting_gives_up_the_place_in_the_queue_at_once() {
    let etcd = Etcd::start().expect("etcd starts");
    let p = Palisade::new(Some(&etcd));
    let hold = "touch started; while [ ! -e release ]; do sleep 0.05; done";
    let a = p.spawn(&["run", "--lock", "x", "--ttl", "30s", "--", "sh", "-c", hold]);
    wait_for_file(&p.dir.path().join("started"), "A's command to start");
    wait_keys(&etcd, "x", 1, "A holds the lock", Duration::from_secs(10));

    for stop in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        let b = p.spawn(&[
            "run", "--lock", "x", "--wait", "--ttl", "30s", "--", "touch", "b-ran",
        ]);
        wait_keys(&etcd, "x", 2, "B queued behind A", Duration::from_secs(10));
        signal(b.id(), stop);
        let out = wait_bounded(b, Duration::from_secs(10));
        assert_eq!(
            out.status.code(),
            Some(128 + stop as i32),
            "B exits with 128+{stop}: {out:?}"
        );
        // B's key is gone now, not when its 30 s TTL runs out.
        wait_keys(
            &etcd,
            "x",
            1,
            &format!("B's waiter key after {stop}"),
            Duration::from_secs(2),
        );
        assert!(!p.dir.path().join("b-ran").exists());
    }

    std::fs::write(p.dir.path().join("release"), "").unwrap();
    assert_eq!(p.finish(a).code(), Some(0));
    let started = Instant::now();
    let c = p.output(&["run", "--lock", "x", "--wait-for", "20s", "--", "true"]);
    assert_eq!(c.status.code(), Some(0), "{c:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the next run waited {:?}: a stale waiter key blocked it",
        started.elapsed()
    );
}

/// The last line of `path` as a number (nanoseconds since the epoch, from `date +%s%N`).
fn last_stamp(path: &Path) -> u128 {
    let text = std::fs::read_to_string(path).expect("stamps");
    text.lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .expect("a complete stamp")
}

#[test]
fn a_partitioned_holder_stops_its_command_before_the_next_holder_starts() {
    let etcd = Etcd::start().expect("etcd starts");
    for round in 0..10 {
        let proxy = etcd.proxy().expect("proxy");
        let p = Palisade::new(Some(&etcd));
        let lock = format!("partitioned-{round}");
        // A command that ignores SIGTERM (a job that takes its time to shut down): only SIGKILL
        // at the lease deadline stops it.
        let script = "trap '' TERM; while :; do date +%s%N >> a.log; sleep 0.02; done";
        let a = p.spawn(&[
            "run",
            "--etcd",
            &format!("http://{}", proxy.addr()),
            "--lock",
            &lock,
            "--ttl",
            "3s",
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            script,
        ]);
        wait_for_file(&p.dir.path().join("a.log"), "A's command to write");
        proxy.blackhole();
        let b = p.output(&[
            "run",
            "--lock",
            &lock,
            "--wait-for",
            "30s",
            "--ttl",
            "3s",
            "--",
            "sh",
            "-c",
            "date +%s%N > b.log",
        ]);
        assert_eq!(b.status.code(), Some(0), "round {round}: B runs: {b:?}");
        let a = wait_bounded(a, Duration::from_secs(30));
        assert_eq!(
            a.status.code(),
            Some(76),
            "round {round}: A lost its lease: {a:?}"
        );
        let a_last = last_stamp(&p.dir.path().join("a.log"));
        let b_start = last_stamp(&p.dir.path().join("b.log"));
        assert!(
            a_last < b_start,
            "round {round}: A's command wrote {} ms after B's command started",
            (a_last - b_start) / 1_000_000
        );
    }
}

#[test]
fn a_grace_that_does_not_fit_in_the_ttl_is_refused() {
    let p = Palisade::new(None);
    let out = p.output(&[
        "run",
        "--etcd",
        "http://127.0.0.1:9",
        "--lock",
        "x",
        "--ttl",
        "3s",
        "--grace",
        "2s",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--grace 2s does not fit in --ttl 3s"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// The one-letter state of a process from `/proc/<pid>/stat`.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn wait_state(pid: u32, stopped: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (state(pid) == Some('T')) != stopped {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is in state {:?} after 10 s",
            state(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ctrl_z_stops_the_command_with_palisade_and_fg_continues_both() {
    let p = Palisade::new(None);
    let script = "echo $$ > command; while [ ! -e release ]; do sleep 0.02; done";
    let a = p.spawn(&["run", "--lock", "x", "--", "sh", "-c", script]);
    let command = read_pid(&p.dir.path().join("command"));
    signal(a.id(), Signal::SIGTSTP); // what the terminal sends on Ctrl-Z
    wait_state(a.id(), true, "palisade after SIGTSTP");
    wait_state(command, true, "the command after SIGTSTP");
    signal(a.id(), Signal::SIGCONT); // what the shell's `fg` sends
    wait_state(a.id(), false, "palisade after SIGCONT");
    wait_state(command, false, "the command after SIGCONT");
    std::fs::write(p.dir.path().join("release"), "").unwrap();
    assert_eq!(p.finish(a).code(), Some(0));
}

/// `palisade run --etcdctl-layout` and `etcdctl lock NAME` (etcd's own recipe, Go's
/// concurrency.Mutex) exclude each other, both ways.
#[test]
fn palisade_and_etcdctl_lock_exclude_each_other() {
    let etcd = Etcd::start().expect("etcd starts");
    let p = Palisade::new(Some(&etcd));
    let etcdctl = |args: &[&str]| {
        let mut command = Command::new("etcdctl");
        command
            .arg("--endpoints")
            .arg(etcd.endpoint())
            .args(args)
            .current_dir(p.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    };

    // etcdctl holds "shared job": palisade skips.
    let go_hold = "touch go-holds; while [ ! -e go-release ]; do sleep 0.02; done";
    let go = etcdctl(&["lock", "shared job", "--", "sh", "-c", go_hold])
        .spawn()
        .expect("etcdctl runs (Debian package etcd-client)");
    wait_for_file(&p.dir.path().join("go-holds"), "etcdctl to hold the lock");
    let skipped = p.output(&[
        "run",
        "--etcdctl-layout",
        "--lock",
        "shared job",
        "--",
        "touch",
        "palisade-ran",
    ]);
    assert_eq!(
        skipped.status.code(),
        Some(75),
        "palisade must skip: {skipped:?}"
    );
    assert!(!p.dir.path().join("palisade-ran").exists());
    // Without the option the names live apart (palisade's namespace): no exclusion.
    let apart = p.output(&["run", "--lock", "shared job", "--", "true"]);
    assert_eq!(apart.status.code(), Some(0), "{apart:?}");
    std::fs::write(p.dir.path().join("go-release"), "").unwrap();
    let go = wait_bounded(go, Duration::from_secs(30));
    assert!(go.status.success(), "{go:?}");

    // The reverse: palisade holds it, etcdctl waits until palisade's command ends.
    let hold = "touch palisade-holds; while [ ! -e release ]; do sleep 0.02; done; \
                date +%s%N > palisade-ended";
    let palisade = p.spawn(&[
        "run",
        "--etcdctl-layout",
        "--wait-for",
        "30s",
        "--lock",
        "shared job",
        "--",
        "sh",
        "-c",
        hold,
    ]);
    wait_for_file(
        &p.dir.path().join("palisade-holds"),
        "palisade to hold the lock",
    );
    let go = etcdctl(&[
        "lock",
        "shared job",
        "--",
        "sh",
        "-c",
        "date +%s%N > go-started",
    ])
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !p.dir.path().join("go-started").exists(),
        "etcdctl took the lock while palisade held it"
    );
    std::fs::write(p.dir.path().join("release"), "").unwrap();
    assert_eq!(p.finish(palisade).code(), Some(0));
    let go = wait_bounded(go, Duration::from_secs(30));
    assert!(go.status.success(), "{go:?}");
    let ended = last_stamp(&p.dir.path().join("palisade-ended"));
    let started = last_stamp(&p.dir.path().join("go-started"));
    assert!(
        ended < started,
        "etcdctl's command started before palisade's ended"
    );
}

/// A run that skips (exit 75) or ends leaves no key of its own behind: the next run with
/// `--wait` does not wait for a dead process's TTL.
#[test]
fn a_skipped_run_leaves_no_key_behind() {
    let etcd = Etcd::start().expect("etcd starts");
    let p = Palisade::new(Some(&etcd));
    let hold = "touch started; while [ ! -e release ]; do sleep 0.02; done";
    let a = p.spawn(&["run", "--lock", "x", "--", "sh", "-c", hold]);
    wait_for_file(&p.dir.path().join("started"), "A's command to start");
    for _ in 0..3 {
        let b = p.output(&["run", "--lock", "x", "--", "true"]);
        assert_eq!(b.status.code(), Some(75), "{b:?}");
        assert_eq!(
            lock_keys(&etcd, "x"),
            1,
            "the skipped run's key is gone when it exits"
        );
    }
    std::fs::write(p.dir.path().join("release"), "").unwrap();
    assert_eq!(p.finish(a).code(), Some(0));
    assert_eq!(lock_keys(&etcd, "x"), 0);
    let started = Instant::now();
    let c = p.output(&["run", "--lock", "x", "--wait-for", "20s", "--", "true"]);
    assert_eq!(c.status.code(), Some(0), "{c:?}");
    // A stale key would hold C for the rest of the TTL (or make it give up with 75 above); a
    // start of palisade and etcd's answers take well under a second, 15 s on a busy machine.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}
