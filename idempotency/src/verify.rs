//! Checking a dataset without changing it: every object the manifest names is there with its
//! recorded size (and, if asked, its hash); leftovers and an unfinished commit are reported.
//! For nightly checks of a lake (`palisade verify`).

use std::collections::BTreeSet;
use std::path::Path;

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::error::{Result, io, store as store_err};
use crate::hash::ContentHash;
use crate::layout::{
    DATASET_MARKERS, MANIFEST_FILE, PENDING_FILE, RETIRED_DIR, STAGING_DIR, is_data_object_name,
    is_marker_name, object_key, relative_key,
};
use crate::manifest::Manifest;
use crate::storage::{Backend, DatasetStore, blocking, read_local_manifest, read_object_manifest};

/// What is wrong with one object the manifest names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Problem {
    /// The object does not exist.
    Missing {
        /// The object, relative to the dataset prefix.
        object: String,
    },
    /// Its size differs from the manifest's.
    WrongSize {
        /// The object, relative to the dataset prefix.
        object: String,
        /// The size the manifest records.
        expected: u64,
        /// The size found.
        found: u64,
    },
    /// Its content's BLAKE3 differs from the manifest's (only with `hashes`).
    WrongHash {
        /// The object, relative to the dataset prefix.
        object: String,
    },
    /// It could not be read.
    Unreadable {
        /// The object, relative to the dataset prefix.
        object: String,
        /// Why.
        error: String,
    },
}

/// A replaced partition version kept for readers until the retention has passed
/// ([`WriterBuilder::retain`](crate::WriterBuilder::retain)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Retained {
    /// The generation of the commit that replaced or removed it.
    pub generation: u64,
    /// When, in milliseconds since the Unix epoch on the store's clock (`None`: by the latest
    /// commit, whose manifest's own write time it is).
    pub retired_at_ms: Option<i64>,
    /// Its objects (object stores) or files (local directory).
    pub objects: usize,
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Verification {
    /// The manifest generation checked (0: nothing was ever committed).
    pub generation: u64,
    /// Objects the manifest names, all checked.
    pub objects: usize,
    /// Their total size as recorded.
    pub bytes: u64,
    /// Whether their content was hashed and compared, not only their sizes.
    pub hashes_checked: bool,
    /// Objects that are missing, have another size or (with hashes) another content.
    pub problems: Vec<Problem>,
    /// Data files under the dataset that the manifest does not name, relative to the prefix:
    /// uploads of crashed runs on object stores (swept by a later writer's `open` after
    /// `orphan_grace`), or files put into a partition directory by hand on a local directory
    /// (a plain directory reader reads them).
    pub unreferenced: Vec<String>,
    /// Versions waiting to be deleted once the retention has passed, oldest first.
    pub retained: Vec<Retained>,
    /// Local directory: the generation of a decided commit not yet rolled forward
    /// (`_manifest.pending.json`; the next writer or reader completes it).
    pub pending_commit: Option<u64>,
}

impl Verification {
    /// Sound: every named object is there, whole, and no decided commit is waiting. Unreferenced
    /// files do not make a dataset unsound (they are reported).
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty() && self.pending_commit.is_none()
    }
}

/// Checks the dataset under `prefix` without changing anything (a pending commit is reported,
/// not completed; nothing is swept). With `hashes`, every named object is read and its BLAKE3
/// compared with the manifest's; without, only sizes.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use palisade_idempotency::{DatasetStore, PartitionedWriter, verify};
/// let store = DatasetStore::memory();
/// let mut w = PartitionedWriter::open(&store, "sales").await?;
/// w.put("date=2024-01-01", "a,b\n1,2\n").await?;
/// w.commit().await?;
/// let report = verify(&store, "sales", true).await?;
/// assert!(report.is_sound() && report.objects == 1 && report.hashes_checked);
/// # Ok::<(), palisade_idempotency::Error>(()) }).unwrap();
/// ```
pub async fn verify(
    store: impl Into<DatasetStore>,
    prefix: &str,
    hashes: bool,
) -> Result<Verification> {
    let prefix = prefix.trim_matches('/').to_string();
    match store.into().backend {
        Backend::Local(root) => {
            let dir = root.join(&prefix);
            blocking(move || verify_local(&dir, hashes)).await
        }
        Backend::Object { store, base } => {
            let mkey = object_key(&base, &prefix, MANIFEST_FILE)?;
            let manifest = read_object_manifest(&store, &mkey, true)
                .await?
                .map(|read| read.manifest);
            let mut v = start(manifest.as_ref(), hashes);
            let Some(m) = manifest else { return Ok(v) };
            for (object, size, hash) in named(&m) {
                let key = object_key(&base, &prefix, &object)?;
                let problem = match store.head(&key).await {
                    Err(object_store::Error::NotFound { .. }) => Some(Problem::Missing { object }),
                    Err(e) => Some(Problem::Unreadable {
                        object,
                        error: e.to_string(),
                    }),
                    Ok(meta) if meta.size != size => Some(Problem::WrongSize {
                        object,
                        expected: size,
                        found: meta.size,
                    }),
                    Ok(_) if hashes => match store.get(&key).await {
                        Ok(got) => match got.bytes().await {
                            Ok(b) if ContentHash::of_bytes(&b) == hash => None,
                            Ok(_) => Some(Problem::WrongHash { object }),
                            Err(e) => Some(Problem::Unreadable {
                                object,
                                error: e.to_string(),
                            }),
                        },
                        Err(e) => Some(Problem::Unreadable {
                            object,
                            error: e.to_string(),
                        }),
                    },
                    Ok(_) => None,
                };
                v.problems.extend(problem);
            }
            v.retained = m
                .retired
                .iter()
                .map(|r| Retained {
                    generation: r.generation,
                    retired_at_ms: r.retired_at_ms,
                    objects: r.objects.len(),
                })
                .collect();
            let dir = object_key(&base, &prefix, "")?;
            let live: BTreeSet<&str> = m.kept_objects().collect();
            let listed: Vec<object_store::ObjectMeta> = store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(store_err("list", &dir))?;
            for meta in &listed {
                let Some(rel) = relative_key(&dir, &meta.location) else {
                    continue;
                };
                let file = rel.rsplit('/').next().unwrap_or(rel);
                let ours = is_data_object_name(file);
                if ours && !live.contains(rel) {
                    v.unreferenced.push(rel.to_string());
                }
            }
            v.unreferenced.sort();
            Ok(v)
        }
    }
}

fn start(m: Option<&Manifest>, hashes: bool) -> Verification {
    let named = m.map(named).unwrap_or_default();
    Verification {
        generation: m.map_or(0, |m| m.generation),
        objects: named.len(),
        bytes: named.iter().map(|(_, size, _)| size).sum(),
        hashes_checked: hashes,
        ..Verification::default()
    }
}

/// Every object the manifest names: (object, size, hash).
fn named(m: &Manifest) -> Vec<(String, u64, ContentHash)> {
    let mut out = Vec::new();
    for e in m.partitions.values() {
        if e.is_multi_file() {
            out.extend(e.files.iter().map(|f| (f.object.clone(), f.size, f.hash)));
        } else {
            out.push((e.object.clone(), e.size, e.hash));
        }
    }
    out
}

fn verify_local(dir: &Path, hashes: bool) -> Result<Verification> {
    let manifest = read_local_manifest(dir, true)?;
    let mut v = start(manifest.as_ref(), hashes);
    let pending = dir.join(PENDING_FILE);
    match std::fs::read(&pending) {
        Ok(bytes) => {
            let generation = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|p| p["manifest"]["generation"].as_u64());
            v.pending_commit = Some(generation.unwrap_or(0));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", &pending)(e)),
    }
    for (at, generation, path) in crate::swap::retained(dir)? {
        v.retained.push(Retained {
            generation,
            retired_at_ms: Some(at),
            objects: count_files(&path),
        });
    }
    let Some(m) = manifest else { return Ok(v) };
    for (object, size, hash) in named(&m) {
        let path = dir.join(&object);
        let problem = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Problem::Missing { object }),
            Err(e) => Some(Problem::Unreadable {
                object,
                error: e.to_string(),
            }),
            Ok(meta) if meta.len() != size => Some(Problem::WrongSize {
                object,
                expected: size,
                found: meta.len(),
            }),
            Ok(_) if hashes => {
                match std::fs::File::open(&path).and_then(|f| ContentHash::of_reader(f, |_| Ok(())))
                {
                    Ok((h, _)) if h == hash => None,
                    Ok(_) => Some(Problem::WrongHash { object }),
                    Err(e) => Some(Problem::Unreadable {
                        object,
                        error: e.to_string(),
                    }),
                }
            }
            Ok(_) => None,
        };
        v.problems.extend(problem);
    }
    // Files a plain reader would read that the manifest does not name.
    let live: BTreeSet<String> = m
        .partitions
        .values()
        .flat_map(|e| e.objects())
        .map(str::to_string)
        .collect();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("list", &d)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io("list", &d))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = entry.file_type().map_err(io("stat", entry.path()))?;
            if ft.is_dir() {
                if !(rel.is_empty() && (name == STAGING_DIR || name == RETIRED_DIR)) {
                    stack.push((entry.path(), path));
                }
            } else {
                let reserved = (rel.is_empty() && DATASET_MARKERS.contains(&name.as_str()))
                    || name.starts_with('.')
                    || name.starts_with('_')
                    || is_marker_name(&name);
                if !(reserved || live.contains(&path)) {
                    v.unreferenced.push(path);
                }
            }
        }
    }
    v.unreferenced.sort();
    Ok(v)
}

/// The files under `dir`, recursively (0 if it cannot be listed).
fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(_) => n += 1,
                Err(_) => {}
            }
        }
    }
    n
}
