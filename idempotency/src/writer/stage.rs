//! Validating and staging the files of a multi-file partition on a local directory.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::error::{Error, Result, io};
use crate::hash::ContentHash;
use crate::partition::validate_partition;
use crate::storage::write_unsynced;

use super::PartFile;
use super::local::copy_hashing;

/// Checks the files of a multi-file partition: at least one, valid and distinct names, and no
/// name that is a directory of another.
pub(crate) fn check_part_files(partition: &str, files: &[PartFile]) -> Result<()> {
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
pub(crate) fn stage_dir(
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
