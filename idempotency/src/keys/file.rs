//! Run-once records in files on one host.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Claim, IdempotencyStore, OwnerToken};
use crate::error::{Error, Result, io};
use crate::storage::{blocking, fsync_dir, lock_exclusive, remove_file_if_exists, write_synced};

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
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    lock_timeout: Duration,
}

impl FileStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        Ok(Self {
            dir,
            lock_timeout: Duration::from_secs(10),
        })
    }

    /// Removes expired records; returns how many.
    pub async fn purge_expired(&self) -> Result<usize> {
        let dir = self.dir.clone();
        let timeout = self.lock_timeout;
        blocking(move || {
            let mut n = 0;
            let entries = std::fs::read_dir(&dir).map_err(io("list", &dir))?;
            let now = now_ms();
            for entry in entries {
                let entry = entry.map_err(io("list", &dir))?;
                let name = entry.file_name().to_string_lossy().to_string();
                let Some(stem) = name.strip_suffix(".json") else {
                    continue;
                };
                let _lock = lock_exclusive(&dir.join(format!("{stem}.lock")), timeout)?;
                if let Some(r) = read(&entry.path())?
                    && r.expires_at_ms <= now
                {
                    remove_file_if_exists(&entry.path())?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        let h = blake3::hash(key.as_bytes()).to_hex();
        (
            self.dir.join(format!("{h}.json")),
            self.dir.join(format!("{h}.lock")),
        )
    }

    /// Runs `f` on the key's record under the key's lock.
    async fn locked<T: Send + 'static>(
        &self,
        key: &str,
        f: impl FnOnce(&Path, &Path, Option<Record>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (record, lock) = self.paths(key);
        let (dir, timeout) = (self.dir.clone(), self.lock_timeout);
        blocking(move || {
            let _guard = lock_exclusive(&lock, timeout)?;
            let current = read(&record)?.filter(|r| r.expires_at_ms > now_ms());
            f(&dir, &record, current)
        })
        .await
    }
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

fn write(dir: &Path, path: &Path, r: &Record) -> Result<()> {
    let bytes = serde_json::to_vec(r).map_err(|source| Error::Serialization {
        what: "an idempotency record",
        source,
    })?;
    let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
    write_synced(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    fsync_dir(dir)
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
                        owner: None,
                        result: Some(result),
                        expires_at_ms: now_ms() + ttl.as_millis() as u64,
                    },
                )
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
