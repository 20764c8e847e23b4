//! The local-directory target: staging, the commit (every partition directory swapped in whole
//! through the `swap` module's roll-forward record) and the sweeps of `open`. Blocking code: the
//! writer calls it on tokio's blocking pool.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::debug;

use crate::error::{Error, Result, io};
use crate::hash::ContentHash;
use crate::layout::{
    DATASET_MARKERS, LOCK_FILE, RETIRED_DIR, STAGING_DIR, is_marker_name, join_prefix, marker_name,
};
use crate::manifest::{FileEntry, Manifest};
use crate::partition::is_object_file_name;
use crate::storage::{
    fsync_many, lock_exclusive, read_local_manifest, remove_dir_all_if_exists,
    remove_file_if_exists, try_lock, write_unsynced,
};
use crate::swap::{Pending, Removal, Swap};

use super::PartFile;
use super::plan::Plan;

/// A partition's new version in the staging area: `_staging/<run>/p<n>/`, holding its files and
/// the marker `.palisade-<run16>`.
#[derive(Debug, Clone)]
pub(crate) struct StagedDir {
    pub dir: PathBuf,
    /// Every file in it (fsynced at commit), the marker included.
    pub files: Vec<PathBuf>,
    /// It and its subdirectories (fsynced at commit).
    pub dirs: Vec<PathBuf>,
}

/// A writer's place in a local dataset: the dataset directory, and its run's staging area whose
/// lock file marks the run as alive (the kernel drops the lock when the process dies).
/// A cheap handle: clones share the run (staging work runs on blocking threads).
#[derive(Debug, Clone)]
pub(crate) struct LocalTarget {
    dir: PathBuf,
    run_dir: PathBuf,
    lock_path: PathBuf,
    _lock: Arc<std::fs::File>,
    run_id: String,
    seq: Arc<AtomicU64>,
}

impl LocalTarget {
    /// Opens the dataset at `root/prefix`: refuses nested datasets, completes a commit a crashed
    /// writer decided, sweeps what crashed runs left, reads the manifest and creates this run's
    /// staging area, all under the dataset's lock.
    pub fn open(
        root: &Path,
        prefix: &str,
        run_id: &str,
        lock_timeout: Duration,
        accept: bool,
        retain: Duration,
    ) -> Result<(Option<Manifest>, Self)> {
        // Before anything is created: a refused open leaves no trace.
        check_ancestors(root, prefix)?;
        let dir = root.join(prefix);
        check_descendants(&dir, prefix)?;
        let staging = dir.join(STAGING_DIR);
        std::fs::create_dir_all(&staging).map_err(io("create directory", &staging))?;
        let _manifest_lock = lock_exclusive(&dir.join(LOCK_FILE), lock_timeout)?;
        // First complete a commit that a crashed writer decided: its new versions are staged.
        crate::swap::complete_pending(&dir)?;
        sweep_staging(&staging)?;
        crate::swap::expire_retired(&dir, retain)?;
        let manifest = read_local_manifest(&dir, accept)?;
        if let Some(m) = &manifest {
            sweep_unreferenced(&dir, m, &walk(&dir)?.files)?;
        }
        let lock_path = staging.join(format!("{run_id}.lock"));
        let lock = lock_exclusive(&lock_path, lock_timeout)?;
        let run_dir = staging.join(run_id);
        std::fs::create_dir(&run_dir).map_err(io("create directory", &run_dir))?;
        let target = Self {
            dir,
            run_dir,
            lock_path,
            _lock: Arc::new(lock),
            run_id: run_id.to_string(),
            seq: Arc::new(AtomicU64::new(0)),
        };
        Ok((manifest, target))
    }

    /// A new path in the run's staging area.
    pub fn next_path(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.run_dir.join(format!("{what}{n}"))
    }

    /// Stages a single-object partition version from a file already in the staging area: a
    /// directory holding it under its object name, and the marker.
    pub fn stage_object(&self, spooled: &Path, file_name: &str) -> Result<StagedDir> {
        let sdir = self.next_path("p");
        std::fs::create_dir(&sdir).map_err(io("create directory", &sdir))?;
        let to = sdir.join(file_name);
        std::fs::rename(spooled, &to).map_err(io("rename into the staging area", &to))?;
        let marker = sdir.join(marker_name(&self.run_id));
        write_unsynced(&marker, b"")?;
        Ok(StagedDir {
            dir: sdir.clone(),
            files: vec![to, marker],
            dirs: vec![sdir],
        })
    }

    /// Stages a multi-file partition: each file copied while hashed, and the marker. Returns
    /// the files' entries (objects named `<partition>/<name>`) and the staged directory.
    pub fn stage_files(
        &self,
        partition: &str,
        files: &[PartFile],
    ) -> Result<(Vec<FileEntry>, StagedDir)> {
        let sdir = self.next_path("p");
        let (stats, synced, dirs) =
            super::stage::stage_dir(&sdir, partition, files, &marker_name(&self.run_id))?;
        let entries = stats
            .into_iter()
            .map(|(name, size, hash)| FileEntry {
                object: format!("{partition}/{name}"),
                name,
                size,
                hash,
            })
            .collect();
        Ok((
            entries,
            StagedDir {
                dir: sdir,
                files: synced,
                dirs,
            },
        ))
    }

    /// Commits `plan`: fsyncs the staged data (outside the lock), takes the lock, completes a
    /// pending commit of a writer that died, checks the manifest found against the run's base
    /// (`check`), then decides the commit with a durable pending record and rolls it forward:
    /// every written partition's directory swapped in whole, removed ones moved aside, the
    /// manifest installed, old versions moved to `_retired/` (and those older than `retain`
    /// deleted). The run's staging area is deleted either way.
    pub fn commit(
        self,
        plan: &Plan,
        staged: &[(String, StagedDir)],
        lock_timeout: Duration,
        accept: bool,
        retain: Duration,
        check: impl FnOnce(Option<&Manifest>) -> Result<()>,
    ) -> Result<()> {
        if plan.next.is_some() {
            let mut files: Vec<PathBuf> = Vec::new();
            let mut dirs: Vec<PathBuf> = Vec::new();
            for (_, d) in staged {
                files.extend(d.files.iter().cloned());
                dirs.extend(d.dirs.iter().cloned());
            }
            fsync_many(&files, false)?;
            if !dirs.is_empty() {
                dirs.push(self.run_dir.clone());
                fsync_many(&dirs, true)?;
            }
        }
        let lock = lock_exclusive(&self.dir.join(LOCK_FILE), lock_timeout)?;
        // A commit decided by a writer that died is completed before ours is checked against it.
        crate::swap::complete_pending(&self.dir)?;
        let current = read_local_manifest(&self.dir, accept)?;
        let checked = check(current.as_ref());
        let Some(next) = plan.next.clone().filter(|_| checked.is_ok()) else {
            self.discard()?;
            return checked;
        };
        let rel = |p: &Path| -> Result<String> {
            p.strip_prefix(&self.dir)
                .map(|r| r.to_string_lossy().replace('\\', "/"))
                .map_err(|_| Error::Config {
                    field: "store",
                    reason: "staging area outside the dataset (internal error)",
                })
        };
        let mut pending = Pending {
            manifest: next,
            swaps: Vec::new(),
            removals: Vec::new(),
        };
        for (partition, d) in staged {
            pending.swaps.push(Swap {
                partition: partition.clone(),
                staged: rel(&d.dir)?,
                marker: marker_name(&self.run_id),
            });
        }
        for (i, partition) in plan.removed.iter().enumerate() {
            pending.removals.push(Removal {
                partition: partition.clone(),
                aside: rel(&self.run_dir.join(format!("r{i}")))?,
            });
        }
        // The decision; from here on the commit is rolled forward, by us or the next `open`.
        crate::swap::write_pending(&self.dir, &self.run_dir, &pending)?;
        crate::swap::finish(&self.dir, &pending, false)?;
        crate::swap::expire_retired(&self.dir, retain)?;
        self.discard()?;
        drop(lock);
        Ok(())
    }

    /// Deletes the run's staging area.
    pub fn discard(self) -> Result<()> {
        remove_dir_all_if_exists(&self.run_dir)?;
        remove_file_if_exists(&self.lock_path)
    }
}

/// Refuses a dataset that lies inside another: a directory above it (up to the file system's
/// root) that has a manifest, lock or pending record.
fn check_ancestors(root: &Path, prefix: &str) -> Result<()> {
    let dir = root.join(prefix);
    for above in dir.ancestors().skip(1) {
        if let Some(marker) = DATASET_MARKERS.iter().find(|m| above.join(m).exists()) {
            return Err(Error::NestedDataset {
                prefix: dir.display().to_string(),
                relation: "lies inside",
                other: above.display().to_string(),
                evidence: above.join(marker).display().to_string(),
            });
        }
    }
    Ok(())
}

/// Refuses a dataset that contains another: a subdirectory with a manifest, lock or pending
/// record.
fn check_descendants(dir: &Path, prefix: &str) -> Result<()> {
    match walk(dir)?.nested.first() {
        Some(inner) => Err(Error::NestedDataset {
            prefix: prefix.to_string(),
            relation: "contains",
            other: join_prefix(prefix, inner),
            evidence: dir.join(inner).display().to_string(),
        }),
        None => Ok(()),
    }
}

/// What `open` finds under the dataset directory (outside `_staging`).
struct Listing {
    /// Subdirectories (relative) that are datasets of their own.
    nested: Vec<String>,
    /// Files that may be swept: `part-*` data objects and swap markers, absolute.
    files: Vec<PathBuf>,
}

fn walk(dir: &Path) -> Result<Listing> {
    let mut listing = Listing {
        nested: Vec::new(),
        files: Vec::new(),
    };
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
                if !(d == dir && (name == STAGING_DIR || name == RETIRED_DIR)) {
                    stack.push(entry.path());
                }
            } else if d != dir && DATASET_MARKERS.contains(&name.as_str()) {
                let rel = d.strip_prefix(dir).unwrap_or(&d);
                listing
                    .nested
                    .push(rel.to_string_lossy().replace('\\', "/"));
            } else if is_object_file_name(&name) || is_marker_name(&name) {
                listing.files.push(entry.path());
            }
        }
    }
    listing.nested.sort();
    Ok(listing)
}

/// Removes the staging areas of runs whose lock is free (their process is gone). Called with
/// the manifest lock held, which is also held while a run creates its staging area.
fn sweep_staging(staging: &Path) -> Result<()> {
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

/// Removes `part-*` objects that the manifest does not name (left by versions of this crate
/// that renamed single objects into place) and swap markers of finished commits. Manifest lock
/// held. Never called without a manifest: if someone deleted it, the objects stay until a new
/// manifest has been committed, so a mistaken deletion does not destroy the data.
fn sweep_unreferenced(dir: &Path, m: &Manifest, files: &[PathBuf]) -> Result<()> {
    let live: BTreeSet<PathBuf> = m
        .partitions
        .values()
        .flat_map(|e| e.objects())
        .map(|o| dir.join(o))
        .collect();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string());
        let marker = name.as_deref().is_some_and(is_marker_name);
        if marker || !live.contains(path) {
            debug!(path = %path.display(), "sweeping unreferenced object");
            remove_file_if_exists(path)?;
        }
    }
    Ok(())
}

/// Hashes a local file with the crate's one read loop.
pub(crate) fn hash_file(path: &Path) -> Result<(ContentHash, u64)> {
    let f = std::fs::File::open(path).map_err(io("open", path))?;
    ContentHash::of_reader(f, |_| Ok(())).map_err(io("read", path))
}

/// Copies `from` into `to` while hashing what is copied.
pub(crate) fn copy_hashing(
    from: &Path,
    mut to: std::fs::File,
) -> Result<(ContentHash, std::fs::File)> {
    use std::io::Write;
    let f = std::fs::File::open(from).map_err(io("open", from))?;
    let (hash, _) = ContentHash::of_reader(f, |chunk| to.write_all(chunk))
        .map_err(io("copy to the staging area", from))?;
    Ok((hash, to))
}
