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
use tokio::sync::OwnedMutexGuard;

use crate::backend::{
    HeldLock, Holder, Kind, LockBackend, LostSignalHandle, Registration, Wait, sealed::Sealed,
};
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};
use crate::session::{Liveness, LostSignal, Session};

/// How often `observe` and the registry `watch` look at the files.
const POLL: Duration = Duration::from_millis(100);

/// The longest pause between two tries of a waiter whose lock another process holds (the
/// latency of a hand-over between processes is at most this).
const POLL_HELD: Duration = Duration::from_millis(20);

/// How often a holder checks that its lock file is still the one at the lock's path.
const CHECK_FILE: Duration = Duration::from_millis(100);

/// Opens the lock file at `path` and tries to `flock` it without blocking: `Some(file)` once
/// locked, `None` when another process holds it.
///
/// The lock is ours only if the file we locked is still the one at `path`: if it was deleted or
/// replaced between our open and our flock (a tmp cleaner, a previous holder's crash clean-up),
/// another process may lock the new file at the same time. So after locking, the inode of the
/// descriptor is compared with the inode at the path, and on a mismatch we start over.
fn lock_current_file(path: &Path) -> Result<Option<File>, LockError> {
    loop {
        let file = open_rw(path)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if would_block(e) => return Ok(None),
            Err(e) => return Err(LockError::io("flock", path, e.into())),
        }
        if same_file(&file, path)? {
            return Ok(Some(file));
        }
    }
}

/// The device and inode of an open file.
fn file_id(file: &File, path: &Path) -> Result<(u64, u64), LockError> {
    use std::os::unix::fs::MetadataExt;
    let meta = file
        .metadata()
        .map_err(|e| LockError::io("stat", path, e))?;
    Ok((meta.dev(), meta.ino()))
}

/// Whether `path` still names the file open as `file`.
fn same_file(file: &File, path: &Path) -> Result<bool, LockError> {
    path_names(path, file_id(file, path)?)
}

/// Whether `path` names the file `(dev, ino)`.
fn path_names(path: &Path, id: (u64, u64)) -> Result<bool, LockError> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(now) => Ok((now.dev(), now.ino()) == id),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(LockError::io("stat", path, e)),
    }
}

/// Marks a held file lock lost once its file is no longer the one at its path (deleted or
/// replaced under the holder): from then on another process can lock the new file, so this
/// holder must stop, as an etcd holder whose key was deleted does. Checked every
/// [`CHECK_FILE`]: that is how long two holders can overlap after such a deletion.
async fn watch_lock_file(id: (u64, u64), path: PathBuf, liveness: Arc<Liveness>) {
    loop {
        tokio::time::sleep(CHECK_FILE).await;
        if !path_names(&path, id).unwrap_or(true) {
            tracing::warn!(path = %path.display(), "the lock file was deleted or replaced: lock lost");
            liveness.mark_lost();
            return;
        }
    }
}

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

/// Whether some process holds a `flock` on `path`; `None` if the file does not exist.
///
/// On Linux it reads the kernel's table of locks (`/proc/locks`) and takes no lock itself: a
/// probe that took even a shared `flock` for an instant would make a concurrent `try_lock` of a
/// free lock fail (`palisade jobs` or `observe()` polling beside a job that takes the lock).
#[cfg(target_os = "linux")]
fn is_locked(path: &Path) -> Result<Option<bool>, LockError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LockError::io("stat", path, e)),
    };
    let locks = Path::new("/proc/locks");
    let table = std::fs::read_to_string(locks).map_err(|e| LockError::io("read", locks, e))?;
    Ok(Some(flock_listed(&table, meta.dev(), meta.ino())))
}

/// Whether `/proc/locks` (`table`) lists a granted `flock` on the file `(dev, ino)`. A line is
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:393219 0 EOF`; a blocked request has `->` after the
/// number and is not counted.
#[cfg(target_os = "linux")]
fn flock_listed(table: &str, dev: u64, ino: u64) -> bool {
    // The kernel prints MAJOR(dev):MINOR(dev):inode, the device numbers in hex; glibc's encoding
    // of st_dev splits them like this.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{ino}");
    table.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some("FLOCK") && fields.nth(3) == Some(id.as_str())
    })
}

/// Whether some process holds a `flock` on `path` (probed with a non-blocking shared lock that
/// is dropped at once). `None` if the file does not exist.
#[cfg(not(target_os = "linux"))]
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
struct FileHeld {
    // Field order matters: the holder file is removed in `release` before the flock (the file)
    // and then the in-process queue slot are let go.
    file: Option<File>,
    local: Option<OwnedMutexGuard<()>>,
    holder_path: PathBuf,
    token: u64,
    lost: LostSignal,
    /// Watches that the lock file stays in place (see [`watch_lock_file`]).
    watcher: tokio::task::JoinHandle<()>,
    /// The descriptor was handed out ([`HeldLock::lock_fd`]): release only closes it.
    fd_shared: std::sync::atomic::AtomicBool,
}

impl FileHeld {
    /// Lets the lock go. Unless its descriptor was handed out ([`HeldLock::lock_fd`]), the open
    /// file description is unlocked (`LOCK_UN`) before it is closed, so that a process forked
    /// meanwhile (Python's `multiprocessing`, Celery's prefork) that inherited the descriptor
    /// by accident does not keep the lock after its holder let it go. A descriptor handed out on
    /// purpose (`palisade run` passes it to its command, as flock(1) does) is only closed: the
    /// lock stays held until the last process that has it is gone.
    fn release_now(&mut self) {
        self.watcher.abort();
        if let Some(file) = self.file.take() {
            let _ = std::fs::remove_file(&self.holder_path);
            if !self.fd_shared.load(std::sync::atomic::Ordering::Acquire) {
                let _ = flock(&file, FlockOperation::Unlock);
            }
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

impl Sealed for FileHeld {}

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
        // Handed out: a process given it keeps the lock (see `release_now`).
        self.fd_shared
            .store(true, std::sync::atomic::Ordering::Release);
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
        let id = file_id(&file, &path)?;
        let liveness = Liveness::child(&Liveness::forever());
        let watcher = tokio::spawn(watch_lock_file(id, path, liveness.clone()));
        Ok(Box::new(FileHeld {
            file: Some(file),
            local: Some(local),
            holder_path: self.holder_path(kind, name),
            token,
            lost: LostSignal(liveness),
            watcher,
            fd_shared: std::sync::atomic::AtomicBool::new(false),
        }))
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
