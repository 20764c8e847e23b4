//! The one error type of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in palisade-idempotency.
///
/// Each message says what happened and what to do about it.
///
/// # HTTP mapping for run-once keys
///
/// Services that expose [`IdempotencyStore::once`](crate::IdempotencyStore::once) behind an API
/// (in the style of Stripe's `Idempotency-Key` header) should map the key errors like this:
///
/// | variant | status | meaning for the client |
/// |---|---|---|
/// | [`Error::MissingKey`], [`Error::InvalidKey`] | `400 Bad Request` | send a non-empty, valid key |
/// | [`Error::InProgress`] | `409 Conflict` | the first request with this key is still running; retry later |
/// | [`Error::FingerprintMismatch`] | `422 Unprocessable Entity` | the key was already used with a different request body |
/// | [`Error::Job`] | whatever the job's own error maps to | nothing was recorded, a retry runs the job again |
/// | [`Error::OwnershipLost`] | `500` (or `409`) | the job ran, but its claim expired and another runner took the key over |
/// | [`Error::ClaimLost`] | `503 Service Unavailable` | the job was cancelled mid-run (its claim was lost); nothing was recorded, retry later |
/// | [`Error::NotRecorded`] | `503 Service Unavailable` | the job ran but its result could not be recorded; a retry runs it again |
/// | store errors ([`Error::Redis`], [`Error::Io`]) | `503 Service Unavailable` | retry later |
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A partition name would escape the dataset prefix or is not a valid path.
    #[error(
        "invalid partition name {name:?}: {reason}; use relative names of non-empty segments \
         separated by '/', like \"date=2024-01-01/region=eu\""
    )]
    InvalidPartition {
        /// The name as given.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// The same partition was put twice in one run.
    #[error("partition {name:?} was already put in this run; put each partition once per commit")]
    DuplicatePartition {
        /// The partition name.
        name: String,
    },

    /// Another writer committed to the same prefix after this writer opened it.
    #[error(
        "another writer committed to {prefix:?} since this writer opened it (manifest generation \
         {expected:?} -> {found:?}); nothing of this run is visible to readers: open a new writer \
         and run again"
    )]
    Conflict {
        /// The dataset prefix.
        prefix: String,
        /// The manifest generation this writer started from (`None`: no manifest).
        expected: Option<u64>,
        /// The manifest generation found at commit time (`None`: no manifest).
        found: Option<u64>,
    },

    /// The store did not confirm the manifest write and could not be read back to tell whether
    /// it landed (a timeout, a connection lost mid-answer). The write may still be applied, so
    /// this run's objects are kept; if it was not, they are swept as orphans after
    /// `orphan_grace`.
    #[error(
        "the commit of dataset {prefix:?} has an unknown outcome: {detail}; this run's objects \
         are kept (if the manifest write did not land they are swept after orphan_grace): run \
         again, or check with `palisade verify`"
    )]
    CommitUnknown {
        /// The dataset prefix.
        prefix: String,
        /// The store's error, and the error reading the manifest back.
        detail: String,
    },

    /// The dataset's prefix contains another dataset, or lies inside one. A writer only ever
    /// touches its own dataset, and its sweeps would take the other one's data.
    #[error(
        "dataset {prefix:?} {relation} the dataset {other:?} (found {evidence}); datasets cannot \
         nest: write to a prefix that neither contains nor lies inside another dataset"
    )]
    NestedDataset {
        /// The dataset this writer was opened on: its prefix, or its full path or key when the
        /// other dataset lies above the store's base.
        prefix: String,
        /// `"contains"` or `"lies inside"`.
        relation: &'static str,
        /// The other dataset, named the same way.
        other: String,
        /// The file or object that marks it.
        evidence: String,
    },

    /// A writer holding a newer fencing token has already committed.
    #[error(
        "fenced: this writer's fencing token {ours} is lower than the token {recorded} that has \
         already committed; a newer lock holder owns the dataset, so this run was discarded"
    )]
    Fenced {
        /// This writer's token.
        ours: u64,
        /// The highest token recorded in the manifest.
        recorded: u64,
    },

    /// A writer without a fencing token tried to commit to a fenced dataset.
    #[error(
        "the manifest records fencing token {recorded}, but this writer has none; pass the lock's \
         fencing token with `.fencing_token(..)`, or opt out with `.allow_unfenced(true)`"
    )]
    FencingTokenRequired {
        /// The highest token recorded in the manifest.
        recorded: u64,
    },

    /// The manifest cannot be parsed or is inconsistent.
    #[error(
        "the manifest {path} is corrupt ({reason}); nothing was written. To recover, restore it \
         from a backup or an earlier object version; or delete it, and the next run rewrites every \
         partition (readers that read through the manifest see no dataset until then)"
    )]
    CorruptManifest {
        /// Where the manifest lives.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A data object does not hold the content its manifest entry records.
    #[error(
        "the object {path} does not match the hash the manifest records for it; it was changed \
         outside palisade: rewrite the partition (put it again after deleting the object)"
    )]
    CorruptObject {
        /// The object.
        path: String,
    },

    /// The manifest was written with a different hash algorithm or canonical encoding.
    #[error(
        "the manifest {path} was written with {field} {found:?}, this version uses {supported:?}; \
         hashes cannot be compared, so nothing was written. Open the writer with \
         `.rewrite_on_version_change(true)` to rewrite every partition once under the new version"
    )]
    IncompatibleManifest {
        /// Where the manifest lives.
        path: String,
        /// Which field differs (`format`, `hash_algorithm` or `canonical_encoding`).
        field: &'static str,
        /// The value in the manifest.
        found: String,
        /// The value this version writes.
        supported: String,
    },

    /// The store cannot do the conditional put the manifest needs.
    #[error(
        "the object store {store} does not support conditional puts ({detail}), so concurrent \
         writers could overwrite each other's manifest; for a local directory use \
         `store_from_url(\"file:///path\")`, which uses a lock file instead"
    )]
    ConditionalPutUnsupported {
        /// The store's name.
        store: String,
        /// The store's own message.
        detail: String,
    },

    /// The manifest lock file stayed locked for longer than the configured wait.
    #[error(
        "timed out after {waited:?} waiting for the lock file {path}; another writer is \
         committing or hung: retry, or raise `lock_timeout`"
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },

    /// The URL given to [`store_from_url`](crate::store_from_url) is not usable.
    #[error("cannot open store {url:?}: {reason}")]
    UnsupportedUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },

    /// A configuration value is invalid.
    #[error("invalid configuration: `{field}` {reason}")]
    Config {
        /// The field name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// An object store operation failed.
    #[error("object store {op} of {path} failed: {source}")]
    Store {
        /// The operation.
        op: &'static str,
        /// The object path.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },

    /// A file system operation failed.
    #[error("{op} {path} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A stream given to `put_stream` failed.
    #[error(
        "the input stream of partition {partition:?} failed: {source}; nothing was staged for it"
    )]
    Input {
        /// The partition.
        partition: String,
        /// The stream's error.
        #[source]
        source: std::io::Error,
    },

    /// A local source directory (the SRC of a publish) cannot be scanned, or one of its files
    /// cannot be read as the content asked for; the message names the file and what to do.
    #[error("{message}")]
    Source {
        /// What went wrong, naming the file.
        message: String,
    },

    /// A value could not be encoded canonically.
    #[error("cannot encode {what}: {reason}")]
    Encoding {
        /// What was being encoded.
        what: &'static str,
        /// Why not.
        reason: String,
    },

    /// A run-once call was made with an empty key (HTTP 400).
    #[error("the idempotency key is missing or empty; send a unique key per logical request")]
    MissingKey,

    /// A run-once key is too long or has control characters (HTTP 400).
    #[error("invalid idempotency key: {reason}")]
    InvalidKey {
        /// Why.
        reason: &'static str,
    },

    /// Another runner holds the key and has not finished (HTTP 409).
    #[error(
        "idempotency key {key:?} is in progress in another runner; retry after it completes, or \
         after `in_progress_ttl` if that runner died"
    )]
    InProgress {
        /// The key.
        key: String,
    },

    /// The key was used before with a different request fingerprint (HTTP 422).
    #[error(
        "idempotency key {key:?} was already used with a different request (fingerprint \
         mismatch); use a new key for a different request"
    )]
    FingerprintMismatch {
        /// The key.
        key: String,
    },

    /// The runner's claim expired and another runner took the key over before it completed.
    #[error(
        "the claim on idempotency key {key:?} expired and another runner owns it now; the result \
         of this run was not recorded: this runner could not renew its claim within \
         `in_progress_ttl` (paused, or cut off from the store); raise it if that can be normal"
    )]
    OwnershipLost {
        /// The key.
        key: String,
    },

    /// The run's claim on its key was lost while the job ran (another runner took the key over,
    /// or the claim could not be renewed before `in_progress_ttl` ran out), so the job was
    /// cancelled: its future was dropped and its
    /// [`ClaimContext::cancelled`](crate::keys::ClaimContext::cancelled) fired. Nothing was
    /// recorded; what the job did before may be partial (HTTP 503: retry later).
    #[error(
        "the claim on idempotency key {key:?} was lost while the job ran ({reason}), so the job \
         was cancelled and nothing was recorded; what it did before may be partial, and a retry \
         runs it again. If the store can be slow or unreachable that long, raise `in_progress_ttl`"
    )]
    ClaimLost {
        /// The key.
        key: String,
        /// What happened: another runner took the key over, or renewals failed until the claim
        /// ran out.
        reason: &'static str,
        /// The last renewal's error, when renewals failed.
        #[source]
        source: Option<Box<Error>>,
    },

    /// The job succeeded, but its result could not be recorded, even after retries: the job ran
    /// and a retry runs it again (HTTP 503: retry later).
    #[error(
        "the job for idempotency key {key:?} ran, but its result could not be recorded after \
         {attempts} attempts ({source}); a retry runs the job again, so its effect must be \
         idempotent (see the run-once contract)"
    )]
    NotRecorded {
        /// The key.
        key: String,
        /// How many times recording was tried.
        attempts: usize,
        /// The last attempt's error.
        #[source]
        source: Box<Error>,
    },

    /// The guarded job failed; nothing was recorded, so it can be retried.
    #[error("the job failed (nothing was recorded, a retry runs it again): {0}")]
    Job(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// A result or record could not be (de)serialised.
    #[error("cannot (de)serialise {what}: {source}")]
    Serialization {
        /// What.
        what: &'static str,
        /// The serde_json error.
        #[source]
        source: serde_json::Error,
    },

    /// A Redis command failed.
    #[error("redis {op} failed: {source}; check that the server is reachable")]
    Redis {
        /// The operation.
        op: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

pub(crate) fn store(
    op: &'static str,
    path: &object_store::path::Path,
) -> impl FnOnce(object_store::Error) -> Error {
    let path = path.to_string();
    move |source| Error::Store { op, path, source }
}
