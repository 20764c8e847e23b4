//! The guarantees of `RedisLimiter`, against real redis-server processes (palisade-testkit).

use std::time::{Duration, Instant};

use palisade_ratelimit::redis_crate::{self as redis, aio::ConnectionManager};
use palisade_ratelimit::{
    Algorithm, Error, Limit, LocalLimiter, Policy, RateLimiter, RedisLimiter, connect,
    connect_cluster, connect_cluster_lazy, connect_lazy,
};
use palisade_testkit::{Redis, RedisCluster, RedisOptions};

async fn conn(url: &str) -> ConnectionManager {
    connect(url, Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn evalsha_calls(c: &mut ConnectionManager) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The largest number of admissions (with their costs) in any window of length `window`.
fn max_in_any_window(times: &mut [Duration], window: Duration) -> usize {
    times.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i] - times[j] >= window {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// 16 tasks on 4 limiters (one connection each) hammer one key with 100 per second for 5 s;
/// returns the server times of the admissions.
async fn hammer<C>(limiters: Vec<RedisLimiter<C>>, key: &str) -> Vec<Duration>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let stop = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let limiter = limiters[t % limiters.len()].clone();
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut admitted = Vec::new();
            while tokio::time::Instant::now() < stop {
                let d = limiter.check(&key).await.expect("decision");
                if d.allowed {
                    admitted.push(
                        d.server_time
                            .expect("Redis decisions carry the server time"),
                    );
                }
            }
            admitted
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

async fn exactness<C>(conns: Vec<C>, prefix: &str)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let build = |algorithm| {
        conns
            .iter()
            .map(|c| {
                RedisLimiter::builder(c.clone())
                    .prefix(prefix)
                    .algorithm(algorithm)
                    .limit(Limit::per_second(100).unwrap())
                    .timeout(Duration::from_secs(2))
                    .build()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let mut log = hammer(build(Algorithm::SlidingLog), "hot").await;
    let worst = max_in_any_window(&mut log, Duration::from_secs(1));
    println!(
        "sliding log: {} admitted in 5 s, at most {worst} in any 1 s window",
        log.len()
    );
    assert!(
        worst <= 100,
        "sliding log admitted {worst} > 100 in one second"
    );
    assert!(
        log.len() >= 450,
        "only {} admitted in 5 s with 100/s",
        log.len()
    );

    let mut counter = hammer(build(Algorithm::SlidingWindowCounter), "hot").await;
    let worst = max_in_any_window(&mut counter, Duration::from_secs(1));
    println!(
        "window counter: {} admitted in 5 s, at most {worst} in any 1 s window",
        counter.len()
    );
    // The documented bound: never more than 2 × max in any window (at most max in each of
    // the two fixed windows a sliding window overlaps).
    assert!(
        worst <= 200,
        "window counter admitted {worst} > 200 in one second"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sliding_log_never_admits_more_than_the_limit_in_any_second() {
    let server = Redis::start().expect("redis-server");
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(conn(&server.url()).await);
    }
    exactness(conns, "exact").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sliding_log_is_exact_on_redis_cluster() {
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(
            connect_cluster(cluster.urls())
                .await
                .expect("cluster connection"),
        );
    }
    exactness(conns.clone(), "exact").await;

    // Several limits in one script: their keys share one hash tag, hence one slot.
    let limiter = RedisLimiter::builder(conns[0].clone())
        .limits([
            Limit::per_second(5).unwrap(),
            Limit::per_minute(50).unwrap(),
        ])
        .build()
        .unwrap();
    let keys = limiter.redis_keys("user:1");
    let mut c = conns[0].clone();
    let slots: Vec<i64> = futures_slots(&mut c, &keys).await;
    assert!(
        slots.windows(2).all(|w| w[0] == w[1]),
        "keys {keys:?} in slots {slots:?}"
    );
    for i in 0..5 {
        if i == 2 {
            // Every node forgets the script; EVALSHA gets NOSCRIPT, SCRIPT LOAD goes to all nodes.
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut c)
                .await
                .expect("SCRIPT FLUSH on all nodes");
        }
        assert!(limiter.check("user:1").await.unwrap().allowed);
    }
    assert!(!limiter.check("user:1").await.unwrap().allowed);
}

async fn futures_slots<C: redis::aio::ConnectionLike>(c: &mut C, keys: &[String]) -> Vec<i64> {
    let mut slots = Vec::new();
    for k in keys {
        slots.push(
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query_async(c)
                .await
                .expect("CLUSTER KEYSLOT"),
        );
    }
    slots
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_request_consumes_nothing_from_any_limit() {
    let server = Redis::start().expect("redis-server");
    let c = conn(&server.url()).await;
    for algorithm in [
        Algorithm::SlidingLog,
        Algorithm::SlidingWindowCounter,
        Algorithm::Gcra { burst: 2 },
    ] {
        let strict = Limit::per_minute(2).unwrap();
        // For GCRA the loose limit refills within milliseconds, so that after a short pause it
        // would admit on its own, and only the strict limit denies.
        let loose = match algorithm {
            Algorithm::Gcra { .. } => Limit::per_second(100).unwrap(),
            // (A different window: two limits of one window are refused, the stricter decides.)
            _ => Limit::new(10, Duration::from_secs(120)).unwrap(),
        };
        let prefix = format!("multi{algorithm:?}").replace(['{', '}', ' ', ':'], "");
        let both = RedisLimiter::builder(c.clone())
            .prefix(&prefix)
            .algorithm(algorithm)
            .limits([strict, loose])
            .build()
            .unwrap();
        // The same keys as `both`'s second limit.
        let only_loose = RedisLimiter::builder(c.clone())
            .prefix(&prefix)
            .algorithm(algorithm)
            .limit(loose)
            .build()
            .unwrap();
        assert!(both.check("k").await.unwrap().allowed);
        assert!(both.check("k").await.unwrap().allowed);
        if let Algorithm::Gcra { .. } = algorithm {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..5 {
            let d = both.check("k").await.unwrap();
            assert!(!d.allowed, "{algorithm:?}: the strict limit must deny");
            assert_eq!(d.limit, 2, "{algorithm:?}: the denying limit is reported");
        }
        let d = only_loose.check("k").await.unwrap();
        assert!(d.allowed);
        let expected = match algorithm {
            Algorithm::Gcra { .. } => 1, // refilled burst of 2, one used now
            _ => 10 - 3,
        };
        assert_eq!(
            d.remaining, expected,
            "{algorithm:?}: denied requests were recorded"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_costs_and_ttls() {
    let server = Redis::start().expect("redis-server");
    let mut c = conn(&server.url()).await;
    let limiter = RedisLimiter::builder(c.clone())
        .limit(Limit::per_minute(10).unwrap())
        .build()
        .unwrap();
    let d = limiter.check_n("w", 4).await.unwrap();
    assert!(d.allowed && d.remaining == 6, "{d:?}");
    assert!(limiter.check_n("w", 4).await.unwrap().allowed);
    let d = limiter.check_n("w", 3).await.unwrap();
    assert!(!d.allowed && d.remaining == 2, "{d:?}");
    let retry = d.retry_after.expect("retry_after on denial");
    assert!(
        retry > Duration::from_secs(59) && retry <= Duration::from_secs(60),
        "{retry:?}"
    );
    assert!(limiter.check_n("w", 2).await.unwrap().allowed);
    assert!(matches!(
        limiter.check_n("w", 11).await,
        Err(Error::CostExceedsLimit {
            cost: 11,
            capacity: 10
        })
    ));
    // 10 units in 3 admitted decisions: one member per decision, carrying its cost.
    let key = &limiter.redis_keys("w")[0];
    let members: i64 = redis::cmd("ZCARD")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(members, 3);

    for algorithm in [
        Algorithm::SlidingLog,
        Algorithm::SlidingWindowCounter,
        Algorithm::Gcra { burst: 5 },
    ] {
        let l = RedisLimiter::builder(c.clone())
            .prefix("ttl")
            .algorithm(algorithm)
            .limits([
                Limit::per_second(10).unwrap(),
                Limit::per_minute(100).unwrap(),
            ])
            .build()
            .unwrap();
        l.check("t").await.unwrap();
        let limits = [Duration::from_secs(2), Duration::from_secs(120)];
        for (key, bound) in l.redis_keys("t").iter().zip(limits) {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut c)
                .await
                .unwrap();
            assert!(
                pttl > 0 && pttl as u128 <= bound.as_millis(),
                "{algorithm:?}: {key} has PTTL {pttl} ms, expected in (0, {bound:?}]"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_denials_save_round_trips() {
    let server = Redis::start().expect("redis-server");
    let mut c = conn(&server.url()).await;
    for cache in [false, true] {
        let limiter = RedisLimiter::builder(c.clone())
            .prefix(format!("cache{cache}"))
            .limit(Limit::per_minute(1).unwrap())
            .cache_denials(cache)
            .build()
            .unwrap();
        // Load the script first (a NOSCRIPT reply also counts as a call).
        limiter.check("warm-up").await.unwrap();
        let before = evalsha_calls(&mut c).await;
        assert!(limiter.check("k").await.unwrap().allowed);
        for _ in 0..100 {
            let d = limiter.check("k").await.unwrap();
            assert!(!d.allowed && d.retry_after.is_some());
        }
        let calls = evalsha_calls(&mut c).await - before;
        if cache {
            assert_eq!(
                calls, 2,
                "one admission and one denial reach Redis, the rest is cached"
            );
        } else {
            assert_eq!(calls, 101);
        }
    }
}

/// Waits (bounded) until the limiter decides on Redis again.
async fn until_redis_decides<C>(limiter: &RedisLimiter<C>, key: &str)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(d) = limiter.check(key).await
            && d.server_time.is_some()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the limiter did not recover within 15 s of Redis coming back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_and_restarted_under_each_policy() {
    let server = Redis::start().expect("redis-server");
    let c = conn(&server.url()).await;
    let timeout = Duration::from_millis(300);
    let local = LocalLimiter::new(Limit::per_minute(3).unwrap()).unwrap();
    let policies = [
        ("fail_open", Policy::FailOpen),
        ("fail_closed", Policy::FailClosed),
        ("local", Policy::Local(local)),
    ];
    for (name, policy) in policies {
        let limiter = RedisLimiter::builder(c.clone())
            .prefix(name)
            .limit(Limit::per_second(1000).unwrap())
            .timeout(timeout)
            .on_unavailable(policy)
            .build()
            .unwrap();
        assert!(limiter.check("k").await.unwrap().server_time.is_some());
        server.kill().expect("kill redis");
        for i in 0..5 {
            let started = Instant::now();
            let result = limiter.check("k").await;
            let took = started.elapsed();
            // Bounded by the timeout (a dead server's socket may hang); slack for a busy machine.
            assert!(
                took < timeout + Duration::from_secs(3),
                "{name}: call {i} took {took:?}"
            );
            match name {
                "fail_open" => {
                    let d = result.expect("fail open answers");
                    assert!(d.allowed && d.server_time.is_none());
                }
                "fail_closed" => assert!(
                    matches!(result, Err(Error::Unavailable(_) | Error::Timeout(_))),
                    "{result:?}"
                ),
                _ => {
                    let d = result.expect("the local limiter answers");
                    assert!(d.server_time.is_none());
                    assert_eq!(
                        d.allowed,
                        i < 3,
                        "local limit of 3 per minute: call {i} (took {took:?})"
                    );
                }
            }
        }
        server.restart().expect("restart redis");
        // Restarted empty: the script is gone too, and is reloaded on NOSCRIPT.
        until_redis_decides(&limiter, "k").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_redis_costs_at_most_the_timeout() {
    let server = Redis::start().expect("redis-server");
    let c = conn(&server.url()).await;
    let limiter = RedisLimiter::builder(c)
        .limit(Limit::per_second(100).unwrap())
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(limiter.check("k").await.unwrap().allowed);
    server.pause().expect("SIGSTOP");
    let started = Instant::now();
    let result = limiter.check("k").await;
    let took = started.elapsed();
    server.resume().expect("SIGCONT");
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    // Bounded by the 200 ms timeout (a paused server never answers); the slack is for a busy
    // machine.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    until_redis_decides(&limiter, "k").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn script_flush_mid_run_is_invisible() {
    let server = Redis::start().expect("redis-server");
    let mut admin = conn(&server.url()).await;
    let limiter = RedisLimiter::builder(conn(&server.url()).await)
        .limit(Limit::per_minute(10).unwrap())
        .build()
        .unwrap();
    for i in 0..10u32 {
        if i % 3 == 0 {
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut admin)
                .await
                .unwrap();
        }
        let d = limiter.check("k").await.expect("reloaded after NOSCRIPT");
        assert!(d.allowed && d.remaining == 9 - i, "{d:?}");
    }
    assert!(!limiter.check("k").await.unwrap().allowed);
}

#[tokio::test(flavor = "multi_thread")]
async fn acl_user_in_the_url() {
    let server =
        Redis::start_with(RedisOptions::default().user("alice", "secret")).expect("redis-server");
    let url = server.url().replace("redis://", "redis://alice:secret@");
    let limiter = RedisLimiter::builder(conn(&url).await)
        .limit(Limit::per_second(5).unwrap())
        .build()
        .unwrap();
    assert!(limiter.check("k").await.unwrap().allowed);

    let wrong = server.url().replace("redis://", "redis://alice:wrong@");
    let started = Instant::now();
    let err = connect(&wrong, Duration::from_secs(2))
        .await
        .expect_err("wrong password");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, Error::Redis(_)),
        "an auth failure is not 'unavailable': {err}"
    );
}

/// A manager that has not connected yet (and cannot: nothing listens on the port).
fn lazy_manager_to_nowhere() -> ConnectionManager {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("client");
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(200)))
        .set_number_of_retries(1);
    ConnectionManager::new_lazy_with_config(client, config).expect("lazy manager")
}

#[tokio::test(flavor = "multi_thread")]
async fn build_validates_and_names_the_field() {
    let c = lazy_manager_to_nowhere();
    let limit = Limit::per_second(5).unwrap();
    let field = |r: Result<RedisLimiter, Error>| match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(field(RedisLimiter::builder(c.clone()).build()), "limits");
    assert_eq!(
        field(
            RedisLimiter::builder(c.clone())
                .limits([limit, limit])
                .build()
        ),
        "limits"
    );
    assert_eq!(
        field(
            RedisLimiter::builder(c.clone())
                .limit(limit)
                .prefix("a{b")
                .build()
        ),
        "prefix"
    );
    assert_eq!(
        field(
            RedisLimiter::builder(c.clone())
                .limit(limit)
                .algorithm(Algorithm::Gcra { burst: 0 })
                .build()
        ),
        "algorithm"
    );
    assert_eq!(
        field(
            RedisLimiter::builder(c.clone())
                .limit(limit)
                .timeout(Duration::ZERO)
                .build()
        ),
        "timeout"
    );
    let gcra = RedisLimiter::builder(c)
        .limit(limit)
        .algorithm(Algorithm::Gcra { burst: 2 })
        .build()
        .unwrap();
    assert_eq!(gcra.capacity(), 2, "for GCRA the largest cost is the burst");
    assert!(matches!(
        gcra.check_n("k", 3).await,
        Err(Error::CostExceedsLimit {
            cost: 3,
            capacity: 2
        })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_from_the_start_is_answered_within_the_timeout() {
    let limiter = RedisLimiter::builder(lazy_manager_to_nowhere())
        .limit(Limit::per_second(5).unwrap())
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let r = limiter.check("k").await;
        assert!(
            started.elapsed() < Duration::from_secs(2), // the 300 ms timeout, with slack
            "took {:?}",
            started.elapsed()
        );
        assert!(
            matches!(r, Err(Error::Unavailable(_) | Error::Timeout(_))),
            "{r:?}"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let r = limiter.acquire_with_deadline("k", 1, deadline).await;
    assert!(
        matches!(r, Err(Error::Unavailable(_) | Error::Timeout(_))),
        "acquire fails fast: {r:?}"
    );
}

/// A process that starts while Redis is down keeps its policy from the first decision
/// (`connect` would fail instead), and uses Redis once it is up.
#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_connection_applies_the_policy_until_redis_is_up() {
    let server = Redis::start().expect("redis-server");
    server.kill().expect("kill redis-server");
    assert!(
        connect(&server.url(), Duration::from_millis(300))
            .await
            .is_err(),
        "connect fails while Redis is down"
    );
    let limiter =
        RedisLimiter::builder(connect_lazy(&server.url(), Duration::from_millis(300)).unwrap())
            .limit(Limit::per_minute(1).unwrap())
            .on_unavailable(Policy::FailOpen)
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
    for _ in 0..3 {
        let d = limiter.check("k").await.expect("the policy answers");
        assert!(d.allowed, "admitted by FailOpen while Redis is down: {d:?}");
    }
    server.restart().expect("restart redis-server on its port");
    // Once Redis answers, it decides: one admission per minute, then denials.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut decisions = Vec::new();
    loop {
        let d = limiter.check("k").await.expect("a decision");
        decisions.push(d.allowed);
        if !d.allowed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis never decided after its restart: {decisions:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same for a Redis Cluster: `connect_cluster_lazy` returns at once while no node can be
/// reached (`connect_cluster` fails), the policy answers meanwhile, and the cluster decides once
/// its nodes answer. The nodes are reached through fault proxies that refuse every connection
/// until they are switched to pass.
#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_cluster_connection_applies_the_policy_until_the_cluster_answers() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap()
        .expect("start a Redis Cluster");
    let proxies: Vec<_> = (0..cluster.len())
        .map(|i| cluster.node(i).proxy().expect("proxy"))
        .collect();
    proxies.iter().for_each(|p| p.reset());
    let urls: Vec<String> = proxies
        .iter()
        .map(|p| format!("redis://{}/", p.addr()))
        .collect();
    let eager = tokio::time::timeout(Duration::from_secs(30), connect_cluster(urls.clone())).await;
    assert!(
        matches!(eager, Ok(Err(_))),
        "connect_cluster fails while no node answers"
    );
    let timeout = Duration::from_millis(300);
    let limiter = RedisLimiter::builder(connect_cluster_lazy(urls, timeout).unwrap())
        .limit(Limit::per_minute(1).unwrap())
        .on_unavailable(Policy::FailOpen)
        .timeout(timeout)
        .build()
        .unwrap();
    for _ in 0..3 {
        let d = limiter.check("k").await.expect("the policy answers");
        assert!(
            d.allowed && d.server_time.is_none(),
            "admitted by FailOpen while the cluster is unreachable: {d:?}"
        );
    }
    proxies.iter().for_each(|p| p.pass());
    // Once a node answers, the cluster decides: one admission per minute, then denials.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut decisions = Vec::new();
    loop {
        let d = limiter.check("k").await.expect("a decision");
        decisions.push((d.allowed, d.server_time.is_some()));
        if !d.allowed {
            assert!(d.server_time.is_some(), "{d:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never decided once reachable: {decisions:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acquire_on_redis_waits_for_the_server_retry_after() {
    let server = Redis::start().expect("redis-server");
    let limiter = RedisLimiter::builder(conn(&server.url()).await)
        .limit(Limit::new(2, Duration::from_millis(400)).unwrap())
        .build()
        .unwrap();
    assert!(limiter.check("k").await.unwrap().allowed);
    assert!(limiter.check("k").await.unwrap().allowed);
    // Started before the denial is asked for, so that however long its answer takes to reach
    // us, the slot cannot free before started + retry_after.
    let started = Instant::now();
    let denied = limiter.check("k").await.unwrap();
    let retry = denied.retry_after.expect("denied with retry_after");
    let d = limiter.acquire("k").await.unwrap();
    let waited = started.elapsed();
    assert!(d.allowed);
    // The wait is the server's retry_after, plus jitter (the server rounds to milliseconds).
    assert!(
        waited + Duration::from_millis(2) >= retry,
        "waited {waited:?}, retry_after {retry:?}"
    );
    assert!(
        waited < retry + Duration::from_millis(1000),
        "waited {waited:?}, retry_after {retry:?}"
    );
}
