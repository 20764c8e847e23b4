//! The answer to one request, and its rendering as IETF `RateLimit` headers.

use std::time::Duration;

use crate::algorithm::Verdict;

/// The answer to one request against a limiter.
///
/// When several limits are decided together, the decision describes the one that matters most:
/// if denied, the limit that asks for the longest wait; if admitted, the limit with the fewest
/// units remaining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request was admitted (and its cost recorded).
    pub allowed: bool,
    /// The number of units the limit admits per window (for GCRA: the burst).
    pub limit: u32,
    /// Units still available in the window after this decision.
    pub remaining: u32,
    /// If denied: the wait after which the same request would be admitted, if nobody else used
    /// the key meanwhile. `None` if admitted.
    pub retry_after: Option<Duration>,
    /// The time until the limit is fully replenished (nothing recorded so far counts any more).
    pub reset_after: Duration,
    /// The window of the limit this decision describes (for GCRA: the time to refill the burst).
    pub window: Duration,
    /// The clock the decision was timed by, since the Unix epoch: Redis's `TIME` for a
    /// [`crate::RedisLimiter`], the host's wall clock for a [`crate::FileLimiter`]. `None` for
    /// in-process decisions ([`crate::LocalLimiter`], and fallbacks when Redis was unavailable).
    pub server_time: Option<Duration>,
}

/// The values of the IETF `RateLimit-Policy` and `RateLimit` response headers
/// (draft-ietf-httpapi-ratelimit-headers), plus `Retry-After` when denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// `RateLimit-Policy`, e.g. `"default";q=100;w=60`.
    pub policy: String,
    /// `RateLimit`, e.g. `"default";r=42;t=17`.
    pub rate_limit: String,
    /// `Retry-After` in whole seconds (rounded up), only when denied.
    pub retry_after: Option<String>,
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Decision {
    /// The header values for a policy named `default`.
    pub fn headers(&self) -> RateLimitHeaders {
        self.headers_named("default")
    }

    /// The header values for a policy called `name` (a structured-field string: keep it to
    /// letters, digits, `-` and `_`).
    pub fn headers_named(&self, name: &str) -> RateLimitHeaders {
        RateLimitHeaders {
            policy: format!("\"{name}\";q={};w={}", self.limit, ceil_secs(self.window)),
            rate_limit: format!(
                "\"{name}\";r={};t={}",
                self.remaining,
                ceil_secs(self.retry_after.unwrap_or(self.reset_after))
            ),
            retry_after: self.retry_after.map(|d| ceil_secs(d).to_string()),
        }
    }

    /// Combines the verdicts of several limits (in the order of `limits`) into one decision.
    pub(crate) fn combine(
        allowed: bool,
        verdicts: &[Verdict],
        limits: &[(u32, Duration)],
        server_time: Option<Duration>,
    ) -> Decision {
        let mut pick = 0;
        for (i, v) in verdicts.iter().enumerate() {
            let better = if allowed {
                v.remaining < verdicts[pick].remaining
            } else {
                let cur = &verdicts[pick];
                !v.allowed && (cur.allowed || v.retry_after_us > cur.retry_after_us)
            };
            if better {
                pick = i;
            }
        }
        let v = verdicts[pick];
        let us = |x: i64| Duration::from_micros(x.max(0) as u64);
        Decision {
            allowed,
            limit: limits[pick].0,
            remaining: v.remaining,
            retry_after: (!allowed).then(|| us(v.retry_after_us).max(Duration::from_micros(1))),
            reset_after: us(v.reset_after_us),
            window: limits[pick].1,
            server_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_the_ietf_draft() {
        let d = Decision {
            allowed: false,
            limit: 100,
            remaining: 0,
            retry_after: Some(Duration::from_millis(1500)),
            reset_after: Duration::from_secs(60),
            window: Duration::from_secs(60),
            server_time: None,
        };
        let h = d.headers();
        assert_eq!(h.policy, "\"default\";q=100;w=60");
        assert_eq!(h.rate_limit, "\"default\";r=0;t=2");
        assert_eq!(h.retry_after.as_deref(), Some("2"));
        let ok = Decision {
            allowed: true,
            remaining: 7,
            retry_after: None,
            ..d
        };
        assert_eq!(ok.headers_named("api").rate_limit, "\"api\";r=7;t=60");
        assert_eq!(ok.headers().retry_after, None);
    }

    #[test]
    fn combine_picks_the_longest_wait_or_the_fewest_remaining() {
        let v = |allowed, remaining, retry| Verdict {
            allowed,
            remaining,
            retry_after_us: retry,
            reset_after_us: 5,
        };
        let lim = [(10, Duration::from_secs(1)), (100, Duration::from_secs(60))];
        let d = Decision::combine(false, &[v(true, 3, 0), v(false, 0, 9)], &lim, None);
        assert_eq!(
            (d.limit, d.retry_after),
            (100, Some(Duration::from_micros(9)))
        );
        let d = Decision::combine(true, &[v(true, 3, 0), v(true, 50, 0)], &lim, None);
        assert_eq!((d.limit, d.remaining, d.retry_after), (10, 3, None));
    }
}
