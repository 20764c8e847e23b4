//! Partitions on the local directory: whole partition directories swapped into place, with a
//! roll-forward record so that a crash never leaves the manifest and the directories apart.
//!
//! The protocol, its fallback and what readers observe are documented in the
//! [writer module](crate::writer#on-a-local-directory) (this module is private).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::error::{Error, Result, io};
use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::storage::read_local_manifest;
use crate::storage::{
    create_parents, fsync_dir, fsync_many, lock_exclusive, remove_dir_all_if_exists,
    remove_file_if_exists, write_synced,
};

use crate::layout::{LOCK_FILE, PENDING_FILE, RETIRED_DIR, STAGING_DIR};

/// A decided commit: the manifest to install, and the directory moves that come with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Pending {
    pub manifest: Manifest,
    /// New versions of multi-file partitions to swap into place.
    pub swaps: Vec<Swap>,
    /// Multi-file partitions to take away after the manifest is installed.
    pub removals: Vec<Removal>,
}

/// One directory swap; paths are relative to the dataset directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Swap {
    pub partition: String,
    /// The staged new version, `_staging/<run>/p<n>`; after the exchange, the old version.
    pub staged: String,
    /// The marker file inside the new version that says it is in place.
    pub marker: String,
}

/// One removal; paths are relative to the dataset directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Removal {
    pub partition: String,
    /// Where the live directory is moved before it is deleted, `_staging/<run>/r<n>`.
    pub aside: String,
}

impl Pending {
    fn check(&self, path: &Path) -> Result<()> {
        let corrupt = |reason: String| Error::CorruptManifest {
            path: path.display().to_string(),
            reason,
        };
        let staging = |p: &str| {
            p.strip_prefix("_staging/")
                .is_some_and(crate::manifest::is_safe_relative)
        };
        for s in &self.swaps {
            crate::partition::validate_partition(&s.partition)
                .map_err(|e| corrupt(format!("bad partition {:?}: {e}", s.partition)))?;
            if !staging(&s.staged) || !s.marker.starts_with(".palisade-") || s.marker.contains('/')
            {
                return Err(corrupt(format!("bad swap record for {:?}", s.partition)));
            }
        }
        for r in &self.removals {
            crate::partition::validate_partition(&r.partition)
                .map_err(|e| corrupt(format!("bad partition {:?}: {e}", r.partition)))?;
            if !staging(&r.aside) {
                return Err(corrupt(format!("bad removal record for {:?}", r.partition)));
            }
        }
        Ok(())
    }
}

/// The old versions a finished pending commit leaves in the staging area (deleted last).
fn leftovers(dir: &Path, p: &Pending) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for s in &p.swaps {
        v.push(dir.join(&s.staged));
        v.push(old_aside(&dir.join(&s.staged)));
    }
    for r in &p.removals {
        v.push(dir.join(&r.aside));
    }
    v
}

/// Where the old versions of a commit that is under way (or was interrupted after its decision)
/// are until it finishes: the staged paths they were swapped to, the fallback's aside paths, and
/// removed partitions' aside paths. Empty when no commit is pending. For readers: no lock.
pub(crate) fn in_flight(dir: &Path) -> Result<Vec<PathBuf>> {
    match read_pending(dir) {
        Ok(pending) => Ok(pending.map_or_else(Vec::new, |p| leftovers(dir, &p))),
        // Not readable as a record: nothing in flight worth reading from.
        Err(Error::CorruptManifest { .. }) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The pending record, if a commit was decided and is not finished.
fn read_pending(dir: &Path) -> Result<Option<Pending>> {
    let path = dir.join(PENDING_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::CorruptManifest {
            path: path.display().to_string(),
            reason: format!("not valid JSON: {e}"),
        })
}

/// Where the fallback (two renames) puts the old version.
fn old_aside(staged: &Path) -> PathBuf {
    let mut s = staged.as_os_str().to_owned();
    s.push(".old");
    PathBuf::from(s)
}

/// Writes the pending record durably (the decision point). Manifest lock held.
pub(crate) fn write_pending(dir: &Path, run_dir: &Path, pending: &Pending) -> Result<()> {
    let tmp = run_dir.join("pending.json");
    remove_file_if_exists(&tmp)?;
    let mut bytes = serde_json::to_vec_pretty(pending).map_err(|e| Error::Io {
        op: "encode pending manifest",
        path: tmp.clone(),
        source: std::io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_synced(&tmp, &bytes)?;
    let target = dir.join(PENDING_FILE);
    std::fs::rename(&tmp, &target).map_err(io("rename into place", &target))?;
    fsync_dir(dir)
}

/// Completes a pending commit if there is one. Manifest lock held. Returns whether there was one.
pub(crate) fn complete_pending(dir: &Path) -> Result<bool> {
    let Some(pending) = read_pending(dir)? else {
        return Ok(false);
    };
    pending.check(&dir.join(PENDING_FILE))?;
    warn!(
        generation = pending.manifest.generation,
        "completing a commit that was interrupted after its decision"
    );
    finish(dir, &pending, false)?;
    Ok(true)
}

/// Completes a pending commit without the writer's lock: for readers. Takes the lock only if a
/// pending record exists.
pub(crate) fn complete_pending_unlocked(dir: &Path) -> Result<()> {
    if !dir.join(PENDING_FILE).exists() {
        return Ok(());
    }
    let _lock = lock_exclusive(&dir.join(LOCK_FILE), std::time::Duration::from_secs(30))?;
    complete_pending(dir)?;
    Ok(())
}

/// Steps 5 and 6 of the protocol: swaps (unless the manifest is already installed), install,
/// removals, clean-up. Idempotent. Manifest lock held. `force_fallback` tests the two-rename
/// path.
pub(crate) fn finish(dir: &Path, pending: &Pending, force_fallback: bool) -> Result<()> {
    let installed = read_local_manifest(dir, true)?
        .is_some_and(|m| m.generation >= pending.manifest.generation);
    if !installed {
        let mut touched: BTreeSet<PathBuf> = BTreeSet::new();
        for s in &pending.swaps {
            swap_in(dir, s, force_fallback, &mut touched)?;
        }
        let touched: Vec<PathBuf> = touched.into_iter().collect();
        fsync_many(&touched, true)?;
        let tmp = dir.join(STAGING_DIR).join("_install.json");
        remove_file_if_exists(&tmp)?;
        write_synced(&tmp, &pending.manifest.encode())?;
        let target = dir.join(MANIFEST_FILE);
        std::fs::rename(&tmp, &target).map_err(io("rename into place", &target))?;
        fsync_dir(dir)?;
    }
    // Removed partitions disappear (atomically: one rename each) after the manifest commit.
    let mut touched: BTreeSet<PathBuf> = BTreeSet::new();
    for r in &pending.removals {
        let live = dir.join(&r.partition);
        if std::fs::symlink_metadata(&live).is_ok() {
            let aside = dir.join(&r.aside);
            if let Some(parent) = aside.parent() {
                std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
            }
            std::fs::rename(&live, &aside).map_err(io("move aside", &live))?;
        }
        // Empty parents go too (also when a crash came between the rename and this).
        let mut d = live.parent().map(Path::to_path_buf);
        while let Some(x) = d {
            if x == dir {
                touched.insert(x);
                break;
            }
            match std::fs::remove_dir(&x) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => {
                    // Not empty: it stays, and its entry list changed.
                    touched.insert(x);
                    break;
                }
            }
            d = x.parent().map(Path::to_path_buf);
        }
    }
    let touched: Vec<PathBuf> = touched.into_iter().collect();
    fsync_many(&touched, true)?;
    for s in &pending.swaps {
        // Not fsynced: a marker that survives a crash is hidden, and swept by the next `open`.
        let marker = dir.join(&s.partition).join(&s.marker);
        if let Err(e) = remove_file_if_exists(&marker) {
            warn!(error = %e, "could not delete a swap marker; the next open sweeps it");
        }
    }
    // The old versions move to the retired area before the pending record goes: until then the
    // record is what leads readers (and a crash's recovery) to them in the staging area, and a
    // crash in between would leave them there for the next open to sweep, under readers that
    // opened them.
    retire(dir, pending);
    let pending_path = dir.join(PENDING_FILE);
    remove_file_if_exists(&pending_path)?;
    fsync_dir(dir)?;
    Ok(())
}

/// Moves the old versions a finished commit left in the staging area to the retired area, where
/// readers that opened them keep reading them until a writer's retention has passed.
fn retire(dir: &Path, pending: &Pending) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let retired = dir.join(RETIRED_DIR);
    for (i, old) in leftovers(dir, pending).into_iter().enumerate() {
        if std::fs::symlink_metadata(&old).is_err() {
            continue;
        }
        let to = retired.join(format!("{now_ms}-g{}-{i}", pending.manifest.generation));
        let moved = std::fs::create_dir_all(&retired).and_then(|()| std::fs::rename(&old, &to));
        if let Err(e) = moved {
            warn!(error = %e, "could not keep an old partition version; deleting it");
            if let Err(e) = remove_dir_all_if_exists(&old) {
                warn!(error = %e, "could not delete an old partition version; the next open sweeps it");
            }
        }
    }
}

/// The retained versions of a local dataset: (retired at, unix ms; generation that replaced
/// them; path), oldest first.
pub(crate) fn retained(dir: &Path) -> Result<Vec<(i64, u64, PathBuf)>> {
    let retired = dir.join(RETIRED_DIR);
    let entries = match std::fs::read_dir(&retired) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", &retired)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("list", &retired))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let mut parts = name.splitn(3, '-');
        let at = parts.next().and_then(|p| p.parse::<i64>().ok());
        let generation = parts
            .next()
            .and_then(|p| p.strip_prefix('g'))
            .and_then(|p| p.parse::<u64>().ok());
        // Anything else in there is not ours to keep: it counts as retired long ago.
        out.push((at.unwrap_or(0), generation.unwrap_or(0), entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Deletes the retained versions older than `retain` (manifest lock held).
pub(crate) fn expire_retired(dir: &Path, retain: std::time::Duration) -> Result<()> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let retain_ms = i64::try_from(retain.as_millis()).unwrap_or(i64::MAX);
    for (at, generation, path) in retained(dir)? {
        if now_ms.saturating_sub(at) >= retain_ms {
            debug!(generation, path = %path.display(), "deleting a retained version");
            remove_dir_all_if_exists(&path)?;
        }
    }
    Ok(())
}

/// Puts one staged version in place, unless its marker says it already is.
fn swap_in(
    dir: &Path,
    s: &Swap,
    force_fallback: bool,
    touched: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let live = dir.join(&s.partition);
    let staged = dir.join(&s.staged);
    if live.join(&s.marker).exists() {
        return Ok(());
    }
    if !staged.join(&s.marker).exists() {
        return Err(Error::CorruptManifest {
            path: dir.join(PENDING_FILE).display().to_string(),
            reason: format!(
                "the interrupted commit's new version of partition {:?} is missing from {} \
                 (was the staging area deleted by hand?)",
                s.partition,
                staged.display()
            ),
        });
    }
    let parent = live.parent().unwrap_or(dir).to_path_buf();
    if std::fs::symlink_metadata(&live).is_ok() {
        if force_fallback || !exchange(&staged, &live)? {
            let aside = old_aside(&staged);
            debug!(partition = %s.partition, "RENAME_EXCHANGE unavailable: two renames");
            std::fs::rename(&live, &aside).map_err(io("move aside", &live))?;
            std::fs::rename(&staged, &live).map_err(io("rename into place", &live))?;
        }
    } else {
        if create_parents(&parent, dir, touched)? {
            // New parents are durable before the partition is renamed into them.
            let list: Vec<PathBuf> = touched.iter().cloned().collect();
            fsync_many(&list, true)?;
        }
        std::fs::rename(&staged, &live).map_err(io("rename into place", &live))?;
    }
    touched.insert(parent);
    if let Some(sp) = staged.parent() {
        touched.insert(sp.to_path_buf());
    }
    Ok(())
}

/// Exchanges two directories atomically. `Ok(false)`: not supported here (use two renames).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(true),
        Err(e) if e == Errno::INVAL || e == Errno::NOSYS || e == Errno::OPNOTSUPP => Ok(false),
        Err(e) => Err(io("exchange directories", b)(e.into())),
    }
}

/// Exchanges two directories atomically. `Ok(false)`: not supported here (use two renames).
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(dir: &Path, rel: &str, files: &[(&str, &str)], marker: Option<&str>) {
        let d = dir.join(rel);
        std::fs::create_dir_all(&d).unwrap();
        for (n, c) in files {
            std::fs::write(d.join(n), c).unwrap();
        }
        if let Some(m) = marker {
            std::fs::write(d.join(m), b"").unwrap();
        }
    }

    fn listing(d: &Path) -> Vec<(String, String)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// A writer that crashed after its decision, with one of two swaps done: `Dataset::open`
    /// (like a writer's `open`) completes it; a pending record whose manifest is already
    /// installed is only cleaned up; one that cannot be completed is a clear error.
    #[test]
    fn a_decided_commit_is_rolled_forward() {
        use crate::manifest::{FileEntry, PartitionEntry, files_digest};
        use crate::{ContentHash, Dataset, DatasetStore, PartFile, PartitionedWriter};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let src = tempfile::tempdir().unwrap();
            let store = DatasetStore::local(tmp.path());
            let dir = tmp.path().join("t");
            let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
            for p in ["a=1", "a=2"] {
                let f = src.path().join(format!("{p}.csv"));
                std::fs::write(&f, format!("{p} old")).unwrap();
                let id = ContentHash::of_bytes(p.as_bytes());
                w.put_files(p, vec![PartFile::new("old.csv", f)], id)
                    .await
                    .unwrap();
            }
            w.commit().await.unwrap();

            // The dead run's decision: new versions staged, pending record written.
            let mut manifest = Dataset::open(&store, "t")
                .await
                .unwrap()
                .manifest()
                .unwrap()
                .clone();
            manifest.generation += 1;
            let mut swaps = Vec::new();
            for (i, p) in ["a=1", "a=2"].into_iter().enumerate() {
                let staged = format!("_staging/dead/p{i}");
                let content = format!("{p} new");
                version(
                    &dir,
                    &staged,
                    &[("new.csv", &content)],
                    Some(".palisade-dead"),
                );
                let files = vec![FileEntry {
                    name: "new.csv".into(),
                    object: format!("{p}/new.csv"),
                    size: content.len() as u64,
                    hash: ContentHash::of_bytes(content.as_bytes()),
                }];
                manifest.partitions.insert(
                    p.to_string(),
                    PartitionEntry {
                        object: format!("{p}/"),
                        size: content.len() as u64,
                        hash: files_digest(&files),
                        rows_hash: None,
                        identity: Some(ContentHash::of_bytes(content.as_bytes())),
                        files,
                    },
                );
                swaps.push(Swap {
                    partition: p.to_string(),
                    staged,
                    marker: ".palisade-dead".into(),
                });
            }
            let pending = Pending {
                manifest,
                swaps,
                removals: Vec::new(),
            };
            write_pending(&dir, &dir.join("_staging/dead"), &pending).unwrap();
            // The crash came after the first swap.
            swap_in(&dir, &pending.swaps[0], false, &mut BTreeSet::new()).unwrap();
            let names = |p: &str| -> Vec<String> {
                listing(&dir.join(p)).into_iter().map(|(n, _)| n).collect()
            };
            assert_eq!(names("a=1"), vec![".palisade-dead", "new.csv"]);
            assert_eq!(names("a=2"), vec!["old.csv"]);

            let ds = Dataset::open(&store, "t").await.unwrap();
            assert_eq!(ds.manifest().unwrap().generation, 2);
            for p in ["a=1", "a=2"] {
                assert_eq!(
                    listing(&dir.join(p)),
                    vec![("new.csv".to_string(), format!("{p} new"))]
                );
                let got = ds.read_file(p, "new.csv").await.unwrap().unwrap();
                assert_eq!(got, format!("{p} new"));
            }
            assert!(!dir.join(PENDING_FILE).exists());
            assert_eq!(
                std::fs::read_dir(dir.join("_staging/dead"))
                    .unwrap()
                    .count(),
                0,
                "the old versions are deleted"
            );

            // Already installed: only the record goes (its staged versions are gone, so a swap
            // attempt would fail).
            write_pending(&dir, &dir.join("_staging/dead"), &pending).unwrap();
            let w = PartitionedWriter::open(&store, "t").await.unwrap();
            assert!(!dir.join(PENDING_FILE).exists());
            assert_eq!(w.manifest().generation, 2);
            w.abort().await.unwrap();
            assert_eq!(std::fs::read_dir(dir.join("_staging")).unwrap().count(), 0);

            // Not installed and not completable: a clear error naming the record, no change.
            let mut broken = pending.clone();
            broken.manifest.generation = 3;
            std::fs::create_dir_all(dir.join("_staging/dead")).unwrap();
            write_pending(&dir, &dir.join("_staging/dead"), &broken).unwrap();
            let err = Dataset::open(&store, "t").await.unwrap_err();
            assert!(
                matches!(&err, Error::CorruptManifest { path, .. } if path.ends_with(PENDING_FILE)),
                "{err}"
            );
            assert_eq!(names("a=1"), vec!["new.csv"]);
        });
    }

    /// A crash between the fallback's two renames (the live version aside, the new one not yet
    /// in: the partition is missing) is rolled forward: the new version is renamed in.
    #[test]
    fn a_crash_inside_the_fallback_is_rolled_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        version(
            dir,
            "_staging/r/p1",
            &[("new.csv", "new")],
            Some(".palisade-r"),
        );
        version(dir, "_staging/r/p1.old", &[("old.csv", "old")], None);
        let mut manifest = Manifest::empty();
        manifest.generation = 1;
        let pending = Pending {
            manifest,
            swaps: vec![Swap {
                partition: "k=1".into(),
                staged: "_staging/r/p1".into(),
                marker: ".palisade-r".into(),
            }],
            removals: Vec::new(),
        };
        write_pending(dir, &dir.join("_staging/r"), &pending).unwrap();
        assert!(complete_pending(dir).unwrap());
        assert_eq!(
            listing(&dir.join("k=1")),
            vec![("new.csv".into(), "new".into())]
        );
        assert_eq!(
            std::fs::read_dir(dir.join("_staging/r")).unwrap().count(),
            0
        );
        assert!(!complete_pending(dir).unwrap(), "nothing pending any more");
    }

    /// Both paths (exchange and the two-rename fallback) swap, and are idempotent.
    #[test]
    fn swap_exchange_and_fallback() {
        for fallback in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            std::fs::create_dir_all(dir.join("_staging/r")).unwrap();
            version(dir, "k=1", &[("old.csv", "old")], None);
            version(
                dir,
                "_staging/r/p1",
                &[("new.csv", "new")],
                Some(".palisade-r"),
            );
            version(dir, "_staging/r/p2", &[("x.csv", "x")], Some(".palisade-r"));
            version(dir, "gone=1/sub=2", &[("g.csv", "g")], None);
            let mut manifest = Manifest::empty();
            manifest.generation = 1;
            let pending = Pending {
                manifest,
                swaps: vec![
                    Swap {
                        partition: "k=1".into(),
                        staged: "_staging/r/p1".into(),
                        marker: ".palisade-r".into(),
                    },
                    Swap {
                        partition: "a=1/b=2".into(),
                        staged: "_staging/r/p2".into(),
                        marker: ".palisade-r".into(),
                    },
                ],
                removals: vec![Removal {
                    partition: "gone=1/sub=2".into(),
                    aside: "_staging/r/r1".into(),
                }],
            };
            finish(dir, &pending, fallback).unwrap();
            assert_eq!(
                listing(&dir.join("k=1")),
                vec![("new.csv".into(), "new".into())]
            );
            assert_eq!(
                listing(&dir.join("a=1/b=2")),
                vec![("x.csv".into(), "x".into())]
            );
            assert!(!dir.join("gone=1").exists());
            assert!(!dir.join(PENDING_FILE).exists());
            assert_eq!(
                std::fs::read_dir(dir.join("_staging/r")).unwrap().count(),
                0
            );
            // Idempotent: finishing again changes nothing.
            finish(dir, &pending, fallback).unwrap();
            assert_eq!(
                listing(&dir.join("k=1")),
                vec![("new.csv".into(), "new".into())]
            );
        }
    }
}
