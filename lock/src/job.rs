//! What a running job says about itself, and the changes the registry reports.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A job that runs (or wants to run) under a lock: who it is and where it runs.
///
/// `run_exclusive` stores it as the lock holder's value and registers it in the
/// [`JobRegistry`](crate::JobRegistry) for as long as the job runs, under the session's lease,
/// so the entry vanishes when the process dies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The job's name (for example `daily_etl`).
    pub name: String,
    /// The lock the job runs under; set by `run_exclusive`.
    #[serde(default)]
    pub lock: String,
    /// The host the job runs on.
    pub host: String,
    /// The process id of the job's process.
    pub pid: u32,
    /// When the job started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// The command line, when the job is a command (the `palisade` CLI sets it).
    #[serde(default)]
    pub command: Vec<String>,
    /// Free-form metadata (owner, run id, …). Never put secrets here: anyone who can read the
    /// coordination store can read it.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The fencing token of the lock the job holds; set by `run_exclusive`.
    #[serde(default)]
    pub fencing_token: Option<u64>,
    /// When the job holds one slot of a semaphore (`run_limited`): the semaphore's permits.
    /// `None` under a lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
}

impl JobInfo {
    /// Describes a job named `name` running now in this process on this host.
    pub fn new(name: impl Into<String>) -> Self {
        JobInfo {
            name: name.into(),
            lock: String::new(),
            host: hostname(),
            pid: std::process::id(),
            started_at_ms: now_ms(),
            command: Vec::new(),
            metadata: BTreeMap::new(),
            fencing_token: None,
            permits: None,
        }
    }

    /// Sets the command line.
    pub fn command<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.command = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The job's name in the registry: its lock's name, and for a semaphore's holder (several
    /// at once) `<name>/<fencing token>` (names cannot contain `/`).
    pub fn registry_key(&self) -> String {
        match self.permits {
            Some(_) => format!("{}/{}", self.lock, self.fencing_token.unwrap_or(0)),
            None => self.lock.clone(),
        }
    }

    /// When the job started.
    pub fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.started_at_ms)
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings, integers and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a job entry; `None` when the bytes are not a `JobInfo` in JSON.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn hostname() -> String {
    let uname = rustix::system::uname();
    uname.nodename().to_string_lossy().into_owned()
}

/// A change in the set of running jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobEvent {
    /// A job registered: it holds its lock and runs.
    Started(JobInfo),
    /// A job finished (its closure returned or was cancelled) and removed its entry.
    Finished(JobInfo),
    /// A job's entry vanished without it finishing: its process died or its lease expired.
    Expired(JobInfo),
}

impl JobEvent {
    /// The job this event is about.
    pub fn job(&self) -> &JobInfo {
        match self {
            JobEvent::Started(j) | JobEvent::Finished(j) | JobEvent::Expired(j) => j,
        }
    }
}
