#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`writer`]: the content-hash [`PartitionedWriter`], its commit protocol and what readers see.
//! - `layout` (private): reserved names, data object names, object keys (byte for byte).
//! - `swap` (private; see [`writer`]): partitions on a local directory, swapped in
//!   whole with `renameat2(RENAME_EXCHANGE)` and rolled forward after a crash.
//! - [`manifest`]: the [`Manifest`], the dataset's commit point.
//! - [`source`]: a local directory as a dataset's source: its partitions and their content
//!   identities (bytes, or rows with the `rows` feature), as `palisade publish` computes them.
//! - [`verify()`]: a read-only check of a dataset against its manifest.
//! - [`hash`]: [`ContentHash`] and the canonical row [`ContentHasher`].
//! - [`keys`]: run-once keys ([`IdempotencyStore`], [`MemoryStore`], [`FileStore`], [`RedisStore`]).

// docs.rs (nightly, `--cfg docsrs`): mark each feature-gated item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
pub mod hash;
pub mod keys;
mod layout;
pub mod manifest;
mod partition;
mod reader;
pub mod source;
mod storage;
mod swap;
mod verify;
pub mod writer;

pub use error::{Error, Result};
pub use hash::{
    CANONICAL_ENCODING_VERSION, ContentHash, ContentHasher, HASH_ALGORITHM, RowOrder,
    canonical_bytes, fingerprint,
};
pub use keys::{
    Claim, ClaimContext, FileStore, IdempotencyStore, MemoryStore, OnceOptions, Outcome,
    OwnerToken, RedisStore,
};
pub use manifest::{FileEntry, Manifest, PartitionEntry, RetiredVersion};
pub use partition::validate_partition;
pub use reader::Dataset;
pub use storage::{DatasetStore, StoreOptions, store_from_url, store_from_url_with};
pub use verify::{Problem, Retained, Verification, verify};
pub use writer::{PartFile, PartitionedWriter, Report, WriterBuilder};
