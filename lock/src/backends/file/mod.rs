//! The one-host backend: `flock(2)` on a file per name.
//!
//! Layout under the lock directory:
//! - `lock/<name>.lock`, `election/<name>.lock`: the file that is `flock`ed; it holds the fencing
//!   counter (a decimal number, rewritten and fsynced under the lock by every new holder).
//! - `lock/<name>.holder`: the holder's token and value, replaced atomically (rename) after
//!   acquiring and removed before releasing.
//! - `sem/<name>.lock` and `.holder`: a semaphore's queue, a lock as above (see `file_sem` for
//!   its slots, `sem/<name>.slot-<i>`).
//! - `jobs/<name>.json`: a running job, `flock`ed by its process while it runs, so an entry whose
//!   file is not locked belongs to a dead process.
//!
//! Names are percent-encoded into file names.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;

mod flock;
mod sem;

use self::flock::{FileHeld, encode, is_locked, lock_current_file, read_holder, replace_file};
use crate::backend::{
    HeldLock, Holder, Kind, LockBackend, Registration, SlotTry, Wait, sealed::Sealed,
};
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::Session;

/// How often `observe` and the registry `watch` look at the files.
const POLL: Duration = Duration::from_millis(100);

/// The longest pause between two tries of a waiter whose lock another process holds (the
/// latency of a hand-over between processes is at most this).
const POLL_HELD: Duration = Duration::from_millis(20);

/// The in-process FIFO queue of one name.
type LocalQueue = Arc<tokio::sync::Mutex<()>>;

/// Registry entries by lock name.
type Jobs = BTreeMap<String, JobInfo>;

pub(crate) struct FileBackend {
    dir: PathBuf,
    /// One FIFO mutex per name: tasks of this process queue here in arrival order before they
    /// contend for the `flock` with other processes.
    local: Mutex<HashMap<(Kind, String), LocalQueue>>,
    /// Tasks of this process waiting per name (local queue or `flock`).
    waiting: Mutex<HashMap<(Kind, String), usize>>,
}

/// Counts a waiter from construction until drop.
struct WaitingMark<'a> {
    map: &'a Mutex<HashMap<(Kind, String), usize>>,
    key: (Kind, String),
}

impl<'a> WaitingMark<'a> {
    fn new(map: &'a Mutex<HashMap<(Kind, String), usize>>, key: (Kind, String)) -> Self {
        *map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        WaitingMark { map, key }
    }
}

impl Drop for WaitingMark<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

fn kind_dir(kind: Kind) -> &'static str {
    match kind {
        Kind::Lock => "lock",
        Kind::Election => "election",
        Kind::Semaphore => "sem",
    }
}

impl FileBackend {
    pub(crate) fn open(dir: PathBuf) -> Result<Self, LockError> {
        for sub in ["lock", "election", "sem", "jobs"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| LockError::io("create", &path, e))?;
        }
        Ok(FileBackend {
            dir,
            local: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
        })
    }

    fn lock_path(&self, kind: Kind, name: &str) -> PathBuf {
        self.dir
            .join(kind_dir(kind))
            .join(format!("{}.lock", encode(name)))
    }

    fn holder_path(&self, kind: Kind, name: &str) -> PathBuf {
        self.dir
            .join(kind_dir(kind))
            .join(format!("{}.holder", encode(name)))
    }

    fn local_mutex(&self, kind: Kind, name: &str) -> LocalQueue {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((kind, name.to_string())).or_default().clone()
    }

    fn current_holder(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        match is_locked(&self.lock_path(kind, name))? {
            Some(true) => Ok(Some(read_holder(&self.holder_path(kind, name)).unwrap_or(
                Holder {
                    value: Vec::new(),
                    fencing_token: 0,
                },
            ))),
            _ => Ok(None),
        }
    }

    fn held_error(&self, kind: Kind, name: &str) -> LockError {
        let holder = self
            .current_holder(kind, name)
            .ok()
            .flatten()
            .and_then(|h| h.job());
        LockError::Held { holder }
    }

    /// Under the flock: bump the persisted counter and publish the holder.
    fn take_over(
        &self,
        kind: Kind,
        name: &str,
        file: &File,
        value: &[u8],
    ) -> Result<u64, LockError> {
        let path = self.lock_path(kind, name);
        let mut text = String::new();
        (&*file)
            .read_to_string(&mut text)
            .map_err(|e| LockError::io("read", &path, e))?;
        let last: u64 = match text.trim() {
            "" => {
                // A new lock file: make its directory entry durable before the first token is
                // handed out, so that a crash cannot bring back an empty counter (and so a
                // token that was already used).
                if let Some(dir) = path.parent() {
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| LockError::io("fsync", dir, e))?;
                }
                0
            }
            t => t
                .parse()
                .map_err(|e: std::num::ParseIntError| LockError::Corrupt {
                    what: format!("fencing counter in {}", path.display()),
                    detail: e.to_string(),
                })?,
        };
        let token = last + 1;
        // Fixed width, one write at offset 0: the counter never shrinks in length, so no stale
        // digits remain and the write does not need a truncate.
        let record = format!("{token:020}\n");
        file.write_all_at(record.as_bytes(), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| LockError::io("write", &path, e))?;
        let mut holder = format!("{token}\n").into_bytes();
        holder.extend_from_slice(value);
        replace_file(&self.holder_path(kind, name), &holder, false)?;
        Ok(token)
    }
}

#[derive(Debug)]
struct FileRegistration {
    path: PathBuf,
    file: Option<File>,
}

impl FileRegistration {
    fn remove(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(file);
        }
    }
}

impl Drop for FileRegistration {
    fn drop(&mut self) {
        self.remove();
    }
}

impl Sealed for FileRegistration {}

#[async_trait]
impl Registration for FileRegistration {
    async fn finish(mut self: Box<Self>) -> Result<(), LockError> {
        self.remove();
        Ok(())
    }
}

/// Live jobs (file locked by a process) and stale ones (file left by a dead process).
fn scan_jobs(dir: &Path) -> Result<(Jobs, Jobs), LockError> {
    let mut live = BTreeMap::new();
    let mut stale = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| LockError::io("read", dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Some(job) = JobInfo::from_bytes(&bytes) else {
            continue;
        };
        match is_locked(&path)? {
            Some(true) => {
                live.insert(job.registry_key(), job);
            }
            Some(false) => {
                stale.insert(job.registry_key(), job);
            }
            None => {}
        }
    }
    Ok((live, stale))
}

impl Sealed for FileBackend {}

#[async_trait]
impl LockBackend for FileBackend {
    fn session(&self) -> Session {
        Session::forever()
    }

    async fn acquire(
        &self,
        kind: Kind,
        name: &str,
        value: Vec<u8>,
        wait: Wait,
    ) -> Result<Box<dyn HeldLock>, LockError> {
        let local = self.local_mutex(kind, name);
        // Counted from here (before the first await) until we hold the lock or give up.
        let waiting =
            (wait != Wait::No).then(|| WaitingMark::new(&self.waiting, (kind, name.to_string())));
        let started = tokio::time::Instant::now();
        let timeout_err = |d| LockError::Timeout {
            name: name.to_string(),
            waited: d,
        };
        let local = match wait {
            Wait::No => match local.try_lock_owned() {
                Ok(g) => g,
                Err(_) => return Err(self.held_error(kind, name)),
            },
            Wait::Forever => local.lock_owned().await,
            Wait::Up(d) => tokio::time::timeout(d, local.lock_owned())
                .await
                .map_err(|_| timeout_err(d))?,
        };
        let path = self.lock_path(kind, name);
        let mut delay = Duration::from_millis(1);
        let file = loop {
            if let Some(file) = lock_current_file(&path)? {
                break file;
            }
            // Held by another process. No thread blocks in flock(LOCK_EX) for us: a waiter that
            // gives up (a timeout, a dropped future) must leave nothing behind, so the wait is a
            // non-blocking try, repeated with a backoff of at most POLL_HELD.
            let left = match wait {
                Wait::No => return Err(self.held_error(kind, name)),
                Wait::Forever => delay,
                Wait::Up(d) => match d.checked_sub(started.elapsed()) {
                    Some(left) if !left.is_zero() => left.min(delay),
                    _ => return Err(timeout_err(d)),
                },
            };
            tokio::time::sleep(left).await;
            delay = (delay * 2).min(POLL_HELD);
        };
        drop(waiting);
        let token = self.take_over(kind, name, &file, &value)?;
        let held = FileHeld::new(
            file,
            &path,
            self.holder_path(kind, name),
            token,
            Some(local),
        )?;
        Ok(Box::new(held))
    }

    async fn holder(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        self.current_holder(kind, name)
    }

    async fn break_lock(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        // A flock is held only by a live process (the kernel frees it when the last descriptor
        // closes): there is nothing to break, only a process to stop.
        match self.current_holder(kind, name)? {
            Some(_) => Err(self.held_error(kind, name)),
            None => Ok(None),
        }
    }

    async fn queue_len(&self, kind: Kind, name: &str) -> Result<usize, LockError> {
        let map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.get(&(kind, name.to_string())).copied().unwrap_or(0))
    }

    fn observe(&self, kind: Kind, name: &str) -> BoxStream<'static, Option<Holder>> {
        let lock_path = self.lock_path(kind, name);
        let holder_path = self.holder_path(kind, name);
        let probe = move || match is_locked(&lock_path) {
            Ok(Some(true)) => Some(read_holder(&holder_path).unwrap_or(Holder {
                value: Vec::new(),
                fencing_token: 0,
            })),
            _ => None,
        };
        futures::stream::unfold(
            (probe, None::<Option<Holder>>),
            |(probe, last)| async move {
                loop {
                    let now = probe();
                    if last.as_ref() != Some(&now) {
                        return Some((now.clone(), (probe, Some(now))));
                    }
                    tokio::time::sleep(POLL).await;
                }
            },
        )
        .boxed()
    }

    async fn take_slot(
        &self,
        name: &str,
        permits: u32,
        value: Vec<u8>,
        queue: &dyn HeldLock,
    ) -> Result<SlotTry, LockError> {
        sem::take(&self.dir, name, permits, queue.fencing_token(), &value)
    }

    async fn slot_freed(&self, _name: &str, _seen: u64) -> Result<(), LockError> {
        // flock tells no one when a lock is freed: look again soon (as a waiter does).
        tokio::time::sleep(POLL_HELD).await;
        Ok(())
    }

    async fn slot_holders(&self, name: &str) -> Result<Vec<Holder>, LockError> {
        Ok(sem::holders(&self.dir, name)?
            .into_iter()
            .map(|h| h.holder)
            .collect())
    }

    async fn register(&self, job: JobInfo) -> Result<Box<dyn Registration>, LockError> {
        let path = self
            .dir
            .join("jobs")
            .join(format!("{}.json", encode(&job.registry_key())));
        // Locked before it appears under its name, so it is never seen unlocked (stale) while
        // its process lives.
        let file = replace_file(&path, &job.to_bytes(), true)?;
        Ok(Box::new(FileRegistration {
            path,
            file: Some(file),
        }))
    }

    async fn running(&self) -> Result<Vec<JobInfo>, LockError> {
        Ok(scan_jobs(&self.dir.join("jobs"))?.0.into_values().collect())
    }

    fn watch_jobs(&self) -> BoxStream<'static, JobEvent> {
        let dir = self.dir.join("jobs");
        let initial = scan_jobs(&dir).map(|(live, _)| live).unwrap_or_default();
        let pending: std::collections::VecDeque<JobEvent> =
            initial.values().cloned().map(JobEvent::Started).collect();
        futures::stream::unfold(
            (dir, initial, pending),
            |(dir, mut known, mut pending)| async move {
                loop {
                    if let Some(event) = pending.pop_front() {
                        return Some((event, (dir, known, pending)));
                    }
                    tokio::time::sleep(POLL).await;
                    let Ok((live, stale)) = scan_jobs(&dir) else {
                        continue;
                    };
                    for (lock, job) in &known {
                        let same =
                            |j: &JobInfo| j.started_at_ms == job.started_at_ms && j.pid == job.pid;
                        if live.get(lock).is_some_and(same) {
                            continue;
                        }
                        if stale.get(lock).is_some_and(same) {
                            pending.push_back(JobEvent::Expired(job.clone()));
                        } else {
                            pending.push_back(JobEvent::Finished(job.clone()));
                        }
                    }
                    for (lock, job) in &live {
                        if known.get(lock) != Some(job) {
                            pending.push_back(JobEvent::Started(job.clone()));
                        }
                    }
                    known = live;
                }
            },
        )
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::flock::encode;

    #[test]
    fn names_become_safe_short_file_names() {
        assert_eq!(encode("daily_etl-2"), "daily_etl-2");
        assert_eq!(encode("a.b:c"), "a%2Eb%3Ac");
        assert_eq!(encode(".."), "%2E%2E");
        let long = "é".repeat(100);
        let (a, b) = (encode(&long), encode(&format!("{long}x")));
        assert!(a.len() <= 200 && b.len() <= 200);
        assert_ne!(a, b);
    }
}
