//! The part of the example that the test `tests/metrics_dashboard.rs` runs too: the Prometheus
//! exporter, and a fixed burst of traffic whose counts the test knows.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use palisade::breaker::{CircuitBreaker, Window};
use palisade::ratelimit::RateLimiter;

/// Installs the Prometheus recorder and serves it on `addr` (any path, e.g. `/metrics`). Call it
/// inside a tokio runtime, before building breakers and limiters.
pub fn serve(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    Ok(())
}

/// The breaker of the demo: opens at 50 % failures over the last 10 calls.
pub fn breaker() -> Result<CircuitBreaker, Box<dyn std::error::Error>> {
    Ok(CircuitBreaker::builder("orders")
        .sliding_window(Window::Count(10))
        .minimum_calls(10)
        .failure_rate_threshold(0.5)
        .build()?)
}

/// A burst of traffic: 12 decisions of one unit for `user:42` (against a 10-per-minute limit:
/// 10 admitted, the last two of them above 80 %, 2 denied), and 10 calls through the breaker,
/// every other one failing (it opens), then 3 calls it does not permit.
pub async fn traffic(
    limiter: &impl RateLimiter,
    breaker: &CircuitBreaker,
) -> Result<(), Box<dyn std::error::Error>> {
    for _ in 0..12 {
        limiter.check("user:42").await?;
    }
    for i in 0..13 {
        let Ok(permit) = breaker.try_acquire() else {
            continue;
        };
        if i % 2 == 0 {
            permit.success(Duration::from_millis(5));
        } else {
            permit.failure(Duration::from_millis(20));
        }
    }
    Ok(())
}
