//! `BreakerLayer` inside a tower `ServiceBuilder`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use palisade_breaker::{
    BreakerError, BreakerLayer, CircuitBreaker, FakeClock, Outcome, State, Window,
};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

fn breaker(clock: &FakeClock) -> CircuitBreaker {
    CircuitBreaker::builder("svc")
        .sliding_window(Window::Count(2))
        .minimum_calls(2)
        .wait_in_open(Duration::from_secs(10))
        .half_open_permits(1)
        .clock(clock.clone())
        .build()
        .unwrap()
}

#[tokio::test]
async fn rejected_calls_never_reach_the_inner_service() {
    let clock = FakeClock::new();
    let b = breaker(&clock);
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let mut svc = ServiceBuilder::new()
        .layer(BreakerLayer::new(b.clone()))
        .service(service_fn(move |fail: bool| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { if fail { Err("boom") } else { Ok("ok") } }
        }));
    for _ in 0..2 {
        let r = svc.ready().await.unwrap().call(true).await;
        assert_eq!(r, Err(BreakerError::Inner("boom")));
    }
    assert_eq!(b.state(), State::Open);
    let r = svc.ready().await.unwrap().call(false).await;
    match r {
        Err(BreakerError::Rejected(rej)) => {
            assert_eq!(rej.retry_after(), Some(Duration::from_secs(10)))
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the rejected request was not passed on"
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(svc.ready().await.unwrap().call(false).await, Ok("ok"));
    assert_eq!(b.state(), State::Closed);
    assert_eq!(svc.get_ref().clone().oneshot(false).await, Ok("ok"));
}

#[tokio::test]
async fn a_classifier_turns_ok_responses_into_failures() {
    let clock = FakeClock::new();
    let b = breaker(&clock);
    let layer = BreakerLayer::new(b.clone()).with_classifier(|r: &Result<u16, ()>| match r {
        Ok(code) if *code >= 500 => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(()) => Outcome::Failure,
    });
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|code: u16| async move { Ok::<_, ()>(code) }));
    assert_eq!(svc.ready().await.unwrap().call(503).await, Ok(503));
    assert_eq!(svc.ready().await.unwrap().call(502).await, Ok(502));
    assert_eq!(b.state(), State::Open);
    assert!(
        svc.ready()
            .await
            .unwrap()
            .call(200)
            .await
            .unwrap_err()
            .is_rejected()
    );
}

#[tokio::test]
async fn a_dropped_response_future_gives_the_probe_back() {
    let clock = FakeClock::new();
    let b = breaker(&clock);
    b.force_open();
    b.reset();
    for _ in 0..2 {
        b.try_acquire().unwrap().failure(Duration::ZERO);
    }
    clock.advance(Duration::from_secs(10));
    let mut svc = ServiceBuilder::new()
        .layer(BreakerLayer::new(b.clone()))
        .service(service_fn(|pending: bool| async move {
            if pending {
                std::future::pending::<()>().await;
            }
            Ok::<_, ()>(())
        }));
    let stuck = svc.ready().await.unwrap().call(true);
    assert!(b.try_acquire().is_err(), "the one probe is taken");
    drop(stuck);
    assert_eq!(svc.ready().await.unwrap().call(false).await, Ok(()));
    assert_eq!(b.state(), State::Closed);
}
