//! A big limit (1,000,000 per hour) next to a small one (100 per second), in one run, on one
//! palisade-testkit `redis-server`: latency per decision (client round trip, and the server's
//! own time per `EVALSHA` from `INFO commandstats`), and `MEMORY USAGE` of the key.
//!
//! `cargo bench -p palisade-ratelimit --bench big_limits -- --warm-up-time 1 --measurement-time 3`
//!
//! The big key is filled as a steady load of one hour would leave it: 200,000 decisions
//! (concurrently, 64 at a time); once with cost 1 (the key admits), once with cost 5 (1,000,000
//! units: the key is full and every decision is a denial that searches the log).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use palisade_ratelimit::redis_crate::{self as redis, aio::ConnectionManager};
use palisade_ratelimit::{Limit, RateLimiter, RedisLimiter, connect};

/// Decisions left in the big key's window by the steady load.
const FILL: usize = 200_000;
/// Decisions timed per row of the table.
const TIMED: usize = 5_000;

async fn fill(limiter: &RedisLimiter, key: &str, cost: u32) {
    futures::stream::iter(0..FILL)
        .for_each_concurrent(64, |_| async move {
            limiter.check_n(key, cost).await.expect("decision");
        })
        .await;
}

async fn info_field(c: &mut ConnectionManager, section: &str, line: &str, field: &str) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(c)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|rest| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

struct Row {
    name: &'static str,
    members: u64,
    bytes: u64,
    p50: Duration,
    p99: Duration,
    server_us: f64,
    admitted: usize,
}

/// Times `TIMED` sequential decisions of cost 1 on `key`; the server's µs per call comes from
/// `INFO commandstats` after `CONFIG RESETSTAT`.
async fn measure(
    name: &'static str,
    limiter: &RedisLimiter,
    admin: &mut ConnectionManager,
    key: &str,
) -> Row {
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(admin)
        .await
        .expect("RESETSTAT");
    let mut latencies = Vec::with_capacity(TIMED);
    let mut admitted = 0;
    for _ in 0..TIMED {
        let started = Instant::now();
        let d = limiter.check(key).await.expect("decision");
        latencies.push(started.elapsed());
        admitted += usize::from(d.allowed);
    }
    latencies.sort();
    let server_us = info_field(admin, "commandstats", "cmdstat_evalsha:", "usec_per_call").await;
    let redis_key = &limiter.redis_keys(key)[0];
    let members: u64 = redis::cmd("ZCARD")
        .arg(redis_key)
        .query_async(admin)
        .await
        .expect("ZCARD");
    let bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(redis_key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(admin)
        .await
        .expect("MEMORY USAGE");
    Row {
        name,
        members,
        bytes,
        p50: latencies[TIMED / 2],
        p99: latencies[TIMED * 99 / 100],
        server_us,
        admitted,
    }
}

fn big_limits(c: &mut Criterion) {
    let server = palisade_testkit::Redis::start().expect("redis-server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let connect_to = || {
        rt.block_on(connect(&server.url(), Duration::from_secs(5)))
            .expect("connect")
    };
    let build = |limit| {
        RedisLimiter::builder(connect_to())
            .prefix("bench")
            .limit(limit)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let small = build(Limit::per_second(100).unwrap());
    let big = build(Limit::per_hour(1_000_000).unwrap());
    let mut admin = connect_to();
    rt.block_on(async {
        fill(&big, "admitting", 1).await;
        fill(&big, "full", 5).await;
    });

    let mut group = c.benchmark_group("big_limits_one_decision");
    group.sample_size(20);
    for (name, limiter, key) in [
        ("100_per_second", &small, "small"),
        ("1M_per_hour_200k_members_admitting", &big, "admitting"),
        ("1M_per_hour_200k_members_full", &big, "full"),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(limiter.check(key).await.expect("decision")) })
        });
    }
    group.finish();

    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        // Interleaved twice; the second round is reported (warm).
        for _ in 0..2 {
            rows = vec![
                measure("100 / second", &small, &mut admin, "small").await,
                measure("1,000,000 / hour, admitting", &big, &mut admin, "admitting").await,
                measure("1,000,000 / hour, full (denials)", &big, &mut admin, "full").await,
            ];
        }
        rows
    });
    println!(
        "\n| limit, key state | members | MEMORY USAGE | bytes/member | p50 | p99 | server µs/decision | admitted of {TIMED} |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} | {:?} | {:?} | {:.1} | {} |",
            r.name,
            r.members,
            r.bytes,
            r.bytes as f64 / r.members.max(1) as f64,
            r.p50,
            r.p99,
            r.server_us,
            r.admitted
        );
    }
    println!();
}

criterion_group!(benches, big_limits);
criterion_main!(benches);
