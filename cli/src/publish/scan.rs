//! Scanning SRC into partitions: Hive-style `key=value/` directories (nested keys allowed), or
//! one partition per file with `--unit file`.
//!
//! Skipped always: any path segment that starts with `_` or `.` (Hive and Spark readers treat
//! those as hidden: Spark's `_SUCCESS`, `_temporary/`, `_committed_*`, and Hadoop's `.*.crc`
//! checksums), and files ending in `.crc`. Then `--include` globs (if any) must match and
//! `--exclude` globs must not; globs match the path relative to SRC, `*` stays within one path
//! segment and `**` crosses them.

use globset::{GlobSet, GlobSetBuilder};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What one partition is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unit {
    /// A Hive-style directory: the leading `key=value` directories of a file's path.
    Dir,
    /// Every file on its own.
    File,
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
}

/// A scan that failed: the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScanError(pub String);

/// The scan's options.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Directory or file partitions.
    pub unit: Unit,
    /// Globs a file must match one of (none: every file).
    pub include: Vec<String>,
    /// Globs that skip a file.
    pub exclude: Vec<String>,
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

/// Lists the partitions of `src`, sorted by name.
pub fn scan(src: &Path, opts: &ScanOptions) -> Result<Vec<Partition>, ScanError> {
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
        palisade_idempotency::validate_partition(&partition)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, f.as_bytes()).unwrap();
        }
        dir
    }

    fn opts(unit: Unit) -> ScanOptions {
        ScanOptions {
            unit,
            include: vec![],
            exclude: vec![],
        }
    }

    fn names(parts: &[Partition]) -> Vec<(String, Vec<String>)> {
        parts
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.files.iter().map(|f| f.name.clone()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn hive_directories_nested_and_spark_leftovers_skipped() {
        let d = tree(&[
            "_SUCCESS",
            "date=1/part-0.csv",
            "date=1/.part-0.csv.crc",
            "date=1/sub/part-1.csv",
            "date=2/region=eu/part-0.csv",
            "date=2/region=us/part-0.csv",
            "_temporary/0/date=3/part-9.csv",
            "date=4/_committed_1",
        ]);
        let parts = scan(d.path(), &opts(Unit::Dir)).unwrap();
        assert_eq!(
            names(&parts),
            vec![
                (
                    "date=1".into(),
                    vec!["part-0.csv".into(), "sub/part-1.csv".into()]
                ),
                ("date=2/region=eu".into(), vec!["part-0.csv".into()]),
                ("date=2/region=us".into(), vec!["part-0.csv".into()]),
            ]
        );
        assert_eq!(
            parts[0].size(),
            "date=1/part-0.csvdate=1/sub/part-1.csv".len() as u64
        );
    }

    #[test]
    fn file_units() {
        let d = tree(&["a.csv", "date=1/b.csv", "x.crc"]);
        let parts = scan(d.path(), &opts(Unit::File)).unwrap();
        assert_eq!(
            names(&parts),
            vec![
                ("a.csv".into(), vec!["a.csv".into()]),
                ("date=1/b.csv".into(), vec!["b.csv".into()]),
            ]
        );
    }

    #[test]
    fn include_and_exclude_globs() {
        let d = tree(&[
            "d=1/a.parquet",
            "d=1/a.json",
            "d=2/b.parquet",
            "d=3/c.parquet",
        ]);
        let o = ScanOptions {
            unit: Unit::Dir,
            include: vec!["**/*.parquet".into()],
            exclude: vec!["d=3/*".into()],
        };
        let parts = scan(d.path(), &o).unwrap();
        assert_eq!(
            names(&parts),
            vec![
                ("d=1".into(), vec!["a.parquet".into()]),
                ("d=2".into(), vec!["b.parquet".into()]),
            ]
        );
        let bad = ScanOptions {
            unit: Unit::Dir,
            include: vec!["[".into()],
            exclude: vec![],
        };
        assert!(scan(d.path(), &bad).unwrap_err().0.contains("--include"));
    }

    #[test]
    fn bad_inputs_name_the_file() {
        let missing = scan(Path::new("/nonexistent/src"), &opts(Unit::Dir)).unwrap_err();
        assert!(missing.0.contains("/nonexistent/src"), "{missing}");

        let d = tree(&["loose.csv"]);
        let e = scan(d.path(), &opts(Unit::Dir)).unwrap_err();
        assert!(
            e.0.contains("loose.csv") && e.0.contains("--unit file"),
            "{e}"
        );

        let d = tree(&["d=1/a.csv", "d=1/e=2/b.csv"]);
        let e = scan(d.path(), &opts(Unit::Dir)).unwrap_err();
        assert!(e.0.contains("nested"), "{e}");

        let d = tree(&["d=1/a.csv"]);
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("d=1/link"))
            .unwrap();
        let e = scan(d.path(), &opts(Unit::Dir)).unwrap_err();
        assert!(e.0.contains("outside SRC") && e.0.contains("link"), "{e}");
    }
}
