//! The content-hash partition writer.
//!
//! # Layout
//!
//! ```text
//! <prefix>/_manifest.json                          the commit point (see [`Manifest`])
//! <prefix>/<partition>/part-<hash16>-<run16><ext>  a single-object partition's object
//! <prefix>/<partition>/<name>...                   multi-file partitions, local directory
//! <prefix>/<partition>/<stem>-<run16><ext>...      multi-file partitions, object stores
//! <prefix>/_manifest.lock, _staging/               local directory only: lock file, staged data
//! <prefix>/_manifest.pending.json                  local directory only: a decided commit
//!                                                  that swaps directories, until it is done
//! ```
//!
//! A partition's data object is named by the first 16 hex digits of its BLAKE3 hash and by the
//! writing run's random id, so a new version never overwrites the object an older manifest names.
//! Object keys are the partition names **byte for byte**: a Hive partition written by Spark as
//! `slot=2024-01-01 10%3A00%3A00` or `city=Zürich` is stored under exactly that key (not
//! re-encoded to `%253A` or `%C3%BC`), so Hive readers decode the same value from the store as
//! from the source.
//!
//! **One dataset per prefix.** A writer only ever touches its own dataset: `open` refuses, with
//! [`Error::NestedDataset`], a prefix that lies inside another dataset (a manifest above it) or
//! contains one (a manifest, lock or pending record below it), since either one's sweeps would
//! take the other's data.
//!
//! # Commit protocol
//!
//! ## On a local directory
//!
//! Every partition is a directory `<prefix>/<partition>/` that belongs to it alone (a commit with
//! a partition inside another's directory is refused with [`Error::InvalidPartition`]), and a new
//! version replaces the whole directory in one atomic step.
//!
//! 1. `put*` builds the new version in the run's staging area, `_staging/<run>/p<n>/`: the data
//!    object `part-<hash16>-<run16><ext>` (or, for [`put_files`](PartitionedWriter::put_files),
//!    every file copied while it is hashed), plus the hidden marker `.palisade-<run16>`.
//! 2. `commit` fsyncs those files and directories (outside the lock), takes `_manifest.lock`,
//!    completes any interrupted commit (step 5), re-reads the manifest and checks fencing token
//!    and generation. A refused commit stops here: nothing a reader sees has changed.
//! 3. **The decision:** the new manifest, with the list of directory swaps and removals, is
//!    written to `_manifest.pending.json` (staged, fsynced, renamed, prefix directory fsynced).
//!    From here on the commit is rolled forward, never back.
//! 4. Each new version is swapped into place: `renameat2(RENAME_EXCHANGE)` exchanges the staged
//!    directory and the live one in one atomic step (the old version lands in the staging area);
//!    a partition that did not exist yet is renamed into place, after its parent directories
//!    (`k1=v/` of `k1=v/k2=w`) are created and fsynced. The directories are fsynced, then the
//!    new manifest is installed as `_manifest.json` (staged, fsynced, renamed, fsynced): the
//!    commit point for readers of the manifest. Then removed partitions are renamed aside into
//!    the staging area (atomically disappearing), the markers are deleted,
//!    `_manifest.pending.json` is deleted, and only then the old versions are moved to
//!    `_retired/` (see [Retention](#retention-readers-keep-the-version-they-started-reading)).
//! 5. **Roll-forward:** `open`, `commit` and [`Dataset::open`](crate::Dataset::open) look for
//!    `_manifest.pending.json`; if there is one (its writer crashed or failed in step 4) they
//!    take the lock and complete it idempotently: a partition whose live directory holds this
//!    run's marker was already swapped; otherwise its staged directory is swapped in. If the
//!    installed manifest already has the pending generation, the swaps were all done and only the
//!    clean-up remains. (A `commit` that fails with an I/O error after step 3 returns the error,
//!    but its commit is decided: the next `open` completes it.) A pending record that cannot be
//!    completed (its staged versions deleted by hand) is [`Error::CorruptManifest`] naming
//!    `_manifest.pending.json`.
//!
//! Every `open` also sweeps, under the same lock, the staging areas of runs that are gone (each
//! run holds a lock on its own `_staging/<run>.lock` for its lifetime; the kernel drops it when
//! the process dies), and any `part-*` object the manifest does not name.
//!
//! ### Where `RENAME_EXCHANGE` is not available
//!
//! Other operating systems, and Linux file systems without it (the call fails with `EINVAL`,
//! `ENOSYS` or `EOPNOTSUPP`), fall back to two renames: the live directory aside into the
//! staging area, then the new one in. Between the two, **the partition is missing** (a reader
//! listing it finds no directory; never a mix). A crash in between is rolled forward like any
//! other (the new version is renamed in).
//!
//! ## On an object store
//!
//! `put*` uploads a changed partition straight to its final, unique name (a put is atomic on
//! object stores; files of [`put_files`](PartitionedWriter::put_files) are streamed, 8 MiB at a
//! time, hashed as they are read, under `<partition>/<dir>/<stem>-<run16><ext>`, keeping their
//! extension). `commit` reads the manifest, checks fencing token and generation, and writes the
//! new manifest, which records this run's id as its `commit_id`, with a conditional put
//! (`PutMode::Update` with the e-tag/version it read, or `PutMode::Create`). The replaced
//! objects stay, listed in the manifest's [`retired`](crate::Manifest::retired) versions, for
//! the retention (see below).
//!
//! **A manifest write is never taken back on an unclear answer.** A put can be applied and
//! still be answered with an error (a 5xx or a timeout after the store applied it, or a `412`
//! when the client retried an applied put). So after any answer other than success the writer
//! reads the manifest back: if it carries this run's `commit_id` (or names this run's objects),
//! the commit happened and `commit` returns its [`Report`]; if another generation is there,
//! someone else committed and the error is [`Error::Conflict`] (or [`Error::Fenced`]); if the
//! manifest cannot be read, or is still the one this run started from (the write may still
//! land), the error is [`Error::CommitUnknown`] and **nothing is deleted**: the run's uploads
//! stay, and are swept as orphans only if no manifest ever names them.
//!
//! **Orphans** (uploads of crashed runs) are swept on `open` once they are older than
//! `orphan_grace` (default 1 hour; it must exceed your longest run). Their age is measured on
//! the **store's clock**: the writer writes a probe object (`_staging/clock-<run>`, deleted at
//! once) and compares its `last_modified` with theirs, so a local clock that is ahead, or a store
//! clock that is behind, never shortens the grace. S3 gives a multipart upload the
//! `last_modified` of its start, so a large upload looks as old as its upload took: a writer that
//! has been open longer than half the grace re-checks its uploads before it commits.
//!
//! # Multi-file partitions
//!
//! [`put_files`](PartitionedWriter::put_files) puts a partition made of several files, as Spark
//! or pandas write a Hive-style partition directory (part files whose names change every run).
//! The caller gives the partition's content identity; the files are written only if it differs
//! from the manifest's, and the manifest records the identity and every file's name, object,
//! size and BLAKE3. Manifests that have such partitions are written as format 2
//! ([`MANIFEST_FORMAT`](crate::manifest::MANIFEST_FORMAT)); all others stay format 1, readable
//! by older versions of this crate. A multi-file partition's directory belongs to it alone on
//! every store: a commit with another partition inside it is refused.
//!
//! # What readers observe
//!
//! ## A plain directory reader on a local directory
//!
//! (Spark, pyarrow or DuckDB listing `<prefix>/*/...`, skipping names that start with `.` or
//! `_`, as Hive-style readers do.)
//!
//! - A partition directory always holds exactly one complete version's files: the old set or
//!   the new set, each file complete, **also right after a crash** (the swap is one atomic rename
//!   of the whole directory, and a crash is rolled forward by the next `open`). Never a
//!   half-written file, never old and new files side by side (no row seen twice).
//! - Different partitions switch at different instants during a commit (one `renameat2` each),
//!   so a reader that lists several partitions during a commit can see some new and some old.
//! - Files a reader has already opened keep their content until it closes them, even after the
//!   old version is deleted (renames and deletions do not disturb open files). But a reader
//!   that listed a directory before its swap and opens files by path after it gets the new
//!   version's files: a name that is gone is "not found" (re-list and start over), and a reused
//!   name opens the new content. A reader that must never mix versions opens all the files it
//!   listed before reading, or reads through the manifest and checks the hashes.
//!
//! ## A plain listing on an object store
//!
//! A listing of `<partition>/` sees **both versions** from the uploads until the replaced
//! objects are deleted after the retention (and after a crash, the dead run's uploads until a
//! later `open` sweeps them, once they are older than `orphan_grace`). Readers that need a
//! consistent view read through the manifest ([`Dataset::live_files`](crate::Dataset::live_files),
//! or `palisade manifest`).
//!
//! ## Through the manifest, on every store
//!
//! ([`Dataset`](crate::Dataset), or any reader that reads `_manifest.json` and then the objects
//! it names.)
//!
//! - One committed version of every partition, complete; never an object that is missing or
//!   half-written.
//! - On a local directory the manifest is installed after the swaps, so between the first swap
//!   and the install (milliseconds, or until the next `open` after a crash) the manifest still
//!   describes the old versions of partitions already swapped: such a reader can get "not found"
//!   (or a hash mismatch when a file name is reused) and should re-read the manifest.
//!   `Dataset::open` completes a pending commit before reading.
//! - Replaced objects stay for the retention (default 1 hour) after the commit that stops naming
//!   them, so a reader that read an older manifest keeps reading its objects for that long.
//!
//! # Retention: readers keep the version they started reading
//!
//! A query lists (or reads a manifest), then reads, sometimes minutes later. So a replaced or
//! removed partition version is not deleted by the commit that replaces it, but kept for
//! [`retain`](WriterBuilder::retain) (default 1 hour), as table formats keep their snapshots:
//!
//! - **Object stores:** the objects stay where they are, and the manifest lists them as a
//!   [`RetiredVersion`](crate::RetiredVersion) with the time of the commit on the store's clock
//!   (the `last_modified` of the manifest that retired them). The first commit after the
//!   retention, timed on the store's clock (a probe object), drops them from the manifest and
//!   then deletes them; the orphan sweep never takes them. A reader that read any manifest of the
//!   last `retain` reads all its objects.
//! - **Local directory:** the swapped-out directory moves to `_retired/<ms>-g<generation>-<n>/`
//!   (skipped by Hive-style readers), and the first `open` or commit after the retention deletes
//!   it. A reader that opened a partition directory (or its files) reads that version whole for
//!   the retention, through its open handle; a reader that opens paths later gets the new version.
//! - [`verify`](crate::verify()) lists the versions waiting, and `retain(Duration::ZERO)` deletes
//!   them right after each commit (the behaviour before retention existed).
//! - Without a manifest (never committed, or deleted by hand), `open` sweeps no objects; they
//!   are swept after the next commit, so deleting a corrupt manifest to recover loses nothing
//!   until the rewrite has committed.

mod builder;
mod local;
mod object;
mod plan;
mod stage;
mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::error::{Error, Result, io};
use crate::hash::ContentHash;
use crate::layout::object_name;
use crate::manifest::{Manifest, PartitionEntry, files_digest};
use crate::partition::validate_partition;
use crate::storage::{DatasetStore, blocking};

pub use builder::WriterBuilder;
use local::{StagedDir, copy_hashing, hash_file};
use plan::{Proposal, check_current, check_fence};
use stage::check_part_files;
use target::{CommitArgs, Spool, Target, hash_bytes};

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

/// A staged partition: its future manifest entry, and (local directory) its staged directory.
/// On object stores its objects are already uploaded under the names the entry gives.
#[derive(Debug)]
struct Staged {
    entry: PartitionEntry,
    local: Option<StagedDir>,
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

/// Writes a partitioned dataset, only the partitions whose content changed, and commits them
/// atomically through a manifest. See the [module docs](self) for the protocol and what readers
/// observe.
#[derive(Debug)]
pub struct PartitionedWriter {
    /// `None` once committed or aborted (a local target is consumed by its commit).
    target: Option<Target>,
    prefix: String,
    opts: WriterBuilder,
    /// The manifest this run started from (`Manifest::empty()` if none).
    base: Manifest,
    /// The base was written by another version: every put is written.
    rewrite_all: bool,
    run_id: String,
    staged: BTreeMap<String, Staged>,
    unchanged: BTreeSet<String>,
    bytes_written: u64,
    bytes_hashed: u64,
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
            retain: Duration::from_secs(3600),
        }
    }

    #[tracing::instrument(name = "open_dataset", skip_all, fields(prefix = %opts.prefix))]
    async fn open_with(opts: WriterBuilder) -> Result<Self> {
        let run_id = format!("{:016x}", rand::random::<u64>());
        let prefix = opts.prefix.clone();
        let accept = opts.rewrite_on_version_change;
        let (base, target) = Target::open(
            opts.store.backend.clone(),
            &prefix,
            &run_id,
            opts.lock_timeout,
            accept,
            opts.orphan_grace,
            opts.retain,
        )
        .await?;
        let base = base.unwrap_or_else(Manifest::empty);
        let writer = Self {
            rewrite_all: !base.is_current_version(),
            target: Some(target),
            prefix,
            opts,
            base,
            run_id,
            staged: BTreeMap::new(),
            unchanged: BTreeSet::new(),
            bytes_written: 0,
            bytes_hashed: 0,
            opened_at: Instant::now(),
        };
        if let Err(e) = check_fence(
            writer.opts.fencing_token,
            writer.opts.allow_unfenced,
            &writer.base,
        ) {
            writer.abort().await?;
            return Err(e);
        }
        info!(prefix = %writer.prefix, run = %writer.run_id, generation = writer.base.generation, "opened dataset");
        Ok(writer)
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
        let spool = self.target()?.spool().await?;
        let path = spool.path().to_path_buf();
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(io("create spool file", &path))?;
        let mut hasher = blake3::Hasher::new();
        let mut stream = std::pin::pin!(stream);
        let input_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Input {
            partition: partition.to_string(),
            source: std::io::Error::other(e),
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| input_err(e.into()))?;
            if chunk.len() >= 1 << 16 {
                let (h, c) = tokio::task::spawn_blocking(move || {
                    let mut h = hasher;
                    h.update(&chunk);
                    (h, chunk)
                })
                .await
                .map_err(|e| input_err(e.to_string().into()))?;
                hasher = h;
                file.write_all(&c).await
            } else {
                hasher.update(&chunk);
                file.write_all(&chunk).await
            }
            .map_err(io("write spool file", &path))?;
        }
        file.flush().await.map_err(io("write spool file", &path))?;
        let size = file
            .metadata()
            .await
            .map_err(io("stat spool file", &path))?
            .len();
        drop(file);
        self.finish_spooled(partition, hasher.finalize().into(), size, spool)
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
        let spool = self.target()?.spool().await?;
        let to = spool.path().to_path_buf();
        let (hash, size) = blocking(move || {
            let out = std::fs::File::create(&to).map_err(io("create", &to))?;
            let (hash, out) = copy_hashing(&path, out)?;
            let size = out.metadata().map_err(io("stat", &to))?.len();
            Ok((hash, size))
        })
        .await?;
        self.bytes_hashed += size;
        self.finish_spooled(partition, hash, size, spool).await
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
    /// whole and atomically at commit (see the [module docs](self#on-a-local-directory)). On
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
                reason: "a multi-file partition's directory belongs to it alone: no other \
                         partition can lie inside it",
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
        let (mut entries, local) = self
            .target()?
            .stage_files(partition, files, &self.run_id)
            .await?;
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
        self.staged
            .insert(partition.to_string(), Staged { entry, local });
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
    /// fencing token) and returns what was done.
    ///
    /// On [`Error::Conflict`] or [`Error::Fenced`] nothing a reader sees has changed, and this
    /// run's staged data is deleted. On an object store, a manifest write whose answer was an
    /// error is read back: if it landed, the commit succeeded; if the outcome cannot be told,
    /// the error is [`Error::CommitUnknown`] and this run's objects are kept. On a local
    /// directory, a commit that fails with an I/O error after its decision is completed by the
    /// next `open` (see the [module docs](self#on-a-local-directory)).
    #[tracing::instrument(
        name = "commit_dataset",
        skip_all,
        fields(prefix = %self.prefix, run = %self.run_id, fencing_token = ?self.opts.fencing_token)
    )]
    pub async fn commit(mut self) -> Result<Report> {
        let whole_directories = self.target()?.whole_directories();
        // The store's clock, only when retained versions may have come of age.
        let now_ms = if self.base.retired.is_empty() {
            None
        } else {
            match self.target()?.clock_ms().await {
                Ok(now) => now,
                Err(e) => {
                    self.abort().await?;
                    return Err(e);
                }
            }
        };
        let proposal = Proposal {
            base: &self.base,
            staged: self
                .staged
                .iter()
                .map(|(k, s)| (k.as_str(), &s.entry))
                .collect(),
            unchanged: &self.unchanged,
            remove_missing: self.opts.remove_missing,
            rewrite_all: self.rewrite_all,
            fencing_token: self.opts.fencing_token,
            commit_id: &self.run_id,
            whole_directories,
            retain: self.opts.retain,
            base_written_at_ms: self.target()?.base_written_at_ms(),
            now_ms,
        };
        let plan = match plan::plan(&proposal) {
            Ok(plan) => plan,
            Err(e) => {
                self.abort().await?;
                return Err(e);
            }
        };
        let report = Report {
            written: self.staged.keys().cloned().collect(),
            unchanged: self.unchanged.iter().cloned().collect(),
            removed: plan.removed.clone(),
            bytes_written: self.bytes_written,
            bytes_hashed: self.bytes_hashed,
            generation: plan
                .next
                .as_ref()
                .map_or(self.base.generation, |m| m.generation),
            manifest_written: plan.next.is_some(),
        };
        let (fence, unfenced, accept) = (
            self.opts.fencing_token,
            self.opts.allow_unfenced,
            self.opts.rewrite_on_version_change,
        );
        let (prefix, base) = (self.prefix.clone(), self.base.clone());
        let check =
            move |found: Option<&Manifest>| check_current(fence, unfenced, &prefix, &base, found);
        let args = CommitArgs {
            plan: &plan,
            staged: std::mem::take(&mut self.staged)
                .into_iter()
                .filter_map(|(k, s)| s.local.map(|d| (k, d)))
                .collect(),
            uploaded: self.uploaded(),
            recheck: self.opened_at.elapsed() > self.opts.orphan_grace / 2,
            lock_timeout: self.opts.lock_timeout,
            accept,
            retain: self.opts.retain,
        };
        let result = match self.target.take() {
            Some(target) => target.commit(args, check).await,
            None => Err(finished()),
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
                Ok(report)
            }
            Err(e) => {
                warn!(prefix = %self.prefix, error = %e, "commit failed");
                Err(e)
            }
        }
    }

    /// Discards this run: deletes its staged data; readers see no change.
    pub async fn abort(mut self) -> Result<()> {
        let uploaded = self.uploaded();
        match self.target.take() {
            Some(target) => target.abort(&uploaded).await,
            None => Ok(()),
        }
    }

    // ---------- internals ----------

    fn target(&self) -> Result<&Target> {
        self.target.as_ref().ok_or_else(finished)
    }

    /// The objects this run uploaded (object stores).
    fn uploaded(&self) -> Vec<String> {
        self.staged
            .values()
            .flat_map(|s| s.entry.objects())
            .map(str::to_string)
            .collect()
    }

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
        &self,
        partition: &str,
        hash: ContentHash,
        size: u64,
        rows_hash: Option<ContentHash>,
    ) -> PartitionEntry {
        PartitionEntry {
            object: object_name(
                partition,
                &hash.to_hex(),
                &self.run_id,
                &self.opts.extension,
            ),
            size,
            hash,
            rows_hash,
            identity: None,
            files: Vec::new(),
        }
    }

    fn record(&mut self, partition: &str, entry: PartitionEntry, local: Option<StagedDir>) {
        debug!(partition, object = %entry.object, size = entry.size, "staged partition");
        self.bytes_written += entry.size;
        self.staged
            .insert(partition.to_string(), Staged { entry, local });
    }

    async fn put_hashed(
        &mut self,
        partition: &str,
        bytes: Bytes,
        hash: ContentHash,
        rows_hash: Option<ContentHash>,
    ) -> Result<()> {
        self.bytes_hashed += bytes.len() as u64;
        if !self.changed(partition, &hash, rows_hash.as_ref()) {
            debug!(partition, "unchanged");
            self.unchanged.insert(partition.to_string());
            return Ok(());
        }
        let entry = self.new_entry(partition, hash, bytes.len() as u64, rows_hash);
        let local = self.target()?.stage_bytes(&entry.object, bytes).await?;
        self.record(partition, entry, local);
        Ok(())
    }

    async fn finish_spooled(
        &mut self,
        partition: &str,
        hash: ContentHash,
        size: u64,
        spool: Spool,
    ) -> Result<()> {
        if !self.changed(partition, &hash, None) {
            self.target()?.drop_spool(spool).await?;
            self.unchanged.insert(partition.to_string());
            return Ok(());
        }
        let entry = self.new_entry(partition, hash, size, None);
        let local = self.target()?.stage_spooled(&entry.object, spool).await?;
        self.record(partition, entry, local);
        Ok(())
    }
}

fn finished() -> Error {
    Error::Config {
        field: "writer",
        reason: "this writer has already committed or aborted",
    }
}
