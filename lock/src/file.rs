//! The one-host backend: `flock(2)` on a file per name.
//!
//! Layout under the lock directory:
//! - `lock/<name>.lock`, `election/<name>.lock`: the file that is `flock`ed; it holds the fencing
//!   counter (a decimal number, rewritten and fsynced under the lock by every new holder).
//! - `lock/<name>.holder`: the holder's token and value, replaced atomically (rename) after
//!   acquiring and removed before releasing.
//! - `jobs/<name>.json`: a running job, `flock`ed by its process while it runs, so an entry whose
//!   file is not locked belongs to a dead process.
//!
//! Names are percent-encoded into file names.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use rustix::fs::{FlockOperation, flock};
use tokio::sync::{OwnedMutexGuard, oneshot};

use crate::backend::{HeldLock, Holder, Kind, LockBackend, LostSignalHandle, Registration};
use crate::coordinator::Wait;
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::{LostSignal, Session};

/// How often `observe` and the registry `watch` look at the files.
const POLL: Duration = Duration::from_millis(100);

/// The in-process FIFO queue of one name.
type LocalQueue = Arc<tokio::sync::Mutex<()>>;

/// Registry entries by lock name.
type Jobs = BTreeMap<String, JobInfo>;

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

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

/// A file name for `name`: percent-encoded, and shortened with a hash when it would not fit
/// in the 255 bytes most file systems allow (with room for the extensions).
fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > 200 {
        let hash = blake3::hash(name.as_bytes()).to_hex();
        let mut cut = 120;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out = format!("{}~{}", &out[..cut], &hash[..32]);
    }
    out
}

fn kind_dir(kind: Kind) -> &'static str {
    match kind {
        Kind::Lock => "lock",
        Kind::Election => "election",
    }
}

fn would_block(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::AGAIN
}

fn open_rw(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| LockError::io("open", path, e))
}

/// Writes `bytes` to a temporary file next to `path` and renames it into place, so readers see
/// the old content or the new, never a part. Returns the (still open) new file. Not fsynced:
/// holder and registry files describe live processes and mean nothing after a crash.
fn replace_file(path: &Path, bytes: &[u8], lock_it: bool) -> Result<File, LockError> {
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = File::create(&tmp).map_err(|e| LockError::io("create", &tmp, e))?;
    if lock_it {
        flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| LockError::io("flock", &tmp, e.into()))?;
    }
    file.write_all(bytes)
        .map_err(|e| LockError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| LockError::io("rename", path, e))?;
    Ok(file)
}

/// Whether some process holds a `flock` on `path` (probed with a non-blocking shared lock that
/// is dropped at once). `None` if the file does not exist.
fn is_locked(path: &Path) -> Result<Option<bool>, LockError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LockError::io("open", path, e)),
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => Ok(Some(false)),
        Err(e) if would_block(e) => Ok(Some(true)),
        Err(e) => Err(LockError::io("flock", path, e.into())),
    }
}

fn read_holder(path: &Path) -> Option<Holder> {
    let bytes = std::fs::read(path).ok()?;
    let split = bytes.iter().position(|b| *b == b'\n')?;
    let token = std::str::from_utf8(&bytes[..split]).ok()?.parse().ok()?;
    Some(Holder {
        value: bytes[split + 1..].to_vec(),
        fencing_token: token,
    })
}

impl FileBackend {
    pub(crate) fn open(dir: PathBuf) -> Result<Self, LockError> {
        for sub in ["lock", "election", "jobs"] {
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
            .and_then(|h| JobInfo::from_holder_value(&h.value));
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
            "" => 0,
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
struct FileHeld {
    // Field order matters: the holder file is removed in `release` before the flock (the file)
    // and then the in-process queue slot are let go.
    file: Option<File>,
    local: Option<OwnedMutexGuard<()>>,
    holder_path: PathBuf,
    token: u64,
    lost: LostSignal,
}

impl FileHeld {
    fn release_now(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = std::fs::remove_file(&self.holder_path);
            // Closing, not `LOCK_UN`: a child process that inherited the descriptor (`palisade
            // run` passes it on, as flock(1) does) shares the open file description, and the
            // lock must stay held until the last process that has it is gone.
            drop(file);
        }
        self.local.take();
    }
}

impl Drop for FileHeld {
    fn drop(&mut self) {
        self.release_now();
    }
}

#[async_trait]
impl HeldLock for FileHeld {
    fn fencing_token(&self) -> u64 {
        self.token
    }
    fn lost_signal(&self) -> LostSignalHandle {
        LostSignalHandle(self.lost.clone())
    }
    async fn release(mut self: Box<Self>) -> Result<(), LockError> {
        self.release_now();
        Ok(())
    }
    fn release_in_background(mut self: Box<Self>) {
        self.release_now();
    }
    fn lock_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.file.as_ref().map(File::as_raw_fd)
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
        let Ok(job) = JobInfo::from_bytes("job entry", &bytes) else {
            continue;
        };
        match is_locked(&path)? {
            Some(true) => {
                live.insert(job.lock.clone(), job);
            }
            Some(false) => {
                stale.insert(job.lock.clone(), job);
            }
            None => {}
        }
    }
    Ok((live, stale))
}

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
        let file = open_rw(&path)?;
        let file = match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => file,
            Err(e) if would_block(e) => {
                if wait == Wait::No {
                    return Err(self.held_error(kind, name));
                }
                // Another process holds it: block in a thread of our own (not tokio's blocking
                // pool, which a runtime waits for on shutdown). If we stop waiting, the thread
                // still takes the lock when it comes, finds nobody to hand it to and drops it.
                let (tx, rx) = oneshot::channel();
                let path2 = path.clone();
                std::thread::spawn(move || {
                    let result = flock(&file, FlockOperation::LockExclusive)
                        .map(|()| file)
                        .map_err(|e| LockError::io("flock", &path2, e.into()));
                    let _ = tx.send(result);
                });
                let result = match wait {
                    Wait::Up(d) => {
                        let left = d.saturating_sub(started.elapsed());
                        tokio::time::timeout(left, rx)
                            .await
                            .map_err(|_| timeout_err(d))?
                    }
                    _ => rx.await,
                };
                result.map_err(|_| LockError::Lost)??
            }
            Err(e) => return Err(LockError::io("flock", &path, e.into())),
        };
        drop(waiting);
        let token = self.take_over(kind, name, &file, &value)?;
        Ok(Box::new(FileHeld {
            file: Some(file),
            local: Some(local),
            holder_path: self.holder_path(kind, name),
            token,
            lost: LostSignal::never(),
        }))
    }

    async fn holder(&self, kind: Kind, name: &str) -> Result<Option<Holder>, LockError> {
        self.current_holder(kind, name)
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

    async fn register(&self, job: JobInfo) -> Result<Box<dyn Registration>, LockError> {
        let path = self
            .dir
            .join("jobs")
            .join(format!("{}.json", encode(&job.lock)));
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
    use super::encode;

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
