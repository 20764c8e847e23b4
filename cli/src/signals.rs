//! The signals a scheduler or a terminal sends to stop a job: INT (Ctrl-C), TERM (systemd,
//! Airflow, Kubernetes), HUP (a closed terminal or ssh session) and QUIT (Ctrl-\).
//!
//! `palisade run` takes them over for its whole life, from before it contacts the lock backend
//! to its exit, so there is no instant in which one of them kills palisade without its clean-up:
//! while it waits, a signal gives up the wait (and its place in the queue); while the command
//! runs, it is passed on to the command's process group.

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

/// The stop signals, received as a stream.
pub struct StopSignals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    /// Installs the handlers (from now on these signals no longer end the process by default).
    pub fn install() -> std::io::Result<StopSignals> {
        let kinds = [
            (Signal::SIGINT, SignalKind::interrupt()),
            (Signal::SIGTERM, SignalKind::terminate()),
            (Signal::SIGHUP, SignalKind::hangup()),
            (Signal::SIGQUIT, SignalKind::quit()),
        ];
        let mut streams = Vec::with_capacity(kinds.len());
        for (name, kind) in kinds {
            streams.push((name, signal(kind)?));
        }
        Ok(StopSignals { streams })
    }

    /// The next stop signal received.
    pub async fn recv(&mut self) -> Signal {
        let next = futures::future::select_all(
            self.streams
                .iter_mut()
                .map(|(name, stream)| Box::pin(async move { stream.recv().await.map(|_| *name) })),
        );
        match next.await.0 {
            Some(name) => name,
            // A stream ends only if the runtime shuts down.
            None => std::future::pending().await,
        }
    }
}

/// The exit code of a process ended by `signal` (the shell's convention, 128 + its number).
pub fn exit_code(signal: Signal) -> u8 {
    128 + signal as u8
}
