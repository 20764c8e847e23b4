//! `palisade.publish`: make the dataset at DEST equal to a local directory, writing only the
//! partitions whose content changed, atomically for readers, fenced against older lock holders.
//!
//! The writing is palisade-idempotency's `PartitionedWriter` (content-hash skip, atomic
//! manifest, fencing, retention). What the `palisade publish` command adds around it (finding
//! the partitions in SRC, computing their identities, rows mode) lives in the CLI crate, not in
//! a library; this module has the smallest version of the first two that the writer needs:
//! Hive-style `key=value/` directories, identities from the bytes of their files. Its
//! identities differ from the CLI's, so switching a dataset between the two rewrites each
//! partition once (never less safely: the writer decides what is committed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use palisade_idempotency::{ContentHash, PartFile, PartitionedWriter, StoreOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors;
use crate::runtime::block_on;

/// Tags this module's identities, so that they never equal another scheme's.
const IDENTITY_TAG: &[u8] = b"palisade-python publish bytes v1\0";

/// Whether a file or directory name is skipped: Spark's `_SUCCESS`, `_temporary/`, `.*.crc`.
fn skipped(name: &str) -> bool {
    name.starts_with('_') || name.starts_with('.') || name.ends_with(".crc")
}

/// SRC's data files by partition (the directory that holds them, relative to SRC, with `/`).
fn scan(src: &Path) -> Result<BTreeMap<String, Vec<(String, PathBuf)>>, String> {
    let mut out: BTreeMap<String, Vec<(String, PathBuf)>> = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let here = src.join(&rel);
        let entries = std::fs::read_dir(&here).map_err(|e| format!("{}: {e}", here.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", here.display()))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| format!("{}: the name {n:?} is not UTF-8", here.display()))?;
            if skipped(&name) {
                continue;
            }
            let kind = entry
                .file_type()
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            if kind.is_dir() {
                dirs.push(rel.join(&name));
            } else if kind.is_file() {
                if rel.as_os_str().is_empty() {
                    return Err(format!(
                        "{} is a data file at the top of SRC; publish takes Hive-style \
                         partition directories (SRC/key=value/part-0.parquet)",
                        entry.path().display()
                    ));
                }
                let partition = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.entry(partition).or_default().push((name, entry.path()));
            }
        }
    }
    Ok(out)
}

/// A partition's identity: BLAKE3 over its files' sorted content hashes (file names and order
/// do not count: Spark names part files anew on every run); the bytes read.
fn identity(files: &[(String, PathBuf)]) -> Result<(ContentHash, u64), String> {
    let mut hashes = Vec::with_capacity(files.len());
    let mut bytes = 0;
    for (_, path) in files {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (hash, size) = ContentHash::of_reader(file, |_| Ok(()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        hashes.push(*hash.as_bytes());
        bytes += size;
    }
    hashes.sort_unstable();
    let mut all = IDENTITY_TAG.to_vec();
    for h in &hashes {
        all.extend_from_slice(h);
    }
    Ok((ContentHash::of_bytes(&all), bytes))
}

/// Publishes the local directory `src` (Hive-style `key=value/` partition directories, as
/// Spark's `partitionBy` writes them) to `dest` (`file:///path`, `s3://bucket/prefix` with the
/// AWS_* environment variables, `memory://`), writing only the partitions whose bytes changed,
/// and returns the report `palisade publish --json` prints: src, dest, dry_run, written,
/// unchanged, removed, kept, bytes_written, bytes_hashed, generation, fencing_token, seconds.
///
/// `fencing_token`: the lock holder's token (`Ran.fencing_token`, `guard.fencing_token`); the
/// commit is refused with `Fenced` if a higher token has committed. `remove_missing`: remove
/// committed partitions SRC no longer has. `retain`: seconds that replaced versions are kept
/// for readers still reading them. Names starting with `_` or `.` and `*.crc` files are
/// skipped. `content="rows"` (identity from the rows, as the CLI computes it) is not available
/// from Python yet.
#[pyfunction]
#[pyo3(signature = (src, dest, *, content="bytes", fencing_token=None, remove_missing=false, allow_unfenced=false, allow_empty=false, retain=3600.0, lock_timeout=30.0))]
#[allow(clippy::too_many_arguments)]
pub fn publish<'py>(
    py: Python<'py>,
    src: PathBuf,
    dest: String,
    content: &str,
    fencing_token: Option<u64>,
    remove_missing: bool,
    allow_unfenced: bool,
    allow_empty: bool,
    retain: f64,
    lock_timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let started = Instant::now();
    match content {
        "bytes" => {}
        "rows" => {
            return Err(errors::config(
                py,
                "content=\"rows\" is not available from Python yet (the row readers are part of \
                 the palisade command, not of a library); use content=\"bytes\" or the command \
                 `palisade publish --content rows`",
            ));
        }
        other => {
            return Err(errors::config(
                py,
                format!("content={other:?}: expected \"bytes\" or \"rows\""),
            ));
        }
    }
    let secs = |what: &str, s: f64| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| errors::config(py, format!("{what}: {s} is not a number of seconds >= 0")))
    };
    let (retain, lock_timeout) = (secs("retain", retain)?, secs("lock_timeout", lock_timeout)?);
    let options = StoreOptions::default().retry(3, Duration::from_secs(15));
    let store = palisade_idempotency::store_from_url_with(&dest, &options)
        .map_err(|e| errors::idempotency(py, e))?;
    let src_for_scan = src.clone();
    let scanned = py.detach(move || {
        let parts = scan(&src_for_scan)?;
        let mut hashed = 0;
        let mut ids = Vec::with_capacity(parts.len());
        for files in parts.values() {
            let (id, bytes) = identity(files)?;
            ids.push(id);
            hashed += bytes;
        }
        Ok::<_, String>((parts, ids, hashed))
    });
    let (parts, ids, bytes_hashed) =
        scanned.map_err(|e| errors::config(py, format!("SRC {}: {e}", src.display())))?;
    if parts.is_empty() && !allow_empty {
        return Err(errors::config(
            py,
            format!(
                "SRC {} holds no data files (after skipping _*, .* and *.crc names); refusing \
                 to publish an empty dataset, pass allow_empty=True if that is intended",
                src.display()
            ),
        ));
    }
    let ours: BTreeSet<String> = parts.keys().cloned().collect();
    let committed = block_on(py, async move {
        let mut builder = PartitionedWriter::builder(&store, "")
            .allow_unfenced(allow_unfenced)
            .remove_missing(remove_missing)
            .retain(retain)
            .lock_timeout(lock_timeout);
        if let Some(token) = fencing_token {
            builder = builder.fencing_token(token);
        }
        let mut writer = builder.open().await?;
        let kept: Vec<String> = if remove_missing {
            Vec::new()
        } else {
            writer
                .manifest()
                .partitions
                .keys()
                .filter(|p| !ours.contains(*p))
                .cloned()
                .collect()
        };
        for ((name, files), id) in parts.iter().zip(ids) {
            let files = files
                .iter()
                .map(|(n, path)| PartFile::new(n.clone(), path.clone()))
                .collect();
            if let Err(e) = writer.put_files(name, files, id).await {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
        Ok((writer.commit().await?, kept))
    })?;
    let (report, kept) = committed.map_err(|e| errors::idempotency(py, e))?;
    let d = PyDict::new(py);
    d.set_item("src", src.display().to_string())?;
    d.set_item("dest", &dest)?;
    d.set_item("dry_run", false)?;
    d.set_item("written", report.written)?;
    d.set_item("unchanged", report.unchanged.len())?;
    d.set_item("removed", report.removed)?;
    d.set_item("kept", kept)?;
    d.set_item("bytes_written", report.bytes_written)?;
    d.set_item("bytes_hashed", bytes_hashed)?;
    d.set_item("generation", report.generation)?;
    d.set_item("fencing_token", fencing_token)?;
    d.set_item("seconds", started.elapsed().as_secs_f64())?;
    Ok(d)
}
