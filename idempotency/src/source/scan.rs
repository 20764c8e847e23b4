//! Scanning SRC into partitions: Hive-style `key=value/` directories (nested keys allowed), or
//! one partition per file ([`Unit::File`], `--unit file`).
//!
//! Skipped always: any path segment that starts with `_` or `.` (Hive and Spark readers treat
//! those as hidden: Spark's `_SUCCESS`, `_temporary/`, `_committed_*`, and Hadoop's `.*.crc`
//! checksums), and files ending in `.crc`. Then `--include` globs (if any) must match and
//! `--exclude` globs must not; globs match the path relative to SRC, `*` stays within one path
//! segment and `**` crosses them.
//!
//! Errors are [`Error::Source`](crate::Error::Source), one line naming the file.

use super::source_error;
use crate::{PartFile, Result};
use globset::{GlobSet, GlobSetBuilder};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What one partition is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Unit {
    /// A Hive-style directory: the leading `key=value` directories of a file's path.
    #[default]
    Dir,
    /// Every file on its own (it becomes the partition `<path>/` holding that file).
    File,
}

impl FromStr for Unit {
    type Err = crate::Error;

    /// `"dir"` or `"file"`.
    fn from_str(s: &str) -> Result<Unit> {
        match s {
            "dir" => Ok(Unit::Dir),
            "file" => Ok(Unit::File),
            other => Err(source_error(format!(
                "unit {other:?}: expected \"dir\" or \"file\""
            ))),
        }
    }
}

/// One file of SRC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrcFile {
    /// The path relative to the partition directory (`/`-separated).
    pub name: String,
    /// Where it is on disk.
    pub path: PathBuf,
    /// Its size when scanned.
    pub size: u64,
}

/// One partition of SRC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The partition name (its path relative to SRC and DEST), e.g. `date=2024-01-01/region=eu`.
    pub name: String,
    /// Its files, sorted by name.
    pub files: Vec<SrcFile>,
}

impl Partition {
    /// The total size of its files.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Its files as [`PartitionedWriter::put_files`](crate::PartitionedWriter::put_files) takes them: each file's
    /// name in the partition directory and its path on disk.
    pub fn part_files(&self) -> Vec<PartFile> {
        self.files
            .iter()
            .map(|f| PartFile::new(f.name.clone(), f.path.clone()))
            .collect()
    }
}

/// The scan's options (the default: Hive-style directories, every file).
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Directory or file partitions.
    pub unit: Unit,
    /// Globs a file must match one of (none: every file).
    pub include: Vec<String>,
    /// Globs that skip a file.
    pub exclude: Vec<String>,
}

/// A scan error's message, as the crate's error.
struct ScanError(String);

impl From<ScanError> for crate::Error {
    fn from(e: ScanError) -> crate::Error {
        source_error(e.0)
    }
}

fn globset(globs: &[String], flag: &str) -> Result<Option<GlobSet>, ScanError> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for g in globs {
        let glob = globset::GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map_err(|e| ScanError(format!("{flag} {g:?}: {e}")))?;
        builder.add(glob);
    }
    builder
        .build()
        .map(Some)
        .map_err(|e| ScanError(format!("{flag}: {e}")))
}

/// Whether a path segment is hidden by default (see the module docs).
fn skipped_by_default(segment: &str) -> bool {
    segment.starts_with('_') || segment.starts_with('.') || segment.ends_with(".crc")
}

/// Whether a directory name is a Hive-style `key=value` segment.
fn is_hive(segment: &str) -> bool {
    matches!(segment.split_once('='), Some((k, _)) if !k.is_empty())
}

/// Lists the partitions of `src`, sorted by name, each with its files sorted by name.
///
/// Refused (with the file named): a file outside any `key=value/` directory with
/// [`Unit::Dir`], a partition holding files beside a nested partition, a symlink that leads
/// outside `src` or to a directory, a name that is not UTF-8 or not a valid partition path.
pub fn scan(src: &Path, opts: &ScanOptions) -> Result<Vec<Partition>> {
    Ok(scan_inner(src, opts)?)
}

fn scan_inner(src: &Path, opts: &ScanOptions) -> Result<Vec<Partition>, ScanError> {
    let meta = std::fs::metadata(src)
        .map_err(|e| ScanError(format!("cannot read SRC {}: {e}", src.display())))?;
    if !meta.is_dir() {
        return Err(ScanError(format!(
            "SRC {} is not a directory",
            src.display()
        )));
    }
    let root = src
        .canonicalize()
        .map_err(|e| ScanError(format!("cannot resolve SRC {}: {e}", src.display())))?;
    let include = globset(&opts.include, "--include")?;
    let exclude = globset(&opts.exclude, "--exclude")?;

    let mut files: Vec<(String, PathBuf, u64)> = Vec::new();
    walk(&root, &root, &mut Vec::new(), &mut files)?;
    let mut partitions: BTreeMap<String, Vec<SrcFile>> = BTreeMap::new();
    for (rel, path, size) in files {
        if include.as_ref().is_some_and(|g| !g.is_match(&rel)) {
            continue;
        }
        if exclude.as_ref().is_some_and(|g| g.is_match(&rel)) {
            continue;
        }
        let segments: Vec<&str> = rel.split('/').collect();
        let (partition, name) = match opts.unit {
            Unit::File => {
                let file = segments.last().copied().unwrap_or_default();
                (rel.clone(), file.to_string())
            }
            Unit::Dir => {
                let dirs = &segments[..segments.len() - 1];
                let depth = dirs.iter().take_while(|s| is_hive(s)).count();
                if depth == 0 {
                    return Err(ScanError(format!(
                        "{} is not inside a Hive-style `key=value/` partition directory; \
                         publish one partition per file with --unit file, or skip it with \
                         --exclude",
                        path.display()
                    )));
                }
                (segments[..depth].join("/"), segments[depth..].join("/"))
            }
        };
        crate::validate_partition(&partition)
            .map_err(|e| ScanError(format!("{}: bad partition path: {e}", path.display())))?;
        partitions
            .entry(partition)
            .or_default()
            .push(SrcFile { name, path, size });
    }
    // A partition directory inside another one would be swapped out with its parent.
    let names: Vec<&String> = partitions.keys().collect();
    for pair in names.windows(2) {
        if let Some(rest) = pair[1].strip_prefix(pair[0].as_str())
            && rest.starts_with('/')
        {
            let file = &partitions[pair[0]][0];
            return Err(ScanError(format!(
                "{}: partition {:?} holds files and also the nested partition {:?}; put the \
                 files into their own `key=value/` directory or --exclude them",
                file.path.display(),
                pair[0],
                pair[1]
            )));
        }
    }
    Ok(partitions
        .into_iter()
        .map(|(name, mut files)| {
            files.sort_by(|a, b| a.name.cmp(&b.name));
            Partition { name, files }
        })
        .collect())
}

/// Collects every regular file under `dir`, not following symlinked directories, refusing
/// symlinks that lead outside `root`.
fn walk(
    root: &Path,
    dir: &Path,
    rel: &mut Vec<String>,
    out: &mut Vec<(String, PathBuf, u64)>,
) -> Result<(), ScanError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ScanError(format!("cannot list {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| ScanError(format!("cannot list {}: {e}", dir.display())))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(ScanError(format!(
                "{}: the name is not valid UTF-8",
                path.display()
            )));
        };
        if skipped_by_default(&name) {
            continue;
        }
        let ft = entry
            .file_type()
            .map_err(|e| ScanError(format!("cannot stat {}: {e}", path.display())))?;
        let (is_dir, size) = if ft.is_symlink() {
            let target = path.canonicalize().map_err(|e| {
                ScanError(format!(
                    "{}: cannot resolve the symlink: {e}",
                    path.display()
                ))
            })?;
            if !target.starts_with(root) {
                return Err(ScanError(format!(
                    "{} is a symlink that leads outside SRC (to {}); refusing to publish it",
                    path.display(),
                    target.display()
                )));
            }
            let meta = std::fs::metadata(&target)
                .map_err(|e| ScanError(format!("cannot stat {}: {e}", path.display())))?;
            if meta.is_dir() {
                return Err(ScanError(format!(
                    "{} is a symlink to a directory; symlinked directories are not followed",
                    path.display()
                )));
            }
            (false, meta.len())
        } else if ft.is_dir() {
            (true, 0)
        } else if ft.is_file() {
            let meta = entry
                .metadata()
                .map_err(|e| ScanError(format!("cannot stat {}: {e}", path.display())))?;
            (false, meta.len())
        } else {
            return Err(ScanError(format!(
                "{} is not a regular file or directory",
                path.display()
            )));
        };
        rel.push(name);
        if is_dir {
            walk(root, &path, rel, out)?;
        } else {
            out.push((rel.join("/"), path, size));
        }
        rel.pop();
    }
    Ok(())
}
