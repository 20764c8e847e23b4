//! Lifetime counters (calls by outcome since the breaker was created), without a locked
//! instruction on the hot path.
//!
//! Each thread that settles calls on a breaker gets its own block of counters (one cache line),
//! registered once with the breaker. A block has a single writer at a time, the thread that owns
//! it, so an increment is a plain load and store of an atomic (no `lock` prefix, no shared cache
//! line); readers sum the blocks. When a thread exits, its blocks are released (`in_use` false,
//! with release ordering after the last increment) and a later thread takes them over with
//! acquire ordering, so counts survive their threads and the number of blocks stays bounded by
//! the number of threads using the breaker at once.
//!
//! No increment is lost: a block is only written by the thread that holds it, and a thread that
//! cannot reach its thread-local cache (during its own teardown) uses a shared block with atomic
//! read-modify-write increments.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How many breakers one thread keeps a block for before releasing the least recently added one.
const CACHE_ENTRIES: usize = 16;

/// One outcome kind counted for the whole life of a breaker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Success = 0,
    Failure = 1,
    Slow = 2,
    Ignored = 3,
    Rejected = 4,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Block {
    counts: [AtomicU64; 5],
    in_use: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct Counters {
    id: u64,
    blocks: Mutex<Vec<Arc<Block>>>,
    shared: Block,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The blocks this thread holds, most recently registered first.
struct Cache {
    entries: Vec<(u64, Arc<Block>)>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        for (_, block) in self.entries.drain(..) {
            block.in_use.store(false, Ordering::Release);
        }
    }
}

thread_local! {
    static CACHE: RefCell<Cache> = const { RefCell::new(Cache { entries: Vec::new() }) };
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            blocks: Mutex::new(Vec::new()),
            shared: Block::default(),
        }
    }

    #[inline]
    pub(crate) fn add(&self, counter: Counter) {
        let counted = CACHE.try_with(|cache| {
            if let Ok(cache) = cache.try_borrow() {
                for (id, block) in cache.entries.iter() {
                    if *id == self.id {
                        let c = &block.counts[counter as usize];
                        // Single writer: this thread owns the block.
                        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                        return true;
                    }
                }
            }
            false
        });
        if counted != Ok(true) {
            self.add_slow(counter);
        }
    }

    #[cold]
    fn add_slow(&self, counter: Counter) {
        let registered = CACHE.try_with(|cache| {
            let Ok(mut cache) = cache.try_borrow_mut() else {
                return false;
            };
            let block = self.claim_block();
            let c = &block.counts[counter as usize];
            c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            cache.entries.insert(0, (self.id, block));
            if cache.entries.len() > CACHE_ENTRIES
                && let Some((_, old)) = cache.entries.pop()
            {
                old.in_use.store(false, Ordering::Release);
            }
            true
        });
        if registered != Ok(true) {
            self.shared.counts[counter as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A block for the calling thread: a released one if there is one, else a new one.
    fn claim_block(&self) -> Arc<Block> {
        let mut blocks = crate::sync::lock_std(&self.blocks);
        for b in blocks.iter() {
            if b.in_use
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Arc::clone(b);
            }
        }
        let b = Arc::new(Block::default());
        b.in_use.store(true, Ordering::Relaxed);
        blocks.push(Arc::clone(&b));
        b
    }

    pub(crate) fn get(&self, counter: Counter) -> u64 {
        let blocks = crate::sync::lock_std(&self.blocks);
        let i = counter as usize;
        blocks
            .iter()
            .map(|b| b.counts[i].load(Ordering::Acquire))
            .sum::<u64>()
            + self.shared.counts[i].load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up_and_blocks_are_reused() {
        let c = Arc::new(Counters::new());
        for _round in 0..3 {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let c = Arc::clone(&c);
                    std::thread::spawn(move || {
                        for _ in 0..1000 {
                            c.add(Counter::Success);
                        }
                        c.add(Counter::Rejected);
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        }
        assert_eq!(c.get(Counter::Success), 12_000);
        assert_eq!(c.get(Counter::Rejected), 12);
        let blocks = crate::sync::lock_std(&c.blocks).len();
        assert!(blocks <= 4, "blocks of exited threads are reused: {blocks}");
    }
}
