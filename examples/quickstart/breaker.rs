//! The breaker part of the quick start: a breaker opens on failures and recovers.

use std::time::Duration;

use palisade::breaker::{BreakerError, CircuitBreaker, Window};

/// Shows palisade-breaker on its embedded default: opening on failures, rejecting while open,
/// probing in half-open and closing again.
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let breaker = CircuitBreaker::builder("flaky-api")
        .sliding_window(Window::Count(4))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .wait_in_open(Duration::from_millis(200))
        .half_open_permits(1)
        .build()?;

    for i in 1..=4 {
        let r = breaker
            .call(|| async { Err::<(), _>("upstream returned 500") })
            .await;
        let outcome = match r {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("failed ({e})"),
        };
        println!("[breaker] call {i}: {outcome} -> state {}", breaker.state());
    }
    match breaker.call(|| async { Ok::<_, &str>("hello") }).await {
        Err(BreakerError::Rejected(r)) => println!("[breaker] call 5 rejected: {r}"),
        other => println!("[breaker] call 5: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let r = breaker.call(|| async { Ok::<_, &str>("hello") }).await;
    println!(
        "[breaker] after the wait, a probe: {:?} -> state {}",
        r.ok(),
        breaker.state()
    );
    let m = breaker.metrics();
    println!(
        "[breaker] {} ok, {} failed, {} rejected",
        m.successful_calls, m.failed_calls, m.not_permitted_calls
    );
    Ok(())
}
