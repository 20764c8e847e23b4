//! Speed, side by side with the peers, in one run:
//!
//! - `redis`: sliding-log decisions per second from 64 tasks sharing one multiplexed connection
//!   on 1000 keys, next to `redis-benchmark -c 64` sending `EVALSHA` of the same script (the
//!   ceiling of one round trip per decision) against the same testkit server.
//! - `local`: `LocalLimiter` ns per decision next to raw keyed `governor`, 1000 keys.
//!
//! `cargo bench -p palisade-ratelimit --bench decisions -- --warm-up-time 1 --measurement-time 3`
//! (`PALISADE_BENCH=local` or `PALISADE_BENCH=redis` in the environment runs only that part).

use std::hint::black_box;
use std::num::NonZeroU32;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use palisade_ratelimit::{Limit, LocalLimiter, RateLimiter, RedisLimiter, connect};

const TASKS: usize = 64;
const KEYS: usize = 1000;
/// Decisions per side-by-side run (ours and redis-benchmark's).
const RUN: usize = 200_000;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user:{i:012}")).collect()
}

/// Runs `total` decisions from 64 tasks over one connection; returns the elapsed time.
async fn run_tasks<L: RateLimiter + Clone + 'static>(
    limiter: &L,
    keys: &[String],
    total: usize,
) -> Duration {
    let per_task = total.div_ceil(TASKS);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let limiter = limiter.clone();
        let keys: Vec<String> = keys.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut k = t * 7919;
            for _ in 0..per_task {
                k = (k + 104_729) % KEYS;
                black_box(limiter.check(&keys[k]).await.expect("decision"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    started.elapsed()
}

/// `redis-benchmark -c 64 -n RUN -r 1000 EVALSHA <sha> ...` with our keys and arguments;
/// returns requests per second.
fn redis_benchmark(
    port: u16,
    pipeline: u32,
    sha: &str,
    key_template: &str,
    args: &[String],
) -> f64 {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            "64",
            "-n",
            &RUN.to_string(),
        ])
        .args(["-P", &pipeline.to_string()])
        .args([
            "-r",
            &KEYS.to_string(),
            "--csv",
            "EVALSHA",
            sha,
            "1",
            key_template,
        ])
        .args(args)
        .output()
        .expect("run redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    // CSV: "test","rps",... then one row per test.
    text.lines()
        .nth(1)
        .and_then(|row| row.split(',').nth(1))
        .and_then(|rps| rps.trim_matches('"').parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "unexpected redis-benchmark output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// (calls, failed_calls) of EVALSHA from `INFO commandstats`.
async fn evalsha_stats(
    c: &mut palisade_ratelimit::redis_crate::aio::ConnectionManager,
) -> (u64, u64) {
    let info: String = palisade_ratelimit::redis_crate::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .expect("INFO");
    let line = info
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap_or("");
    let field = |name: &str| {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("calls"), field("failed_calls"))
}

fn redis(c: &mut Criterion) {
    if std::env::var("PALISADE_BENCH").is_ok_and(|only| only != "redis") {
        return;
    }
    let server = palisade_testkit::Redis::start().expect("redis-server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = rt
        .block_on(connect(&server.url(), Duration::from_secs(5)))
        .expect("connect");
    let limit = Limit::per_second(100).unwrap();
    let limiter = RedisLimiter::builder(conn)
        .prefix("bench")
        .limit(limit)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let keys = keys();
    rt.block_on(run_tasks(&limiter, &keys, 10_000)); // loads the script, fills the keys

    let mut group = c.benchmark_group("redis_sliding_log_64_tasks_1000_keys");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.bench_function("palisade_ratelimit", |b| {
        b.iter_custom(|iters| rt.block_on(run_tasks(&limiter, &keys, iters as usize)))
    });
    group.finish();

    // Side by side, same server, same script, same keyspace shape: alternate the two twice.
    let key_template = limiter.redis_keys("user:__rand_int__")[0].clone();
    let args = [
        String::new(), // time: read TIME on the server
        "1".into(),    // cost
        limit.max().to_string(),
        (limit.window().as_micros()).to_string(),
        limit.max().to_string(),
    ];
    let mut admin = rt
        .block_on(connect(&server.url(), Duration::from_secs(5)))
        .expect("connect");
    let sha = limiter.script_sha();
    let (mut ours, mut theirs, mut pipelined) = (0.0f64, 0.0f64, 0.0f64);
    for _ in 0..2 {
        let elapsed = rt.block_on(run_tasks(&limiter, &keys, RUN));
        ours = ours.max(RUN as f64 / elapsed.as_secs_f64());
        let before = rt.block_on(evalsha_stats(&mut admin));
        theirs = theirs.max(redis_benchmark(server.port(), 1, sha, &key_template, &args));
        pipelined = pipelined.max(redis_benchmark(
            server.port(),
            16,
            sha,
            &key_template,
            &args,
        ));
        let after = rt.block_on(evalsha_stats(&mut admin));
        // redis-benchmark ignores error replies: make sure every EVALSHA really ran the script.
        assert_eq!(after.1, before.1, "redis-benchmark's EVALSHA calls failed");
        assert!(
            after.0 - before.0 >= 2 * RUN as u64,
            "redis-benchmark sent too few EVALSHA"
        );
    }
    println!("\n| sliding log, 64 concurrent, 1000 keys | decisions/s | vs ours |");
    println!("|---|---|---|");
    println!("| palisade-ratelimit (64 tasks, 1 multiplexed connection) | {ours:.0} | 1.00 |");
    println!(
        "| redis-benchmark -c 64 EVALSHA (one round trip per call) | {theirs:.0} | {:.2} |",
        theirs / ours
    );
    println!(
        "| redis-benchmark -c 64 -P 16 EVALSHA (pipelined) | {pipelined:.0} | {:.2} |",
        pipelined / ours
    );
    println!("ours / redis-benchmark -c 64 = {:.2}x\n", ours / theirs);
}

fn local(c: &mut Criterion) {
    if std::env::var("PALISADE_BENCH").is_ok_and(|only| only != "local") {
        return;
    }
    let keys = keys();
    let ours = LocalLimiter::new(Limit::per_second(1_000_000).unwrap()).unwrap();
    let quota = governor::Quota::per_second(NonZeroU32::new(1_000_000).unwrap());
    // The reference: governor's keyed limiter as `RateLimiter::keyed` builds it (its default
    // DashMap store with std's SipHash, no middleware: the answer is only ok / not until).
    let raw = governor::RateLimiter::keyed(quota);
    // The same, plus the remaining capacity our decisions carry (StateInformationMiddleware).
    let informed = governor::RateLimiter::keyed(quota)
        .with_middleware::<governor::middleware::StateInformationMiddleware>();
    // The same two, with the hasher our own key map uses (foldhash, through hashbrown).
    let raw_foldhash =
        governor::RateLimiter::dashmap_with_hasher(quota, hashbrown::DefaultHashBuilder::default());
    let informed_foldhash =
        governor::RateLimiter::dashmap_with_hasher(quota, hashbrown::DefaultHashBuilder::default())
            .with_middleware::<governor::middleware::StateInformationMiddleware>();
    for k in &keys {
        let _ = ours.check_n_now(k, 1);
        let _ = raw.check_key(k);
        let _ = informed.check_key(k);
        let _ = informed_foldhash.check_key(k);
        let _ = raw_foldhash.check_key(k);
    }
    // Every row hands the whole answer of the call to `black_box` (governor's
    // `Result<_, NotUntil>`, our `Result<Decision, Error>`), on the same key sequence.
    let mut group = c.benchmark_group("local_1000_keys");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("governor_keyed", |b| {
        b.iter(|| {
            i = (i + 7) % KEYS;
            black_box(raw.check_key(&keys[i]))
        })
    });
    group.bench_function("governor_keyed_foldhash", |b| {
        b.iter(|| {
            i = (i + 7) % KEYS;
            black_box(raw_foldhash.check_key(&keys[i]))
        })
    });
    group.bench_function("governor_keyed_with_remaining", |b| {
        b.iter(|| {
            i = (i + 7) % KEYS;
            black_box(
                informed
                    .check_key(&keys[i])
                    .map(|s| s.remaining_burst_capacity()),
            )
        })
    });
    group.bench_function("palisade_LocalLimiter_check", |b| {
        b.iter(|| {
            i = (i + 7) % KEYS;
            black_box(ours.check(&keys[i]).now_or_never())
        })
    });
    group.bench_function("palisade_LocalLimiter_check_n_now", |b| {
        b.iter(|| {
            i = (i + 7) % KEYS;
            black_box(ours.check_n_now(&keys[i], 1))
        })
    });
    group.finish();

    // Side by side on a noisy machine: interleave short rounds of each and keep each one's best
    // round, so that all of them see the same background load.
    const ROUND: usize = 200_000;
    const ROUNDS: usize = 30;
    let rows: [&str; 7] = [
        "governor keyed (`RateLimiter::keyed`, `check_key(&String)`, ok/err only)",
        "the same + `StateInformationMiddleware` (remaining capacity)",
        "the same, key given as `&str` (copied into a thread-local `String`)",
        "governor keyed, foldhash instead of SipHash (`dashmap_with_hasher`), ok/err only",
        "the same + `StateInformationMiddleware` (remaining capacity)",
        "palisade `LocalLimiter::check_n_now(&str, 1)` (sync, full `Decision`)",
        "palisade `LocalLimiter::check(&str)` (async trait, `now_or_never`, full `Decision`)",
    ];
    println!(
        "sizes: decision {} result {}",
        std::mem::size_of::<palisade_ratelimit::Decision>(),
        std::mem::size_of::<Result<palisade_ratelimit::Decision, palisade_ratelimit::Error>>()
    );
    let mut best = [f64::MAX; 7];
    for _ in 0..ROUNDS {
        for (slot, best) in best.iter_mut().enumerate() {
            let started = Instant::now();
            for r in 0..ROUND {
                let k = &keys[(r * 7) % KEYS];
                match slot {
                    0 => _ = black_box(raw.check_key(k)),
                    1 => _ = black_box(informed.check_key(k).map(|s| s.remaining_burst_capacity())),
                    2 => {
                        thread_local! {
                            static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
                        }
                        let k: &str = k;
                        _ = black_box(BUF.with_borrow_mut(|b| {
                            b.clear();
                            b.push_str(k);
                            informed.check_key(b).map(|s| s.remaining_burst_capacity())
                        }))
                    }
                    3 => _ = black_box(raw_foldhash.check_key(k)),
                    4 => {
                        _ = black_box(
                            informed_foldhash
                                .check_key(k)
                                .map(|s| s.remaining_burst_capacity()),
                        )
                    }
                    5 => _ = black_box(ours.check_n_now(k, 1)),
                    _ => _ = black_box(ours.check(k).now_or_never()),
                }
            }
            *best = best.min(started.elapsed().as_nanos() as f64 / ROUND as f64);
        }
    }
    println!(
        "\n| local, 1000 keys, best of {ROUNDS} interleaved rounds | ns/decision | vs governor | vs governor with foldhash |"
    );
    println!("|---|---|---|---|");
    for (row, ns) in rows.iter().zip(best) {
        println!(
            "| {row} | {ns:.1} | {:.2} | {:.2} |",
            ns / best[0],
            ns / best[3]
        );
    }
    println!();

    let mut group = c.benchmark_group("clock");
    group.bench_function("std_instant_now", |b| b.iter(|| black_box(Instant::now())));
    group.bench_function("tokio_instant_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    group.bench_function("governor_default_clock_now", |b| {
        use governor::clock::Clock;
        let clock = governor::clock::DefaultClock::default();
        b.iter(|| black_box(clock.now()))
    });
    group.finish();
}

criterion_group!(benches, local, redis);
criterion_main!(benches);
