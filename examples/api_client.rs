//! Calls a flaky HTTP API through a tower stack of rate limit + circuit breaker, with retries
//! beside it: the shape of every client of an external API.
//!
//! The example starts its own small HTTP server on 127.0.0.1 that fails on purpose (requests
//! 6 to 15 get `503`), then makes 40 calls:
//! - the rate limit (20 calls per second, in-process) spaces the calls out (`Mode::Wait`);
//! - the breaker opens after the failures pile up, so the struggling server gets no calls
//!   while it is open, and half-opens to probe it;
//! - backon retries a rejected call after the breaker's `retry_after`, and a failed call with
//!   exponential backoff.
//!
//! Run it with `cargo run --example api_client`.

use backon::{ExponentialBuilder, Retryable};
use palisade::breaker::{BreakerError, BreakerLayer, CircuitBreaker, State, Window};
use palisade::ratelimit::{Limit, LocalLimiter, Mode, RateLimitLayer};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// A server error returned by the API.
#[derive(Debug)]
struct HttpError(u16);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server answered {}", self.0)
    }
}

impl std::error::Error for HttpError {}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (addr, served) = flaky_server().await?;
    println!("flaky API at http://{addr}/ (requests 6..=15 fail with 503)");

    let breaker = CircuitBreaker::builder("partner-api")
        .sliding_window(Window::Count(10))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_millis(300))
        .half_open_permits(2)
        .build()?;
    let limiter = LocalLimiter::new(Limit::per_second(20)?)?;
    let client = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, |_: &String| "partner-api").mode(Mode::Wait))
        .layer(BreakerLayer::new(breaker.clone()))
        .service(service_fn(move |path: String| get(addr, path)));

    let mut events = breaker.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let palisade::breaker::Event::StateTransition { from, to, .. } = event {
                println!("  breaker: {from:?} -> {to:?}");
            }
        }
    });

    let started = Instant::now();
    let mut ok = 0;
    for i in 0..40 {
        let call = || {
            let client = client.clone();
            async move { client.oneshot(format!("/items/{i}")).await }
        };
        let result = call
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(20))
                    .with_max_times(6),
            )
            // A rejection says when the breaker may let a call through: wait that long.
            .adjust(|error, backoff| {
                Some(retry_after(error.as_ref()).unwrap_or(backoff.unwrap_or_default()))
            })
            .await;
        match result {
            Ok(status) => ok += u32::from(status == 200),
            Err(error) => println!("  call {i} gave up: {error}"),
        }
    }
    let metrics = breaker.metrics();
    println!(
        "{ok}/40 calls succeeded in {:.1?}; the server saw {} requests; breaker is {:?}, \
         {} calls were not permitted while it was open",
        started.elapsed(),
        served.load(Ordering::Relaxed),
        breaker.state(),
        metrics.not_permitted_calls
    );
    assert_eq!(
        breaker.state(),
        State::Closed,
        "the breaker recovers once the server does"
    );
    Ok(())
}

fn retry_after(error: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<Duration> {
    let breaker_error = error.downcast_ref::<BreakerError<std::io::Error>>()?;
    breaker_error.rejected()?.retry_after()
}

/// GET `path`; a 5xx status is an error (so the breaker counts it as a failure).
async fn get(addr: std::net::SocketAddr, path: String) -> Result<u16, std::io::Error> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed response"))?;
    if status >= 500 {
        return Err(std::io::Error::other(HttpError(status)));
    }
    Ok(status)
}

/// An HTTP server on a free loopback port whose requests 6 to 15 fail with 503.
async fn flaky_server() -> std::io::Result<(std::net::SocketAddr, Arc<AtomicU32>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let served = Arc::new(AtomicU32::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let (status, body) = if (6..=15).contains(&n) {
                    ("503 Service Unavailable", "busy")
                } else {
                    ("200 OK", "ok")
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok((addr, served))
}
