//! The `metrics` feature: resilience4j's Micrometer names and labels through the facade.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use palisade_breaker::{CircuitBreaker, Window};

/// A counter's count, a gauge's value (f64 bits), or a histogram's number of samples.
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
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

impl HistogramFn for Value {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A recorder that keeps every metric by its full key (`name{label=value,...}`, sorted).
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

    fn raw(&self, name: &str) -> u64 {
        let map = self.0.lock().unwrap();
        let value = map
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not registered"));
        value.0.load(Ordering::Relaxed)
    }

    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.raw(name))
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
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.slot(key))
    }
}

#[test]
fn resilience4j_names_and_labels_reach_the_recorder() {
    let keep = Keep::default();
    let b = metrics::with_local_recorder(&keep, || {
        CircuitBreaker::builder("orders")
            .sliding_window(Window::Count(4))
            .minimum_calls(4)
            .slow_call_duration(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    let state = |s: &str| {
        keep.gauge(&format!(
            "resilience4j_circuitbreaker_state{{name=orders,state={s}}}"
        ))
    };
    let calls = |kind: &str| {
        keep.raw(&format!(
            "resilience4j_circuitbreaker_calls_seconds{{kind={kind},name=orders}}"
        ))
    };
    let rate = |what: &str| {
        keep.gauge(&format!(
            "resilience4j_circuitbreaker_{what}{{name=orders}}"
        ))
    };
    assert_eq!(state("closed"), 1.0);
    for s in [
        "open",
        "half_open",
        "forced_open",
        "disabled",
        "metrics_only",
    ] {
        assert_eq!(state(s), 0.0, "{s}");
    }
    assert_eq!(
        rate("failure_rate"),
        -1.0,
        "below the minimum number of calls"
    );

    b.try_acquire().unwrap().success(Duration::from_secs(2)); // slow
    b.try_acquire().unwrap().ignore();
    b.try_acquire().unwrap().success(Duration::ZERO);
    b.try_acquire().unwrap().failure(Duration::ZERO);
    assert_eq!(rate("failure_rate"), -1.0, "3 of 4 calls");
    b.try_acquire().unwrap().success(Duration::ZERO);
    assert_eq!(rate("failure_rate"), 25.0);
    assert_eq!(rate("slow_call_rate"), 25.0);
    assert_eq!(
        keep.gauge("resilience4j_circuitbreaker_buffered_calls{kind=failed,name=orders}"),
        1.0
    );
    assert_eq!(
        keep.gauge("resilience4j_circuitbreaker_buffered_calls{kind=successful,name=orders}"),
        3.0
    );
    b.try_acquire().unwrap().failure(Duration::ZERO);
    assert_eq!(state("open"), 1.0, "2 of the last 4 failed: open (50 %)");
    assert_eq!(state("closed"), 0.0);
    assert_eq!(
        rate("failure_rate"),
        50.0,
        "the rate that opened it stays visible"
    );
    b.metrics();
    assert_eq!(rate("failure_rate"), 50.0);
    assert!(b.try_acquire().is_err());
    assert!(b.try_acquire().is_err());

    assert_eq!(calls("successful"), 3);
    assert_eq!(calls("failed"), 2);
    assert_eq!(calls("ignored"), 1);
    assert_eq!(
        keep.raw(
            "resilience4j_circuitbreaker_not_permitted_calls_total{kind=not_permitted,name=orders}"
        ),
        2
    );
    b.reset();
    assert_eq!(state("closed"), 1.0);
    assert_eq!(rate("failure_rate"), -1.0, "a reset window");
}
