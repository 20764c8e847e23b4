//! Loom models of the lock-free parts: the count window's slots and aggregates, the time
//! window's tagged counters, and the breaker's state word against its control lock.
//!
//! Not part of the normal test suite; run with
//! `RUSTFLAGS="--cfg loom" cargo test -p palisade-breaker --release --test loom`.
#![cfg(loom)]

use std::time::Duration;

use loom::sync::Arc;
use loom::thread;
use palisade_breaker::window::{CountWindow, TimeWindow};
use palisade_breaker::{CircuitBreaker, FakeClock, State, Window};

#[test]
fn count_window_aggregates_equal_its_slots() {
    loom::model(|| {
        let w = Arc::new(CountWindow::new(2, 0));
        // Fill the window so that the two writers overwrite (and evict) each other's slots.
        w.record(0, 1);
        w.record(0, 0);
        let handles: Vec<_> = [1u8, 2]
            .into_iter()
            .map(|mark| {
                let w = Arc::clone(&w);
                thread::spawn(move || {
                    w.record(0, mark);
                    w.record(0, 0);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let s = w.snapshot();
        assert_eq!(s.calls, 2);
        assert_eq!((s.failures, s.slow), w.recount());
    });
}

#[test]
fn clean_window_success_races_with_a_failure() {
    loom::model(|| {
        let w = Arc::new(CountWindow::new(2, 0));
        w.record(0, 0);
        w.record(0, 0);
        let w2 = Arc::clone(&w);
        let t = thread::spawn(move || w2.record(0, 1));
        // A success into the full, clean window: either it sees the failure or it changes nothing.
        w.record(0, 0);
        let seen = t.join().unwrap().expect("the failure is evaluated");
        assert_eq!(seen.failures, 1);
        let s = w.snapshot();
        assert_eq!((s.failures, s.slow), w.recount());
        assert!(s.failures <= 1);
    });
}

#[test]
fn reset_racing_with_a_record_leaves_no_stale_count() {
    loom::model(|| {
        let w = Arc::new(CountWindow::new(2, 0));
        let w2 = Arc::clone(&w);
        let t = thread::spawn(move || {
            w2.record(0, 1);
        });
        w.reset(1);
        t.join().unwrap();
        let s = w.snapshot();
        assert_eq!(
            s.failures, 0,
            "a write of generation 0 must not count in generation 1"
        );
        assert_eq!((s.failures, s.slow), w.recount());
    });
}

#[test]
fn time_window_counts_concurrent_calls_in_one_second() {
    loom::model(|| {
        let w = Arc::new(TimeWindow::new(2, 0));
        let now = Duration::from_millis(1500);
        let w2 = Arc::clone(&w);
        let t = thread::spawn(move || {
            w2.record(0, 1, now);
        });
        w.record(0, 0, now);
        t.join().unwrap();
        let s = w.snapshot(now);
        assert_eq!((s.calls, s.failures), (2, 1));
    });
}

#[test]
fn breaker_opens_once_when_two_failures_race() {
    loom::model(|| {
        let clock = FakeClock::new();
        let b = CircuitBreaker::builder("loom")
            .sliding_window(Window::Count(2))
            .minimum_calls(1)
            .clock(clock)
            .build()
            .unwrap();
        let mut events = b.subscribe();
        let b2 = b.clone();
        let t = thread::spawn(move || {
            if let Ok(p) = b2.try_acquire() {
                p.failure(Duration::ZERO);
            }
        });
        if let Ok(p) = b.try_acquire() {
            p.failure(Duration::ZERO);
        }
        t.join().unwrap();
        assert_eq!(b.state(), State::Open);
        let opened = events
            .drain()
            .into_iter()
            .filter(|e| matches!(e, palisade_breaker::Event::StateTransition { .. }))
            .count();
        assert_eq!(opened, 1, "exactly one transition to open");
    });
}
