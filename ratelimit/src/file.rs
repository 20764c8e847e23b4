//! The embedded multi-process default: the sliding log kept in one file per key, shared by
//! every process of one host that uses the same directory.
//!
//! Each decision takes an exclusive `flock` on the key's lock file (`<name>.lock`, never
//! replaced or removed, so every process locks the same inode), reads the key's log
//! (`<name>.slog`), decides with [`crate::algorithm::SlidingLog`] (the arithmetic the Redis
//! script runs too), and, if it admitted, writes the new log crash-safely: to `<name>.slog.tmp`,
//! `fsync`, `rename` over the log, `fsync` of the directory. A process killed at any point
//! leaves either the old log or the new one, never a torn one; a power loss after the decision
//! returned cannot lose it.
//!
//! Times are the host's wall clock in µs (the one clock all processes share); a clock stepped
//! back records new admissions at the newest recorded time, so it never admits too many.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::algorithm::{LogEntry, LogState, Params, SlidingLog, decide};
use crate::{Decision, Error, Limit, RateLimiter};

const HEADER: &str = "palisade-ratelimit sliding-log 1";
/// Escaped key names longer than this are cut and completed by a hash of the key.
const MAX_NAME: usize = 180;

/// An exact sliding-log limiter shared by the processes of one host through files in a
/// directory (one log and one lock file per key). Every process using the same directory and
/// key shares its count, as every process using the same Redis and prefix shares a
/// [`crate::RedisLimiter`]'s; and like there, `max` is not part of the stored state (a changed
/// `max` applies to the recorded history) while each window keeps its own log (a changed
/// window starts empty).
///
/// A decision costs a file lock, a read, and for an admission a write with two `fsync`s: about
/// a millisecond on a local disk. Decisions run on tokio's blocking pool. Dropping the future
/// of a decision that has started does not stop it: it may still be recorded.
#[derive(Debug, Clone)]
pub struct FileLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    limits: Vec<Limit>,
    params: Vec<Params>,
    reported: Vec<(u32, Duration)>,
    capacity: u32,
}

impl FileLimiter {
    /// One limit, in files under `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>, limit: Limit) -> Result<Self, Error> {
        Self::with_limits(dir, [limit])
    }

    /// Several limits decided together (admitted only if every limit admits; nothing recorded
    /// otherwise), in files under `dir` (created if missing). Two limits of one window are
    /// refused, as by [`crate::RedisLimiter`].
    pub fn with_limits(
        dir: impl Into<PathBuf>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Result<Self, Error> {
        let dir = dir.into();
        let limits: Vec<Limit> = limits.into_iter().collect();
        if limits.is_empty() {
            return Err(Error::InvalidConfig {
                field: "limits",
                reason: "is empty; give at least one limit".into(),
            });
        }
        for (i, a) in limits.iter().enumerate() {
            if limits[..i].iter().any(|b| b.window() == a.window()) {
                return Err(Error::InvalidConfig {
                    field: "limits",
                    reason: format!("has two limits with the window {:?}", a.window()),
                });
            }
        }
        std::fs::create_dir_all(&dir).map_err(|source| Error::File {
            path: dir.clone(),
            source,
        })?;
        let params = limits
            .iter()
            .map(|l| Params {
                max: l.max(),
                window_us: l.window_us(),
                burst: l.max(),
            })
            .collect();
        Ok(FileLimiter {
            inner: Arc::new(Inner {
                reported: limits.iter().map(|l| (l.max(), l.window())).collect(),
                capacity: limits.iter().map(Limit::max).min().unwrap_or(1),
                dir,
                limits,
                params,
            }),
        })
    }

    /// The limits decided together, in order.
    pub fn limits(&self) -> &[Limit] {
        &self.inner.limits
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Decides `n` units for `key` now, blocking on the key's file lock (the async
    /// [`RateLimiter`] methods run this on tokio's blocking pool). A cost of 0 is a peek.
    pub fn check_n_blocking(&self, key: &str, n: u32) -> Result<Decision, Error> {
        if n > self.inner.capacity {
            return Err(Error::CostExceedsLimit {
                cost: n,
                capacity: self.inner.capacity,
            });
        }
        let files = Files::of(&self.inner.dir, key);
        let _lock = files.lock()?;
        let mut sections = files.read(key)?;
        let now = now_us();
        let mut states: Vec<LogState> = self
            .inner
            .params
            .iter()
            .map(|p| sections.remove(&p.window_us).unwrap_or_default())
            .collect();
        let (allowed, verdicts) = decide::<SlidingLog>(&mut states, &self.inner.params, now, n);
        if allowed && n > 0 {
            for (p, state) in self.inner.params.iter().zip(states) {
                sections.insert(p.window_us, state);
            }
            files.write(key, &sections, now)?;
        }
        let server_time = Duration::from_micros(now.max(0) as u64);
        let decision =
            Decision::combine(allowed, &verdicts, &self.inner.reported, Some(server_time));
        if n > 0 {
            crate::stats::decided("file", n, &decision);
        }
        Ok(decision)
    }

    /// Clears `key` for every window (deletes its log under its lock), blocking.
    pub fn reset_blocking(&self, key: &str) -> Result<(), Error> {
        let files = Files::of(&self.inner.dir, key);
        let _lock = files.lock()?;
        match std::fs::remove_file(&files.log) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(files.error(e)),
            _ => files.sync_dir(),
        }
    }

    /// Clears `key` for every window (its next decision starts with an empty log).
    pub async fn reset(&self, key: &str) -> Result<(), Error> {
        let (this, key) = (self.clone(), key.to_owned());
        blocking(move || this.reset_blocking(&key)).await
    }
}

impl RateLimiter for FileLimiter {
    fn check_n(&self, key: &str, n: u32) -> impl Future<Output = Result<Decision, Error>> + Send {
        let (this, key) = (self.clone(), key.to_owned());
        blocking(move || this.check_n_blocking(&key, n))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Error::File {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        }),
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The file names of one key: its safe characters kept, every other byte `_xx` (so `_` itself
/// is escaped and the name is unambiguous); long names cut and completed by `~` and a 64-bit
/// FNV-1a hash of the key (the full key is in the file, and a mismatch is an error).
fn escape(key: &str) -> String {
    let mut name = String::with_capacity(key.len());
    for byte in key.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' => name.push(byte as char),
            _ => {
                let _ = write!(name, "_{byte:02x}");
            }
        }
    }
    name
}

fn file_stem(key: &str) -> String {
    let mut name = escape(key);
    if name.len() > MAX_NAME || name.is_empty() || name.starts_with('.') {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        name.truncate(MAX_NAME);
        let _ = write!(name, "~{hash:016x}");
    }
    name
}

/// The lock and log files of one key.
struct Files {
    dir: PathBuf,
    lock: PathBuf,
    log: PathBuf,
    tmp: PathBuf,
}

impl Files {
    fn of(dir: &Path, key: &str) -> Files {
        let stem = file_stem(key);
        Files {
            dir: dir.to_owned(),
            lock: dir.join(format!("{stem}.lock")),
            log: dir.join(format!("{stem}.slog")),
            tmp: dir.join(format!("{stem}.slog.tmp")),
        }
    }

    fn error(&self, source: std::io::Error) -> Error {
        Error::File {
            path: self.log.clone(),
            source,
        }
    }

    /// The exclusive lock, held until the returned file is dropped.
    fn lock(&self) -> Result<File, Error> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)
            .map_err(|e| self.error(e))?;
        file.lock().map_err(|e| self.error(e))?;
        Ok(file)
    }

    /// The log's sections, window (µs) → state; empty if there is no log yet.
    fn read(&self, key: &str) -> Result<BTreeMap<i64, LogState>, Error> {
        let text = match std::fs::read_to_string(&self.log) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.error(e)),
        };
        parse(&text, key).map_err(|why| {
            self.error(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("{why}; it was not written by this version of palisade-ratelimit (delete it to start the limit over)"),
            ))
        })
    }

    /// Replaces the log crash-safely, dropping entries that have left their window.
    fn write(&self, key: &str, sections: &BTreeMap<i64, LogState>, now: i64) -> Result<(), Error> {
        let mut text = format!("{HEADER}\nkey {}\n", escape(key));
        for (window, state) in sections {
            let live = state.entries.iter().filter(|e| e.at > now - window);
            let mut live = live.peekable();
            if live.peek().is_none() {
                continue;
            }
            let _ = writeln!(text, "window {window}");
            for e in live {
                let _ = writeln!(text, "{} {} {}", e.at, e.cost, e.end);
            }
        }
        let write = || -> std::io::Result<()> {
            let mut tmp = File::create(&self.tmp)?;
            tmp.write_all(text.as_bytes())?;
            tmp.sync_all()?;
            std::fs::rename(&self.tmp, &self.log)
        };
        write().map_err(|e| self.error(e))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), Error> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::File {
                path: self.dir.clone(),
                source,
            })
    }
}

/// Reads a log written by [`Files::write`]; any other content is refused, never guessed at.
fn parse(text: &str, key: &str) -> Result<BTreeMap<i64, LogState>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("it does not start with the expected header".into());
    }
    let escaped = escape(key);
    match lines.next().and_then(|l| l.strip_prefix("key ")) {
        Some(k) if k == escaped => {}
        Some(k) => return Err(format!("it holds the key {k:?}, not {escaped:?}")),
        None => return Err("it names no key".into()),
    }
    let mut sections = BTreeMap::new();
    let mut current: Option<&mut LogState> = None;
    for (i, line) in lines.enumerate() {
        let bad = || format!("line {} ({line:?}) is not understood", i + 3);
        if let Some(w) = line.strip_prefix("window ") {
            let w: i64 = w.parse().map_err(|_| bad())?;
            current = Some(sections.entry(w).or_insert_with(LogState::default));
            continue;
        }
        let mut fields = line.split(' ').map(str::parse::<i64>);
        let (Some(Ok(at)), Some(Ok(cost)), Some(Ok(end)), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad());
        };
        let state = current.as_deref_mut().ok_or_else(bad)?;
        let cost = u32::try_from(cost)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(bad)?;
        // The algorithm's invariants: times never go back, running totals strictly grow.
        let follows = state
            .entries
            .back()
            .is_none_or(|prev| at >= prev.at && end - i64::from(cost) >= prev.end);
        if !follows || end < i64::from(cost) {
            return Err(bad());
        }
        state.entries.push_back(LogEntry { at, cost, end });
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe_and_unambiguous() {
        assert_eq!(file_stem("a-b.c"), "a-b.c");
        assert_eq!(file_stem("a_b"), "a_5fb");
        assert_ne!(file_stem("a_5fb"), file_stem("a_b"));
        assert!(!file_stem("../x/y").contains('/'));
        assert!(file_stem("").starts_with('~'));
        assert!(file_stem(".hidden").starts_with(".hidden~"));
        let long = "k".repeat(500);
        let stem = file_stem(&long);
        assert!(stem.len() < 200 && stem.contains('~'), "{stem}");
        assert_ne!(stem, file_stem(&format!("{long}x")));
    }

    #[test]
    fn a_log_reads_back_as_written_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::of(dir.path(), "k");
        let mut sections = BTreeMap::new();
        let mut s = LogState::default();
        s.entries.push_back(LogEntry {
            at: 10,
            cost: 2,
            end: 2,
        });
        s.entries.push_back(LogEntry {
            at: 20,
            cost: 1,
            end: 3,
        });
        sections.insert(1_000, s);
        files.write("k", &sections, 15).unwrap();
        assert_eq!(files.read("k").unwrap(), sections);
        let err = files.read("other").unwrap_err().to_string();
        assert!(err.contains("not \"other\""), "{err}");
        let text = std::fs::read_to_string(&files.log).unwrap();
        std::fs::write(&files.log, text.replace("20 1 3", "5 1 3")).unwrap();
        let err = files.read("k").unwrap_err().to_string();
        assert!(err.contains("line 5"), "time going back: {err}");
        std::fs::write(&files.log, "1700000000000\n").unwrap();
        let err = files.read("k").unwrap_err().to_string();
        assert!(err.contains("delete it"), "{err}");
    }
}
