//! The file backend's lowest layer: locking a file with `flock(2)` (and making sure it is still
//! the file at its path), the encoding of names into file names, whole-file replacement, the
//! probe of `/proc/locks`, and a held file lock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rustix::fs::{FlockOperation, flock};
use tokio::sync::OwnedMutexGuard;

use crate::backend::{HeldLock, Holder, LostSignalHandle, sealed::Sealed};
use crate::error::LockError;
use crate::session::{Liveness, LostSignal};

/// How often a holder checks that its lock file is still the one at the lock's path.
const CHECK_FILE: Duration = Duration::from_millis(100);

/// Opens the lock file at `path` and tries to `flock` it without blocking: `Some(file)` once
/// locked, `None` when another process holds it.
///
/// The lock is ours only if the file we locked is still the one at `path`: if it was deleted or
/// replaced between our open and our flock (a tmp cleaner, a previous holder's crash clean-up),
/// another process may lock the new file at the same time. So after locking, the inode of the
/// descriptor is compared with the inode at the path, and on a mismatch we start over.
pub(super) fn lock_current_file(path: &Path) -> Result<Option<File>, LockError> {
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

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A file name for `name`: percent-encoded, and shortened with a hash when it would not fit
/// in the 255 bytes most file systems allow (with room for the extensions).
pub(super) fn encode(name: &str) -> String {
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

pub(super) fn would_block(e: rustix::io::Errno) -> bool {
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
pub(super) fn replace_file(path: &Path, bytes: &[u8], lock_it: bool) -> Result<File, LockError> {
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
pub(super) fn is_locked(path: &Path) -> Result<Option<bool>, LockError> {
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
pub(super) fn is_locked(path: &Path) -> Result<Option<bool>, LockError> {
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

pub(super) fn read_holder(path: &Path) -> Option<Holder> {
    let bytes = std::fs::read(path).ok()?;
    let split = bytes.iter().position(|b| *b == b'\n')?;
    let token = std::str::from_utf8(&bytes[..split]).ok()?.parse().ok()?;
    Some(Holder {
        value: bytes[split + 1..].to_vec(),
        fencing_token: token,
    })
}

#[derive(Debug)]
pub(super) struct FileHeld {
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
    /// The lock held through `file` (locked, at `path`), whose holder file is `holder_path`;
    /// watched from now on so that it is lost if its file is deleted or replaced.
    pub(super) fn new(
        file: File,
        path: &Path,
        holder_path: PathBuf,
        token: u64,
        local: Option<OwnedMutexGuard<()>>,
    ) -> Result<Self, LockError> {
        let id = file_id(&file, path)?;
        let liveness = Liveness::child(&Liveness::forever());
        let watcher = tokio::spawn(watch_lock_file(id, path.to_path_buf(), liveness.clone()));
        Ok(FileHeld {
            file: Some(file),
            local,
            holder_path,
            token,
            lost: LostSignal(liveness),
            watcher,
            fd_shared: std::sync::atomic::AtomicBool::new(false),
        })
    }

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
