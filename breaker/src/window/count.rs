//! The count-based window: the outcomes of the last `n` calls, in a ring of atomic slots.
//!
//! Three kinds of atomics, each tagged with the window's generation (24 bits) so that a reset is
//! one store per word and a stale writer notices it:
//!
//! - `head`: generation | index of the next slot to write (40 bits). Before the window is full
//!   the index counts the calls it holds.
//! - `slots[i]`: generation | the [`Mark`](crate::machine::Mark) bits of the call stored there.
//!   A slot of another generation holds nothing (counts as a success).
//! - `agg`: generation | failures (20 bits) | slow calls (20 bits) among the slots of this
//!   generation, adjusted by the writer that changes a slot (modulo 2^20: see `count_value`).
//!
//! Invariant (at quiescence): `agg`'s counts equal the marks in the slots of `agg`'s generation.
//!
//! The hot path: a success into a full window that holds no failure and no slow call changes
//! nothing (the slot it would overwrite is a success too), so it only *reads* `agg` and `head`.
//! Those cache lines stay shared between cores, which is why the closed-state success costs a
//! few loads and scales across threads. Every other outcome claims a slot with a CAS on `head`,
//! swaps the slot, and adjusts `agg` with a CAS when the marks differ.

use crate::machine::WindowStats;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

const GEN_BITS: u32 = 24;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const IDX_BITS: u32 = 40;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
const CNT_BITS: u32 = 20;
const CNT_MASK: u64 = (1 << CNT_BITS) - 1;
const MARK_BITS: u32 = 8;

fn head_word(generation: u64, idx: u64) -> u64 {
    (generation << IDX_BITS) | (idx & IDX_MASK)
}

fn agg_word(generation: u64, failures: u64, slow: u64) -> u64 {
    (generation << (2 * CNT_BITS)) | ((failures & CNT_MASK) << CNT_BITS) | (slow & CNT_MASK)
}

fn agg_parts(a: u64) -> (u64, u64, u64) {
    (
        a >> (2 * CNT_BITS),
        (a >> CNT_BITS) & CNT_MASK,
        a & CNT_MASK,
    )
}

/// An aggregate count as a number of calls. The counts are kept modulo 2^20 because concurrent
/// writers may apply an eviction's -1 before the matching +1 of the write it evicted, so a count
/// can dip below zero for a moment; values in the upper half are such dips and read as zero.
/// (Windows are at most 2^18 calls, so real counts stay far below the upper half.)
fn count_value(raw: u64) -> u64 {
    if raw >= 1 << (CNT_BITS - 1) { 0 } else { raw }
}

/// The lock-free ring of the last `size` outcomes (public only for the loom tests).
#[derive(Debug)]
pub struct CountWindow {
    size: u64,
    head: AtomicU64,
    agg: AtomicU64,
    slots: Box<[AtomicU32]>,
}

impl CountWindow {
    /// An empty window of `size` slots (≤ 2^20 - 1) in `generation`.
    pub fn new(size: u32, generation: u64) -> Self {
        let g = generation & GEN_MASK;
        let slots = (0..size).map(|_| AtomicU32::new(0)).collect();
        CountWindow {
            size: u64::from(size.max(1)),
            head: AtomicU64::new(head_word(g, 0)),
            agg: AtomicU64::new(agg_word(g, 0, 0)),
            slots,
        }
    }

    /// Empties the window and makes `generation` the current one.
    ///
    /// Called with the breaker's control lock held, before the new state is published.
    pub fn reset(&self, generation: u64) {
        let g = generation & GEN_MASK;
        if g == 0 {
            // The generation counter wrapped: a slot written 2^24 generations ago would look
            // current, so clear them all (once every 16 million transitions).
            for s in self.slots.iter() {
                s.store(0, Ordering::Relaxed);
            }
        }
        // Swaps, not stores: every write to `head` and `agg` is then a read-modify-write, so the
        // writers' CASes and the reset are totally ordered (loom checks exactly this).
        self.agg.swap(agg_word(g, 0, 0), Ordering::AcqRel);
        self.head.swap(head_word(g, 0), Ordering::AcqRel);
    }

    /// Records the mark bits `mark` of one call in `generation`; see
    /// [`SlidingWindow::record`](super::SlidingWindow::record) for the result.
    #[inline]
    pub fn record(&self, generation: u64, mark: u8) -> Option<WindowStats> {
        let g = generation & GEN_MASK;
        if mark == 0 {
            let a = self.agg.load(Ordering::Acquire);
            let (ag, f, s) = agg_parts(a);
            if ag == g && f == 0 && s == 0 {
                let h = self.head.load(Ordering::Acquire);
                if h >> IDX_BITS == g && h & IDX_MASK >= self.size {
                    return None;
                }
            }
        }
        self.record_slow(g, mark)
    }

    #[inline(never)]
    fn record_slow(&self, g: u64, mark: u8) -> Option<WindowStats> {
        // Claim the next slot, unless a reset moved the window to another generation.
        let mut h = self.head.load(Ordering::Acquire);
        let idx = loop {
            if h >> IDX_BITS != g {
                return None;
            }
            match self.head.compare_exchange_weak(
                h,
                h.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break h & IDX_MASK,
                Err(actual) => h = actual,
            }
        };
        let calls = (idx + 1).min(self.size);
        let slot = &self.slots[(idx % self.size) as usize];
        let new = ((g as u32) << MARK_BITS) | u32::from(mark);
        let marks_of = |word: u32| {
            if u64::from(word >> MARK_BITS) == g {
                (word & 0xff) as u8
            } else {
                0
            }
        };
        let mut old = marks_of(slot.load(Ordering::Acquire));
        if old != mark {
            old = marks_of(slot.swap(new, Ordering::AcqRel));
        }
        let mut a = self.agg.load(Ordering::Acquire);
        if old != mark {
            let df = i64::from(mark & 1) - i64::from(old & 1);
            let ds = i64::from(mark >> 1 & 1) - i64::from(old >> 1 & 1);
            loop {
                let (ag, f, s) = agg_parts(a);
                if ag != g {
                    return None;
                }
                let nf = f.wrapping_add_signed(df) & CNT_MASK;
                let ns = s.wrapping_add_signed(ds) & CNT_MASK;
                let next = agg_word(g, nf, ns);
                match self
                    .agg
                    .compare_exchange_weak(a, next, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        a = next;
                        break;
                    }
                    Err(actual) => a = actual,
                }
            }
        }
        let (ag, failures, slow) = agg_parts(a);
        if ag != g {
            return None;
        }
        Some(WindowStats {
            calls,
            failures: count_value(failures).min(calls),
            slow: count_value(slow).min(calls),
        })
    }

    /// The window's counts now.
    pub fn snapshot(&self) -> WindowStats {
        let h = self.head.load(Ordering::Acquire);
        let a = self.agg.load(Ordering::Acquire);
        let g = h >> IDX_BITS;
        let calls = (h & IDX_MASK).min(self.size);
        let (ag, f, s) = agg_parts(a);
        if ag != g {
            return WindowStats {
                calls,
                failures: 0,
                slow: 0,
            };
        }
        WindowStats {
            calls,
            failures: count_value(f).min(calls),
            slow: count_value(s).min(calls),
        }
    }

    /// The raw words (head, aggregate, slots), for debugging the models.
    pub fn raw(&self) -> (u64, u64, Vec<u32>) {
        (
            self.head.load(Ordering::Acquire),
            self.agg.load(Ordering::Acquire),
            self.slots
                .iter()
                .map(|s| s.load(Ordering::Acquire))
                .collect(),
        )
    }

    /// Recounts the marks in the slots (for tests: at quiescence it equals [`snapshot`](Self::snapshot)'s
    /// failures and slow calls).
    pub fn recount(&self) -> (u64, u64) {
        let g = self.head.load(Ordering::Acquire) >> IDX_BITS;
        let mut f = 0;
        let mut s = 0;
        for slot in self.slots.iter() {
            let w = slot.load(Ordering::Acquire);
            if u64::from(w >> MARK_BITS) == g {
                f += u64::from(w & 1);
                s += u64::from(w >> 1 & 1);
            }
        }
        (f, s)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_n_outcomes() {
        let w = CountWindow::new(3, 0);
        assert_eq!(w.record(0, 1).map(|s| (s.calls, s.failures)), Some((1, 1)));
        assert_eq!(w.record(0, 0).map(|s| (s.calls, s.failures)), Some((2, 1)));
        assert_eq!(w.record(0, 0).map(|s| (s.calls, s.failures)), Some((3, 1)));
        // The failure leaves with the fourth call.
        assert_eq!(w.record(0, 0).map(|s| (s.calls, s.failures)), Some((3, 0)));
        // Clean and full: nothing to evaluate.
        assert_eq!(w.record(0, 0), None);
        assert_eq!(w.record(0, 2).map(|s| (s.calls, s.slow)), Some((3, 1)));
        assert_eq!(w.recount(), (0, 1));
        w.reset(1);
        assert_eq!(w.snapshot(), WindowStats::default());
        assert_eq!(w.record(0, 1), None, "a stale generation is dropped");
        assert_eq!(w.recount(), (0, 0));
    }
}
