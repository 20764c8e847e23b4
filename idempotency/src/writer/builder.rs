//! The writer's options, validated when it opens.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::partition::validate_partition;
use crate::storage::DatasetStore;

use super::PartitionedWriter;

/// Options of a [`PartitionedWriter`]; see each method.
#[derive(Debug, Clone)]
pub struct WriterBuilder {
    pub(super) store: DatasetStore,
    pub(super) prefix: String,
    pub(super) fencing_token: Option<u64>,
    pub(super) allow_unfenced: bool,
    pub(super) remove_missing: bool,
    pub(super) rewrite_on_version_change: bool,
    pub(super) lock_timeout: Duration,
    pub(super) orphan_grace: Duration,
    pub(super) extension: String,
    pub(super) retain: Duration,
}

impl WriterBuilder {
    /// The lock holder's fencing token (e.g. `guard.fencing_token()` of palisade-lock). The
    /// manifest records the highest token that committed; a commit with a lower one fails with
    /// [`Error::Fenced`], atomically with the manifest's own concurrency check.
    pub fn fencing_token(mut self, token: u64) -> Self {
        self.fencing_token = Some(token);
        self
    }

    /// Allows a writer without a fencing token to commit to a dataset whose manifest records one
    /// (default: refused with [`Error::FencingTokenRequired`]).
    pub fn allow_unfenced(mut self, allow: bool) -> Self {
        self.allow_unfenced = allow;
        self
    }

    /// Removes, at commit, the partitions that were not put in this run (default: kept).
    pub fn remove_missing(mut self, remove: bool) -> Self {
        self.remove_missing = remove;
        self
    }

    /// Accepts a manifest written with another format, hash algorithm or canonical encoding, and
    /// rewrites every partition put in this run under the current ones (default: refused with
    /// [`Error::IncompatibleManifest`]). That run must put every partition of the old manifest
    /// (or set [`remove_missing`](Self::remove_missing)), since old hashes cannot be carried over.
    pub fn rewrite_on_version_change(mut self, rewrite: bool) -> Self {
        self.rewrite_on_version_change = rewrite;
        self
    }

    /// How long `open` and `commit` wait for the local lock file (default 30 s).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Object stores only: how old an unreferenced object must be before `open` deletes it as the
    /// leftover of a crashed run (default 1 hour; keep it above your longest run).
    pub fn orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// How long a replaced or removed partition version is kept for readers that are still
    /// reading it (default 1 hour, enough for a typical query; `Duration::ZERO` deletes it right
    /// after the commit). As table formats keep snapshots: on an object store the manifest lists
    /// such versions ([`Manifest::retired`](crate::Manifest::retired)) and the first commit after
    /// the retention, timed on the store's clock, deletes them; on a local directory they wait in
    /// `_retired/` and the first `open` or commit after the retention deletes them.
    pub fn retain(mut self, retain: Duration) -> Self {
        self.retain = retain;
        self
    }

    /// The extension of data objects, like `".parquet"` (default none).
    pub fn file_extension(mut self, ext: impl Into<String>) -> Self {
        self.extension = ext.into();
        self
    }

    /// Validates the options, reads the manifest and sweeps leftovers of crashed runs.
    pub async fn open(self) -> Result<PartitionedWriter> {
        if !self.prefix.is_empty() {
            validate_partition(&self.prefix).map_err(|_| Error::Config {
                field: "prefix",
                reason: "must be empty or a relative path of non-empty segments without '..' or \
                         leading '_'/'.'",
            })?;
        }
        let ext_ok = self.extension.is_empty()
            || (self.extension.starts_with('.')
                && self.extension.len() <= 16
                && self.extension[1..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'));
        if !ext_ok {
            return Err(Error::Config {
                field: "file_extension",
                reason: "must be empty or '.' followed by up to 15 letters, digits, '.', '_', '-'",
            });
        }
        if self.lock_timeout.is_zero() {
            return Err(Error::Config {
                field: "lock_timeout",
                reason: "must be greater than zero",
            });
        }
        PartitionedWriter::open_with(self).await
    }
}
