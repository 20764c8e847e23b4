//! Partition names: relative paths that can never leave the dataset prefix.

use crate::error::{Error, Result};

/// Checks a partition name and returns it unchanged.
///
/// A valid name is one or more segments separated by `/`; no segment is empty, `.` or `..`, or
/// starts with `_` or `.` (those are reserved: `_manifest.json`, `_staging/`, and files that
/// Hive-style readers skip); no control characters or backslashes; at most 1024 bytes.
pub fn validate_partition(name: &str) -> Result<&str> {
    let bad = |reason| Error::InvalidPartition {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() > 1024 {
        return Err(bad("the name is longer than 1024 bytes"));
    }
    if name.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if name.contains('\\') {
        return Err(bad("backslashes are not allowed"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return Err(bad("empty path segments are not allowed"));
        }
        if seg == "." || seg == ".." {
            return Err(bad("'.' and '..' segments are not allowed"));
        }
        if seg.starts_with('_') || seg.starts_with('.') {
            return Err(bad("segments starting with '_' or '.' are reserved"));
        }
        if is_object_file_name(seg) {
            return Err(bad(
                "segments named like data objects (part-<hash>-<run>) are reserved",
            ));
        }
    }
    Ok(name)
}

/// Whether a file name has the shape of the data objects this crate writes:
/// `part-<16 hex>-<16 hex>` followed by the configured extension.
pub(crate) fn is_object_file_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("part-") else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() >= 33
        && b[..16].iter().all(u8::is_ascii_hexdigit)
        && b[16] == b'-'
        && b[17..33].iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hive_names() {
        for ok in ["a", "date=2024-01-01", "date=2024-01-01/region=eu", "x y/z"] {
            validate_partition(ok).unwrap();
        }
    }

    #[test]
    fn rejects_escapes() {
        for bad in [
            "",
            "/etc",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "_staging",
            "a/.hidden",
            "a\\b",
            "a\nb",
            "part-0123456789abcdef-0123456789abcdef",
        ] {
            assert!(
                matches!(validate_partition(bad), Err(Error::InvalidPartition { .. })),
                "{bad:?} was accepted"
            );
        }
    }
}
