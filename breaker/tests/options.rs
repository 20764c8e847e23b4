//! One test per option and per state: what each one does to the breaker.

use std::time::Duration;

use palisade_breaker::{
    BreakerError, CircuitBreaker, Event, FakeClock, OpenBackoff, Outcome, State, Window,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// A breaker on a fake clock: count window of 4, minimum 4 calls, 10 s open, 2 probes.
fn small(clock: &FakeClock) -> palisade_breaker::BreakerBuilder {
    CircuitBreaker::builder("test")
        .sliding_window(Window::Count(4))
        .minimum_calls(4)
        .wait_in_open(secs(10))
        .half_open_permits(2)
        .clock(clock.clone())
}

fn ok(b: &CircuitBreaker) {
    b.try_acquire().expect("permitted").success(ms(1));
}

fn fail(b: &CircuitBreaker) {
    b.try_acquire().expect("permitted").failure(ms(1));
}

#[test]
fn breaker_is_a_cheap_shareable_handle() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<CircuitBreaker>();
    fn sendable<T: Send>(_: &T) {}
    let b = CircuitBreaker::builder("s").build().unwrap();
    let call = b.call(|| async { Ok::<_, ()>(()) });
    sendable(&call);
    let clone = b.clone();
    clone.force_open();
    assert_eq!(b.state(), State::ForcedOpen, "clones share one state");
}

#[test]
fn defaults_are_resilience4j_defaults() {
    let b = CircuitBreaker::builder("d").build().unwrap();
    // 50 failures among 100 calls open it; 49 do not.
    for _ in 0..51 {
        ok(&b);
    }
    for _ in 0..49 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().buffered_calls, 100);
    fail(&b); // the oldest success leaves, 50 of 100 failed
    assert_eq!(b.state(), State::Open);
    let r = b.try_acquire().unwrap_err();
    let wait = r.retry_after().unwrap();
    assert!(wait > secs(59) && wait <= secs(60), "{wait:?}");
}

#[test]
fn failure_rate_opens_the_breaker() {
    let clock = FakeClock::new();
    let b = small(&clock).failure_rate_threshold(0.5).build().unwrap();
    ok(&b);
    ok(&b);
    fail(&b);
    assert_eq!(b.state(), State::Closed, "3 calls are below minimum_calls");
    fail(&b);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.metrics().failed_calls, 2);
}

#[test]
fn minimum_calls_holds_the_breaker_closed() {
    let clock = FakeClock::new();
    let b = small(&clock)
        .sliding_window(Window::Count(10))
        .minimum_calls(5)
        .build()
        .unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Closed, "4 failures < minimum_calls 5");
    fail(&b);
    assert_eq!(b.state(), State::Open);
}

#[test]
fn minimum_calls_above_the_count_window_acts_as_the_window_size() {
    let clock = FakeClock::new();
    let b = small(&clock).minimum_calls(1000).build().unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Open);
}

#[test]
fn slow_calls_open_the_breaker() {
    let clock = FakeClock::new();
    let b = small(&clock)
        .slow_call_duration(ms(500))
        .slow_call_rate_threshold(0.75)
        .build()
        .unwrap();
    b.try_acquire().unwrap().success(ms(100));
    b.try_acquire().unwrap().success(ms(500));
    b.try_acquire().unwrap().success(ms(900));
    assert_eq!(b.state(), State::Closed);
    b.try_acquire().unwrap().success(secs(2));
    assert_eq!(b.state(), State::Open, "3 of 4 calls were slow");
    let m = b.metrics();
    assert_eq!(
        (m.slow_calls, m.successful_calls, m.failed_calls),
        (3, 4, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn call_times_slow_calls_with_the_clock() {
    let b = CircuitBreaker::builder("slow")
        .sliding_window(Window::Count(2))
        .minimum_calls(2)
        .slow_call_duration(secs(1))
        .clock(palisade_breaker::TokioClock::new())
        .build()
        .unwrap();
    for _ in 0..2 {
        let r: Result<(), BreakerError<()>> = b
            .call(|| async {
                tokio::time::sleep(secs(2)).await;
                Ok(())
            })
            .await;
        assert!(r.is_ok());
    }
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.metrics().slow_calls, 2);
}

#[tokio::test(start_paused = true)]
async fn calls_are_timed_only_once_slow_calls_are_configured() {
    let slow_call = |b: CircuitBreaker| async move {
        let r: Result<(), BreakerError<()>> = b
            .call(|| async {
                tokio::time::sleep(secs(120)).await;
                Ok(())
            })
            .await;
        assert!(r.is_ok());
        b.metrics().slow_calls
    };
    let builder = || CircuitBreaker::builder("t").clock(palisade_breaker::TokioClock::new());
    let default = builder().build().unwrap();
    assert_eq!(
        slow_call(default).await,
        0,
        "by default calls are not timed"
    );
    let with_threshold = builder().slow_call_rate_threshold(0.9).build().unwrap();
    assert_eq!(
        slow_call(with_threshold).await,
        1,
        "a threshold turns detection on (60 s default)"
    );
    let explicit = builder().slow_call_detection(true).build().unwrap();
    assert_eq!(
        slow_call(explicit).await,
        1,
        "resilience4j's 60 s default applies"
    );
    let off = builder()
        .slow_call_duration(secs(1))
        .slow_call_detection(false)
        .build()
        .unwrap();
    assert_eq!(slow_call(off).await, 0, "an explicit off wins");
}

#[test]
fn open_waits_then_half_open_probes_decide() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Open);
    clock.advance(secs(4));
    let r = b.try_acquire().unwrap_err();
    assert_eq!(r.state(), State::Open);
    assert_eq!(r.retry_after(), Some(secs(6)));
    clock.advance(secs(6));
    assert_eq!(
        b.state(),
        State::Open,
        "without automatic_half_open, a call moves it"
    );
    let p1 = b.try_acquire().expect("first probe");
    assert_eq!(b.state(), State::HalfOpen);
    let p2 = b.try_acquire().expect("second probe");
    let r = b.try_acquire().unwrap_err();
    assert_eq!((r.state(), r.retry_after()), (State::HalfOpen, None));
    p1.success(ms(1));
    assert_eq!(b.state(), State::HalfOpen);
    p2.success(ms(1));
    assert_eq!(b.state(), State::Closed);
    assert_eq!(
        b.metrics().buffered_calls,
        0,
        "closing starts an empty window"
    );
}

#[test]
fn a_failed_probe_reopens() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    clock.advance(secs(10));
    fail(&b);
    ok(&b);
    assert_eq!(b.state(), State::Open, "1 of 2 probes failed: 50 % >= 50 %");
}

#[test]
fn a_dropped_permit_gives_its_probe_slot_back() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    clock.advance(secs(10));
    let p1 = b.try_acquire().unwrap();
    let p2 = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err());
    drop(p1);
    let p3 = b
        .try_acquire()
        .expect("the dropped permit's slot is free again");
    p2.ignore();
    let p4 = b
        .try_acquire()
        .expect("an ignored probe gives its slot back too");
    p3.success(ms(1));
    p4.success(ms(1));
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().ignored_calls, 1);
}

#[test]
fn automatic_half_open_moves_without_a_call() {
    let clock = FakeClock::new();
    let b = small(&clock).automatic_half_open(true).build().unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    clock.advance(secs(10));
    assert_eq!(b.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn automatic_half_open_timer_fires_in_a_runtime() {
    let b = CircuitBreaker::builder("auto")
        .sliding_window(Window::Count(1))
        .minimum_calls(1)
        .wait_in_open(secs(5))
        .automatic_half_open(true)
        .clock(palisade_breaker::TokioClock::new())
        .build()
        .unwrap();
    let mut events = b.subscribe();
    fail(&b);
    tokio::time::sleep(secs(6)).await;
    let got = events.drain();
    assert!(
        got.contains(&Event::StateTransition {
            from: State::Open,
            to: State::HalfOpen
        }),
        "the timer moved it to half-open without anyone asking: {got:?}"
    );
}

#[test]
fn max_wait_in_half_open_reopens() {
    let clock = FakeClock::new();
    let b = small(&clock)
        .max_wait_in_half_open(secs(3))
        .build()
        .unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    clock.advance(secs(10));
    let _probe = b.try_acquire().unwrap();
    clock.advance(secs(2));
    assert_eq!(b.state(), State::HalfOpen);
    clock.advance(secs(1));
    assert_eq!(
        b.state(),
        State::Open,
        "the probes did not finish within 3 s"
    );
}

#[test]
fn zero_max_wait_in_half_open_waits_for_the_probes() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    clock.advance(secs(10));
    let _probe = b.try_acquire().unwrap();
    clock.advance(secs(3600));
    assert_eq!(b.state(), State::HalfOpen);
}

#[test]
fn open_backoff_grows_the_wait_on_reopening() {
    let clock = FakeClock::new();
    let b = small(&clock)
        .half_open_permits(1)
        .open_backoff(OpenBackoff::exponential(secs(35)).with_jitter(0.0))
        .build()
        .unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    let mut waits = Vec::new();
    for _ in 0..4 {
        let wait = b.try_acquire().unwrap_err().retry_after().unwrap();
        waits.push(wait.as_secs());
        clock.advance(wait);
        fail(&b); // the probe fails: open again
    }
    assert_eq!(waits, vec![10, 20, 35, 35]);
    // A successful probe closes and resets the growth.
    clock.advance(secs(35));
    ok(&b);
    assert_eq!(b.state(), State::Closed);
    for _ in 0..4 {
        fail(&b);
    }
    assert_eq!(b.try_acquire().unwrap_err().retry_after(), Some(secs(10)));
}

#[test]
fn forced_open_rejects_everything() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    b.force_open();
    for _ in 0..3 {
        let r = b.try_acquire().unwrap_err();
        assert_eq!((r.state(), r.retry_after()), (State::ForcedOpen, None));
        clock.advance(secs(3600));
    }
    assert_eq!(b.state(), State::ForcedOpen);
    assert_eq!(b.metrics().not_permitted_calls, 3);
    b.reset();
    assert_eq!(b.state(), State::Closed);
    ok(&b);
}

#[test]
fn disabled_permits_everything_and_records_nothing() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    b.disable();
    for _ in 0..100 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Disabled);
    let m = b.metrics();
    assert_eq!((m.failed_calls, m.buffered_calls), (0, 0));
}

#[test]
fn metrics_only_records_but_never_opens() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    b.metrics_only();
    for _ in 0..10 {
        fail(&b);
    }
    assert_eq!(b.state(), State::MetricsOnly);
    let m = b.metrics();
    assert_eq!(
        (m.failed_calls, m.buffered_calls, m.failure_rate),
        (10, 4, 1.0)
    );
}

#[test]
fn reset_closes_and_clears_the_window() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    fail(&b);
    fail(&b);
    fail(&b);
    b.reset();
    fail(&b);
    assert_eq!(
        b.state(),
        State::Closed,
        "the window forgot the first three failures"
    );
    assert_eq!(b.metrics().buffered_calls, 1);
    for _ in 0..3 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Open);
    b.reset();
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn time_window_forgets_old_buckets() {
    let clock = FakeClock::new();
    let b = small(&clock)
        .sliding_window(Window::Time(secs(10)))
        .minimum_calls(4)
        .build()
        .unwrap();
    fail(&b);
    fail(&b);
    fail(&b);
    clock.advance(secs(10));
    assert_eq!(
        b.metrics().buffered_calls,
        0,
        "the failures' second has left the window"
    );
    fail(&b);
    assert_eq!(
        b.state(),
        State::Closed,
        "1 call in the window < minimum_calls"
    );
    clock.advance(secs(5));
    fail(&b);
    fail(&b);
    ok(&b);
    assert_eq!(
        b.state(),
        State::Open,
        "3 of 4 calls in the last 10 s failed"
    );
}

#[test]
fn time_window_success_can_cross_minimum_calls_and_open() {
    let clock = FakeClock::new();
    let b = small(&clock)
        .sliding_window(Window::Time(secs(10)))
        .minimum_calls(3)
        .build()
        .unwrap();
    fail(&b);
    fail(&b);
    ok(&b);
    assert_eq!(b.state(), State::Open);
}

#[test]
fn outcomes_from_an_earlier_state_are_not_counted() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    let late = b.try_acquire().unwrap();
    b.reset();
    late.failure(ms(1));
    assert_eq!(b.metrics().buffered_calls, 0);
    assert_eq!(
        b.metrics().failed_calls,
        1,
        "lifetime counters still see it"
    );
}

#[test]
fn classifier_counts_ok_as_failure_and_ignores_errors() {
    let clock = FakeClock::new();
    let b = small(&clock).build().unwrap();
    let classify = |r: &Result<u16, String>| match r {
        Ok(503) => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(e) if e == "not found" => Outcome::Ignored,
        Err(_) => Outcome::Failure,
    };
    for _ in 0..4 {
        let r = b.call_blocking_with(classify, || Err::<u16, _>("not found".to_string()));
        assert!(matches!(r, Err(BreakerError::Inner(_))));
    }
    assert_eq!(b.state(), State::Closed);
    for _ in 0..4 {
        assert_eq!(b.call_blocking_with(classify, || Ok(503)).unwrap(), 503);
    }
    assert_eq!(b.state(), State::Open);
    let m = b.metrics();
    assert_eq!((m.ignored_calls, m.failed_calls), (4, 4));
    assert!(
        b.call_blocking(|| Ok::<_, ()>(1))
            .unwrap_err()
            .is_rejected()
    );
}

#[tokio::test]
async fn cancelled_call_gives_the_probe_back() {
    let clock = FakeClock::new();
    let b = small(&clock).half_open_permits(1).build().unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    clock.advance(secs(10));
    {
        let call = b.call(std::future::pending::<Result<(), ()>>);
        let timed = tokio::time::timeout(ms(1), call).await;
        assert!(timed.is_err());
    }
    ok(&b);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn events_report_transitions_and_outcomes() {
    let clock = FakeClock::new();
    let b = small(&clock).slow_call_duration(secs(1)).build().unwrap();
    let mut events = b.subscribe();
    b.try_acquire().unwrap().success(secs(2));
    b.try_acquire().unwrap().ignore();
    fail(&b);
    fail(&b);
    fail(&b);
    let _ = b.try_acquire();
    b.reset();
    let got = events.drain();
    assert_eq!(
        got,
        vec![
            Event::Success { elapsed: secs(2) },
            Event::SlowCall {
                elapsed: secs(2),
                failed: false
            },
            Event::IgnoredError,
            Event::Error { elapsed: ms(1) },
            Event::Error { elapsed: ms(1) },
            Event::Error { elapsed: ms(1) },
            Event::StateTransition {
                from: State::Closed,
                to: State::Open
            },
            Event::Rejected { state: State::Open },
            Event::StateTransition {
                from: State::Open,
                to: State::Closed
            },
            Event::Reset,
        ]
    );
}

#[test]
fn invalid_options_are_rejected_by_name() {
    let cases: Vec<(&str, palisade_breaker::BreakerBuilder)> = vec![
        (
            "failure_rate_threshold",
            CircuitBreaker::builder("x").failure_rate_threshold(0.0),
        ),
        (
            "failure_rate_threshold",
            CircuitBreaker::builder("x").failure_rate_threshold(1.5),
        ),
        (
            "failure_rate_threshold",
            CircuitBreaker::builder("x").failure_rate_threshold(f64::NAN),
        ),
        (
            "slow_call_rate_threshold",
            CircuitBreaker::builder("x").slow_call_rate_threshold(0.0),
        ),
        (
            "slow_call_duration",
            CircuitBreaker::builder("x").slow_call_duration(Duration::ZERO),
        ),
        (
            "sliding_window",
            CircuitBreaker::builder("x").sliding_window(Window::Count(0)),
        ),
        (
            "sliding_window",
            CircuitBreaker::builder("x").sliding_window(Window::Time(Duration::ZERO)),
        ),
        (
            "minimum_calls",
            CircuitBreaker::builder("x").minimum_calls(0),
        ),
        (
            "wait_in_open",
            CircuitBreaker::builder("x").wait_in_open(Duration::ZERO),
        ),
        (
            "half_open_permits",
            CircuitBreaker::builder("x").half_open_permits(0),
        ),
        (
            "open_backoff",
            CircuitBreaker::builder("x").open_backoff(OpenBackoff::exponential(secs(1))),
        ),
    ];
    for (option, builder) in cases {
        let err = builder.build().unwrap_err();
        assert_eq!(err.option(), option, "{err}");
        assert!(err.to_string().contains(option), "{err}");
    }
}

#[test]
fn after_half_open_goes_back_to_open_metrics_show_the_probes_that_decided() {
    let clock = FakeClock::new();
    let b = CircuitBreaker::builder("probes")
        .sliding_window(Window::Count(5))
        .minimum_calls(5)
        .wait_in_open(secs(10))
        .half_open_permits(4)
        .clock(clock.clone())
        .build()
        .unwrap();
    for _ in 0..5 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Open);
    let m = b.metrics();
    assert_eq!(
        (m.failure_rate, m.buffered_calls),
        (1.0, 5),
        "the closed window opened it"
    );
    clock.advance(secs(10));
    ok(&b); // the first call after the wait moves it to half-open, as a probe
    assert_eq!(b.state(), State::HalfOpen);
    for _ in 0..3 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Open, "3 of 4 probes failed");
    let m = b.metrics();
    assert_eq!(
        (m.failure_rate, m.buffered_calls, m.failed_buffered_calls),
        (0.75, 4, 3),
        "while open, the window that decided is shown: the probes' (as resilience4j does)"
    );
    // Closing again starts an empty window.
    clock.advance(secs(30));
    for _ in 0..4 {
        ok(&b);
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().buffered_calls, 0);
}
