//! The guarded command: started in its own process group, with SIGINT/SIGTERM forwarded to
//! the whole group, and terminated (SIGTERM, then SIGKILL after a grace period) on demand.

use crate::exit::{CliError, NOT_STARTED};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// A running command, supervised by a task that owns it.
pub struct Child {
    pgid: Pid,
    status: watch::Receiver<Option<ExitStatus>>,
}

impl Child {
    /// Starts `argv` with `env` added, in a new process group whose id is the child's pid, and
    /// forwards SIGINT and SIGTERM that palisade receives to that group.
    pub fn spawn(argv: &[String], env: &[(&str, String)]) -> Result<Child, CliError> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| CliError::config("no command given after `--`"))?;
        let mut command = Command::new(program);
        command.args(args).process_group(0);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| CliError::new(NOT_STARTED, format!("cannot start `{program}`: {e}")))?;
        let pid = child
            .id()
            .ok_or_else(|| CliError::new(NOT_STARTED, format!("`{program}` exited at once")))?;
        let pgid = Pid::from_raw(pid as i32);
        let (tx, status) = watch::channel(None);
        // Handlers are installed only now: while palisade waits for a lock, Ctrl-C simply ends it.
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        let mut terminate = signal(SignalKind::terminate()).ok();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    exited = child.wait() => {
                        let _ = tx.send(Some(exited.unwrap_or_else(|_| ExitStatus::from_raw(1 << 8))));
                        return;
                    }
                    Some(()) = recv(&mut interrupt) => { let _ = killpg(pgid, Signal::SIGINT); }
                    Some(()) = recv(&mut terminate) => { let _ = killpg(pgid, Signal::SIGTERM); }
                }
            }
        });
        Ok(Child { pgid, status })
    }

    /// The process id of the command (and the id of its process group).
    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
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

    /// Sends SIGTERM to the command's process group, waits up to `grace`, then sends SIGKILL;
    /// returns how it ended and whether SIGKILL was needed.
    pub async fn terminate(&self, grace: Duration) -> (ExitStatus, bool) {
        let _ = killpg(self.pgid, Signal::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => (status, false),
            Err(_) => {
                let _ = killpg(self.pgid, Signal::SIGKILL);
                (self.wait().await, true)
            }
        }
    }
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
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
