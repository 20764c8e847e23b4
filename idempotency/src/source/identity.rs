//! A partition's content identity: what decides whether it changed since the last publish.
//!
//! - [`Content::Bytes`] (default): BLAKE3 of every file; the partition's identity is a BLAKE3
//!   over the sorted per-file hashes, so the order of files does not count, and neither do
//!   their names (Spark names part files with a new random id every run) unless
//!   [`IdentityOptions::names`].
//! - [`Content::Rows`]: the rows of the partition's Parquet, CSV or JSON-lines files, in the
//!   crate's order-insensitive row hash (see [`super::rows`]; feature `rows`).
//!
//! Each mode hashes under its own BLAKE3 key, so switching modes rewrites every partition once.
//! The keys still say "palisade publish": they are part of every identity already committed.

use super::rows::Format;
use super::scan::Partition;
use super::source_error;
use crate::{ContentHash, Result};
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the identity of a partition is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Content {
    /// The bytes of its files.
    #[default]
    Bytes,
    /// The rows of its Parquet, CSV or JSON-lines files, in any order and split (feature `rows`).
    Rows,
}

impl FromStr for Content {
    type Err = crate::Error;

    /// `"bytes"` or `"rows"`.
    fn from_str(s: &str) -> Result<Content> {
        match s {
            "bytes" => Ok(Content::Bytes),
            "rows" => Ok(Content::Rows),
            other => Err(source_error(format!(
                "content {other:?}: expected \"bytes\" or \"rows\""
            ))),
        }
    }
}

/// How identities are computed (the default: bytes, names not counted, formats by extension,
/// one partition per CPU at a time).
#[derive(Debug, Clone, Copy)]
pub struct IdentityOptions {
    /// Bytes or rows.
    pub content: Content,
    /// Whether file names count (bytes mode): a renamed file is then a change.
    pub names: bool,
    /// The file format in rows mode.
    pub format: Format,
    /// Partitions hashed at once.
    pub threads: usize,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        IdentityOptions {
            content: Content::Bytes,
            names: false,
            format: Format::Auto,
            threads: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
        }
    }
}

/// BLAKE3 of a file (the crate's one read-and-hash loop); calls `on_bytes` as it reads.
pub fn hash_file(path: &Path, on_bytes: &(dyn Fn(u64) + Sync)) -> Result<ContentHash> {
    let f = std::fs::File::open(path)
        .map_err(|e| source_error(format!("cannot open {}: {e}", path.display())))?;
    let (hash, _) = ContentHash::of_reader(f, |chunk| {
        on_bytes(chunk.len() as u64);
        Ok(())
    })
    .map_err(|e| source_error(format!("cannot read {}: {e}", path.display())))?;
    Ok(hash)
}

/// The identity of one partition; `on_bytes` is called with the bytes read as they are read.
pub fn identity(
    partition: &Partition,
    opts: &IdentityOptions,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<ContentHash> {
    match opts.content {
        Content::Bytes => {
            let mut entries: Vec<(String, ContentHash)> = Vec::new();
            for f in &partition.files {
                let name = if opts.names {
                    f.name.clone()
                } else {
                    String::new()
                };
                entries.push((name, hash_file(&f.path, on_bytes)?));
            }
            entries.sort();
            let key = if opts.names {
                "palisade publish bytes+names v1"
            } else {
                "palisade publish bytes v1"
            };
            let mut h = blake3::Hasher::new_derive_key(key);
            h.update(&(entries.len() as u64).to_be_bytes());
            for (name, hash) in &entries {
                h.update(&(name.len() as u64).to_be_bytes());
                h.update(name.as_bytes());
                h.update(hash.as_bytes());
            }
            Ok(h.finalize().into())
        }
        Content::Rows => rows_identity(partition, opts.format, on_bytes),
    }
}

#[cfg(feature = "rows")]
fn rows_identity(
    partition: &Partition,
    format: Format,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<ContentHash> {
    let paths: Vec<&Path> = partition.files.iter().map(|f| f.path.as_path()).collect();
    let rows = super::rows::hash_partition(&paths, format, on_bytes)?;
    let mut h = blake3::Hasher::new_derive_key("palisade publish rows v1");
    h.update(rows.finish().as_bytes());
    Ok(h.finalize().into())
}

#[cfg(not(feature = "rows"))]
fn rows_identity(_: &Partition, _: Format, _: &(dyn Fn(u64) + Sync)) -> Result<ContentHash> {
    Err(crate::Error::Config {
        field: "content",
        reason: "is rows, which needs the `rows` feature of palisade-idempotency (the Parquet, \
                 CSV and JSON-lines readers)",
    })
}

/// The identities of all partitions, in their order, `opts.threads` partitions at a time; the
/// first error stops the work and is returned.
pub fn identities(
    partitions: &[Partition],
    opts: &IdentityOptions,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<Vec<ContentHash>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<ContentHash>>> = Mutex::new(vec![None; partitions.len()]);
    let failed: Mutex<Option<crate::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..opts.threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= partitions.len() || failed.lock().map_or(true, |f| f.is_some()) {
                        return;
                    }
                    match identity(&partitions[i], opts, on_bytes) {
                        Ok(h) => {
                            if let Ok(mut r) = results.lock() {
                                r[i] = Some(h);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    let panicked = || source_error("a hashing thread panicked");
    results
        .into_inner()
        .map_err(|_| panicked())?
        .into_iter()
        .map(|h| h.ok_or_else(panicked))
        .collect()
}
