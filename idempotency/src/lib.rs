//! # palisade-idempotency
//!
//! This crate will hold the content-hash `PartitionedWriter` on `object_store` (writes only the
//! partitions whose content changed, commits through an atomic manifest, survives crashes),
//! the canonical row `ContentHasher`, and run-once idempotency keys on Redis, files or memory.
