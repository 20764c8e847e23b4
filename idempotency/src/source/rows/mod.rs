//! Rows identities ([`Content::Rows`](super::Content::Rows)): the rows of Parquet, CSV and
//! JSON-lines files, read with arrow-rs and fed to the crate's order-insensitive
//! [`ContentHasher`](crate::ContentHasher).
//!
//! A row is hashed as a map from column name to value (the canonical encoding sorts map
//! entries), so neither the order of rows, nor their split into part files, nor the order of
//! columns counts. Values keep their type: integers (any width) as integers, floats as floats,
//! strings, bytes, booleans, nulls; every other Arrow type (dates, timestamps, decimals, lists,
//! structs) as its display string.
//!
//! - **Parquet**: the file's own schema.
//! - **CSV** (with a header row): every column is a string (empty is null), so the hash does not
//!   depend on type inference, which can differ between part files.
//! - **JSON lines**: the schema is inferred over all the partition's files together, so the same
//!   rows split differently infer the same types.
//!
//! [`Format`] is always here; the readers (`hash_partition`) need the `rows` feature (arrow
//! and parquet, readers only; Parquet codecs snappy, zstd and lz4).

use super::source_error;
use crate::Result;
use std::path::Path;
use std::str::FromStr;

#[cfg(feature = "rows")]
mod encode;
#[cfg(feature = "rows")]
mod read;

/// The file formats of rows identities (`--content rows`, `--format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// By extension: `.parquet`/`.pq`, `.csv`, `.json`/`.jsonl`/`.ndjson`.
    #[default]
    Auto,
    /// Apache Parquet.
    Parquet,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format of `path`: `self`, or by extension for `Auto`.
    pub fn of(self, path: &Path) -> Result<Format> {
        if self != Format::Auto {
            return Ok(self);
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match ext.as_str() {
            "parquet" | "pq" => Ok(Format::Parquet),
            "csv" => Ok(Format::Csv),
            "json" | "jsonl" | "ndjson" => Ok(Format::Jsonl),
            _ => Err(source_error(format!(
                "{}: --content rows reads .parquet, .csv and .json/.jsonl/.ndjson files; set \
                 --format, or hash bytes with --content bytes",
                path.display()
            ))),
        }
    }
}

impl FromStr for Format {
    type Err = crate::Error;

    /// `"auto"`, `"parquet"`, `"csv"` or `"jsonl"`.
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "auto" => Ok(Format::Auto),
            "parquet" => Ok(Format::Parquet),
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::Jsonl),
            other => Err(source_error(format!(
                "format {other:?}: expected \"auto\", \"parquet\", \"csv\" or \"jsonl\""
            ))),
        }
    }
}

/// Hashes the rows of `files` (one partition) into one unordered hasher.
///
/// Errors are [`Error::Source`](crate::Error::Source), one line naming the file.
#[cfg(feature = "rows")]
#[cfg_attr(docsrs, doc(cfg(feature = "rows")))]
pub fn hash_partition(
    files: &[&Path],
    format: Format,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<crate::ContentHasher> {
    let mut hasher = crate::ContentHasher::unordered();
    let mut json: Vec<&Path> = Vec::new();
    for &path in files {
        match format.of(path)? {
            Format::Parquet => read::hash_parquet(path, &mut hasher).map_err(source_error)?,
            Format::Csv => read::hash_csv(path, &mut hasher).map_err(source_error)?,
            Format::Jsonl | Format::Auto => json.push(path),
        }
        on_bytes(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
    }
    if !json.is_empty() {
        read::hash_jsonl(&json, &mut hasher).map_err(source_error)?;
    }
    Ok(hasher)
}
