//! Decision counts through the `metrics` facade (feature `metrics`; without it every function
//! here is empty), under the names Envoy's rate-limit service exports to Prometheus (its
//! statsd mapping), so that dashboards made for it work:
//!
//! - `ratelimit_service_rate_limit_total_hits{domain, key1}`: units asked for (a request of cost
//!   `n` is `n` hits, as Envoy's `hits_addend`).
//! - `ratelimit_service_rate_limit_within_limit{domain, key1}`: units admitted.
//! - `ratelimit_service_rate_limit_over_limit{domain, key1}`: units denied (denials served from
//!   the denial cache included).
//! - `ratelimit_service_rate_limit_near_limit{domain, key1}`: admitted units that took the key
//!   above 80 % of its limit (Envoy's rule: the units above `floor(0.8 × limit)`).
//! - `ratelimit_service_rate_limit_error{domain}`: decisions Redis did not answer (timeout or
//!   unavailable), whatever the policy then did; and
//!   `ratelimit_service_rate_limit_failure_mode_allowed{domain}`: those the policy admitted
//!   (`FailOpen`, or `Local` when the local limiter admitted), as Envoy's filter counts
//!   `ratelimit.error` and `ratelimit.failure_mode_allowed`.
//!
//! `domain` is the limiter's prefix (`RedisLimiter`) or `file` (`FileLimiter`); `key1` is the
//! limit that decided, as text (`100/min`); never the user key, so the number of series stays
//! bounded. Peeks count nothing. `LocalLimiter` reports nothing (its hot path stays ~25 ns).

use crate::{Decision, Limit};

/// Envoy's near-limit ratio.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
const NEAR_LIMIT_RATIO: f64 = 0.8;

/// The admitted units above `floor(0.8 × limit)` after a decision: Envoy's `near_limit` step.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) fn near_limit_units(limit: u32, remaining: u32, cost: u32) -> u32 {
    let threshold = (f64::from(limit) * NEAR_LIMIT_RATIO).floor() as u32;
    let after = limit.saturating_sub(remaining);
    let before = after.saturating_sub(cost);
    after.saturating_sub(threshold.max(before))
}

/// The `key1` label: the deciding limit as text.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
fn rule(d: &Decision) -> String {
    Limit::new(d.limit, d.window).map_or_else(|_| d.limit.to_string(), |l| l.to_string())
}

/// A decision made (by Redis, the denial cache, or a file) for `cost` units; not for peeks.
#[cfg(feature = "metrics")]
pub(crate) fn decided(domain: &str, cost: u32, d: &Decision) {
    let labels = [("domain", domain.to_owned()), ("key1", rule(d))];
    let cost = u64::from(cost);
    metrics::counter!("ratelimit_service_rate_limit_total_hits", &labels).increment(cost);
    if d.allowed {
        metrics::counter!("ratelimit_service_rate_limit_within_limit", &labels).increment(cost);
        let near = near_limit_units(d.limit, d.remaining, cost as u32);
        if near > 0 {
            metrics::counter!("ratelimit_service_rate_limit_near_limit", &labels)
                .increment(u64::from(near));
        }
    } else {
        metrics::counter!("ratelimit_service_rate_limit_over_limit", &labels).increment(cost);
    }
}

/// Redis did not answer; `admitted` is what the policy then answered (`None`: an error).
#[cfg(feature = "metrics")]
pub(crate) fn unavailable(domain: &str, admitted: Option<bool>) {
    let labels = [("domain", domain.to_owned())];
    metrics::counter!("ratelimit_service_rate_limit_error", &labels).increment(1);
    if admitted == Some(true) {
        metrics::counter!("ratelimit_service_rate_limit_failure_mode_allowed", &labels)
            .increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) fn decided(_domain: &str, _cost: u32, _d: &Decision) {}

#[cfg(not(feature = "metrics"))]
pub(crate) fn unavailable(_domain: &str, _admitted: Option<bool>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_limit_counts_the_units_above_80_percent_as_envoy_does() {
        // limit 10: threshold 8.
        assert_eq!(near_limit_units(10, 5, 1), 0, "6 of 10");
        assert_eq!(near_limit_units(10, 2, 1), 0, "8 of 10 is not above 8");
        assert_eq!(near_limit_units(10, 1, 1), 1, "9 of 10");
        assert_eq!(near_limit_units(10, 0, 5), 2, "5 → 10: the units 9 and 10");
        assert_eq!(near_limit_units(100, 0, 1), 1);
        assert_eq!(near_limit_units(1, 0, 1), 1, "threshold 0");
    }
}
