//! `BreakerConfig` (feature `serde`) from TOML and JSON.

use std::time::Duration;

use palisade_breaker::{BreakerConfig, FakeClock, State, WindowConfig};

#[test]
fn toml_config_builds_a_breaker_with_those_options() {
    let cfg: BreakerConfig = toml::from_str(
        r#"
        name = "payments"
        failure_rate_threshold = 0.5
        slow_call_duration = "2s"
        sliding_window = { count = 4 }
        minimum_calls = 4
        wait_in_open = "1m 30s"
        half_open_permits = 1
        "#,
    )
    .unwrap();
    assert_eq!(cfg.sliding_window, Some(WindowConfig::Count(4)));
    assert_eq!(cfg.wait_in_open, Some(Duration::from_secs(90)));
    let clock = FakeClock::new();
    let b = cfg.builder().clock(clock.clone()).build().unwrap();
    assert_eq!(b.name(), "payments");
    for _ in 0..4 {
        b.try_acquire().unwrap().failure(Duration::ZERO);
    }
    assert_eq!(b.state(), State::Open);
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(90))
    );
}

#[test]
fn json_config_with_a_time_window_round_trips() {
    let cfg: BreakerConfig = serde_json::from_str(
        r#"{"sliding_window": {"time": "30s"}, "open_backoff": {"max_wait": "5m", "jitter": 0.1}}"#,
    )
    .unwrap();
    assert_eq!(
        cfg.sliding_window,
        Some(WindowConfig::Time(Duration::from_secs(30)))
    );
    let text = serde_json::to_string(&cfg).unwrap();
    let again: BreakerConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg, again);
    assert!(cfg.build().is_ok());
}

#[test]
fn invalid_values_name_the_field() {
    let cfg: BreakerConfig = toml::from_str("half_open_permits = 0").unwrap();
    assert_eq!(cfg.build().unwrap_err().option(), "half_open_permits");
    let err = toml::from_str::<BreakerConfig>("wait_in_open = \"soon\"").unwrap_err();
    assert!(err.to_string().contains("not a duration"), "{err}");
    let err = toml::from_str::<BreakerConfig>("failure_rate = 0.5").unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
}
