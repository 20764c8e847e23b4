//! A one-line "waiting for ..." display on a terminal; nothing at all when stderr is not one.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinHandle;

/// Shows what palisade waits for, and since when, until dropped.
pub struct Progress {
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `what` (e.g. "waiting for lock `daily_etl`") if stderr is a terminal.
    pub fn start(what: String) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let since = humantime::format_rfc3339_seconds(SystemTime::now());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let waited = Duration::from_secs(started.elapsed().as_secs());
                eprint!(
                    "\r\x1b[2Kpalisade: {what} since {since} ({})",
                    humantime::format_duration(waited)
                );
                let _ = std::io::stderr().flush();
            }
        });
        Progress { task: Some(task) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}
