//! `examples/metrics_dashboard`: its exporter scraped over HTTP on 127.0.0.1, with the names and
//! values a resilience4j dashboard and an Envoy rate-limit dashboard expect, against real Redis
//! (stopped at the end, for the unavailable-Redis counts).

#[path = "../examples/metrics_dashboard/dashboard.rs"]
mod dashboard;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use palisade::ratelimit::{Limit, Policy, RateLimiter, RedisLimiter, connect};
use palisade_testkit::Redis;

/// `GET /metrics`, retried (bounded) until the listener is up.
fn scrape(addr: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.starts_with("HTTP/1.1 200") => return body,
            other => assert!(
                Instant::now() < deadline,
                "no metrics from {addr} within 10 s: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the series `name{labels}` (labels exactly as rendered), if present.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_serves_resilience4j_and_envoy_names_over_http() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    dashboard::serve(addr).expect("the exporter listens");
    let redis = Redis::start().expect("redis-server");
    let conn = connect(&redis.url(), Duration::from_secs(2)).await.unwrap();
    let limiter = RedisLimiter::builder(conn)
        .prefix("api")
        .limit(Limit::per_minute(10).unwrap())
        .timeout(Duration::from_millis(300))
        .on_unavailable(Policy::FailOpen)
        .build()
        .unwrap();
    let breaker = dashboard::breaker().unwrap();
    dashboard::traffic(&limiter, &breaker).await.unwrap();
    redis.kill().expect("stop redis");
    let d = limiter.check("user:42").await.expect("fail open");
    assert!(d.allowed && d.server_time.is_none());
    // A peek (cost 0) while Redis is down is answered by the policy too, and counts nothing.
    let peek = limiter.check_n("user:42", 0).await.expect("fail open");
    assert!(peek.allowed);

    let body = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    for line in body.lines().filter(|l| l.starts_with("r")) {
        println!("{line}");
    }
    let expect = |series: &str, want: f64| {
        assert_eq!(value(&body, series), Some(want), "{series} in:\n{body}");
    };
    // The limiter, as Envoy's rate-limit service reports it.
    let rl = |stat: &str| {
        format!("ratelimit_service_rate_limit_{stat}{{domain=\"api\",key1=\"10/min\"}}")
    };
    expect(&rl("total_hits"), 12.0);
    expect(&rl("within_limit"), 10.0);
    expect(&rl("near_limit"), 2.0);
    expect(&rl("over_limit"), 2.0);
    expect("ratelimit_service_rate_limit_error{domain=\"api\"}", 1.0);
    expect(
        "ratelimit_service_rate_limit_failure_mode_allowed{domain=\"api\"}",
        1.0,
    );
    // The breaker, as resilience4j's Micrometer binding exports it.
    let cb = |name: &str, labels: &str| format!("resilience4j_circuitbreaker_{name}{{{labels}}}");
    expect(&cb("state", "name=\"orders\",state=\"open\""), 1.0);
    expect(&cb("state", "name=\"orders\",state=\"closed\""), 0.0);
    expect(&cb("state", "name=\"orders\",state=\"half_open\""), 0.0);
    expect(&cb("failure_rate", "name=\"orders\""), 50.0);
    expect(&cb("slow_call_rate", "name=\"orders\""), 0.0);
    expect(
        &cb("calls_seconds_count", "name=\"orders\",kind=\"successful\""),
        5.0,
    );
    expect(
        &cb("calls_seconds_count", "name=\"orders\",kind=\"failed\""),
        5.0,
    );
    expect(
        &cb(
            "not_permitted_calls_total",
            "name=\"orders\",kind=\"not_permitted\"",
        ),
        3.0,
    );
    let failed_seconds = value(
        &body,
        &cb("calls_seconds_sum", "name=\"orders\",kind=\"failed\""),
    );
    assert!(
        failed_seconds.is_some_and(|s| (s - 0.1).abs() < 1e-9),
        "5 failed calls of 20 ms: {failed_seconds:?}"
    );
}
