//! A sliding-log rate limit shared by the processes of one host through a file per key.
//!
//! Each decision locks the key's file (`flock`), drops the admissions older than the period,
//! admits if fewer than `max` remain, and records the admission: exact, like the Redis sliding
//! log, for every process that uses the same directory. Admission times are wall-clock
//! milliseconds (the only clock that processes share); a clock stepped backwards by more than a
//! period can delay admissions by that much, never admit too many.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// At most `max` admissions in any window of `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Admissions allowed per period.
    pub max: u32,
    /// The window length.
    pub period: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// `N/PERIOD`: `100/s`, `5/min`, `1000/1h`, `3/10s`.
    fn from_str(text: &str) -> Result<Rate, String> {
        let bad = || format!("expected N/PERIOD such as 100/s, 5/min or 3/10s, got {text:?}");
        let (max, period) = text.split_once('/').ok_or_else(bad)?;
        let max: u32 = max.trim().parse().map_err(|_| bad())?;
        if max == 0 {
            return Err(format!(
                "the rate {text:?} admits nothing: N must be at least 1"
            ));
        }
        let period = period.trim();
        let period = match period {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if period.is_zero() {
            return Err(format!("the period of {text:?} is zero"));
        }
        Ok(Rate { max, period })
    }
}

/// The pure decision: `log` holds admission times (ms), oldest first. Admits at `now` (and
/// records it) when fewer than `rate.max` fall within the last period; otherwise returns how
/// long until the oldest of them leaves the window.
pub fn decide(log: &mut Vec<u64>, now_ms: u64, rate: Rate) -> Result<(), Duration> {
    let period_ms = u64::try_from(rate.period.as_millis()).unwrap_or(u64::MAX);
    let window_start = now_ms.saturating_sub(period_ms);
    log.retain(|&t| t > window_start);
    if log.len() < rate.max as usize {
        log.push(now_ms);
        return Ok(());
    }
    let oldest = log[log.len() - rate.max as usize];
    Err(Duration::from_millis(
        (oldest + period_ms).saturating_sub(now_ms).max(1),
    ))
}

/// Rate limits kept in files under one directory.
#[derive(Debug, Clone)]
pub struct FileLimiter {
    dir: PathBuf,
}

impl FileLimiter {
    /// Limits under `dir/limits/` (created if missing).
    pub fn new(dir: &Path) -> std::io::Result<FileLimiter> {
        let dir = dir.join("limits");
        std::fs::create_dir_all(&dir)?;
        Ok(FileLimiter { dir })
    }

    /// One decision for `key` at the current wall-clock time (blocking: it takes a file lock).
    pub fn check(&self, key: &str, rate: Rate) -> std::io::Result<Result<(), Duration>> {
        let path = self.dir.join(file_name(key));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut file = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        let mut log = read_log(&mut file)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let decision = decide(&mut log, now, rate);
        if decision.is_ok() {
            write_log(&mut file, &log)?;
        }
        Ok(decision)
    }
}

fn read_log(file: &mut File) -> std::io::Result<Vec<u64>> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_string(&mut text)?;
    // A line that does not parse (a torn write from a crash) is dropped, never trusted.
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn write_log(file: &mut File, log: &[u64]) -> std::io::Result<()> {
    let text: String = log.iter().map(|t| format!("{t}\n")).collect();
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(text.as_bytes())
}

/// A file name for any key: safe characters kept, the rest hex-escaped.
fn file_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 4);
    for byte in key.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' => name.push(byte as char),
            _ => name.push_str(&format!("_{byte:02x}")),
        }
    }
    name.push_str(".log");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(text: &str) -> Rate {
        text.parse().expect("a valid rate")
    }

    #[test]
    fn rates_parse_with_units_and_durations() {
        assert_eq!(
            rate("100/s"),
            Rate {
                max: 100,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(
            rate("5/min"),
            Rate {
                max: 5,
                period: Duration::from_secs(60)
            }
        );
        assert_eq!(
            rate("3/10s"),
            Rate {
                max: 3,
                period: Duration::from_secs(10)
            }
        );
        assert_eq!(
            rate("1000/1h"),
            Rate {
                max: 1000,
                period: Duration::from_secs(3600)
            }
        );
        for bad in ["", "5", "0/s", "x/s", "5/", "5/fortnight", "5/0s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_log_admits_max_per_window_and_says_when_the_next_fits() {
        let r = rate("3/1s");
        let mut log = Vec::new();
        assert_eq!(decide(&mut log, 1000, r), Ok(()));
        assert_eq!(decide(&mut log, 1100, r), Ok(()));
        assert_eq!(decide(&mut log, 1200, r), Ok(()));
        assert_eq!(decide(&mut log, 1300, r), Err(Duration::from_millis(700)));
        assert_eq!(log.len(), 3, "a denial records nothing");
        // At 2000 the admission at 1000 has left the window (1000, 2000].
        assert_eq!(decide(&mut log, 2000, r), Ok(()));
        assert_eq!(decide(&mut log, 2001, r), Err(Duration::from_millis(99)));
    }

    #[test]
    fn processes_sharing_a_directory_share_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileLimiter::new(dir.path()).unwrap();
        let b = FileLimiter::new(dir.path()).unwrap();
        let r = rate("2/1h");
        assert!(a.check("api/key", r).unwrap().is_ok());
        assert!(b.check("api/key", r).unwrap().is_ok());
        assert!(a.check("api/key", r).unwrap().is_err());
        assert!(b.check("other", r).unwrap().is_ok(), "keys are independent");
    }

    #[test]
    fn keys_become_safe_file_names() {
        assert_eq!(file_name("a-b.c"), "a-b.c.log");
        assert_eq!(file_name("../x"), ".._2fx.log");
        assert!(!file_name("a/b").contains('/'));
    }
}
