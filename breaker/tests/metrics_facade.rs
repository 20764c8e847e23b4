//! The `metrics` feature: counters by outcome and a state gauge through the facade.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use palisade_breaker::{CircuitBreaker, Window};

#[derive(Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    fn absolute(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

impl GaugeFn for Value {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, v: f64) {
        self.0.store(v as u64, Ordering::Relaxed);
    }
}

/// A recorder that keeps every counter and gauge by its full key.
#[derive(Default, Clone)]
struct Keep(Arc<Mutex<HashMap<String, Arc<Value>>>>);

impl Keep {
    fn slot(&self, key: &Key) -> Arc<Value> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Arc::clone(self.0.lock().unwrap().entry(name).or_default())
    }

    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |v| v.0.load(Ordering::Relaxed))
    }
}

impl Recorder for Keep {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn outcomes_and_state_reach_the_recorder() {
    let keep = Keep::default();
    let b = metrics::with_local_recorder(&keep, || {
        CircuitBreaker::builder("orders")
            .sliding_window(Window::Count(3))
            .minimum_calls(3)
            .slow_call_duration(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    b.try_acquire().unwrap().success(Duration::from_secs(2));
    b.try_acquire().unwrap().ignore();
    b.try_acquire().unwrap().failure(Duration::ZERO);
    b.try_acquire().unwrap().failure(Duration::ZERO);
    assert!(b.try_acquire().is_err());
    let calls = |outcome: &str| {
        keep.get(&format!(
            "palisade_breaker_calls_total{{breaker=orders,outcome={outcome}}}"
        ))
    };
    assert_eq!(calls("success"), 1);
    assert_eq!(calls("failure"), 2);
    assert_eq!(calls("ignored"), 1);
    assert_eq!(calls("rejected"), 1);
    assert_eq!(
        keep.get("palisade_breaker_slow_calls_total{breaker=orders}"),
        1
    );
    assert_eq!(
        keep.get("palisade_breaker_state{breaker=orders}"),
        1,
        "1 = open"
    );
}
