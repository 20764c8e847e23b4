//! The cost per call of a circuit breaker, palisade-breaker against failsafe and recloser, in one
//! run, with a plain function call as the floor:
//!
//! - `closed_success`: a successful call in the closed state;
//! - `open_rejected`: a call rejected in the open state;
//!
//! each single-threaded and with 2 threads on one shared breaker (the time per call that each
//! thread sees). Every breaker runs with its default configuration for `closed_success`.
//!
//! cargo bench -p palisade-breaker --bench overhead -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};

mod common;
use common::threaded;
use failsafe::CircuitBreaker as _;
use palisade_breaker::{CircuitBreaker, Window};

#[inline(never)]
fn work() -> Result<u64, ()> {
    Ok(black_box(42))
}

#[inline(never)]
fn failing() -> Result<u64, u64> {
    Err(black_box(7))
}

/// Like [`threaded`], but `None` unless the threads really ran side by side (their timed
/// intervals overlap by at least 90 % of the longest): on a busy machine one thread may run its
/// whole batch while the other waits for a core, which would hide any contention.
fn overlapped<F: Fn() + Sync>(threads: usize, iters: u64, op: F) -> Option<Duration> {
    if threads == 1 {
        return Some(threaded(1, iters, op));
    }
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let longest = spans.iter().map(|(a, b)| *b - *a).max()?;
    let common_start = spans.iter().map(|(a, _)| *a).max()?;
    let common_end = spans.iter().map(|(_, b)| *b).min()?;
    let overlap = common_end.saturating_duration_since(common_start);
    (overlap.as_secs_f64() >= 0.9 * longest.as_secs_f64()).then_some(longest)
}

fn palisade_default() -> CircuitBreaker {
    CircuitBreaker::builder("bench").build().unwrap()
}

/// resilience4j's behaviour: every call timed for slow-call detection.
fn palisade_timed() -> CircuitBreaker {
    CircuitBreaker::builder("bench")
        .slow_call_detection(true)
        .build()
        .unwrap()
}

fn palisade_open() -> CircuitBreaker {
    let b = CircuitBreaker::builder("bench")
        .sliding_window(Window::Count(1))
        .minimum_calls(1)
        .wait_in_open(Duration::from_secs(3600))
        .build()
        .unwrap();
    let _ = b.call_blocking(failing);
    assert!(b.call_blocking(work).is_err());
    b
}

fn failsafe_open() -> impl failsafe::CircuitBreaker + Sync {
    let policy = failsafe::failure_policy::consecutive_failures(
        1,
        failsafe::backoff::constant(Duration::from_secs(3600)),
    );
    let b = failsafe::Config::new().failure_policy(policy).build();
    let _ = b.call(failing);
    assert!(matches!(b.call(work), Err(failsafe::Error::Rejected)));
    b
}

fn recloser_open() -> recloser::Recloser {
    let b = recloser::Recloser::custom()
        .closed_len(1)
        .open_wait(Duration::from_secs(3600))
        .build();
    for _ in 0..3 {
        let _ = b.call(failing);
    }
    assert!(matches!(b.call(work), Err(recloser::Error::Rejected)));
    b
}

fn bench(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("closed_success/{threads}t"));
        g.bench_function("plain_call", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(work());
                })
            })
        });
        let p = palisade_default();
        g.bench_function("palisade", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(p.call_blocking(work));
                })
            })
        });
        let p = palisade_timed();
        g.bench_function("palisade_slow_call_timing", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(p.call_blocking(work));
                })
            })
        });
        let f = failsafe::Config::new().build();
        g.bench_function("failsafe", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(f.call(work));
                })
            })
        });
        let r = recloser::Recloser::default();
        g.bench_function("recloser", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(r.call(work));
                })
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("open_rejected/{threads}t"));
        let p = palisade_open();
        g.bench_function("palisade", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(p.call_blocking(work));
                })
            })
        });
        let f = failsafe_open();
        g.bench_function("failsafe", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(f.call(work));
                })
            })
        });
        let r = recloser_open();
        g.bench_function("recloser", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(r.call(work));
                })
            })
        });
        g.finish();
    }
}

/// A second, noise-resistant measurement printed after criterion's: every variant runs in
/// interleaved rounds (so a burst of load on this shared machine hits all of them alike), and
/// each keeps its fastest batch. Prints a markdown table with ratios to the faster peer.
fn summary() {
    const ROUNDS: usize = 40;
    const BATCH: u64 = 200_000;
    type Op<'a> = Box<dyn Fn() + Sync + 'a>;
    let p_default = palisade_default();
    let p_timed = palisade_timed();
    let p_time = CircuitBreaker::builder("bench")
        .sliding_window(Window::Time(Duration::from_secs(60)))
        .slow_call_detection(false)
        .build()
        .unwrap();
    let f_closed = failsafe::Config::new().build();
    let r_closed = recloser::Recloser::default();
    let p_open = palisade_open();
    let f_open = failsafe_open();
    let r_open = recloser_open();
    let scenarios: Vec<(&str, Vec<(&str, Op<'_>)>)> = vec![
        (
            "closed_success",
            vec![
                (
                    "plain call",
                    Box::new(|| {
                        let _ = black_box(work());
                    }),
                ),
                (
                    "palisade (default)",
                    Box::new(|| {
                        let _ = black_box(p_default.call_blocking(work));
                    }),
                ),
                (
                    "palisade (slow_call_detection(true): every call timed)",
                    Box::new(|| {
                        let _ = black_box(p_timed.call_blocking(work));
                    }),
                ),
                (
                    "palisade, Window::Time(60 s), no slow-call timing",
                    Box::new(|| {
                        let _ = black_box(p_time.call_blocking(work));
                    }),
                ),
                (
                    "failsafe",
                    Box::new(|| {
                        let _ = black_box(f_closed.call(work));
                    }),
                ),
                (
                    "recloser",
                    Box::new(|| {
                        let _ = black_box(r_closed.call(work));
                    }),
                ),
            ],
        ),
        (
            "open_rejected",
            vec![
                (
                    "palisade",
                    Box::new(|| {
                        let _ = black_box(p_open.call_blocking(work));
                    }),
                ),
                (
                    "failsafe",
                    Box::new(|| {
                        let _ = black_box(f_open.call(work));
                    }),
                ),
                (
                    "recloser",
                    Box::new(|| {
                        let _ = black_box(r_open.call(work));
                    }),
                ),
            ],
        ),
        (
            "clock_read (for scale)",
            vec![
                (
                    "quanta::Instant::now (palisade's MonotonicClock)",
                    Box::new(|| {
                        let _ = black_box(quanta::Instant::now());
                    }),
                ),
                (
                    "std::time::Instant::now",
                    Box::new(|| {
                        let _ = black_box(Instant::now());
                    }),
                ),
            ],
        ),
    ];
    println!(
        "\n## summary: fastest of {ROUNDS} interleaved batches of {BATCH} calls per thread \
         (2 threads: only batches where both threads ran side by side)\n"
    );
    println!(
        "| scenario | threads | breaker | ns/call | ratio to the faster of failsafe/recloser |"
    );
    println!("|---|---|---|---|---|");
    for (name, ops) in &scenarios {
        for threads in [1usize, 2] {
            let mut best = vec![f64::INFINITY; ops.len()];
            for _ in 0..ROUNDS {
                for (i, (_, op)) in ops.iter().enumerate() {
                    if let Some(t) = overlapped(threads, BATCH, op) {
                        best[i] = best[i].min(t.as_nanos() as f64 / BATCH as f64);
                    }
                }
            }
            let peer = ops
                .iter()
                .zip(&best)
                .filter(|((n, _), _)| *n == "failsafe" || *n == "recloser")
                .map(|(_, b)| *b)
                .fold(f64::INFINITY, f64::min);
            for ((label, _), b) in ops.iter().zip(&best) {
                let ratio = if peer.is_finite() {
                    format!("{:.2}x", b / peer)
                } else {
                    "-".to_string()
                };
                println!("| {name} | {threads} | {label} | {b:.1} | {ratio} |");
            }
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::args().any(|a| a == "--bench") && std::env::var_os("OVERHEAD_NO_SUMMARY").is_none()
    {
        summary();
    }
}
