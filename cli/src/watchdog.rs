//! The watchdog: a second `palisade` process that kills a guarded command's process group the
//! moment palisade dies, however it dies (`kill -9`, the OOM killer), so the command never runs on
//! without the process that holds its lock.
//!
//! palisade keeps the write end of a pipe whose read end is the watchdog's stdin. The kernel
//! closes that end when palisade exits for any reason; the watchdog then reads end-of-file and
//! sends `SIGKILL` to the group. The watchdog runs in a process group of its own (the terminal's
//! Ctrl-C does not reach it) and ignores INT, TERM, HUP and QUIT: a scheduler that signals every
//! process of the job must not stop the watchdog before palisade is gone.

use crate::exit::{CliError, INTERNAL};
use clap::Args;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use tokio::signal::unix::{SignalKind, signal};

/// The hidden subcommand's flags.
#[derive(Debug, Args)]
pub struct WatchdogArgs {
    /// The process group to kill when stdin reaches end-of-file.
    #[arg(long)]
    pub pgid: i32,
}

/// The watchdog of one command; dropping it (or palisade's death) kills the command's group.
pub struct Watchdog {
    _pipe: OwnedFd,
    process: std::process::Child,
}

impl Watchdog {
    /// Starts `palisade __watchdog --pgid PGID`.
    pub fn start(pgid: Pid) -> Result<Watchdog, CliError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            CliError::new(INTERNAL, format!("cannot start the watchdog ({what}: {e})"))
        };
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| failed("creating a pipe", &e))?;
        // /proc/self/exe, not the path palisade was started from: that file may have been
        // replaced meanwhile (an upgrade while a job waited for its lock), the running binary not.
        let process = std::process::Command::new("/proc/self/exe")
            .arg0("palisade")
            .args(["__watchdog", "--pgid", &pgid.as_raw().to_string()])
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| failed("spawning it", &e))?;
        Ok(Watchdog {
            _pipe: write,
            process,
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // The pipe closes after this body: the watchdog kills what is left of the group and
        // exits; reap it in the background so that no zombie stays while palisade runs on.
        let pid = self.process.id();
        std::thread::spawn(move || {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        });
    }
}

/// `palisade __watchdog --pgid PGID`: waits for end-of-file on stdin, then kills the group.
pub async fn watch(args: WatchdogArgs) -> Result<u8, CliError> {
    // Registering a handler replaces the default action (exit) of each signal.
    let _ignored = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::quit(),
    ]
    .map(signal);
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    })
    .await;
    let _ = killpg(Pid::from_raw(args.pgid), Signal::SIGKILL);
    Ok(0)
}
