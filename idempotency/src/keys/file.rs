//! Run-once records in files on one host.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{Claim, IdempotencyStore, OwnerToken};
use crate::error::{Error, Result, io};
use crate::storage::{blocking, fsync_dir, remove_file_if_exists, write_synced};

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    key: String,
    state: State,
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<String>,
    /// Unix milliseconds.
    expires_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    InProgress,
    Completed,
}

/// Run-once records as files in a directory: the embedded default for jobs on one host (cron,
/// several processes). Records survive restarts.
///
/// Each key is one JSON file named by the BLAKE3 hash of the key; every operation holds an
/// exclusive `flock` on the key's lock file, and replaces the record by writing a staging file,
/// fsyncing it, renaming it and fsyncing the directory. Expiry uses the host's wall clock.
///
/// The directory does not grow with keys that are never used again: each call looks at a few
/// directory entries past the ones the previous call looked at (wrapping around), and removes
/// expired records with their lock files, lock files without a record, and staging files left by
/// a crash; [`purge_expired`](Self::purge_expired) does the same for every entry at once. An
/// entry whose key is busy is left for a later pass. A lock file is removed only while it is
/// locked, and every locker checks after locking that its file is still the one at the path, so
/// removing it never lets two holders in.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    lock_timeout: Duration,
    /// Where the next bounded sweep goes on reading the directory; shared by clones.
    sweep: Arc<Mutex<Option<std::fs::ReadDir>>>,
}

/// How many directory entries each call looks at besides its own key's files.
const SWEEP_PER_CALL: usize = 8;

/// Staging files of the old naming (`.tmp-<random>`, no key in the name) are removed once they
/// are this old: no write takes that long.
const LEGACY_TMP_AGE: Duration = Duration::from_secs(3600);

impl FileStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        Ok(Self {
            dir,
            lock_timeout: Duration::from_secs(10),
            sweep: Arc::default(),
        })
    }

    /// Removes expired records, with their lock files, and lock and staging files that no record
    /// needs (left behind by released keys and crashes); returns how many records. Keys that are
    /// busy at the moment are skipped. Calls do this for a few entries each as they go; this is
    /// for a full pass (from a maintenance job, say).
    pub async fn purge_expired(&self) -> Result<usize> {
        let dir = self.dir.clone();
        blocking(move || {
            let mut n = 0;
            let entries = std::fs::read_dir(&dir).map_err(io("list", &dir))?;
            for entry in entries {
                let entry = entry.map_err(io("list", &dir))?;
                if sweep_entry(&dir, &entry.file_name().to_string_lossy())? {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf, String) {
        let h = blake3::hash(key.as_bytes()).to_hex().to_string();
        (
            self.dir.join(format!("{h}.json")),
            self.dir.join(format!("{h}.lock")),
            h,
        )
    }

    /// Runs `f` on the key's record under the key's lock, after a bounded sweep.
    async fn locked<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(&Staging, &Path, Option<Record>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (record, lock, hash) = self.paths(key);
        let (dir, timeout, sweep) = (self.dir.clone(), self.lock_timeout, self.sweep.clone());
        blocking(move || {
            sweep_some(&dir, &sweep);
            let _guard = lock_key(&lock, timeout)?;
            let current = read(&record)?.filter(|r| r.expires_at_ms > now_ms());
            f(&Staging { dir, hash }, &record, current)
        })
        .await
    }
}

/// Where a key's record is staged before it is renamed into place: `.<hash>.<random>.tmp`, so a
/// sweep that holds the key's lock knows that such a file is left over.
struct Staging {
    dir: PathBuf,
    hash: String,
}

/// Looks at the next `SWEEP_PER_CALL` entries of the directory (see [`FileStore`]). Never fails
/// the call it runs in: what cannot be removed now is left for a later pass.
fn sweep_some(dir: &Path, cursor: &Mutex<Option<std::fs::ReadDir>>) {
    // Another thread of this process is sweeping: leave it to that one.
    let Ok(mut cursor) = cursor.try_lock() else {
        return;
    };
    for _ in 0..SWEEP_PER_CALL {
        if cursor.is_none() {
            match std::fs::read_dir(dir) {
                Ok(entries) => *cursor = Some(entries),
                Err(e) => {
                    debug!(dir = %dir.display(), error = %e, "cannot list the store for a sweep");
                    return;
                }
            }
        }
        let Some(entries) = cursor.as_mut() else {
            return;
        };
        match entries.next() {
            // The end of the directory: the next call starts a new pass.
            None => {
                *cursor = None;
                return;
            }
            Some(Err(e)) => debug!(dir = %dir.display(), error = %e, "sweep: cannot read an entry"),
            Some(Ok(entry)) => {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Err(e) = sweep_entry(dir, &name) {
                    debug!(file = %name, error = %e, "sweep: left for a later pass");
                }
            }
        }
    }
}

/// Removes the directory entry `name` if it is no longer needed: an expired record (with its
/// lock file), a lock file without a record, a staging file left by a crash. Returns whether it
/// removed a record. Busy keys are left alone.
fn sweep_entry(dir: &Path, name: &str) -> Result<bool> {
    let (hash, kind) = if let Some(h) = name.strip_suffix(".json") {
        (h, Kind::Record)
    } else if let Some(h) = name.strip_suffix(".lock") {
        (h, Kind::Lock)
    } else if let Some(h) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(|n| n.split_once('.'))
        .map(|(h, _)| h)
    {
        (h, Kind::Staging)
    } else if name.starts_with(".tmp-") {
        let path = dir.join(name);
        let old = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > LEGACY_TMP_AGE);
        if old {
            remove_file_if_exists(&path)?;
        }
        return Ok(false);
    } else {
        return Ok(false);
    };
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(false); // not ours
    }
    let lock = dir.join(format!("{hash}.lock"));
    let Some(held) = try_lock_key(&lock)? else {
        return Ok(false); // busy: a later pass
    };
    let record = dir.join(format!("{hash}.json"));
    let mut purged = false;
    match kind {
        Kind::Staging => remove_file_if_exists(&dir.join(name))?,
        Kind::Record => {
            // A record that cannot be read is left for an operator (its error says what to do).
            if let Ok(Some(r)) = read(&record)
                && r.expires_at_ms <= now_ms()
            {
                remove_file_if_exists(&record)?;
                purged = true;
            }
        }
        Kind::Lock => {}
    }
    if !record.exists() {
        // Still locked: whoever waits on this file finds it gone after locking, and starts over.
        remove_lock_file(&lock)?;
    }
    drop(held);
    Ok(purged)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Record,
    Lock,
    Staging,
}

/// Takes the key's lock, waiting up to `timeout`: the lock file at `path`, checked after locking
/// to still be the file at `path` (a sweep may have removed it meanwhile; then it starts over).
fn lock_key(path: &Path, timeout: Duration) -> Result<File> {
    let start = std::time::Instant::now();
    loop {
        let file = open_lock_file(path)?;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    if start.elapsed() >= timeout {
                        return Err(Error::LockTimeout {
                            path: path.to_path_buf(),
                            waited: start.elapsed(),
                        });
                    }
                    // A blocking-pool thread; operations hold this lock for milliseconds.
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(TryLockError::Error(e)) => return Err(io("lock", path)(e)),
            }
        }
        if still_at(&file, path)? {
            return Ok(file);
        }
    }
}

/// Takes the key's lock if it is free now.
fn try_lock_key(path: &Path) -> Result<Option<File>> {
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => return Err(io("lock", path)(e)),
    }
    Ok(still_at(&file, path)?.then_some(file))
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("open lock file", path))
}

/// Whether `file` is still the file at `path`.
#[cfg(unix)]
fn still_at(file: &File, path: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = file.metadata().map_err(io("stat lock file", path))?;
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.dev() == held.dev() && m.ino() == held.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("stat lock file", path)(e)),
    }
}

/// Lock files are never removed where identity cannot be checked, so the file is always the one.
#[cfg(not(unix))]
fn still_at(_file: &File, _path: &Path) -> Result<bool> {
    Ok(true)
}

/// Removes a lock file its caller holds locked (only where lockers check identity).
fn remove_lock_file(path: &Path) -> Result<()> {
    if cfg!(unix) {
        remove_file_if_exists(path)?;
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<Option<Record>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Serialization {
                    what: "an idempotency record (delete the file to reset the key)",
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

fn write(staging: &Staging, path: &Path, r: &Record) -> Result<()> {
    let bytes = serde_json::to_vec(r).map_err(|source| Error::Serialization {
        what: "an idempotency record",
        source,
    })?;
    let tmp = staging.dir.join(format!(
        ".{}.{:016x}.tmp",
        staging.hash,
        rand::random::<u64>()
    ));
    write_synced(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    fsync_dir(&staging.dir)
}

#[async_trait]
impl IdempotencyStore for FileStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<Claim> {
        let (key_s, fp) = (key.to_string(), fingerprint.to_string());
        self.locked(key, move |dir, path, current| {
            match current {
                Some(r) if r.state == State::InProgress => {
                    return Ok(Claim::InProgress {
                        fingerprint: r.fingerprint,
                    });
                }
                Some(r) => {
                    return Ok(Claim::Completed {
                        fingerprint: r.fingerprint,
                        result: r.result.unwrap_or_default(),
                    });
                }
                None => {}
            }
            let owner = OwnerToken::random();
            write(
                dir,
                path,
                &Record {
                    key: key_s,
                    state: State::InProgress,
                    fingerprint: fp,
                    owner: Some(owner.as_str().to_string()),
                    result: None,
                    expires_at_ms: now_ms() + in_progress_ttl.as_millis() as u64,
                },
            )?;
            Ok(Claim::Acquired(owner))
        })
        .await
    }

    async fn complete(
        &self,
        key: &str,
        owner: &OwnerToken,
        result: &str,
        ttl: Duration,
    ) -> Result<()> {
        let (key_s, owner, result) = (key.to_string(), owner.clone(), result.to_string());
        self.locked(key, move |dir, path, current| match current {
            Some(r)
                if r.state == State::InProgress && r.owner.as_deref() == Some(owner.as_str()) =>
            {
                write(
                    dir,
                    path,
                    &Record {
                        key: r.key,
                        state: State::Completed,
                        fingerprint: r.fingerprint,
                        // Kept so that the owner's retry of this complete succeeds.
                        owner: r.owner,
                        result: Some(result),
                        expires_at_ms: now_ms() + ttl.as_millis() as u64,
                    },
                )
            }
            // This owner completed it already: a retry of a complete that was applied.
            Some(r)
                if r.state == State::Completed && r.owner.as_deref() == Some(owner.as_str()) =>
            {
                Ok(())
            }
            _ => Err(Error::OwnershipLost { key: key_s }),
        })
        .await
    }

    async fn extend(&self, key: &str, owner: &OwnerToken, ttl: Duration) -> Result<bool> {
        let owner = owner.clone();
        self.locked(key, move |dir, path, current| match current {
            Some(mut r)
                if r.state == State::InProgress && r.owner.as_deref() == Some(owner.as_str()) =>
            {
                r.expires_at_ms = now_ms() + ttl.as_millis() as u64;
                write(dir, path, &r).map(|()| true)
            }
            _ => Ok(false),
        })
        .await
    }

    async fn release(&self, key: &str, owner: &OwnerToken) -> Result<()> {
        let owner = owner.clone();
        self.locked(key, move |_dir, path, current| match current {
            Some(r)
                if r.state == State::InProgress && r.owner.as_deref() == Some(owner.as_str()) =>
            {
                remove_file_if_exists(path)
            }
            _ => Ok(()),
        })
        .await
    }
}
