//! The closed-path cost per call of a fleet breaker next to the local breaker it wraps, in one
//! run: a successful call while the fleet is closed, with the background tasks running against
//! a real redis-server (started by the testkit) and reporting every second.
//!
//! cargo bench -p palisade-breaker --features fleet --bench fleet -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use palisade_breaker::CircuitBreaker;
use palisade_breaker::fleet::{FleetBreaker, FleetState};

mod common;
use common::threaded;

#[inline(never)]
fn work() -> Result<u64, ()> {
    Ok(black_box(42))
}

struct Setup {
    local: CircuitBreaker,
    fleet: FleetBreaker,
    _runtime: tokio::runtime::Runtime,
    _redis: palisade_testkit::Redis,
}

fn setup() -> Setup {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let fleet = CircuitBreaker::builder("bench")
        .fleet(redis.url())
        .runtime(runtime.handle().clone())
        .build()
        .expect("fleet breaker");
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.fleet_state() != Some(FleetState::Closed) {
        assert!(Instant::now() < deadline, "the fleet breaker did not join");
        std::thread::sleep(Duration::from_millis(10));
    }
    Setup {
        local: CircuitBreaker::builder("bench").build().expect("breaker"),
        fleet,
        _runtime: runtime,
        _redis: redis,
    }
}

fn bench(c: &mut Criterion, s: &Setup) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("fleet_closed_success/{threads}t"));
        g.bench_function("local_breaker", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(s.local.call_blocking(work));
                })
            })
        });
        g.bench_function("fleet_breaker", |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    let _ = black_box(s.fleet.call_blocking(work));
                })
            })
        });
        g.finish();
    }
}

/// Interleaved batches, the fastest of each kept: a burst of load from other processes hits
/// both variants alike (criterion's means above include time spent waiting for a core).
fn summary(s: &Setup) {
    const ROUNDS: usize = 40;
    const BATCH: u64 = 200_000;
    println!("\n## summary: fastest of {ROUNDS} interleaved batches of {BATCH} calls per thread\n");
    println!("| scenario | threads | breaker | ns/call | ratio to the local breaker |");
    println!("|---|---|---|---|---|");
    for threads in [1usize, 2] {
        let (mut local, mut fleet) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..ROUNDS {
            let t = threaded(threads, BATCH, || {
                let _ = black_box(s.local.call_blocking(work));
            });
            local = local.min(t.as_nanos() as f64 / BATCH as f64);
            let t = threaded(threads, BATCH, || {
                let _ = black_box(s.fleet.call_blocking(work));
            });
            fleet = fleet.min(t.as_nanos() as f64 / BATCH as f64);
        }
        println!("| closed_success | {threads} | local CircuitBreaker | {local:.1} | 1.00x |");
        println!(
            "| closed_success | {threads} | FleetBreaker | {fleet:.1} | {:.2}x |",
            fleet / local
        );
    }
    // The same by hand: `try_acquire`, then `success`.
    let (mut local, mut fleet) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..ROUNDS {
        let t = threaded(1, BATCH, || {
            if let Ok(p) = s.local.try_acquire() {
                p.success(Duration::ZERO);
            }
        });
        local = local.min(t.as_nanos() as f64 / BATCH as f64);
        let t = threaded(1, BATCH, || {
            if let Ok(p) = s.fleet.try_acquire() {
                p.success(Duration::ZERO);
            }
        });
        fleet = fleet.min(t.as_nanos() as f64 / BATCH as f64);
    }
    println!("| try_acquire + success | 1 | local CircuitBreaker | {local:.1} | 1.00x |");
    println!(
        "| try_acquire + success | 1 | FleetBreaker | {fleet:.1} | {:.2}x |",
        fleet / local
    );
    assert_eq!(
        s.fleet.fleet_state(),
        Some(FleetState::Closed),
        "the fleet breaker lost Redis during the run"
    );
}

fn main() {
    let s = setup();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &s);
    c.final_summary();
    // Not in `cargo test --benches`, which runs each benchmark once as a smoke test.
    if std::env::args().any(|a| a == "--bench") {
        summary(&s);
    }
}
