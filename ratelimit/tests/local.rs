//! The embedded `LocalLimiter`, `acquire`, and the tower layer, on tokio's paused clock.

use std::convert::Infallible;
use std::time::Duration;

use palisade_ratelimit::{
    Error, Limit, LocalLimiter, Mode, RateLimitLayer, RateLimiter, Rejected, TokioClock,
};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

fn ten_per_second() -> LocalLimiter<TokioClock> {
    LocalLimiter::with_clock(Limit::per_second(10).unwrap(), 10, TokioClock).unwrap()
}

#[tokio::test(start_paused = true)]
async fn bursts_then_paces_with_exact_retry_after() {
    let l = ten_per_second();
    for i in 0..10 {
        let d = l.check("k").await.unwrap();
        assert!(d.allowed, "burst unit {i}");
        assert_eq!(d.remaining, 9 - i);
    }
    let d = l.check("k").await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
    // Other keys are independent.
    assert!(l.check("other").await.unwrap().allowed);
    tokio::time::advance(Duration::from_millis(99)).await;
    assert!(!l.check("k").await.unwrap().allowed);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(l.check("k").await.unwrap().allowed);
}

#[tokio::test(start_paused = true)]
async fn weighted_cost_and_invalid_costs() {
    let l = ten_per_second();
    assert!(l.check_n("k", 7).await.unwrap().allowed);
    let d = l.check_n("k", 4).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
    assert!(l.check_n("k", 3).await.unwrap().allowed);
    assert!(matches!(
        l.check_n("k", 11).await,
        Err(Error::CostExceedsLimit {
            cost: 11,
            capacity: 10
        })
    ));
    // A cost of 0 is a peek: what is left, nothing consumed.
    let peek = l.check_n("k", 0).await.unwrap();
    assert!(peek.allowed && peek.remaining == 0, "{peek:?}");
    tokio::time::advance(Duration::from_millis(250)).await;
    assert_eq!(l.peek("k").await.unwrap().remaining, 2);
    assert_eq!(l.peek("k").await.unwrap().remaining, 2);
    assert_eq!(l.peek("never-seen").await.unwrap().remaining, 10);
    assert_eq!(l.len(), 1, "a peek stores no key");
    // A reset key starts with the full burst.
    l.reset("k");
    assert_eq!(l.check_n("k", 10).await.unwrap().remaining, 0);
}

#[tokio::test(start_paused = true)]
async fn acquire_waits_the_retry_after_plus_bounded_jitter() {
    let l = ten_per_second();
    l.check_n("k", 10).await.unwrap();
    let started = Instant::now();
    let d = l.acquire_n("k", 5).await.unwrap();
    let waited = started.elapsed();
    assert!(d.allowed);
    // 5 units at 100 ms each; jitter adds at most 10% (capped at 20 ms) per attempt.
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    assert!(waited <= Duration::from_millis(520), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn acquire_with_deadline_gives_up_without_sleeping_in_vain() {
    let l = ten_per_second();
    l.check_n("k", 10).await.unwrap();
    let started = Instant::now();
    let err = l
        .acquire_with_deadline("k", 5, started + Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded(d) if d.retry_after == Some(Duration::from_millis(500)))
    );
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "it knew at once the deadline was too short"
    );
    let d = l
        .acquire_with_deadline("k", 1, started + Duration::from_millis(300))
        .await
        .unwrap();
    assert!(d.allowed);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn many_waiters_are_admitted_at_the_steady_rate() {
    let l = ten_per_second();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            l.acquire("k").await.unwrap();
            Instant::now()
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.unwrap() - started);
    }
    times.sort();
    // 10 at once, then 20 more at 100 ms each.
    assert!(times[9] < Duration::from_millis(1));
    assert!(times[29] >= Duration::from_secs(2), "{:?}", times[29]);
    assert!(times[29] < Duration::from_millis(2300), "{:?}", times[29]);
}

#[tokio::test(start_paused = true)]
async fn retain_recent_forgets_only_replenished_keys() {
    let l = ten_per_second();
    l.check_n("busy", 10).await.unwrap();
    l.check("idle").await.unwrap();
    tokio::time::advance(Duration::from_millis(200)).await;
    l.retain_recent();
    assert_eq!(l.len(), 1);
    assert!(
        !l.check_n("busy", 9).await.unwrap().allowed,
        "busy kept its state"
    );
}

#[tokio::test(start_paused = true)]
async fn tower_layer_rejects_with_the_decision_or_waits() {
    let echo = service_fn(|req: String| async move { Ok::<_, Infallible>(req) });
    let limiter = LocalLimiter::with_clock(Limit::per_second(2).unwrap(), 2, TokioClock).unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter.clone(), |req: &String| {
            req.clone()
        }))
        .service(echo);
    for _ in 0..2 {
        assert_eq!(
            svc.ready().await.unwrap().call("a".into()).await.unwrap(),
            "a"
        );
    }
    let err = svc
        .ready()
        .await
        .unwrap()
        .call("a".into())
        .await
        .unwrap_err();
    let rejected = err.downcast_ref::<Rejected>().expect("a Rejected error");
    assert_eq!(
        rejected.decision.retry_after,
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        rejected.decision.headers().retry_after.as_deref(),
        Some("1")
    );
    // Keys come from the request.
    assert!(svc.ready().await.unwrap().call("b".into()).await.is_ok());

    let mut waiting = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, |req: &String| req.clone()).mode(Mode::Wait))
        .service(echo);
    let started = Instant::now();
    assert_eq!(
        waiting
            .ready()
            .await
            .unwrap()
            .call("a".into())
            .await
            .unwrap(),
        "a"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
}
