//! The ratelimit part of the quick start: the in-process limiter (no Redis needed).

use std::time::Duration;

use palisade::ratelimit::{Limit, LocalLimiter, RateLimiter};

/// Shows palisade-ratelimit on its embedded default.
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let limiter = LocalLimiter::new(Limit::per_second(5)?)?;
    let mut admitted = 0;
    for _ in 0..8 {
        let d = limiter.check("user:42").await?;
        if d.allowed {
            admitted += 1;
        } else {
            println!(
                "[ratelimit] denied, retry after {:?}; headers: RateLimit: {}",
                d.retry_after.unwrap_or_default(),
                d.headers().rate_limit
            );
            break;
        }
    }
    println!("[ratelimit] 5 per second: {admitted} requests admitted at once for user:42");
    let started = std::time::Instant::now();
    limiter.acquire("user:42").await?;
    println!(
        "[ratelimit] acquire() waited {:?} for the next unit (about {:?})",
        started.elapsed(),
        Duration::from_millis(200)
    );
    Ok(())
}
