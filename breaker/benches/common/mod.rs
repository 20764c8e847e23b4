//! What the breaker's benchmarks share.

use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Runs `op` `iters` times on each of `threads` threads started together and returns the
/// longest time one thread took: the time per call each thread experiences (× iters). Each
/// thread times itself, so a thread descheduled before it starts inflates (never deflates) the
/// result.
pub fn threaded<F: Fn() + Sync>(threads: usize, iters: u64, op: F) -> Duration {
    if threads == 1 {
        let start = Instant::now();
        for _ in 0..iters {
            op();
        }
        return start.elapsed();
    }
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}
