//! A local directory as a dataset's source: the partitions a job wrote there, and each
//! partition's content identity, the value a [`PartitionedWriter`](crate::PartitionedWriter)
//! compares with the manifest to decide whether the partition changed.
//!
//! This is the one implementation behind `palisade publish` and the Python package's
//! `palisade.publish`: both find the same partitions and compute the same identities, so a
//! dataset can be published by either and a rerun by the other writes nothing.
//!
//! - [`scan`](mod@scan): SRC into [`Partition`]s (Hive-style `key=value/` directories, or one per
//!   file), skipping Spark's and Hadoop's leftovers, with include/exclude globs.
//! - [`identity`](mod@identity): a partition's identity from the bytes of its files
//!   ([`Content::Bytes`]) or from its rows ([`Content::Rows`]), on several threads.
//! - [`rows`]: the Parquet, CSV and JSON-lines row readers behind [`Content::Rows`] (feature
//!   `rows`).
//! - [`plan`](mod@plan): the partitions a publish writes (new, changed), leaves alone
//!   (unchanged), keeps or removes, compared with the manifest (`--dry-run` prints it).
//! - [`write`](mod@write): [`write_all`], every partition to `put_files`, then the commit.
//!
//! ```no_run
//! use palisade_idempotency::source::{self, IdentityOptions, ScanOptions};
//! # async fn run(store: &palisade_idempotency::DatasetStore) -> palisade_idempotency::Result<()> {
//! let partitions = source::scan(std::path::Path::new("/scratch/sales"), &ScanOptions::default())?;
//! let ids = source::identities(&partitions, &IdentityOptions::default(), &|_bytes| {})?;
//! let writer = palisade_idempotency::PartitionedWriter::builder(store, "").open().await?;
//! let plan = source::plan(&partitions, &ids, writer.manifest(), false);
//! println!("{} partitions to write", plan.writes().count());
//! source::write_all(writer, &partitions, &ids, &mut |_progress| {}).await?;
//! # Ok(()) }
//! ```
//!
//! Identities are stable across versions: a value computed once is computed again for the same
//! content (`tests/source_pins.rs` pins some), since a changed identity rewrites every
//! partition of every dataset published before.

pub mod identity;
pub mod plan;
pub mod rows;
pub mod scan;
pub mod write;

pub use identity::{Content, IdentityOptions, identities, identity};
pub use plan::{Action, Item, Plan, plan};
pub use rows::Format;
pub use scan::{Partition, ScanOptions, SrcFile, Unit, scan};
pub use write::{Progress, write_all};

/// An [`Error::Source`](crate::Error::Source) with this message.
fn source_error(message: impl Into<String>) -> crate::Error {
    crate::Error::Source {
        message: message.into(),
    }
}
