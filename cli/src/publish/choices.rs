//! The values of `--unit`, `--content` and `--format`: clap's side of palisade-idempotency's
//! `source::{Unit, Content, Format}` (the doc comments are the `--help` text).

use clap::ValueEnum;
use palisade_idempotency::source;

/// What one partition is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Unit {
    /// A Hive-style directory: the leading `key=value` directories of a file's path.
    Dir,
    /// Every file on its own.
    File,
}

/// What the identity of a partition is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Content {
    /// The bytes of its files.
    Bytes,
    /// The rows of its Parquet, CSV or JSON-lines files, in any order and split.
    Rows,
}

/// The file formats `--content rows` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// By extension: `.parquet`/`.pq`, `.csv`, `.json`/`.jsonl`/`.ndjson`.
    Auto,
    /// Apache Parquet.
    Parquet,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl From<Unit> for source::Unit {
    fn from(unit: Unit) -> Self {
        match unit {
            Unit::Dir => source::Unit::Dir,
            Unit::File => source::Unit::File,
        }
    }
}

impl From<Content> for source::Content {
    fn from(content: Content) -> Self {
        match content {
            Content::Bytes => source::Content::Bytes,
            Content::Rows => source::Content::Rows,
        }
    }
}

impl From<Format> for source::Format {
    fn from(format: Format) -> Self {
        match format {
            Format::Auto => source::Format::Auto,
            Format::Parquet => source::Format::Parquet,
            Format::Csv => source::Format::Csv,
            Format::Jsonl => source::Format::Jsonl,
        }
    }
}
