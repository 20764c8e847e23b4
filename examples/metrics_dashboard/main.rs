//! Serves palisade's metrics for Prometheus, under the names existing dashboards know:
//! resilience4j's for the circuit breaker, Envoy's rate-limit service's for the limiter.
//!
//! ```sh
//! cargo run --example metrics_dashboard -- 127.0.0.1:9000   # then: curl 127.0.0.1:9000/metrics
//! ```
//!
//! The limiter uses the Redis at `PALISADE_REDIS_URL` (default `redis://127.0.0.1:6379/`) and
//! admits when it is unavailable (`Policy::FailOpen`): without a Redis, every decision shows up
//! as `ratelimit_service_rate_limit_error` and `..._failure_mode_allowed`. Ctrl-C stops it.

mod dashboard;

use std::time::Duration;

use palisade::ratelimit::redis_crate::{Client, aio::ConnectionManager};
use palisade::ratelimit::{Limit, Policy, RedisLimiter};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into())
        .parse()?;
    dashboard::serve(addr)?;
    let url = std::env::var("PALISADE_REDIS_URL").unwrap_or("redis://127.0.0.1:6379/".into());
    // A lazy connection: the example starts (and fails open) even when Redis is not up.
    let conn = ConnectionManager::new_lazy_with_config(Client::open(url)?, Default::default())?;
    let limiter = RedisLimiter::builder(conn)
        .prefix("api")
        .limit(Limit::per_minute(10)?)
        .timeout(Duration::from_millis(200))
        .on_unavailable(Policy::FailOpen)
        .build()?;
    let breaker = dashboard::breaker()?;
    dashboard::traffic(&limiter, &breaker).await?;
    println!("serving metrics on http://{addr}/metrics (Ctrl-C to stop)");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
