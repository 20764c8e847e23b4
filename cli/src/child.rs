//! The guarded command: started in its own process group that never outlives palisade, given
//! signals on demand, and killed with everything it left behind.
//!
//! How the command is tied to palisade's life:
//! - the command's own process gets `SIGKILL` from the kernel when the palisade thread that
//!   started it exits (Linux's parent-death signal; the thread is the one that drives the job,
//!   which lives until palisade exits);
//! - a watchdog process (`palisade __watchdog`, see [`crate::watchdog`]) kills the command's
//!   whole process group the moment palisade dies, `kill -9` included;
//! - on the file backend the command inherits the descriptor that holds the lock's `flock`, so
//!   the lock stays held while any process that has it lives, as with `flock(1)`.

use crate::exit::{CliError, INTERNAL, NOT_STARTED};
use crate::signals::StopSignals;
use crate::watchdog::Watchdog;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::fd::RawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use tokio::process::Command;
use tokio::sync::watch;

/// A running command, supervised by a task that owns it.
pub struct Child {
    pgid: Pid,
    status: watch::Receiver<Option<ExitStatus>>,
    // Kills the group if palisade dies; dropped (and so fired) after the group is gone.
    _watchdog: Watchdog,
}

impl Child {
    /// Starts `argv` with `env` added, in a new process group whose id is the child's pid,
    /// passing `lock_fd` on to it when given (see the module docs).
    pub fn spawn(
        argv: &[String],
        env: &[(&str, String)],
        lock_fd: Option<RawFd>,
    ) -> Result<Child, CliError> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| CliError::config("no command given after `--`"))?;
        let mut command = Command::new(program);
        command.args(args).process_group(0);
        for (key, value) in env {
            command.env(key, value);
        }
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls (prctl, getppid, fcntl); it allocates nothing and takes
        // no lock.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                if nix::unistd::getppid() != parent {
                    // palisade died before the line above: the signal will never come.
                    return Err(std::io::Error::other("palisade exited"));
                }
                if let Some(fd) = lock_fd {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    nix::fcntl::fcntl(
                        fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )
                    .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| CliError::new(NOT_STARTED, format!("cannot start `{program}`: {e}")))?;
        let pid = child
            .id()
            .ok_or_else(|| CliError::new(NOT_STARTED, format!("`{program}` exited at once")))?;
        let pgid = Pid::from_raw(pid as i32);
        let watchdog = match Watchdog::start(pgid) {
            Ok(watchdog) => watchdog,
            Err(e) => {
                let _ = killpg(pgid, Signal::SIGKILL);
                return Err(e);
            }
        };
        let (tx, status) = watch::channel(None);
        tokio::spawn(async move {
            let exited = child.wait().await;
            let _ = tx.send(Some(
                exited.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)),
            ));
        });
        Ok(Child {
            pgid,
            status,
            _watchdog: watchdog,
        })
    }

    /// [`Child::spawn`] without a lock descriptor, passing INT, TERM, HUP and QUIT that palisade
    /// receives from now on to the command's process group (for `once` and `limit`, which hold
    /// no lock while the command runs).
    pub fn spawn_forwarding(
        argv: &[String],
        env: &[(&str, String)],
    ) -> Result<Arc<Child>, CliError> {
        let mut signals = StopSignals::install()
            .map_err(|e| CliError::new(INTERNAL, format!("cannot install signal handlers: {e}")))?;
        let child = Arc::new(Child::spawn(argv, env, None)?);
        let forward = Arc::downgrade(&child);
        tokio::spawn(async move {
            loop {
                let signal = signals.recv().await;
                match forward.upgrade() {
                    Some(child) => child.signal(signal),
                    None => return,
                }
            }
        });
        Ok(child)
    }

    /// The process id of the command (and the id of its process group).
    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    /// Sends `signal` to the command's whole process group.
    pub fn signal(&self, signal: Signal) {
        let _ = killpg(self.pgid, signal);
    }

    /// Waits until the command exits.
    pub async fn wait(&self) -> ExitStatus {
        let mut status = self.status.clone();
        match status.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or_else(|| ExitStatus::from_raw(1 << 8)),
            // The supervising task is gone only if the runtime shuts down.
            Err(_) => ExitStatus::from_raw(1 << 8),
        }
    }

    /// Kills the whole process group with SIGKILL (what is left of it: the command, or what it
    /// started in the background) and waits for the command itself.
    pub async fn kill(&self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait().await
    }
}

/// The shell convention: the exit code, or 128 + the signal that ended the process.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}
