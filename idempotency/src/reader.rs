//! Reading a dataset through its manifest: one committed version of every partition.

use bytes::Bytes;
use object_store::ObjectStoreExt;

use crate::error::{Error, Result, io, store as store_err};
use crate::hash::ContentHash;
use crate::layout::object_key;
use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::storage::{Backend, DatasetStore, blocking, read_object_manifest};

/// A committed version of a dataset, for readers.
///
/// ```
/// # tokio_test_block(async {
/// use palisade_idempotency::{Dataset, DatasetStore, PartitionedWriter};
/// let store = DatasetStore::memory();
/// let mut w = PartitionedWriter::open(&store, "sales").await?;
/// w.put("date=2024-01-01", "a,b\n1,2\n").await?;
/// w.commit().await?;
/// let ds = Dataset::open(&store, "sales").await?;
/// assert_eq!(ds.read("date=2024-01-01").await?.unwrap(), "a,b\n1,2\n");
/// # Ok::<(), palisade_idempotency::Error>(()) });
/// # fn tokio_test_block<F: std::future::Future<Output = Result<(), palisade_idempotency::Error>>>(f: F) {
/// #     tokio::runtime::Runtime::new().unwrap().block_on(f).unwrap() }
/// ```
#[derive(Debug, Clone)]
pub struct Dataset {
    backend: Backend,
    prefix: String,
    manifest: Option<Manifest>,
}

impl Dataset {
    /// Reads the manifest under `prefix` (a missing manifest is an empty dataset).
    ///
    /// On a local directory, if a writer crashed after deciding a commit that swaps multi-file
    /// partitions (`_manifest.pending.json` exists), this first completes that commit, under the
    /// writer's lock, so the manifest read matches the directories.
    pub async fn open(store: impl Into<DatasetStore>, prefix: &str) -> Result<Self> {
        let backend = store.into().backend;
        let prefix = prefix.trim_matches('/').to_string();
        let manifest = match &backend {
            Backend::Local(root) => {
                let dir = root.join(&prefix);
                blocking(move || {
                    // A commit decided by a writer that crashed is completed first (this takes
                    // the writer's lock, only when there is one).
                    crate::swap::complete_pending_unlocked(&dir)?;
                    crate::storage::read_local_manifest(&dir, true)
                })
                .await?
            }
            Backend::Object { store, base } => {
                let path = object_key(base, &prefix, MANIFEST_FILE)?;
                read_object_manifest(store, &path, true)
                    .await?
                    .map(|read| read.manifest)
            }
        };
        Ok(Self {
            backend,
            prefix,
            manifest,
        })
    }

    /// The manifest, if anything was ever committed.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// The live partition names, sorted.
    pub fn partitions(&self) -> Vec<String> {
        self.manifest
            .as_ref()
            .map(|m| m.partitions.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The live files of every partition per the manifest, sorted by partition: each
    /// partition's object paths **relative to the dataset prefix** (join them to the store's
    /// root and the prefix: `<root>/<prefix>/<object>`). A single-object partition has one; a
    /// multi-file partition ([`put_files`](crate::PartitionedWriter::put_files)) has one per
    /// file, sorted by file name: `<partition>/<name>` on a local directory,
    /// `<partition>/<stem>-<run16><ext>` on object stores.
    pub fn live_files(&self) -> Vec<(String, Vec<String>)> {
        self.manifest
            .as_ref()
            .map(|m| {
                m.partitions
                    .iter()
                    .map(|(k, e)| {
                        let objects = e.objects().into_iter().map(str::to_string).collect();
                        (k.clone(), objects)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Reads a partition's committed content and checks it against its hash (`None`: no such
    /// partition). A multi-file partition is read file by file with
    /// [`read_file`](Self::read_file); `read` refuses it with [`Error::InvalidPartition`].
    pub async fn read(&self, partition: &str) -> Result<Option<Bytes>> {
        let Some(entry) = self
            .manifest
            .as_ref()
            .and_then(|m| m.partitions.get(partition))
        else {
            return Ok(None);
        };
        if entry.is_multi_file() {
            return Err(Error::InvalidPartition {
                name: partition.to_string(),
                reason: "it has several files: read them with `read_file`",
            });
        }
        self.read_object(partition, &entry.object, &entry.hash)
            .await
            .map(Some)
    }

    /// Reads one file of a multi-file partition, by its name in the partition, and checks it
    /// against its hash (`None`: no such partition or file).
    pub async fn read_file(&self, partition: &str, name: &str) -> Result<Option<Bytes>> {
        let Some(file) = self
            .manifest
            .as_ref()
            .and_then(|m| m.partitions.get(partition))
            .and_then(|e| e.files.iter().find(|f| f.name == name))
        else {
            return Ok(None);
        };
        self.read_object(partition, &file.object, &file.hash)
            .await
            .map(Some)
    }

    /// Reads one object of this version. On object stores a replaced version's objects stay
    /// under their keys for the writer's retention. On a local directory a later commit swaps
    /// the partition's directory and moves the old one to the retired area, so a file that is
    /// no longer this version's at its live path is looked for there (while the retention keeps
    /// it): a `Dataset` opened before a publish reads its own version throughout.
    async fn read_object(
        &self,
        partition: &str,
        object: &str,
        hash: &ContentHash,
    ) -> Result<Bytes> {
        let (bytes, shown) = match &self.backend {
            Backend::Local(root) => {
                let dir = root.join(&self.prefix);
                let path = dir.join(object);
                let generation = self.manifest.as_ref().map_or(0, |m| m.generation);
                let (p, partition, object, hash) = (
                    path.clone(),
                    partition.to_string(),
                    object.to_string(),
                    *hash,
                );
                let b = blocking(move || {
                    let live = std::fs::read(&p);
                    if live
                        .as_ref()
                        .is_ok_and(|b| ContentHash::of_bytes(b) == hash)
                    {
                        return live.map_err(io("read", &p));
                    }
                    let retired = retired_copy(&dir, generation, &partition, &object, &hash)?;
                    retired.map_or_else(|| live.map_err(io("read", &p)), Ok)
                })
                .await?;
                (Bytes::from(b), path.display().to_string())
            }
            Backend::Object { store, base } => {
                let path = object_key(base, &self.prefix, object)?;
                let got = store.get(&path).await.map_err(store_err("read", &path))?;
                let b = got.bytes().await.map_err(store_err("read", &path))?;
                (b, path.to_string())
            }
        };
        if ContentHash::of_bytes(&bytes) != *hash {
            return Err(Error::CorruptObject { path: shown });
        }
        Ok(bytes)
    }
}

/// The content of `object` (of `partition`) as a version replaced after `generation` left it,
/// if a copy with `hash` is still kept: first where a commit under way (or interrupted after its
/// decision) holds the old versions, then in the retired area, where that commit moves them when
/// it finishes (in this order, so that a move between the two looks is not missed).
fn retired_copy(
    dir: &std::path::Path,
    generation: u64,
    partition: &str,
    object: &str,
    hash: &ContentHash,
) -> Result<Option<Vec<u8>>> {
    let Some(name) = object
        .strip_prefix(partition)
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return Ok(None);
    };
    let read = |old: &std::path::Path| {
        std::fs::read(old.join(name))
            .ok()
            .filter(|bytes| ContentHash::of_bytes(bytes) == *hash)
    };
    if let Some(bytes) = crate::swap::in_flight(dir)?
        .iter()
        .find_map(|old| read(old))
    {
        return Ok(Some(bytes));
    }
    Ok(crate::swap::retained(dir)?
        .into_iter()
        .filter(|(_, replaced_by, _)| *replaced_by > generation)
        .find_map(|(_, _, old)| read(&old)))
}
