//! The Redis key of each (prefix, user key, algorithm, window): `<prefix>{<key>}:<algorithm>:<window µs>`.
//!
//! - **Unambiguous.** The prefix may not contain braces, so it ends at the first `{`; the user key
//!   is escaped so that it contains no brace either (`%` → `%25`, `{` → `%7B`, `}` → `%7D`, and
//!   the empty key → `%`, which no escaped non-empty key can be), so it ends at the first `}`; the
//!   rest is ours. Different (prefix, key) pairs never share a Redis key: prefix `a` with key
//!   `b:c` is `a{b:c}:…`, prefix `a:b` with key `c` is `a:b{c}:…`.
//! - **One Cluster slot per user key.** The hash tag is exactly the escaped user key (never empty),
//!   so every limit and algorithm of one user key lands in one slot and a multi-limit script is
//!   never CROSSSLOT.
//! - **Live limit changes.** `max` (and GCRA's burst) are not part of the key: a changed `max`
//!   applies to the history already recorded. The window is: a changed window starts an empty
//!   history for that limit (the old key expires on its own TTL).
//! - **Operator friendly.** Every key starts with the prefix (`SCAN MATCH 'prefix{*'`, ACL
//!   `~prefix{*`).

use std::fmt::Write;

use crate::Algorithm;

/// The short name of an algorithm in its keys.
pub(crate) fn tag(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::SlidingLog => "log",
        Algorithm::SlidingWindowCounter => "swc",
        Algorithm::Gcra { .. } => "gcra",
    }
}

/// Every algorithm, for `reset` (which clears a key under each of them).
pub(crate) const ALL: [Algorithm; 3] = [
    Algorithm::SlidingLog,
    Algorithm::SlidingWindowCounter,
    Algorithm::Gcra { burst: 1 },
];

/// `<prefix>{<escaped key>}`: the part of every Redis key of `key` before the limit's suffix.
pub(crate) fn base(prefix: &str, key: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + key.len() + 2);
    out.push_str(prefix);
    out.push('{');
    if key.is_empty() {
        out.push('%');
    }
    for c in key.chars() {
        match c {
            '%' | '{' | '}' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('}');
    out
}

/// The suffix of one limit's key: `:<algorithm>:<window µs>`.
pub(crate) fn suffix(algorithm: Algorithm, window_us: i64) -> String {
    format!(":{}:{window_us}", tag(algorithm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_key_never_run_into_each_other() {
        assert_ne!(base("a", "b:c"), base("a:b", "c"));
        assert_eq!(base("a", "b:c"), "a{b:c}");
        assert_eq!(base("a:b", "c"), "a:b{c}");
        assert_eq!(base("p", "x}y{%"), "p{x%7Dy%7B%25}");
        assert_eq!(base("p", ""), "p{%}");
        assert_ne!(base("p", "%"), base("p", ""));
        assert_ne!(base("p", "%25"), base("p", "%"));
        assert_eq!(
            suffix(Algorithm::Gcra { burst: 3 }, 1_000_000),
            ":gcra:1000000"
        );
    }
}
