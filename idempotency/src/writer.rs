//! The content-hash partition writer.
//!
//! # Layout
//!
//! ```text
//! <prefix>/_manifest.json                          the commit point (see [`Manifest`])
//! <prefix>/<partition>/part-<hash16>-<run16><ext>  one object per partition version
//! <prefix>/<partition>/<name>...                   multi-file partitions, local directory
//! <prefix>/<partition>/<stem>-<run16><ext>...      multi-file partitions, object stores
//! <prefix>/_manifest.lock, _staging/               local directory only: lock file, staged data
//! <prefix>/_manifest.pending.json                  local directory only: a decided commit
//!                                                  that swaps directories, until it is done
//! ```
//!
//! A partition's data object is named by the first 16 hex digits of its BLAKE3 hash and by the
//! writing run's random id, so a new version never overwrites the object an older manifest names.
//!
//! # Commit protocol
//!
//! **Local directory.** `put` writes the content to `_staging/<run>/` and leaves it there.
//! `commit` fsyncs the staged files (many at once), takes the exclusive lock file
//! `_manifest.lock`, re-reads the manifest, checks fencing token and generation, renames the
//! staged files into their partition directories, fsyncs those directories, writes the new
//! manifest to a staging file, fsyncs it, renames it over `_manifest.json`, fsyncs the prefix
//! directory, and only then deletes the objects the old manifest named and the new one does
//! not. Every `open` sweeps, under the same lock, the staging directories of runs that are gone
//! (each run holds a lock on its own `_staging/<run>.lock` for its lifetime; the kernel drops it
//! when the process dies) and any `part-*` object the manifest does not name.
//!
//! **Object stores.** `put` uploads a changed partition straight to its final, unique name (a put
//! is atomic on object stores). `commit` reads the manifest, checks fencing token and generation,
//! and writes the new manifest with a conditional put (`PutMode::Update` with the e-tag/version it
//! read, or `PutMode::Create`); then deletes replaced objects. Objects of crashed runs are swept on
//! `open` once they are older than `orphan_grace` (default 1 hour; it must exceed your longest
//! run, and a writer that has been open longer than half of it re-checks its uploads before it
//! commits).
//!
//! # Multi-file partitions
//!
//! [`put_files`](PartitionedWriter::put_files) puts a partition made of several files, as Spark
//! or pandas write a Hive-style partition directory (part files whose names change every run).
//! The caller gives the partition's content identity; the files are written only if it differs
//! from the manifest's, and the manifest records the identity and every file's name, object,
//! size and BLAKE3. Manifests that have such partitions are written as format 2
//! ([`MANIFEST_FORMAT`](crate::manifest::MANIFEST_FORMAT)); all others stay format 1, readable
//! by older versions of this crate. A multi-file partition's directory belongs to it alone: a
//! commit with another partition inside it is refused.
//!
//! ## On a local directory
//!
//! A multi-file partition is a real
//! directory `<prefix>/<partition>/` that holds exactly its files under their own names, so a
//! plain Hive-style reader sees a normal layout. Only the writer's hidden marker
//! `.palisade-<run16>` can sit next to them for the length of a commit (Hive readers skip names
//! starting with `.` or `_`).
//!
//! ## Commit protocol (local directory)
//!
//! 1. `put_files` builds the new version in the run's staging area, `_staging/<run>/p<n>/`:
//!    every file copied while it is hashed, plus the marker file `.palisade-<run16>`.
//! 2. `commit` fsyncs those files and directories (outside the lock), takes `_manifest.lock`,
//!    completes any interrupted commit (step 6), re-reads the manifest and checks fencing token
//!    and generation. A refused commit stops here: nothing a reader sees has changed.
//! 3. Single-object partitions of the run are renamed into place and their directories fsynced
//!    (their names are new, so no reader sees them yet).
//! 4. **The decision:** the new manifest, with the list of directory swaps and removals, is
//!    written to `_manifest.pending.json` (staged, fsynced, renamed, prefix directory fsynced).
//!    From here on the commit is rolled forward, never back.
//! 5. Each new version is swapped into place: `renameat2(RENAME_EXCHANGE)` exchanges the staged
//!    directory and the live one in one atomic step (the old version lands in the staging area);
//!    a partition that did not exist yet is renamed into place, after its parent directories
//!    (`k1=v/` of `k1=v/k2=w`) are created and fsynced. The directories are fsynced, then the
//!    new manifest is installed as `_manifest.json` (staged, fsynced, renamed, fsynced): the
//!    commit point for readers of the manifest. Then removed multi-file partitions are renamed
//!    aside into the staging area (atomically disappearing), the markers are deleted,
//!    `_manifest.pending.json` is deleted, and only then the old versions.
//! 6. **Roll-forward:** `open`, `commit` and [`Dataset::open`](crate::Dataset::open) look for
//!    `_manifest.pending.json`; if there is one (its writer crashed or failed in step 5) they
//!    take the lock and complete it idempotently: a partition whose live directory holds this
//!    run's marker was already swapped; otherwise its staged directory is swapped in. If the
//!    installed manifest already has the pending generation, the swaps were all done and only the
//!    clean-up remains. The staging sweep of `open` runs after this, so it never deletes a
//!    version that a pending commit still has to swap in. (A `commit` that fails with an I/O
//!    error after step 4 returns the error, but its commit is decided: the next `open`
//!    completes it.) A pending record that cannot be completed (its staged versions deleted
//!    by hand) is [`Error::CorruptManifest`] naming `_manifest.pending.json`.
//!
//! ## Where `RENAME_EXCHANGE` is not available
//!
//! Other operating systems, and Linux file systems without it (the call fails with `EINVAL`,
//! `ENOSYS` or `EOPNOTSUPP`), fall back to two renames: the live directory aside into the
//! staging area, then the new one in. Between the two, **the partition is missing** (a reader
//! listing it finds no directory; never a mix). A crash in between is rolled forward like any
//! other (the new version is renamed in).
//!
//! ## What a plain directory reader observes
//!
//! - A partition directory always holds one complete version's files: the old set or the new
//!   set, each file complete (the swap is one atomic rename of the whole directory). Never a
//!   half-written file, never old and new files mixed.
//! - Different partitions switch at different instants during a commit (one `renameat2` each),
//!   so a reader that lists several partitions during a commit can see some new and some old.
//! - Files a reader has already opened keep their content until it closes them, even after the
//!   old version is deleted (renames and deletions do not disturb open files). But a reader
//!   that listed a directory before its swap and opens files by path after it gets the new
//!   version's files: a name that is gone is "not found" (re-list and start over), and a reused
//!   name opens the new content. A reader that must never mix versions opens all the files it
//!   listed before reading, or reads through the manifest and checks the hashes.
//! - Readers through the manifest ([`Dataset`](crate::Dataset), `_manifest.json`): the manifest
//!   is installed after the swaps, so between the first swap and the install (milliseconds,
//!   or until the next `open` after a crash) the manifest still describes the old versions of
//!   partitions already swapped: such a reader can get "not found" (or a hash mismatch when a
//!   file name is reused) and should re-read the manifest. `Dataset::open` completes a pending
//!   commit before reading.
//!
//! ## Object stores
//!
//! `put_files` uploads each file at once (streamed, 8 MiB at a time, hashed as it is read)
//! under a unique name that keeps its extension, `<partition>/<dir>/<stem>-<run16><ext>`
//! (`part-0.snappy.parquet` becomes `part-0-<run16>.snappy.parquet`). The manifest's
//! conditional put is the commit point; the replaced version's objects are deleted right after
//! it. A plain listing of `<partition>/` therefore sees **both versions** from the uploads until
//! that deletion (and after a crash, the dead run's uploads until a later `open` sweeps them,
//! once they are older than `orphan_grace`): readers that need a consistent view read through
//! the manifest ([`Dataset::live_files`](crate::Dataset::live_files), or `palisade manifest`).
//!
//! # What readers observe
//!
//! - **Through the manifest** ([`Dataset`](crate::Dataset), or any reader that reads
//!   `_manifest.json` and then the objects it names): one committed version of every partition,
//!   complete; never an object that is missing or half-written. (Multi-file partitions on a
//!   local directory are swapped in place, which has a short window before the manifest is
//!   installed: see [above](#what-a-plain-directory-reader-observes).)
//! - **A plain directory listing** (a Hive-style reader globbing `<partition>/*`): never a
//!   half-written file (data is staged outside the partition directories, and objects are
//!   written whole). But while a commit replaces a partition, and after a crash until the next
//!   `open` sweeps, a partition directory can hold both the old and the new object; such readers
//!   should read through the manifest, or use multi-file partitions, whose directories are
//!   swapped whole on a local directory (see [above](#what-a-plain-directory-reader-observes)).
//! - Replaced objects are deleted right after the commit that stops naming them, so a reader that
//!   is still reading objects named by the previous manifest can get "not found": it should
//!   re-read the manifest and start over.
//! - Without a manifest (never committed, or deleted by hand), `open` sweeps no objects; they
//!   are swept after the next commit, so deleting a corrupt manifest to recover loses nothing
//!   until the rewrite has committed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};
use tracing::{debug, info, warn};

use crate::error::{Error, Result, io, store as store_err};
use crate::hash::ContentHash;
use crate::manifest::{FileEntry, MANIFEST_FILE, Manifest, PartitionEntry, files_digest};
use crate::partition::{is_object_file_name, validate_partition};
use crate::storage::{
    Backend, DatasetStore, blocking, create_parents, fsync_dir, fsync_many, lock_exclusive,
    remove_dir_all_if_exists, remove_file_if_exists, try_lock, write_synced, write_unsynced,
};

use crate::swap::LOCK_FILE;
const STAGING_DIR: &str = "_staging";
/// Inputs larger than this are hashed on the blocking pool, and streamed in multipart uploads.
const LARGE: usize = 8 << 20;

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Partitions whose content changed (or were new) and were written.
    pub written: Vec<String>,
    /// Partitions put in this run whose content was already committed.
    pub unchanged: Vec<String>,
    /// Partitions removed (only with [`WriterBuilder::remove_missing`]).
    pub removed: Vec<String>,
    /// Bytes of partition data written to the store (the manifest is not counted).
    pub bytes_written: u64,
    /// Bytes hashed.
    pub bytes_hashed: u64,
    /// The manifest generation now committed (unchanged if nothing was committed).
    pub generation: u64,
    /// Whether a new manifest was written.
    pub manifest_written: bool,
}

/// Options of a [`PartitionedWriter`]; see each method.
#[derive(Debug, Clone)]
pub struct WriterBuilder {
    store: DatasetStore,
    prefix: String,
    fencing_token: Option<u64>,
    allow_unfenced: bool,
    remove_missing: bool,
    rewrite_on_version_change: bool,
    lock_timeout: Duration,
    orphan_grace: Duration,
    extension: String,
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

/// A staged partition: its future manifest entry, and where its data waits.
#[derive(Debug)]
struct Staged {
    entry: PartitionEntry,
    /// Local directory: the fsynced staging file to rename into place at commit.
    /// Object stores: `None`, the object is already uploaded under `entry.object`.
    local_file: Option<PathBuf>,
    /// Local directory, multi-file partitions: the staged version of the partition directory.
    local_dir: Option<StagedDir>,
}

/// A multi-file partition's new version in the staging area.
#[derive(Debug, Clone)]
struct StagedDir {
    /// `_staging/<run>/p<n>`.
    dir: PathBuf,
    /// Every file in it (fsynced at commit), the marker included.
    files: Vec<PathBuf>,
    /// It and its subdirectories (fsynced at commit).
    dirs: Vec<PathBuf>,
}

/// One file of a multi-file partition ([`PartitionedWriter::put_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartFile {
    /// The file's path relative to the partition directory (validated like partition names:
    /// non-empty segments, no `..`, no leading `_` or `.`; may contain `/`).
    pub name: String,
    /// Where to read it on the local disk.
    pub path: PathBuf,
}

impl PartFile {
    /// A file named `name` in the partition, read from `path`.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
        }
    }
}

/// A local run's staging area; the lock on `lock` marks the run as alive.
#[derive(Debug)]
struct LocalRun {
    _lock: std::fs::File,
    lock_path: PathBuf,
    dir: PathBuf,
}

/// Writes a partitioned dataset, only the partitions whose content changed, and commits them
/// atomically through a manifest. See the [module docs](self) for the protocol and what readers
/// observe.
#[derive(Debug)]
pub struct PartitionedWriter {
    backend: Backend,
    prefix: String,
    opts: WriterBuilder,
    /// The manifest this run started from (`Manifest::empty()` if none).
    base: Manifest,
    /// The e-tag/version of `base` on object stores (`None` if there was no manifest).
    base_version: Option<UpdateVersion>,
    /// The base was written by another version: every put is written.
    rewrite_all: bool,
    run_id: String,
    seq: u64,
    staged: BTreeMap<String, Staged>,
    unchanged: BTreeSet<String>,
    bytes_written: u64,
    bytes_hashed: u64,
    local: Option<LocalRun>,
    opened_at: Instant,
}

impl PartitionedWriter {
    /// Opens the dataset under `prefix` with default options.
    pub async fn open(store: impl Into<DatasetStore>, prefix: &str) -> Result<Self> {
        Self::builder(store, prefix).open().await
    }

    /// Options for a writer on the dataset under `prefix`.
    pub fn builder(store: impl Into<DatasetStore>, prefix: &str) -> WriterBuilder {
        WriterBuilder {
            store: store.into(),
            prefix: prefix.trim_matches('/').to_string(),
            fencing_token: None,
            allow_unfenced: false,
            remove_missing: false,
            rewrite_on_version_change: false,
            lock_timeout: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(3600),
            extension: String::new(),
        }
    }

    #[tracing::instrument(name = "open_dataset", skip_all, fields(prefix = %opts.prefix))]
    async fn open_with(opts: WriterBuilder) -> Result<Self> {
        let run_id = format!("{:016x}", rand::random::<u64>());
        let backend = opts.store.backend.clone();
        let prefix = opts.prefix.clone();
        let accept = opts.rewrite_on_version_change;
        let (base, base_version, local) = match &backend {
            Backend::Local(root) => {
                let dir = root.join(&prefix);
                let (lock_timeout, run) = (opts.lock_timeout, run_id.clone());
                let (m, local) =
                    blocking(move || local_open(&dir, &run, lock_timeout, accept)).await?;
                (m, None, Some(local))
            }
            Backend::Object { store, base } => {
                let mpath = obj_join(base, &prefix, MANIFEST_FILE);
                let (m, version) = object_read_manifest(store, &mpath, accept).await?;
                let dir = obj_join(base, &prefix, "");
                if let Some(m) = &m {
                    object_sweep(store, &dir, &mpath, m, opts.orphan_grace).await;
                }
                (m, version, None)
            }
        };
        let base = base.unwrap_or_else(Manifest::empty);
        check_fence(&opts, &base)?;
        info!(prefix = %prefix, run = %run_id, generation = base.generation, "opened dataset");
        Ok(Self {
            rewrite_all: !base.is_current_version(),
            backend,
            prefix,
            opts,
            base,
            base_version,
            run_id,
            seq: 0,
            staged: BTreeMap::new(),
            unchanged: BTreeSet::new(),
            bytes_written: 0,
            bytes_hashed: 0,
            local,
            opened_at: Instant::now(),
        })
    }

    /// The manifest this run started from.
    pub fn manifest(&self) -> &Manifest {
        &self.base
    }

    /// Puts a partition's content; it is written only if its hash differs from the manifest's.
    pub async fn put(&mut self, partition: &str, bytes: impl Into<Bytes>) -> Result<()> {
        let bytes = bytes.into();
        self.check_new(partition)?;
        let hash = hash_bytes(bytes.clone()).await?;
        self.put_hashed(partition, bytes, hash, None).await
    }

    /// Like [`put`](Self::put), but the partition's identity is `rows_hash` (from a
    /// [`ContentHasher`](crate::ContentHasher)), so the same rows serialised differently (another
    /// row order, another writer version) count as unchanged and are not rewritten.
    pub async fn put_with_rows_hash(
        &mut self,
        partition: &str,
        rows_hash: ContentHash,
        bytes: impl Into<Bytes>,
    ) -> Result<()> {
        let bytes = bytes.into();
        self.check_new(partition)?;
        let hash = hash_bytes(bytes.clone()).await?;
        self.put_hashed(partition, bytes, hash, Some(rows_hash))
            .await
    }

    /// Puts a partition's content from a stream of chunks, hashing as it reads. The content is
    /// spooled to a file (the local staging directory, or a temporary file for object stores),
    /// never held in memory whole; it is uploaded only if its hash differs from the manifest's.
    pub async fn put_stream<S, E>(&mut self, partition: &str, stream: S) -> Result<()>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.check_new(partition)?;
        let (spool_path, spool_file) = self.spool_file().await?;
        let mut file = tokio::fs::File::from_std(spool_file);
        let mut hasher = blake3::Hasher::new();
        let mut stream = std::pin::pin!(stream);
        let input_err = |e: E| Error::Input {
            partition: partition.to_string(),
            source: std::io::Error::other(e.into()),
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(input_err)?;
            if chunk.len() >= 1 << 16 {
                let (h, c) = tokio::task::spawn_blocking(move || {
                    let mut h = hasher;
                    h.update(&chunk);
                    (h, chunk)
                })
                .await
                .map_err(|e| Error::Input {
                    partition: partition.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                hasher = h;
                tokio::io::AsyncWriteExt::write_all(&mut file, &c).await
            } else {
                hasher.update(&chunk);
                tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await
            }
            .map_err(io(
                "write spool file",
                spool_path.clone().unwrap_or_default(),
            ))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(io(
                "write spool file",
                spool_path.clone().unwrap_or_default(),
            ))?;
        let std_file = file.into_std().await;
        self.finish_spooled(partition, hasher.finalize().into(), spool_path, std_file)
            .await
    }

    /// Puts a partition's content from a local file: hashes it first (one thread, plain reads),
    /// and only if the hash differs from the manifest's, copies it through the staging area
    /// (hashing again what is copied, so the manifest records exactly the bytes written even if
    /// the file changes meanwhile). An unchanged file is read once and nothing is written.
    pub async fn put_file(&mut self, partition: &str, path: impl Into<PathBuf>) -> Result<()> {
        self.check_new(partition)?;
        let path = path.into();
        let p = path.clone();
        let (hash, size) = blocking(move || hash_file(&p)).await?;
        self.bytes_hashed += size;
        if !self.changed(partition, &hash, None) {
            self.unchanged.insert(partition.to_string());
            return Ok(());
        }
        let (spool_path, spool) = self.spool_file().await?;
        let (hash, spool) = blocking(move || copy_hashing(&path, spool)).await?;
        self.finish_spooled(partition, hash, spool_path, spool)
            .await
    }

    /// Puts a partition made of several local files (a Hive-style partition directory as Spark
    /// or pandas write it). `identity` is the partition's content identity as the caller defines
    /// it (for example BLAKE3 over the files' contents, order-insensitively, or an unordered
    /// [`ContentHasher`](crate::ContentHasher) over the rows); the partition is written, all its
    /// files streamed (never whole in memory), only if `identity` differs from the manifest's.
    /// Returns `true` if it will be written at commit, `false` if unchanged.
    ///
    /// On a local directory the partition becomes a real directory `<prefix>/<partition>/`
    /// holding exactly these files under their names; a new version replaces the old directory
    /// whole and atomically at commit (see the [module docs](self#multi-file-partitions)). On
    /// object stores each file is uploaded now under a unique name that keeps its extension,
    /// `<partition>/<dir>/<stem>-<run16><ext>`. Either way the manifest records the identity and
    /// every file's name, object, size and BLAKE3 (of the bytes actually written, hashed while
    /// they are copied). In the [`Report`], a written partition adds its total size to
    /// `bytes_written` and `bytes_hashed`; an unchanged one adds nothing (its files are not read;
    /// the caller's own identity hashing is not counted).
    ///
    /// A multi-file partition's directory belongs to it alone: a commit where another partition
    /// lies inside it is refused with [`Error::InvalidPartition`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use palisade_idempotency::{ContentHash, DatasetStore, PartFile, PartitionedWriter};
    /// let out = tempfile::tempdir()?; // a job's output: out/date=2024-01-01/part-*.csv
    /// std::fs::write(out.path().join("part-0001.csv"), "id\n1\n")?;
    /// std::fs::write(out.path().join("part-0002.csv"), "id\n2\n")?;
    /// let dest = tempfile::tempdir()?;
    /// let store = DatasetStore::local(dest.path()); // or store_from_url("s3://...")
    /// let mut w = PartitionedWriter::open(&store, "sales").await?;
    /// let files = ["part-0001.csv", "part-0002.csv"].map(|n| PartFile::new(n, out.path().join(n)));
    /// let identity = ContentHash::of_bytes(b"the caller's content identity");
    /// assert!(w.put_files("date=2024-01-01", files.to_vec(), identity).await?);
    /// w.commit().await?;
    /// assert!(dest.path().join("sales/date=2024-01-01/part-0002.csv").is_file());
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub async fn put_files(
        &mut self,
        partition: &str,
        files: Vec<PartFile>,
        identity: ContentHash,
    ) -> Result<bool> {
        self.check_new(partition)?;
        check_part_files(partition, &files)?;
        if let Some(other) = self.nested_conflict(partition) {
            return Err(Error::InvalidPartition {
                name: other,
                reason: NESTED,
            });
        }
        let unchanged = !self.rewrite_all
            && self
                .base
                .partitions
                .get(partition)
                .is_some_and(|e| e.identity == Some(identity));
        if unchanged {
            debug!(partition, "unchanged");
            self.unchanged.insert(partition.to_string());
            return Ok(false);
        }
        let mut entries: Vec<FileEntry> = Vec::with_capacity(files.len());
        let mut local_dir = None;
        match self.backend.clone() {
            Backend::Local(_) => {
                let run = self.local.as_ref().ok_or_else(|| Error::Config {
                    field: "store",
                    reason: "local staging used on an object store (internal error)",
                })?;
                self.seq += 1;
                let sdir = run.dir.join(format!("p{}", self.seq));
                let marker = format!(".palisade-{}", self.run_id);
                let (p, d) = (partition.to_string(), sdir.clone());
                let (stats, synced, dirs) =
                    blocking(move || stage_dir(&d, &p, &files, &marker)).await?;
                for (name, size, hash) in stats {
                    entries.push(FileEntry {
                        object: format!("{partition}/{name}"),
                        name,
                        size,
                        hash,
                    });
                }
                local_dir = Some(StagedDir {
                    dir: sdir,
                    files: synced,
                    dirs,
                });
            }
            Backend::Object { store, base } => {
                for f in files {
                    let object = format!("{partition}/{}", unique_name(&f.name, &self.run_id));
                    let target = obj_join(&base, &self.prefix, &object);
                    match upload_hashing(&store, &target, &f.path).await {
                        Ok((hash, size)) => entries.push(FileEntry {
                            name: f.name,
                            object,
                            size,
                            hash,
                        }),
                        Err(e) => {
                            let done: Vec<String> =
                                entries.iter().map(|e| e.object.clone()).collect();
                            delete_objects(&store, &base, &self.prefix, &done).await;
                            return Err(e);
                        }
                    }
                }
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let size: u64 = entries.iter().map(|e| e.size).sum();
        let entry = PartitionEntry {
            object: format!("{partition}/"),
            size,
            hash: files_digest(&entries),
            rows_hash: None,
            identity: Some(identity),
            files: entries,
        };
        debug!(
            partition,
            files = entry.files.len(),
            size,
            "staged multi-file partition"
        );
        self.staged.insert(
            partition.to_string(),
            Staged {
                entry,
                local_file: None,
                local_dir,
            },
        );
        self.bytes_written += size;
        self.bytes_hashed += size;
        Ok(true)
    }

    /// A partition (put in this run or committed) that `partition`'s directory would contain, or
    /// that contains it as a multi-file partition.
    fn nested_conflict(&self, partition: &str) -> Option<String> {
        let inside = format!("{partition}/");
        // Committed partitions not put again are removed at commit with `remove_missing`; the
        // commit checks the final set again.
        let base = self
            .base
            .partitions
            .keys()
            .filter(|_| !self.opts.remove_missing);
        let names = base.chain(self.staged.keys()).chain(self.unchanged.iter());
        for other in names {
            if other.starts_with(&inside) {
                return Some(other.clone());
            }
            let multi = self
                .staged
                .get(other)
                .map(|s| s.entry.is_multi_file())
                .or_else(|| self.base.partitions.get(other).map(|e| e.is_multi_file()))
                .unwrap_or(false);
            if multi && partition.starts_with(&format!("{other}/")) {
                return Some(other.clone());
            }
        }
        None
    }

    /// Commits: writes the new manifest (only if something changed, or to record a newer
    /// fencing token) and returns what was done. On [`Error::Conflict`] or [`Error::Fenced`]
    /// nothing a reader sees has changed, and this run's staged data is deleted. On a local
    /// directory, a commit that swaps multi-file partitions and fails with an I/O error after its
    /// decision is completed by the next `open` (see the [module docs](self#multi-file-partitions)).
    #[tracing::instrument(
        name = "commit_dataset",
        skip_all,
        fields(prefix = %self.prefix, run = %self.run_id, fencing_token = ?self.opts.fencing_token)
    )]
    pub async fn commit(mut self) -> Result<Report> {
        if self.rewrite_all
            && !self.opts.remove_missing
            && self
                .base
                .partitions
                .keys()
                .any(|k| !self.staged.contains_key(k) && !self.unchanged.contains(k))
        {
            // Their recorded hashes were made by the old version and cannot be carried over.
            self.abort().await?;
            return Err(Error::Config {
                field: "rewrite_on_version_change",
                reason: "needs every partition of the old manifest to be put in the run that \
                         rewrites it (or `remove_missing(true)`); nothing was committed",
            });
        }
        let removed: Vec<String> = if self.opts.remove_missing {
            self.base
                .partitions
                .keys()
                .filter(|k| !self.staged.contains_key(*k) && !self.unchanged.contains(*k))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let mut next = self.base.clone();
        next.hash_algorithm = crate::hash::HASH_ALGORITHM.to_string();
        next.canonical_encoding = crate::hash::CANONICAL_ENCODING_VERSION;
        next.generation = self.base.generation + 1;
        next.fencing_token = match (self.base.fencing_token, self.opts.fencing_token) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        // Objects to delete after the commit. On a local directory, a multi-file partition's old
        // files leave with its directory (swapped out or moved aside whole), never one by one:
        // the new version may reuse their names.
        let local = matches!(self.backend, Backend::Local(_));
        let mut obsolete: Vec<String> = Vec::new();
        let mut removed_dirs: Vec<String> = Vec::new();
        for (name, s) in &self.staged {
            if let Some(old) = next.partitions.insert(name.clone(), s.entry.clone())
                && !(local && old.is_multi_file() && s.entry.is_multi_file())
            {
                obsolete.extend(old.objects().into_iter().map(str::to_string));
            }
        }
        for name in &removed {
            if let Some(old) = next.partitions.remove(name) {
                if local && old.is_multi_file() {
                    removed_dirs.push(name.clone());
                } else {
                    obsolete.extend(old.objects().into_iter().map(str::to_string));
                }
            }
        }
        next.format = next.needed_format();
        if let Err(e) = check_nesting(&next) {
            self.abort().await?;
            return Err(e);
        }
        let needs_write = !self.staged.is_empty()
            || !removed.is_empty()
            || next.fencing_token != self.base.fencing_token
            || !self.base.is_current_version();
        let mut report = Report {
            written: self.staged.keys().cloned().collect(),
            unchanged: self.unchanged.iter().cloned().collect(),
            removed,
            bytes_written: self.bytes_written,
            bytes_hashed: self.bytes_hashed,
            generation: if needs_write {
                next.generation
            } else {
                self.base.generation
            },
            manifest_written: needs_write,
        };
        let result = match self.backend.clone() {
            Backend::Local(root) => {
                let dir = root.join(&self.prefix);
                let staged: Vec<(PathBuf, String)> = self
                    .staged
                    .values()
                    .filter_map(|s| s.local_file.clone().map(|f| (f, s.entry.object.clone())))
                    .collect();
                let dirs: Vec<(String, StagedDir)> = self
                    .staged
                    .iter()
                    .filter_map(|(k, s)| s.local_dir.clone().map(|d| (k.clone(), d)))
                    .collect();
                let local = self.local.take();
                let (opts, base) = (self.opts.clone(), self.base.clone());
                let next = needs_write.then_some(next);
                let run_id = self.run_id.clone();
                blocking(move || {
                    local_commit(
                        &dir,
                        &opts,
                        &base,
                        next,
                        LocalChanges {
                            staged,
                            dirs,
                            removed_dirs,
                            obsolete,
                            run_id,
                        },
                        local,
                    )
                })
                .await
            }
            Backend::Object { store, base } => {
                let next = needs_write.then_some(next);
                self.object_commit(&store, &base, next, obsolete).await
            }
        };
        match result {
            Ok(()) => {
                info!(
                    prefix = %self.prefix,
                    written = report.written.len(),
                    unchanged = report.unchanged.len(),
                    removed = report.removed.len(),
                    bytes_written = report.bytes_written,
                    generation = report.generation,
                    "committed dataset"
                );
                #[cfg(feature = "metrics")]
                {
                    metrics::counter!("palisade_idempotency_bytes_written")
                        .increment(report.bytes_written);
                    metrics::counter!("palisade_idempotency_partitions_written")
                        .increment(report.written.len() as u64);
                }
                Ok(std::mem::take(&mut report))
            }
            Err(e) => {
                warn!(prefix = %self.prefix, error = %e, "commit refused; staged data discarded");
                Err(e)
            }
        }
    }

    /// Discards this run: deletes its staged data; readers see no change.
    pub async fn abort(mut self) -> Result<()> {
        match self.backend.clone() {
            Backend::Local(_) => {
                if let Some(run) = self.local.take() {
                    blocking(move || discard_local_run(run)).await?;
                }
            }
            Backend::Object { store, base } => {
                let objects: Vec<String> = self
                    .staged
                    .values()
                    .flat_map(|s| s.entry.objects())
                    .map(str::to_string)
                    .collect();
                delete_objects(&store, &base, &self.prefix, &objects).await;
            }
        }
        Ok(())
    }

    // ---------- internals ----------

    fn check_new(&self, partition: &str) -> Result<()> {
        validate_partition(partition)?;
        if self.staged.contains_key(partition) || self.unchanged.contains(partition) {
            return Err(Error::DuplicatePartition {
                name: partition.to_string(),
            });
        }
        Ok(())
    }

    fn changed(&self, partition: &str, hash: &ContentHash, rows: Option<&ContentHash>) -> bool {
        if self.rewrite_all {
            return true;
        }
        match self.base.partitions.get(partition) {
            None => true,
            Some(e) => !(e.hash == *hash || (rows.is_some() && e.rows_hash.as_ref() == rows)),
        }
    }

    fn new_entry(
        &mut self,
        partition: &str,
        hash: ContentHash,
        size: u64,
        rows_hash: Option<ContentHash>,
    ) -> PartitionEntry {
        let hex = hash.to_hex();
        PartitionEntry {
            object: format!(
                "{partition}/part-{}-{}{}",
                &hex[..16],
                self.run_id,
                self.opts.extension
            ),
            size,
            hash,
            rows_hash,
            identity: None,
            files: Vec::new(),
        }
    }

    fn record(&mut self, partition: &str, entry: PartitionEntry, local_file: Option<PathBuf>) {
        debug!(partition, object = %entry.object, size = entry.size, "staged partition");
        self.staged.insert(
            partition.to_string(),
            Staged {
                entry,
                local_file,
                local_dir: None,
            },
        );
    }

    fn next_staging_path(&mut self) -> Result<PathBuf> {
        let run = self.local.as_ref().ok_or_else(|| Error::Config {
            field: "store",
            reason: "local staging used on an object store (internal error)",
        })?;
        self.seq += 1;
        Ok(run.dir.join(format!("{}.data", self.seq)))
    }

    async fn put_hashed(
        &mut self,
        partition: &str,
        bytes: Bytes,
        hash: ContentHash,
        rows_hash: Option<ContentHash>,
    ) -> Result<()> {
        let size = bytes.len() as u64;
        self.bytes_hashed += size;
        if !self.changed(partition, &hash, rows_hash.as_ref()) {
            debug!(partition, "unchanged");
            self.unchanged.insert(partition.to_string());
            return Ok(());
        }
        let entry = self.new_entry(partition, hash, size, rows_hash);
        match &self.backend {
            Backend::Local(_) => {
                let path = self.next_staging_path()?;
                let p = path.clone();
                blocking(move || write_unsynced(&p, &bytes)).await?;
                self.record(partition, entry, Some(path));
            }
            Backend::Object { store, base } => {
                let target = obj_join(base, &self.prefix, &entry.object);
                store
                    .put(&target, PutPayload::from_bytes(bytes))
                    .await
                    .map_err(store_err("put", &target))?;
                self.record(partition, entry, None);
            }
        }
        self.bytes_written += size;
        Ok(())
    }

    /// A file to spool a stream into: a staging file (local) or an anonymous temp file.
    async fn spool_file(&mut self) -> Result<(Option<PathBuf>, std::fs::File)> {
        match &self.backend {
            Backend::Local(_) => {
                let path = self.next_staging_path()?;
                let p = path.clone();
                let f = blocking(move || {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&p)
                        .map_err(io("create", &p))
                })
                .await?;
                Ok((Some(path), f))
            }
            Backend::Object { .. } => {
                let f = blocking(|| {
                    tempfile::tempfile().map_err(io("create temporary file", std::env::temp_dir()))
                })
                .await?;
                Ok((None, f))
            }
        }
    }

    async fn finish_spooled(
        &mut self,
        partition: &str,
        hash: ContentHash,
        spool_path: Option<PathBuf>,
        file: std::fs::File,
    ) -> Result<()> {
        let size = file
            .metadata()
            .map_err(io(
                "stat spool file",
                spool_path.clone().unwrap_or_default(),
            ))?
            .len();
        self.bytes_hashed += size;
        if !self.changed(partition, &hash, None) {
            if let Some(p) = spool_path {
                blocking(move || remove_file_if_exists(&p)).await?;
            }
            self.unchanged.insert(partition.to_string());
            return Ok(());
        }
        let entry = self.new_entry(partition, hash, size, None);
        match (&self.backend, spool_path) {
            (Backend::Local(_), Some(path)) => {
                // Fsynced in bulk at commit.
                drop(file);
                self.record(partition, entry, Some(path));
            }
            (Backend::Object { store, base }, _) => {
                let target = obj_join(base, &self.prefix, &entry.object);
                upload_file(store, &target, file, size).await?;
                self.record(partition, entry, None);
            }
            (Backend::Local(_), None) => {
                return Err(Error::Config {
                    field: "store",
                    reason: "local spool without a staging path (internal error)",
                });
            }
        }
        self.bytes_written += size;
        Ok(())
    }

    async fn object_commit(
        &self,
        store: &Arc<dyn ObjectStore>,
        base: &ObjPath,
        next: Option<Manifest>,
        obsolete: Vec<String>,
    ) -> Result<()> {
        let ours: Vec<String> = self
            .staged
            .values()
            .flat_map(|s| s.entry.objects())
            .map(str::to_string)
            .collect();
        let mpath = obj_join(base, &self.prefix, MANIFEST_FILE);
        let outcome = async {
            let (current, version) =
                object_read_manifest(store, &mpath, self.opts.rewrite_on_version_change).await?;
            check_current(&self.opts, &self.prefix, &self.base, current.as_ref())?;
            if current.is_some() && version != self.base_version {
                return Err(Error::Conflict {
                    prefix: self.prefix.clone(),
                    expected: Some(self.base.generation),
                    found: current.map(|m| m.generation),
                });
            }
            let Some(next) = next else { return Ok(false) };
            if self.opened_at.elapsed() > self.opts.orphan_grace / 2 {
                // Uploads this old may have been swept as orphans by another writer's `open`.
                for object in &ours {
                    let p = obj_join(base, &self.prefix, object);
                    store.head(&p).await.map_err(store_err("re-check", &p))?;
                }
            }
            let mode = match &self.base_version {
                Some(v) => PutMode::Update(v.clone()),
                None => PutMode::Create,
            };
            let put = store
                .put_opts(
                    &mpath,
                    PutPayload::from(next.encode()),
                    PutOptions::from(mode),
                )
                .await;
            match put {
                Ok(_) => Ok(true),
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. }) => {
                    // Someone committed in between: report Fenced if they fenced us out.
                    let (current, _) =
                        object_read_manifest(store, &mpath, self.opts.rewrite_on_version_change)
                            .await?;
                    check_current(&self.opts, &self.prefix, &self.base, current.as_ref())?;
                    Err(Error::Conflict {
                        prefix: self.prefix.clone(),
                        expected: Some(self.base.generation),
                        found: current.map(|m| m.generation),
                    })
                }
                Err(e @ object_store::Error::NotImplemented { .. })
                | Err(e @ object_store::Error::NotSupported { .. }) => {
                    Err(Error::ConditionalPutUnsupported {
                        store: store.to_string(),
                        detail: e.to_string(),
                    })
                }
                Err(e) => Err(store_err("put manifest", &mpath)(e)),
            }
        }
        .await;
        match outcome {
            Ok(true) => {
                delete_objects(store, base, &self.prefix, &obsolete).await;
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                delete_objects(store, base, &self.prefix, &ours).await;
                Err(e)
            }
        }
    }
}

fn check_fence(opts: &WriterBuilder, m: &Manifest) -> Result<()> {
    match (opts.fencing_token, m.fencing_token) {
        (Some(ours), Some(recorded)) if ours < recorded => Err(Error::Fenced { ours, recorded }),
        (None, Some(recorded)) if !opts.allow_unfenced => {
            Err(Error::FencingTokenRequired { recorded })
        }
        _ => Ok(()),
    }
}

/// The commit-time check against the manifest found in the store: fencing first (a newer holder
/// is the more useful error), then the generation.
fn check_current(
    opts: &WriterBuilder,
    prefix: &str,
    base: &Manifest,
    current: Option<&Manifest>,
) -> Result<()> {
    if let Some(c) = current {
        check_fence(opts, c)?;
    }
    let found = current.map(|m| m.generation).unwrap_or(0);
    if found != base.generation {
        return Err(Error::Conflict {
            prefix: prefix.to_string(),
            expected: (base.generation > 0).then_some(base.generation),
            found: current.map(|m| m.generation),
        });
    }
    Ok(())
}

async fn hash_bytes(bytes: Bytes) -> Result<ContentHash> {
    if bytes.len() < LARGE {
        return Ok(ContentHash::of_bytes(&bytes));
    }
    blocking(move || Ok(ContentHash::of_bytes(&bytes))).await
}

/// Hashes a file with one thread, reading 1 MiB at a time.
pub(crate) fn hash_file(path: &std::path::Path) -> Result<(ContentHash, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher.finalize().into(), size))
}

/// Copies `from` into `to` (positioned at its start) while hashing what is copied.
fn copy_hashing(
    from: &std::path::Path,
    mut to: std::fs::File,
) -> Result<(ContentHash, std::fs::File)> {
    use std::io::{Read, Write};
    let mut f = std::fs::File::open(from).map_err(io("open", from))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read", from))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])
            .map_err(io("write staging copy of", from))?;
    }
    Ok((hasher.finalize().into(), to))
}

fn obj_join(base: &ObjPath, prefix: &str, rel: &str) -> ObjPath {
    let mut p = base.clone();
    for seg in prefix.split('/').chain(rel.split('/')) {
        if !seg.is_empty() {
            p = p.join(seg);
        }
    }
    p
}

async fn upload_file(
    store: &Arc<dyn ObjectStore>,
    target: &ObjPath,
    file: std::fs::File,
    size: u64,
) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(0))
        .map_err(io("seek spool file", PathBuf::new()))?;
    if size <= LARGE as u64 {
        let bytes = blocking(move || {
            let mut v = Vec::with_capacity(size as usize);
            file.read_to_end(&mut v)
                .map_err(io("read spool file", PathBuf::new()))?;
            Ok(v)
        })
        .await?;
        store
            .put(target, PutPayload::from(bytes))
            .await
            .map_err(store_err("put", target))?;
        return Ok(());
    }
    let upload = store
        .put_multipart(target)
        .await
        .map_err(store_err("start multipart upload", target))?;
    let mut writer = WriteMultipart::new(upload);
    let file = Arc::new(std::sync::Mutex::new(file));
    loop {
        let f = file.clone();
        let chunk = blocking(move || {
            let mut buf = vec![0u8; LARGE];
            let mut f = f.lock().map_err(|_| Error::Io {
                op: "read spool file",
                path: PathBuf::new(),
                source: std::io::Error::other("poisoned"),
            })?;
            let mut filled = 0;
            while filled < buf.len() {
                let n = f
                    .read(&mut buf[filled..])
                    .map_err(io("read spool file", PathBuf::new()))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            Ok(buf)
        })
        .await?;
        if chunk.is_empty() {
            break;
        }
        writer
            .wait_for_capacity(4)
            .await
            .map_err(store_err("multipart upload", target))?;
        writer.put(Bytes::from(chunk));
    }
    writer
        .finish()
        .await
        .map_err(store_err("finish multipart upload", target))?;
    Ok(())
}

async fn object_read_manifest(
    store: &Arc<dyn ObjectStore>,
    path: &ObjPath,
    accept_other_versions: bool,
) -> Result<(Option<Manifest>, Option<UpdateVersion>)> {
    match store.get(path).await {
        Ok(got) => {
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = got.bytes().await.map_err(store_err("read", path))?;
            let m = Manifest::decode(&bytes, path.as_ref(), accept_other_versions)?;
            Ok((Some(m), Some(version)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok((None, None)),
        Err(e) => Err(store_err("read", path)(e)),
    }
}

/// Deletes unreferenced data objects older than `grace` (leftovers of crashed runs).
async fn object_sweep(
    store: &Arc<dyn ObjectStore>,
    dir: &ObjPath,
    manifest: &ObjPath,
    m: &Manifest,
    grace: Duration,
) {
    let live: BTreeSet<String> = m
        .partitions
        .values()
        .flat_map(|e| e.objects())
        .map(str::to_string)
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let listed: Vec<_> = match store.list(Some(dir)).try_collect().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "could not list the dataset to sweep orphans; continuing");
            return;
        }
    };
    for meta in listed {
        if meta.location == *manifest {
            continue;
        }
        let Some(rel) = meta.location.prefix_match(dir) else {
            continue;
        };
        let rel: Vec<String> = rel.map(|p| p.as_ref().to_string()).collect();
        let Some(file) = rel.last() else { continue };
        let ours = is_object_file_name(file) || is_multi_file_object_name(file);
        if !ours || live.contains(&rel.join("/")) {
            continue;
        }
        let age_ms = now_ms - meta.last_modified.timestamp_millis();
        if age_ms >= grace.as_millis() as i64 {
            debug!(object = %meta.location, "sweeping orphan");
            if let Err(e) = store.delete(&meta.location).await {
                warn!(object = %meta.location, error = %e, "could not delete orphan");
            }
        }
    }
}

async fn delete_objects(
    store: &Arc<dyn ObjectStore>,
    base: &ObjPath,
    prefix: &str,
    objects: &[String],
) {
    for o in objects {
        let p = obj_join(base, prefix, o);
        match store.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => warn!(object = %p, error = %e, "could not delete; it will be swept later"),
        }
    }
}

// ---------- local directory protocol (blocking) ----------

fn local_read_manifest(dir: &std::path::Path, accept: bool) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Manifest::decode(&bytes, &path.display().to_string(), accept).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read manifest", &path)(e)),
    }
}

/// Reads a manifest from a local dataset directory (no lock needed: it is replaced by rename).
pub(crate) fn local_manifest(dir: &std::path::Path) -> Result<Option<Manifest>> {
    local_read_manifest(dir, true)
}

fn local_open(
    dir: &std::path::Path,
    run_id: &str,
    lock_timeout: Duration,
    accept: bool,
) -> Result<(Option<Manifest>, LocalRun)> {
    let staging = dir.join(STAGING_DIR);
    std::fs::create_dir_all(&staging).map_err(io("create directory", &staging))?;
    let _manifest_lock = lock_exclusive(&dir.join(LOCK_FILE), lock_timeout)?;
    // First complete a commit that a crashed writer decided: its new versions are staged.
    crate::swap::complete_pending(dir)?;
    sweep_staging(&staging)?;
    let manifest = local_read_manifest(dir, accept)?;
    if let Some(m) = &manifest {
        sweep_unreferenced(dir, m)?;
    }
    let lock_path = staging.join(format!("{run_id}.lock"));
    let lock = lock_exclusive(&lock_path, lock_timeout)?;
    let run_dir = staging.join(run_id);
    std::fs::create_dir(&run_dir).map_err(io("create directory", &run_dir))?;
    Ok((
        manifest,
        LocalRun {
            _lock: lock,
            lock_path,
            dir: run_dir,
        },
    ))
}

/// Removes the staging areas of runs whose lock is free (their process is gone). Called with
/// the manifest lock held, which is also held while a run creates its staging area.
fn sweep_staging(staging: &std::path::Path) -> Result<()> {
    let entries = std::fs::read_dir(staging).map_err(io("list", staging))?;
    for entry in entries {
        let entry = entry.map_err(io("list", staging))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(run) = name.strip_suffix(".lock") {
            if let Some(_held) = try_lock(&entry.path())? {
                debug!(run, "sweeping staging area of a finished or crashed run");
                remove_dir_all_if_exists(&staging.join(run))?;
                remove_file_if_exists(&entry.path())?;
            }
        } else if !staging.join(format!("{name}.lock")).exists() {
            remove_dir_all_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes `part-*` objects that the manifest does not name (a crash between renaming data into
/// place and writing the manifest, or before deleting replaced objects). Manifest lock held.
/// Never called without a manifest: if someone deleted it, the objects stay until a new manifest
/// has been committed, so a mistaken deletion does not destroy the data.
fn sweep_unreferenced(dir: &std::path::Path, m: &Manifest) -> Result<()> {
    let live: BTreeSet<PathBuf> = m
        .partitions
        .values()
        .flat_map(|e| e.objects())
        .map(|o| dir.join(o))
        .collect();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("list", &d)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io("list", &d))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let ft = entry.file_type().map_err(io("stat", entry.path()))?;
            if ft.is_dir() {
                if !(d == dir && name == STAGING_DIR) {
                    stack.push(entry.path());
                }
            } else if (is_object_file_name(&name) && !live.contains(&entry.path()))
                || is_marker_name(&name)
            {
                debug!(path = %entry.path().display(), "sweeping unreferenced object");
                remove_file_if_exists(&entry.path())?;
            }
        }
    }
    Ok(())
}

fn discard_local_run(run: LocalRun) -> Result<()> {
    remove_dir_all_if_exists(&run.dir)?;
    remove_file_if_exists(&run.lock_path)?;
    Ok(())
}

/// What a local commit moves into place and deletes.
struct LocalChanges {
    /// Single-object partitions: staged file, object.
    staged: Vec<(PathBuf, String)>,
    /// Multi-file partitions: name, staged directory.
    dirs: Vec<(String, StagedDir)>,
    /// Multi-file partitions removed.
    removed_dirs: Vec<String>,
    /// Objects to delete after the commit.
    obsolete: Vec<String>,
    run_id: String,
}

fn local_commit(
    dir: &std::path::Path,
    opts: &WriterBuilder,
    base: &Manifest,
    next: Option<Manifest>,
    changes: LocalChanges,
    run: Option<LocalRun>,
) -> Result<()> {
    let LocalChanges {
        staged,
        dirs,
        removed_dirs,
        obsolete,
        run_id,
    } = changes;
    let run = run.ok_or_else(|| Error::Config {
        field: "store",
        reason: "commit on a writer without a staging area (internal error)",
    })?;
    if next.is_some() {
        // Staged data is durable before anything names it (outside the lock: it can be slow).
        let mut files: Vec<PathBuf> = staged.iter().map(|(f, _)| f.clone()).collect();
        let mut sync_dirs: Vec<PathBuf> = Vec::new();
        for (_, d) in &dirs {
            files.extend(d.files.iter().cloned());
            sync_dirs.extend(d.dirs.iter().cloned());
        }
        fsync_many(&files, false)?;
        if !sync_dirs.is_empty() {
            sync_dirs.push(run.dir.clone());
            fsync_many(&sync_dirs, true)?;
        }
    }
    let lock = lock_exclusive(&dir.join(LOCK_FILE), opts.lock_timeout)?;
    // A commit decided by a writer that died is completed before ours is checked against it.
    crate::swap::complete_pending(dir)?;
    let current = local_read_manifest(dir, opts.rewrite_on_version_change)?;
    if let Err(e) = check_current(opts, &opts.prefix, base, current.as_ref()) {
        discard_local_run(run)?;
        return Err(e);
    }
    let Some(next) = next else {
        discard_local_run(run)?;
        return Ok(());
    };
    // 1. Move the fsynced data into place; remember which directories changed.
    let mut touched: BTreeSet<PathBuf> = BTreeSet::new();
    for (from, object) in &staged {
        let to = dir.join(object);
        let parent = to.parent().unwrap_or(dir).to_path_buf();
        create_parents(&parent, dir, &mut touched)?;
        std::fs::rename(from, &to).map_err(io("rename into place", &to))?;
        touched.insert(parent);
    }
    let touched: Vec<PathBuf> = touched.into_iter().collect();
    fsync_many(&touched, true)?;
    if dirs.is_empty() && removed_dirs.is_empty() {
        // 2. The commit point: the manifest, staged, fsynced, renamed, directory fsynced.
        let tmp = run.dir.join("manifest.json");
        write_synced(&tmp, &next.encode())?;
        let target = dir.join(MANIFEST_FILE);
        std::fs::rename(&tmp, &target).map_err(io("rename into place", &target))?;
        fsync_dir(dir)?;
    } else {
        // 2'. Directory swaps: decided by a durable pending record, then rolled forward (see
        // the `swap` module); a failure from here on leaves the staging area to the next open.
        let rel = |p: &std::path::Path| -> Result<String> {
            p.strip_prefix(dir)
                .map(|r| r.to_string_lossy().replace('\\', "/"))
                .map_err(|_| Error::Config {
                    field: "store",
                    reason: "staging area outside the dataset (internal error)",
                })
        };
        let mut pending = crate::swap::Pending {
            manifest: next,
            swaps: Vec::new(),
            removals: Vec::new(),
        };
        for (partition, d) in &dirs {
            pending.swaps.push(crate::swap::Swap {
                partition: partition.clone(),
                staged: rel(&d.dir)?,
                marker: format!(".palisade-{run_id}"),
            });
        }
        for (i, partition) in removed_dirs.iter().enumerate() {
            pending.removals.push(crate::swap::Removal {
                partition: partition.clone(),
                aside: rel(&run.dir.join(format!("r{i}")))?,
            });
        }
        crate::swap::write_pending(dir, &run.dir, &pending)?;
        crate::swap::finish(dir, &pending, false)?;
    }
    // 3. Objects no manifest names any more.
    for object in &obsolete {
        let p = dir.join(object);
        if let Err(e) = remove_file_if_exists(&p) {
            warn!(error = %e, "could not delete a replaced object; the next open sweeps it");
        }
        let mut d = p.parent().map(|d| d.to_path_buf());
        while let Some(x) = d {
            if x == dir || std::fs::remove_dir(&x).is_err() {
                break;
            }
            d = x.parent().map(|d| d.to_path_buf());
        }
    }
    discard_local_run(run)?;
    drop(lock);
    Ok(())
}

const NESTED: &str = "a multi-file partition's directory belongs to it alone: no other partition \
                      can lie inside it";

/// Refuses a manifest where a partition lies inside a multi-file partition's directory.
fn check_nesting(m: &Manifest) -> Result<()> {
    for (name, e) in &m.partitions {
        if !e.is_multi_file() {
            continue;
        }
        let inside = format!("{name}/");
        if let Some((other, _)) = m
            .partitions
            .range(inside.clone()..)
            .next()
            .filter(|(k, _)| k.starts_with(&inside))
        {
            return Err(Error::InvalidPartition {
                name: other.clone(),
                reason: NESTED,
            });
        }
    }
    Ok(())
}

/// Checks the files of a multi-file partition: at least one, valid and distinct names, and no
/// name that is a directory of another.
fn check_part_files(partition: &str, files: &[PartFile]) -> Result<()> {
    let bad = |reason| Error::InvalidPartition {
        name: partition.to_string(),
        reason,
    };
    if files.is_empty() {
        return Err(bad("a multi-file partition needs at least one file"));
    }
    let mut names = BTreeSet::new();
    for f in files {
        validate_partition(&f.name).map_err(|e| match e {
            Error::InvalidPartition { reason, .. } => Error::InvalidPartition {
                name: format!("{partition}/{}", f.name),
                reason,
            },
            other => other,
        })?;
        if !names.insert(f.name.as_str()) {
            return Err(bad("two files have the same name"));
        }
    }
    for n in &names {
        let inside = format!("{n}/");
        if names
            .range(inside.as_str()..)
            .next()
            .is_some_and(|m| m.starts_with(&inside))
        {
            return Err(bad("a file name is also the directory of another file"));
        }
    }
    Ok(())
}

/// Builds a multi-file partition's new version in `sdir`: each file copied while hashed, and
/// the marker. Returns (name, size, hash) per file, the files and the directories to fsync.
#[allow(clippy::type_complexity)]
fn stage_dir(
    sdir: &std::path::Path,
    partition: &str,
    files: &[PartFile],
    marker: &str,
) -> Result<(Vec<(String, u64, ContentHash)>, Vec<PathBuf>, Vec<PathBuf>)> {
    std::fs::create_dir(sdir).map_err(io("create directory", sdir))?;
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::from([sdir.to_path_buf()]);
    for f in files {
        let to = sdir.join(&f.name);
        if let Some(parent) = to.parent()
            && parent != sdir
            && !dirs.contains(parent)
        {
            std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
            let mut p = parent.to_path_buf();
            while p != sdir && dirs.insert(p.clone()) {
                match p.parent() {
                    Some(up) => p = up.to_path_buf(),
                    None => break,
                }
            }
        }
    }
    // Copy (and hash) the files on a few threads: hashing is CPU and writing is the kernel's,
    // so a partition of several part files stages in about the time of its largest file.
    let stage_one = |f: &PartFile| -> Result<(String, u64, ContentHash, PathBuf)> {
        let to = sdir.join(&f.name);
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&to)
            .map_err(io("create", &to))?;
        let (hash, out) = copy_hashing(&f.path, out).map_err(|e| match e {
            Error::Io { source, .. } => Error::Input {
                partition: format!("{partition}/{} ({})", f.name, f.path.display()),
                source,
            },
            other => other,
        })?;
        let size = out.metadata().map_err(io("stat", &to))?.len();
        Ok((f.name.clone(), size, hash, to))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(files.len().max(1));
    let staged: Vec<Result<(String, u64, ContentHash, PathBuf)>> = if threads <= 1 {
        files.iter().map(stage_one).collect()
    } else {
        let chunk = files.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = files
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(stage_one).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(Error::Io {
                            op: "stage",
                            path: sdir.to_path_buf(),
                            source: std::io::Error::other("a staging thread panicked"),
                        })]
                    })
                })
                .collect()
        })
    };
    let mut synced = Vec::with_capacity(files.len() + 1);
    let mut stats = Vec::with_capacity(files.len());
    for result in staged {
        let (name, size, hash, to) = result?;
        stats.push((name, size, hash));
        synced.push(to);
    }
    let m = sdir.join(marker);
    write_unsynced(&m, b"")?;
    synced.push(m);
    Ok((stats, synced, dirs.into_iter().collect()))
}

/// A file's object name on object stores: `<dir>/<stem>-<run16><ext>`, where the extension is
/// everything from the first `.` of the last segment (`part-0.snappy.parquet` keeps
/// `.snappy.parquet`).
fn unique_name(name: &str, run_id: &str) -> String {
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

/// The hidden marker a local swap leaves in a new version until its commit is finished.
fn is_marker_name(name: &str) -> bool {
    name.strip_prefix(".palisade-")
        .is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Uploads a local file to `target` while hashing what is read: the hash is of exactly the
/// bytes uploaded. Up to 8 MiB in memory at a time.
async fn upload_hashing(
    store: &Arc<dyn ObjectStore>,
    target: &ObjPath,
    path: &std::path::Path,
) -> Result<(ContentHash, u64)> {
    use std::io::Read;
    let p = path.to_path_buf();
    let file = blocking(move || std::fs::File::open(&p).map_err(io("open", &p))).await?;
    let file = Arc::new(std::sync::Mutex::new((file, blake3::Hasher::new())));
    let read_chunk = |file: Arc<std::sync::Mutex<(std::fs::File, blake3::Hasher)>>| {
        let p = path.to_path_buf();
        blocking(move || {
            let mut guard = file.lock().map_err(|_| Error::Io {
                op: "read",
                path: p.clone(),
                source: std::io::Error::other("poisoned"),
            })?;
            let (f, h) = &mut *guard;
            let mut buf = vec![0u8; LARGE];
            let mut filled = 0;
            while filled < buf.len() {
                let n = f.read(&mut buf[filled..]).map_err(io("read", &p))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            h.update(&buf);
            Ok(buf)
        })
    };
    let first = read_chunk(file.clone()).await?;
    let finish =
        |file: Arc<std::sync::Mutex<(std::fs::File, blake3::Hasher)>>| -> Result<ContentHash> {
            let guard = file.lock().map_err(|_| Error::Io {
                op: "read",
                path: path.to_path_buf(),
                source: std::io::Error::other("poisoned"),
            })?;
            Ok(guard.1.finalize().into())
        };
    if first.len() < LARGE {
        let size = first.len() as u64;
        let hash = finish(file)?;
        store
            .put(target, PutPayload::from(first))
            .await
            .map_err(store_err("put", target))?;
        return Ok((hash, size));
    }
    let upload = store
        .put_multipart(target)
        .await
        .map_err(store_err("start multipart upload", target))?;
    let mut writer = WriteMultipart::new(upload);
    let mut size = first.len() as u64;
    writer.put(Bytes::from(first));
    loop {
        let chunk = match read_chunk(file.clone()).await {
            Ok(c) => c,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        };
        if chunk.is_empty() {
            break;
        }
        size += chunk.len() as u64;
        writer
            .wait_for_capacity(4)
            .await
            .map_err(store_err("multipart upload", target))?;
        writer.put(Bytes::from(chunk));
    }
    writer
        .finish()
        .await
        .map_err(store_err("finish multipart upload", target))?;
    Ok((finish(file)?, size))
}
