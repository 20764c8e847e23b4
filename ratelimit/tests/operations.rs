//! Big limits, peek, reset, live limit changes and unambiguous keys, against real redis-server
//! processes (and a Redis Cluster where keys matter).

use std::time::Duration;

use futures::StreamExt;
use palisade_ratelimit::redis_crate::{self as redis, aio::ConnectionManager};
use palisade_ratelimit::{
    Algorithm, Error, Limit, LocalLimiter, Policy, RateLimiter, RedisLimiter, connect,
    connect_cluster,
};
use palisade_testkit::{Redis, RedisCluster};

async fn conn(url: &str) -> ConnectionManager {
    connect(url, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// How long each `EVALSHA` (µs) in the slow log since `SLOWLOG RESET` held Redis (the slow log
/// records every command, see `slowlog-log-slower-than 0` below), shortest first.
async fn evalsha_times(c: &mut ConnectionManager) -> Vec<u64> {
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(c)
        .await
        .expect("SLOWLOG GET");
    let mut times = Vec::new();
    for e in entries {
        let redis::Value::Array(fields) = e else {
            continue;
        };
        let (Some(redis::Value::Int(us)), Some(redis::Value::Array(args))) =
            (fields.get(2), fields.get(3))
        else {
            continue;
        };
        let is_eval = matches!(args.first(), Some(redis::Value::BulkString(b)) if b.eq_ignore_ascii_case(b"evalsha"));
        if is_eval {
            times.push(*us as u64);
        }
    }
    times.sort_unstable();
    times
}

#[tokio::test(flavor = "multi_thread")]
async fn big_costs_and_long_logs_do_not_hold_redis() {
    let server = Redis::start().expect("redis-server");
    let mut admin = conn(&server.url()).await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(0)
        .arg("slowlog-max-len")
        .arg(1_000_000)
        .query_async(&mut admin)
        .await
        .expect("CONFIG SET");
    let limiter = RedisLimiter::builder(conn(&server.url()).await)
        .limit(Limit::per_hour(1_000_000).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    limiter.check("warm-up").await.unwrap(); // loads the script
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut admin)
        .await
        .unwrap();
    // The case: 100,000 units in one decision, ten times, then a denial.
    for i in 0..10 {
        let d = limiter.check_n("big", 100_000).await.unwrap();
        assert!(d.allowed && d.remaining == 900_000 - i * 100_000, "{d:?}");
    }
    assert!(!limiter.check_n("big", 100_000).await.unwrap().allowed);
    let big = evalsha_times(&mut admin).await;
    println!("check_n(key, 100_000) held Redis for {big:?} µs");

    // A long log: 20,000 decisions on one key, then denials that search it and peeks.
    futures::stream::iter(0..20_000)
        .for_each_concurrent(64, |_| async {
            assert!(limiter.check("long").await.unwrap().allowed);
        })
        .await;
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut admin)
        .await
        .unwrap();
    let d = limiter.check_n("long", 999_000).await.unwrap();
    assert!(!d.allowed && d.remaining == 980_000, "{d:?}");
    assert_eq!(limiter.peek("long").await.unwrap().remaining, 980_000);
    assert!(limiter.check_n("long", 100_000).await.unwrap().allowed);
    let long = evalsha_times(&mut admin).await;
    println!("on a 20,000-member log, decisions held Redis for {long:?} µs");
    let members: usize = redis::cmd("ZCARD")
        .arg(&limiter.redis_keys("long")[0])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(members, 20_001, "one member per admitted decision");
    // The old script took 615 ms for every such call. The slow log measures wall-clock time
    // inside redis-server, so on a busy machine one call can include a wait for the CPU: the
    // median must be a few milliseconds, and no call may come near the old script's time.
    for (what, times) in [("a 100,000-unit decision", &big), ("a long log", &long)] {
        assert!(times.len() >= 3, "{what}: {times:?}");
        let (median, longest) = (times[times.len() / 2], times[times.len() - 1]);
        assert!(
            median < 5_000,
            "{what} held Redis for {median} µs (median of {times:?})"
        );
        assert!(
            longest < 200_000,
            "{what} held Redis for {longest} µs ({times:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn peek_answers_without_consuming_for_every_algorithm() {
    let server = Redis::start().expect("redis-server");
    let c = conn(&server.url()).await;
    for algorithm in [
        Algorithm::SlidingLog,
        Algorithm::SlidingWindowCounter,
        Algorithm::Gcra { burst: 10 },
    ] {
        let limiter = RedisLimiter::builder(c.clone())
            .prefix(format!("peek{algorithm:?}").replace(['{', '}', ' '], ""))
            .algorithm(algorithm)
            // An hour: a window counter's fixed window does not roll over during the test.
            .limit(Limit::per_hour(10).unwrap())
            .cache_denials(true)
            .build()
            .unwrap();
        let fresh = limiter.peek("k").await.unwrap();
        assert!(
            fresh.allowed && fresh.remaining == 10,
            "{algorithm:?}: {fresh:?}"
        );
        assert_eq!(fresh.reset_after, Duration::ZERO, "{algorithm:?}");
        limiter.check_n("k", 3).await.unwrap();
        for _ in 0..3 {
            let p = limiter.check_n("k", 0).await.unwrap();
            assert!(p.allowed && p.server_time.is_some(), "{algorithm:?}: {p:?}");
            assert_eq!(p.remaining, 7, "{algorithm:?}: a peek consumed");
            assert!(p.reset_after > Duration::ZERO, "{algorithm:?}: {p:?}");
        }
        assert_eq!(limiter.check_n("k", 7).await.unwrap().remaining, 0);
        assert!(!limiter.check("k").await.unwrap().allowed);
        // A peek neither reads nor fills the denial cache.
        let p = limiter.peek("k").await.unwrap();
        assert!(
            p.remaining == 0 && p.server_time.is_some(),
            "{algorithm:?}: {p:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_clears_every_limit_algorithm_and_the_denial_cache() {
    let server = Redis::start().expect("redis-server");
    let mut c = conn(&server.url()).await;
    let limits = [
        // Long windows: the GCRA denial stays cached for the whole test.
        Limit::per_minute(5).unwrap(),
        Limit::per_hour(5).unwrap(),
    ];
    let build = |algorithm| {
        RedisLimiter::builder(c.clone())
            .prefix("reset")
            .algorithm(algorithm)
            .limits(limits)
            .cache_denials(true)
            .build()
            .unwrap()
    };
    let log = build(Algorithm::SlidingLog);
    let gcra = build(Algorithm::Gcra { burst: 5 });
    let window = build(Algorithm::SlidingWindowCounter);
    for l in [&log, &gcra, &window] {
        assert_eq!(l.check_n("user", 5).await.unwrap().remaining, 0);
        assert!(!l.check("user").await.unwrap().allowed);
        assert!(!l.check("user").await.unwrap().allowed, "cached");
    }
    log.reset("user").await.unwrap();
    let d = log.check("user").await.unwrap();
    assert!(d.allowed && d.remaining == 4, "after reset: {d:?}");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("reset{user}*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        2,
        "only the log's two keys, rewritten: {keys:?}"
    );
    // The GCRA keys went too, but the GCRA limiter's own cache still denies until its
    // retry_after (documented staleness); its own reset forgets it.
    assert!(!gcra.check("user").await.unwrap().allowed);
    gcra.reset("user").await.unwrap();
    assert_eq!(gcra.check("user").await.unwrap().remaining, 4);
    assert!(!window.check("user").await.unwrap().allowed, "cached");
    window.reset("user").await.unwrap();
    let d = window.check("user").await.unwrap();
    assert!(
        d.allowed && d.remaining == 4,
        "window counter after reset: {d:?}"
    );
}

/// `reset` clears a key in the `Policy::Local` fallback too, even while Redis is down (the reset
/// of the Redis keys then fails, and says so).
#[tokio::test(flavor = "multi_thread")]
async fn reset_clears_the_local_fallback_while_redis_is_down() {
    let server = Redis::start().expect("redis-server");
    let limit = Limit::per_minute(2).unwrap();
    let limiter = RedisLimiter::builder(conn(&server.url()).await)
        .limit(limit)
        .on_unavailable(Policy::Local(LocalLimiter::new(limit).unwrap()))
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    server.kill().expect("kill redis-server");
    let local: Vec<bool> = [
        limiter.check("k").await.unwrap().allowed,
        limiter.check("k").await.unwrap().allowed,
        limiter.check("k").await.unwrap().allowed,
    ]
    .into();
    assert_eq!(local, [true, true, false], "the local fallback decides");
    assert!(
        matches!(
            limiter.reset("k").await,
            Err(Error::Unavailable(_) | Error::Timeout(_))
        ),
        "the Redis part of the reset fails while Redis is down"
    );
    assert!(
        limiter.check("k").await.unwrap().allowed,
        "the local fallback forgot the key"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_max_applies_to_the_existing_history() {
    let server = Redis::start().expect("redis-server");
    let c = conn(&server.url()).await;
    for algorithm in [Algorithm::SlidingLog, Algorithm::SlidingWindowCounter] {
        let with = |max| {
            RedisLimiter::builder(c.clone())
                .prefix(format!("live{algorithm:?}"))
                .algorithm(algorithm)
                .limit(Limit::per_hour(max).unwrap())
                .build()
                .unwrap()
        };
        let (old, raised, lowered) = (with(100), with(120), with(50));
        assert_eq!(old.check_n("k", 100).await.unwrap().remaining, 0);
        // Raised during a rolling deploy: 20 more, not a fresh 120.
        let d = raised.check_n("k", 20).await.unwrap();
        assert!(d.allowed && d.remaining == 0, "{algorithm:?}: {d:?}");
        assert!(!raised.check("k").await.unwrap().allowed, "{algorithm:?}");
        assert!(!old.check("k").await.unwrap().allowed, "{algorithm:?}");
        // Lowered: over the limit until enough leaves the window.
        let p = lowered.peek("k").await.unwrap();
        assert!(!p.allowed && p.remaining == 0, "{algorithm:?}: {p:?}");
        assert!(!lowered.check("k").await.unwrap().allowed, "{algorithm:?}");
    }
}

/// GCRA stores a time (the theoretical arrival time), not a count: a changed rate re-reads the
/// backlog at the new rate. 100/h used up is one hour of backlog; at 120/h (one unit per 30 s)
/// that hour is a full burst of 120, so the next unit is due in 30 s; at 50/h in 72 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_gcra_rate_rereads_the_backlog_at_the_new_rate() {
    let server = Redis::start().expect("redis-server");
    let c = conn(&server.url()).await;
    let with = |max| {
        RedisLimiter::builder(c.clone())
            .prefix("live-gcra")
            .algorithm(Algorithm::Gcra { burst: max })
            .limit(Limit::per_hour(max).unwrap())
            .build()
            .unwrap()
    };
    let (old, raised, lowered) = (with(100), with(120), with(50));
    assert_eq!(old.check_n("k", 100).await.unwrap().remaining, 0);
    let near = |d: palisade_ratelimit::Decision, secs: u64| {
        let retry = d.retry_after.expect("denied with retry_after");
        assert!(
            !d.allowed
                && retry <= Duration::from_secs(secs)
                && retry > Duration::from_secs(secs - 5),
            "expected a denial due in about {secs} s: {d:?}"
        );
    };
    near(old.check("k").await.unwrap(), 36);
    near(raised.check("k").await.unwrap(), 30);
    near(lowered.check("k").await.unwrap(), 72);
}

#[tokio::test(flavor = "multi_thread")]
async fn prefixes_and_keys_never_share_a_redis_key() {
    let server = Redis::start().expect("redis-server");
    let c = conn(&server.url()).await;
    let with = |prefix: &str| {
        RedisLimiter::builder(c.clone())
            .prefix(prefix)
            .limit(Limit::per_minute(1).unwrap())
            .build()
            .unwrap()
    };
    let (a, ab) = (with("a"), with("a:b"));
    assert!(a.check("b:c").await.unwrap().allowed);
    assert!(
        ab.check("c").await.unwrap().allowed,
        "prefix `a:b` + key `c` is not prefix `a` + key `b:c`"
    );
    assert_ne!(a.redis_keys("b:c"), ab.redis_keys("c"));
    for (k1, k2) in [("", "%"), ("}", "%7D"), ("x{y", "x%7By")] {
        assert!(a.check(k1).await.unwrap().allowed);
        assert!(a.check(k2).await.unwrap().allowed, "{k1:?} vs {k2:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn awkward_keys_keep_all_limits_in_one_cluster_slot() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let c = connect_cluster(cluster.urls()).await.expect("cluster");
    let limiter = RedisLimiter::builder(c.clone())
        .prefix("tags")
        .limits([
            Limit::per_second(2).unwrap(),
            Limit::per_minute(3).unwrap(),
            Limit::per_hour(4).unwrap(),
        ])
        .build()
        .unwrap();
    for key in ["", "}", "{", "}x{", "a{b}c", "user:42", "%"] {
        for _ in 0..2 {
            let d = limiter
                .check(key)
                .await
                .unwrap_or_else(|e| panic!("{key:?}: {e}"));
            assert!(d.allowed, "{key:?}");
        }
        assert!(!limiter.check(key).await.unwrap().allowed, "{key:?}");
        limiter
            .reset(key)
            .await
            .unwrap_or_else(|e| panic!("{key:?}: {e}"));
        assert!(limiter.check(key).await.unwrap().allowed, "{key:?}");
    }
}
