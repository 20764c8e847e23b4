//! Many threads on one breaker: no outcome is lost, and half-open never lets more than
//! `half_open_permits` probes run at once.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use palisade_breaker::window::CountWindow;
use palisade_breaker::{CircuitBreaker, State, Window};

const THREADS: usize = 8;
const CALLS: u64 = 100_000;

fn on_threads(f: impl Fn(usize) + Sync) {
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (f, barrier) = (&f, &barrier);
            s.spawn(move || {
                barrier.wait();
                f(t);
            });
        }
    });
}

#[test]
fn no_outcome_is_lost_under_8_threads() {
    // One failure in ten per thread: any 100 consecutive outcomes hold at most 18 failures, so the
    // breaker must stay closed whatever the interleaving, and every call is permitted.
    let b = CircuitBreaker::builder("stress")
        .slow_call_duration(Duration::from_millis(10))
        .build()
        .unwrap();
    on_threads(|_| {
        for i in 0..CALLS {
            let p = b
                .try_acquire()
                .expect("a closed breaker permits every call");
            match i % 10 {
                0 => p.failure(Duration::ZERO),
                5 => p.success(Duration::from_millis(20)),
                7 => p.ignore(),
                _ => p.success(Duration::ZERO),
            }
        }
    });
    let m = b.metrics();
    let n = THREADS as u64 * CALLS;
    assert_eq!(m.state, State::Closed);
    assert_eq!(m.failed_calls, n / 10);
    assert_eq!(m.slow_calls, n / 10);
    assert_eq!(m.ignored_calls, n / 10);
    assert_eq!(m.successful_calls, n - 2 * n / 10);
    assert_eq!(m.not_permitted_calls, 0);
    assert_eq!(m.buffered_calls, 100);
}

#[test]
fn count_window_aggregates_match_its_slots_after_8_threads() {
    let w = CountWindow::new(64, 0);
    let recorded = AtomicU64::new(0);
    on_threads(|t| {
        let mut x = t as u64 * 7919 + 1;
        for _ in 0..CALLS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.record(0, (x % 4) as u8);
        }
        recorded.fetch_add(CALLS, Ordering::Relaxed);
    });
    let s = w.snapshot();
    assert_eq!(s.calls, 64);
    assert_eq!(
        (s.failures, s.slow),
        w.recount(),
        "the aggregate counts equal the marks in the slots"
    );
}

#[test]
fn every_attempt_is_counted_once_while_the_breaker_flaps() {
    let b = CircuitBreaker::builder("flap")
        .sliding_window(Window::Count(10))
        .minimum_calls(5)
        .wait_in_open(Duration::from_micros(200))
        .half_open_permits(2)
        .build()
        .unwrap();
    let attempts = AtomicU64::new(0);
    on_threads(|t| {
        for i in 0..CALLS / 4 {
            attempts.fetch_add(1, Ordering::Relaxed);
            let fail = (i + t as u64).is_multiple_of(3);
            let _ = b.call_blocking(|| if fail { Err(()) } else { Ok(()) });
        }
    });
    let m = b.metrics();
    assert_eq!(
        m.successful_calls + m.failed_calls + m.not_permitted_calls,
        attempts.load(Ordering::Relaxed)
    );
}

#[test]
fn half_open_never_has_more_probes_in_flight_than_permits() {
    const PERMITS: usize = 3;
    let b = Arc::new(
        CircuitBreaker::builder("probes")
            .sliding_window(Window::Count(1))
            .minimum_calls(1)
            .wait_in_open(Duration::from_micros(50))
            .half_open_permits(PERMITS as u32)
            .build()
            .unwrap(),
    );
    let in_flight = AtomicUsize::new(0);
    let max_seen = AtomicUsize::new(0);
    let probes = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    // Bounded: 3000 probes, or 20 s on a very busy machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    on_threads(|t| {
        let mut i = t as u64;
        while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
            i += 1;
            match b.try_acquire() {
                Ok(p) if p.state() == State::HalfOpen => {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_seen.fetch_max(now, Ordering::SeqCst);
                    std::thread::yield_now();
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    if probes.fetch_add(1, Ordering::Relaxed) >= 3_000 {
                        stop.store(true, Ordering::Relaxed);
                    }
                    match i % 4 {
                        0 => drop(p), // gives the slot back
                        1 => p.success(Duration::ZERO),
                        _ => p.failure(Duration::ZERO),
                    }
                }
                // Closed: fail at once so the breaker opens again.
                Ok(p) => p.failure(Duration::ZERO),
                Err(_) => std::thread::yield_now(),
            }
        }
    });
    let max = max_seen.load(Ordering::SeqCst);
    assert!(max <= PERMITS, "{max} probes were in flight at once");
    assert!(max >= 2, "the test never had concurrent probes (max {max})");
}
