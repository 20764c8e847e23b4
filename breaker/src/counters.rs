//! Lifetime counters (calls by outcome since the breaker was created), striped per thread.
//!
//! Each thread increments the counters of its own cache-line-sized stripe, so two threads
//! calling one breaker do not bounce a shared line between their cores; a reader sums the
//! stripes. No increment is lost: every stripe counter is an atomic.

use std::cell::Cell;
use std::sync::atomic::AtomicUsize;

use crate::sync::{AtomicU64, Ordering};

const STRIPES: usize = 16;

/// One outcome kind counted for the whole life of a breaker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Success = 0,
    Failure = 1,
    Slow = 2,
    Ignored = 3,
    Rejected = 4,
}

#[derive(Debug)]
#[repr(align(128))]
struct Stripe {
    counts: [AtomicU64; 5],
}

#[derive(Debug)]
pub(crate) struct Counters {
    stripes: Box<[Stripe]>,
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn stripe_index() -> usize {
    STRIPE.with(|s| {
        let i = s.get();
        if i != usize::MAX {
            i
        } else {
            let i = NEXT_THREAD.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % STRIPES;
            s.set(i);
            i
        }
    })
}

impl Counters {
    pub(crate) fn new() -> Self {
        let stripes = (0..STRIPES)
            .map(|_| Stripe {
                counts: std::array::from_fn(|_| AtomicU64::new(0)),
            })
            .collect();
        Counters { stripes }
    }

    #[inline]
    pub(crate) fn add(&self, counter: Counter) {
        self.stripes[stripe_index()].counts[counter as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self, counter: Counter) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.counts[counter as usize].load(Ordering::Relaxed))
            .sum()
    }
}
