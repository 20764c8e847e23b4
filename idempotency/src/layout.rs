//! The dataset's layout on a store: reserved names, the names of data objects, and object keys.
//!
//! ```text
//! <prefix>/_manifest.json                          the commit point (see `Manifest`)
//! <prefix>/<partition>/part-<hash16>-<run16><ext>  one object per single-object partition version
//! <prefix>/<partition>/<name>...                   multi-file partitions, local directory
//! <prefix>/<partition>/<stem>-<run16><ext>...      multi-file partitions, object stores
//! <prefix>/_manifest.lock, _staging/               local directory only: lock file, staged data
//! <prefix>/_retired/                               local directory only: old versions kept
//! <prefix>/_manifest.pending.json                  local directory only: a decided commit
//! ```
//!
//! Object keys are the partition paths **byte for byte**: a Hive partition that Spark wrote as
//! `slot=2024-01-01 10%3A00%3A00` or `city=Zürich` is stored under exactly that key, so a Hive
//! reader decodes the same partition value from the store as from the source directory.

use object_store::path::Path as ObjPath;

use crate::error::{Error, Result};

/// The commit point of a dataset.
pub(crate) use crate::manifest::MANIFEST_FILE;
/// Local directory only: the writers' lock file.
pub(crate) const LOCK_FILE: &str = "_manifest.lock";
/// Local directory only: a commit that was decided and is being rolled forward.
pub(crate) const PENDING_FILE: &str = "_manifest.pending.json";
/// Local directory only: staged data of running writers.
pub(crate) const STAGING_DIR: &str = "_staging";
/// Local directory only: replaced and removed partition versions kept for readers until the
/// retention has passed, as `_retired/<unix ms>-g<generation>-<n>/`.
pub(crate) const RETIRED_DIR: &str = "_retired";

/// The files that mark a directory (or prefix) as a dataset of this crate.
pub(crate) const DATASET_MARKERS: [&str; 3] = [MANIFEST_FILE, LOCK_FILE, PENDING_FILE];

/// The data object of a single-object partition version: named by the first 16 hex digits of
/// its hash and the writing run's id, so a new version never overwrites an object an older
/// manifest names.
pub(crate) fn object_name(partition: &str, hash_hex: &str, run_id: &str, ext: &str) -> String {
    format!("{partition}/part-{}-{run_id}{ext}", &hash_hex[..16])
}

/// A file's object name on object stores: `<dir>/<stem>-<run16><ext>`, where the extension is
/// everything from the first `.` of the last segment (`part-0.snappy.parquet` keeps
/// `.snappy.parquet`).
pub(crate) fn unique_name(name: &str, run_id: &str) -> String {
    let (dir, file) = match name.rsplit_once('/') {
        Some((d, f)) => (format!("{d}/"), f),
        None => (String::new(), name),
    };
    let (stem, ext) = match file.find('.') {
        Some(i) => file.split_at(i),
        None => (file, ""),
    };
    format!("{dir}{stem}-{run_id}{ext}")
}

/// Whether a file name has the shape `unique_name` gives: `<stem>-<16 hex>` then the extension.
pub(crate) fn is_multi_file_object_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name);
    let b = stem.as_bytes();
    b.len() > 17 && b[b.len() - 17] == b'-' && b[b.len() - 16..].iter().all(u8::is_ascii_hexdigit)
}

/// Whether a file name has the shape of a data object this crate uploads to object stores (a
/// single-object partition's `part-<hash16>-<run16>`, or a multi-file partition's
/// `<stem>-<run16><ext>`): only such objects are ever swept as orphans.
pub(crate) fn is_data_object_name(name: &str) -> bool {
    crate::partition::is_object_file_name(name) || is_multi_file_object_name(name)
}

/// The hidden marker a local swap puts in a new version until its commit is finished.
pub(crate) fn marker_name(run_id: &str) -> String {
    format!(".palisade-{run_id}")
}

/// Whether a file name is a swap marker.
pub(crate) fn is_marker_name(name: &str) -> bool {
    name.strip_prefix(".palisade-")
        .is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The key of `rel` in the dataset `prefix` under `base`, segment for segment as written: no
/// percent-encoding (`object_store`'s `Path::join` would store `%` as `%25` and `ü` as `%C3%BC`).
/// Names are validated before they get here (no empty, `.` or `..` segments, no control
/// characters), which is all `Path::parse` asks of a key.
pub(crate) fn object_key(base: &ObjPath, prefix: &str, rel: &str) -> Result<ObjPath> {
    let mut key = base.as_ref().to_string();
    for seg in prefix.split('/').chain(rel.split('/')) {
        if seg.is_empty() {
            continue;
        }
        if !key.is_empty() {
            key.push('/');
        }
        key.push_str(seg);
    }
    ObjPath::parse(&key).map_err(|_| Error::InvalidPartition {
        name: rel.to_string(),
        reason: "not a valid object key (empty, '.' or '..' segments, or control characters)",
    })
}

/// The dataset `rel` below the dataset prefix `prefix`.
pub(crate) fn join_prefix(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_string()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// The path of `location` below `dir` (both raw keys), `None` if it is not below it.
pub(crate) fn relative_key<'a>(dir: &ObjPath, location: &'a ObjPath) -> Option<&'a str> {
    let (dir, loc) = (dir.as_ref(), location.as_ref());
    if dir.is_empty() {
        return Some(loc);
    }
    loc.strip_prefix(dir)?.strip_prefix('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_names_byte_for_byte() {
        let base = ObjPath::parse("warehouse").unwrap();
        for name in [
            "slot=2024-01-01 10%3A00%3A00",
            "city=Zürich",
            "k=a+b c",
            "k=x:y=z",
        ] {
            let key = object_key(&base, "sales/eu", &format!("{name}/part-0.csv")).unwrap();
            assert_eq!(
                key.as_ref(),
                format!("warehouse/sales/eu/{name}/part-0.csv")
            );
            let dir = object_key(&base, "sales/eu", "").unwrap();
            assert_eq!(
                relative_key(&dir, &key),
                Some(format!("{name}/part-0.csv").as_str())
            );
        }
        let root = object_key(&ObjPath::default(), "", "a=1/x").unwrap();
        assert_eq!(root.as_ref(), "a=1/x");
        assert!(object_key(&base, "", "a/../b").is_err());
        assert_eq!(relative_key(&ObjPath::parse("ware").unwrap(), &base), None);
    }

    #[test]
    fn names() {
        assert_eq!(
            unique_name("d/part-0.snappy.parquet", "0123456789abcdef"),
            "d/part-0-0123456789abcdef.snappy.parquet"
        );
        assert!(is_multi_file_object_name(
            "part-0-0123456789abcdef.snappy.parquet"
        ));
        assert!(!is_multi_file_object_name("part-0.csv"));
        assert!(is_marker_name(&marker_name("0123456789abcdef")));
        assert_eq!(
            object_name("a=1", &"f".repeat(64), "0123456789abcdef", ".csv"),
            format!("a=1/part-{}-0123456789abcdef.csv", "f".repeat(16))
        );
    }
}
