//! The time-based window: per-second buckets in a ring of `secs` buckets.
//!
//! Each bucket holds three counters (calls, failures, slow calls); each counter is one atomic word
//! tagged with the second it counts (32 bits: second + 1, 0 = empty) and the count (32 bits).
//! A writer increments the counter if its tag is the current second and replaces it with a count
//! of 1 if the tag is older, so stale buckets are recycled without a lock. The window at second
//! `t` is the sum of the counters whose tag is one of the seconds `t - secs + 1 ..= t`.
//!
//! `last_bad` (second + 1 of the latest failure or slow call) lets a success skip the evaluation
//! when no failure or slow call is left in the window.

use std::time::Duration;

use crate::machine::WindowStats;
use crate::sync::{AtomicU64, Ordering};

#[derive(Debug)]
struct Bucket {
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

/// The lock-free per-second window (public only for the loom tests).
#[derive(Debug)]
pub struct TimeWindow {
    secs: u64,
    generation: AtomicU64,
    last_bad: AtomicU64,
    buckets: Box<[Bucket]>,
}

fn tag_of(second: u64) -> u64 {
    (second + 1) & 0xffff_ffff
}

/// Adds one to `word` for the second tagged `tag`.
fn bump(word: &AtomicU64, tag: u64) {
    let mut w = word.load(Ordering::Acquire);
    loop {
        let (t, c) = (w >> 32, w & 0xffff_ffff);
        let next = if t == tag {
            (tag << 32) | (c + 1).min(0xffff_ffff)
        } else if t < tag {
            (tag << 32) | 1
        } else {
            // The bucket already counts a later second: this call is older than the whole
            // window by now.
            return;
        };
        match word.compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(actual) => w = actual,
        }
    }
}

fn count_at(word: &AtomicU64, tag: u64) -> u64 {
    let w = word.load(Ordering::Acquire);
    if w >> 32 == tag { w & 0xffff_ffff } else { 0 }
}

impl TimeWindow {
    /// An empty window of `secs` one-second buckets in `generation`.
    pub fn new(secs: u64, generation: u64) -> Self {
        let secs = secs.max(1);
        let buckets = (0..secs)
            .map(|_| Bucket {
                calls: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                slow: AtomicU64::new(0),
            })
            .collect();
        TimeWindow {
            secs,
            generation: AtomicU64::new(generation),
            last_bad: AtomicU64::new(0),
            buckets,
        }
    }

    /// Empties the window and makes `generation` the current one (with the control lock held).
    pub fn reset(&self, generation: u64) {
        // Invalidate first, so that writers of the old generation stop before the clear.
        // Swaps rather than stores, so that they are totally ordered with the writers' CASes.
        self.generation.swap(u64::MAX, Ordering::AcqRel);
        for b in self.buckets.iter() {
            b.calls.swap(0, Ordering::AcqRel);
            b.failures.swap(0, Ordering::AcqRel);
            b.slow.swap(0, Ordering::AcqRel);
        }
        self.last_bad.swap(0, Ordering::AcqRel);
        self.generation.swap(generation, Ordering::AcqRel);
    }

    /// Records the mark bits `mark` of one call that ended at `now`.
    pub fn record(&self, generation: u64, mark: u8, now: Duration) -> Option<WindowStats> {
        if self.generation.load(Ordering::Acquire) != generation {
            return None;
        }
        let sec = now.as_secs();
        let tag = tag_of(sec);
        let b = &self.buckets[(sec % self.secs) as usize];
        bump(&b.calls, tag);
        if mark & 1 != 0 {
            bump(&b.failures, tag);
        }
        if mark & 2 != 0 {
            bump(&b.slow, tag);
        }
        if mark != 0 {
            self.last_bad.fetch_max(sec + 1, Ordering::AcqRel);
        } else {
            let lb = self.last_bad.load(Ordering::Acquire);
            if lb == 0 || lb + self.secs <= sec + 1 {
                return None;
            }
        }
        Some(self.snapshot(now))
    }

    /// The window's counts at `now`.
    pub fn snapshot(&self, now: Duration) -> WindowStats {
        let sec = now.as_secs();
        let mut stats = WindowStats::default();
        for (i, b) in self.buckets.iter().enumerate() {
            // The one second in (sec - secs, sec] that lands in bucket i.
            let back = (sec % self.secs + self.secs - i as u64) % self.secs;
            let Some(s) = sec.checked_sub(back) else {
                continue;
            };
            let tag = tag_of(s);
            stats.calls += count_at(&b.calls, tag);
            stats.failures += count_at(&b.failures, tag);
            stats.slow += count_at(&b.slow, tag);
        }
        stats
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn forgets_buckets_older_than_the_window() {
        let w = TimeWindow::new(3, 0);
        w.record(0, 1, s(0));
        w.record(0, 0, s(1));
        w.record(0, 0, Duration::from_millis(2500));
        let at = |t| {
            let st = w.snapshot(s(t));
            (st.calls, st.failures)
        };
        assert_eq!(at(2), (3, 1));
        assert_eq!(at(3), (2, 0), "second 0 has left a 3 s window at t = 3 s");
        assert_eq!(at(4), (1, 0));
        assert_eq!(at(5), (0, 0));
        // A bucket is recycled by a later second.
        w.record(0, 0, s(3));
        assert_eq!(at(3), (3, 0));
    }
}
