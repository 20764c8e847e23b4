//! One server process: how to start it again, its log, and the signals a test sends it.

use crate::{Error, STARTUP_TIMEOUT};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Finds `binary` on PATH (and in the sbin directories Debian uses, and the virtual environment
/// `.venv/` that `scripts/setup` creates at the workspace root for moto), or says which package
/// has it.
pub(crate) fn find_binary(
    binary: &'static str,
    package: &'static str,
    env_override: &str,
) -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os(env_override) {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin");
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .chain([venv])
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or(Error::MissingBinary { binary, package })
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns every server from one thread that lives as long as the process.
///
/// Linux delivers the parent-death signal when the *thread* that forked the child exits, not the
/// process; spawning from a test's own thread (or a `spawn_blocking` thread that is reaped when
/// idle) would kill servers early. This thread never exits, so the signal fires only when the
/// test process itself dies.
fn spawn(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("palisade-testkit-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("the OS refused to start the testkit's spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    lock(sender)
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("the testkit's spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the testkit's spawner thread is gone"))?
}

/// How many times a start is tried when a port it picked was taken meanwhile.
const ATTEMPTS: usize = 3;

/// Runs `start` until it succeeds, fails for another reason, or has failed [`ATTEMPTS`] times
/// because a port it picked was taken in between (another test process won the race for a free
/// port): each call of `start` picks fresh ports.
pub(crate) fn on_fresh_ports<T>(mut start: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
    let mut attempt = 1;
    loop {
        match start() {
            Err(e) if attempt < ATTEMPTS && port_was_taken(&e) => attempt += 1,
            result => return result,
        }
    }
}

/// Whether a server exited because its port was taken ("address already in use" from etcd and
/// Redis, "Address already in use" from Python's moto).
fn port_was_taken(error: &Error) -> bool {
    match error {
        Error::Exited { log, .. } => log.to_ascii_lowercase().contains("address already in use"),
        _ => false,
    }
}

/// Locks a mutex, ignoring poisoning: a panicking test must not make cleanup panic too.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A server process that can be killed, paused, resumed and started again with the same
/// arguments (and so the same ports and data directory).
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) label: String,
    program: PathBuf,
    args: Vec<String>,
    log_path: PathBuf,
    /// `None` after `kill()`, until the next `spawn()`.
    child: Mutex<Option<Child>>,
}

impl Server {
    pub(crate) fn new(
        label: String,
        program: PathBuf,
        args: Vec<String>,
        log_path: PathBuf,
    ) -> Self {
        Server {
            label,
            program,
            args,
            log_path,
            child: Mutex::new(None),
        }
    }

    /// Starts the process (it must not be running).
    pub(crate) fn spawn(&self) -> Result<(), Error> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(Error::io(format!("opening {}", self.log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(Error::io("duplicating the log file handle"))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call (prctl), allocating nothing and taking no lock.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = spawn(command).map_err(Error::io(format!("starting {}", self.label)))?;
        *lock(&self.child) = Some(child);
        Ok(())
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// Kills the process with SIGKILL (works on a paused process too) and reaps it.
    pub(crate) fn kill(&self) -> Result<(), Error> {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            child
                .wait()
                .map_err(Error::io(format!("waiting for {} to exit", self.label)))?;
        }
        Ok(())
    }

    /// Sends `signal`. For `SIGSTOP` and `SIGCONT` it returns only once the process is stopped
    /// or runs again ([`pause_process`], [`resume_process`]).
    pub(crate) fn signal(&self, signal: Signal) -> Result<(), Error> {
        let pid = self.pid().ok_or_else(|| Error::NotRunning {
            server: self.label.clone(),
        })?;
        signal_and_wait(pid, signal, &self.label)
    }

    /// Polls `ready` until it says yes, the process exits, or [`STARTUP_TIMEOUT`] passes.
    pub(crate) fn wait_ready(&self, mut ready: impl FnMut() -> bool) -> Result<(), Error> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                return Err(Error::Exited {
                    server: self.label.clone(),
                    status,
                    log_path: self.log_path.clone(),
                    log: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    server: self.label.clone(),
                    timeout: STARTUP_TIMEOUT,
                    log_path: self.log_path.clone(),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn exit_status(&self) -> Option<String> {
        let mut guard = lock(&self.child);
        match guard.as_mut().map(Child::try_wait) {
            None => Some("killed".into()),
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(_) => None,
        }
    }

    /// The last 40 lines of the server's log.
    pub(crate) fn log_tail(&self) -> String {
        read_tail(&self.log_path, 40)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Stops process `pid` (any process, e.g. a child a test spawned) with `SIGSTOP` and returns
/// only once every one of its threads is stopped (state `T` in `/proc/<pid>/task/*/stat`). The
/// kernel stops each thread when it is next scheduled, so on a busy machine a thread can still
/// answer a request for a while after the signal is sent, and after the main thread has stopped:
/// a test that injects a pause must not race it. A process that exited meanwhile (or was never
/// there: `ESRCH`) counts as paused; exited threads (`Z`, `X`) are not waited for, and a thread
/// stopped under a tracer (`t`) counts as stopped.
pub fn pause_process(pid: u32) -> Result<(), Error> {
    signal_and_wait(pid, Signal::SIGSTOP, &format!("process {pid}"))
}

/// Continues process `pid` with `SIGCONT` and returns only once none of its threads is stopped.
pub fn resume_process(pid: u32) -> Result<(), Error> {
    signal_and_wait(pid, Signal::SIGCONT, &format!("process {pid}"))
}

fn signal_and_wait(pid: u32, signal: Signal, label: &str) -> Result<(), Error> {
    let io = |context: String, source: std::io::Error| Error::Io { context, source };
    let target = Pid::from_raw(i32::try_from(pid).map_err(|_| {
        io(
            format!("sending {signal} to {label}"),
            std::io::Error::other("pid out of range"),
        )
    })?);
    match kill(target, signal) {
        Err(nix::errno::Errno::ESRCH) => return Ok(()), // gone: nothing left to stop or run
        sent => sent.map_err(|errno| io(format!("sending {signal} to {label}"), errno.into()))?,
    }
    let stopped = match signal {
        Signal::SIGSTOP => true,
        Signal::SIGCONT => false,
        _ => return Ok(()),
    };
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let states = thread_states(pid);
        // Exited threads (a main thread that called pthread_exit, a process being reaped) never
        // change state again: only the live ones are waited for (none left: it exited).
        let mut live = states.iter().filter(|&&state| !matches!(state, 'Z' | 'X'));
        let done = if stopped {
            live.all(|&state| matches!(state, 'T' | 't'))
        } else {
            live.all(|&state| !matches!(state, 'T' | 't'))
        };
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io(
                format!("waiting for {label} to take {signal}"),
                std::io::Error::other(format!(
                    "thread states {states:?} after {STARTUP_TIMEOUT:?}"
                )),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The one-letter states (`R`, `S`, `T`, `Z`, ...) of every thread of process `pid`; empty when
/// there is no such process.
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| state_of(&task.path().join("stat")))
        .collect()
}

/// The one-letter state of a process (`R`, `S`, `T`, `Z`, ...) from `/proc/<pid>/stat`, or
/// `None` when there is no such process.
#[cfg(test)]
fn process_state(pid: u32) -> Option<char> {
    state_of(Path::new(&format!("/proc/{pid}/stat")))
}

fn state_of(stat: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // "pid (comm) S ...": comm may hold spaces and parentheses, so look after the last ')'.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn read_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut raw = Vec::new();
    let _ = file.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_its_package_and_the_setup_command() {
        let error = find_binary(
            "palisade-no-such-server",
            "palisade-no-such-package",
            "PALISADE_TESTKIT_UNSET_VARIABLE",
        )
        .expect_err("the binary does not exist");
        let message = error.to_string();
        assert!(matches!(error, Error::MissingBinary { .. }));
        assert!(message.contains("palisade-no-such-package"), "{message}");
        assert!(message.contains("scripts/setup"), "{message}");
    }

    /// The child of the test below: four threads that never stop computing.
    #[test]
    fn busy_threads_child() {
        if std::env::var_os("PALISADE_TESTKIT_BUSY_CHILD").is_none() {
            return;
        }
        let spin = || loop {
            std::hint::black_box(0u64.wrapping_add(1));
        };
        let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(spin)).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }

    #[test]
    fn pause_returns_once_every_thread_is_stopped_and_resume_once_none_is() {
        // Busy threads on other cores keep running until their next trip into the kernel, after
        // the main thread (blocked in join) has already stopped.
        struct KillOnDrop(Child);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "process::tests::busy_threads_child",
                "--exact",
                "--nocapture",
            ])
            .env("PALISADE_TESTKIT_BUSY_CHILD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .expect("spawn the busy child");
        let pid = child.0.id();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while thread_states(pid).iter().filter(|&&s| s == 'R').count() < 2 {
            assert!(
                Instant::now() < deadline,
                "the child never ran its threads: {:?}",
                thread_states(pid)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for round in 0..200 {
            pause_process(pid).expect("pause");
            let states = thread_states(pid);
            assert!(
                states.len() >= 5 && states.iter().all(|&state| state == 'T'),
                "round {round}: pause returned with thread states {states:?}"
            );
            assert_eq!(process_state(pid), Some('T'));
            resume_process(pid).expect("resume");
            let states = thread_states(pid);
            assert!(
                !states.contains(&'T'),
                "round {round}: resume returned with thread states {states:?}"
            );
        }
    }

    #[test]
    fn a_server_that_exits_at_once_reports_its_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::new(
            "false-server".into(),
            PathBuf::from("/bin/sh"),
            vec!["-c".into(), "echo bad configuration >&2; exit 3".into()],
            dir.path().join("log"),
        );
        server.spawn().expect("spawn");
        let error = server.wait_ready(|| false).expect_err("never ready");
        let message = error.to_string();
        assert!(matches!(error, Error::Exited { .. }), "{message}");
        assert!(message.contains("bad configuration"), "{message}");
    }
}
