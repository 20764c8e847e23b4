//! Retry beside the breaker with backon: a rejection is retried after its `retry_after`, an
//! inner error after an exponential backoff.

use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use palisade_breaker::{BreakerError, CircuitBreaker, State, TokioClock, Window};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn rejected_waits_retry_after_and_errors_back_off_exponentially() {
    let breaker = CircuitBreaker::builder("upstream")
        .sliding_window(Window::Count(2))
        .minimum_calls(2)
        .wait_in_open(Duration::from_secs(5))
        .half_open_permits(1)
        .clock(TokioClock::new())
        .build()
        .unwrap();
    let start = Instant::now();
    let ran = Mutex::new(Vec::new());
    let attempts = Mutex::new(Vec::new());

    let op = || async {
        let r = breaker
            .call(|| async {
                let mut ran = ran.lock().unwrap();
                ran.push(start.elapsed());
                if ran.len() <= 2 {
                    Err("503")
                } else {
                    Ok("payload")
                }
            })
            .await;
        attempts
            .lock()
            .unwrap()
            .push((start.elapsed(), r.as_ref().err().map(|e| e.is_rejected())));
        r
    };
    let result = op
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_factor(2.0)
                .with_max_times(5),
        )
        .sleep(tokio::time::sleep)
        .adjust(|e: &BreakerError<&str>, backoff| match e {
            // Retry exactly when the breaker may permit a call again.
            BreakerError::Rejected(r) => backoff.map(|d| r.retry_after().unwrap_or(d)),
            _ => backoff,
        })
        .await;

    assert_eq!(result, Ok("payload"));
    assert_eq!(breaker.state(), State::Closed);
    let ms = |m| Duration::from_millis(m);
    // tokio's timer has millisecond ticks: round to 10 ms.
    let round = |d: Duration| ms((d.as_millis() as u64 + 5) / 10 * 10);
    let attempts: Vec<_> = attempts
        .lock()
        .unwrap()
        .iter()
        .map(|(t, r)| (round(*t), *r))
        .collect();
    let ran: Vec<_> = ran.lock().unwrap().iter().map(|t| round(*t)).collect();
    assert_eq!(
        attempts,
        vec![
            (ms(0), Some(false)),   // inner error: back off 100 ms
            (ms(100), Some(false)), // inner error, the breaker opens (5 s): back off 200 ms
            (ms(300), Some(true)),  // rejected with retry_after 4.8 s
            (ms(5100), None),       // the half-open probe succeeds and closes the breaker
        ]
    );
    assert_eq!(
        ran,
        vec![ms(0), ms(100), ms(5100)],
        "the rejected attempt did not run the operation"
    );
}
