//! `palisade.publish`: make the dataset at DEST equal to a local directory, writing only the
//! partitions whose content changed, atomically for readers, fenced against older lock holders.
//!
//! A thin user of palisade-idempotency, like the `palisade publish` command: the crate's
//! `source` module finds the partitions in SRC and computes their identities (bytes or rows),
//! and its `PartitionedWriter` writes (content-hash skip, atomic manifest, fencing, retention).
//! Both use the same code, so a dataset published by the command and then by Python from the
//! same SRC (or the reverse) is unchanged the second time.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade_idempotency::source::{self, Content, Format, IdentityOptions, ScanOptions, Unit};
use palisade_idempotency::{PartitionedWriter, StoreOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors;
use crate::runtime::block_on;

/// Publishes the local directory `src` (Hive-style `key=value/` partition directories, as
/// Spark's `partitionBy` writes them) to `dest` (`file:///path`, `s3://bucket/prefix` with the
/// AWS_* environment variables, `memory://`), writing only the partitions whose content
/// changed, and returns the report `palisade publish --json` prints: src, dest, dry_run,
/// written, unchanged, removed, kept, bytes_written, bytes_hashed, generation, fencing_token,
/// seconds.
///
/// The options are the command's flags: `unit` ("dir" or "file"), `content` ("bytes" or
/// "rows"), `names` (bytes: file names count), `format` (rows: "auto", "parquet", "csv",
/// "jsonl"), `include`/`exclude` (globs on paths relative to SRC), `threads` (partitions hashed
/// at once). `fencing_token`: the lock holder's token (`Ran.fencing_token`,
/// `guard.fencing_token`); the commit is refused with `Fenced` if a higher token has committed.
/// `remove_missing`: remove committed partitions SRC no longer has. `retain`: seconds that
/// replaced versions are kept for readers still reading them. Names starting with `_` or `.`
/// and `*.crc` files are skipped.
#[pyfunction]
#[pyo3(signature = (src, dest, *, content="bytes", unit="dir", names=false, format="auto", include=Vec::new(), exclude=Vec::new(), threads=None, fencing_token=None, remove_missing=false, allow_unfenced=false, allow_empty=false, retain=3600.0, lock_timeout=30.0))]
#[allow(clippy::too_many_arguments)]
pub fn publish<'py>(
    py: Python<'py>,
    src: PathBuf,
    dest: String,
    content: &str,
    unit: &str,
    names: bool,
    format: &str,
    include: Vec<String>,
    exclude: Vec<String>,
    threads: Option<usize>,
    fencing_token: Option<u64>,
    remove_missing: bool,
    allow_unfenced: bool,
    allow_empty: bool,
    retain: f64,
    lock_timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let started = Instant::now();
    let bad = |e| errors::idempotency(py, e);
    let mut id_opts = IdentityOptions {
        content: content.parse::<Content>().map_err(bad)?,
        names,
        format: format.parse::<Format>().map_err(bad)?,
        ..IdentityOptions::default()
    };
    if let Some(n) = threads {
        id_opts.threads = n;
    }
    let scan_opts = ScanOptions {
        unit: unit.parse::<Unit>().map_err(bad)?,
        include,
        exclude,
    };
    let secs = |what: &str, s: f64| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| errors::config(py, format!("{what}: {s} is not a number of seconds >= 0")))
    };
    let (retain, lock_timeout) = (secs("retain", retain)?, secs("lock_timeout", lock_timeout)?);
    let options = StoreOptions::default().retry(3, Duration::from_secs(15));
    let store = palisade_idempotency::store_from_url_with(&dest, &options).map_err(bad)?;
    let src_for_scan = src.clone();
    let scanned = py.detach(move || {
        let parts = source::scan(&src_for_scan, &scan_opts)?;
        let hashed = AtomicU64::new(0);
        let ids = source::identities(&parts, &id_opts, &|n| {
            hashed.fetch_add(n, Ordering::Relaxed);
        })?;
        Ok::<_, palisade_idempotency::Error>((parts, ids, hashed.into_inner()))
    });
    let (parts, ids, bytes_hashed) = scanned.map_err(bad)?;
    if parts.is_empty() && !allow_empty {
        return Err(errors::config(
            py,
            format!(
                "SRC {} holds no data files (after skipping _*, .* and *.crc names and applying \
                 include/exclude); refusing to publish an empty dataset, pass allow_empty=True \
                 if that is intended",
                src.display()
            ),
        ));
    }
    let ours: BTreeSet<String> = parts.iter().map(|p| p.name.clone()).collect();
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
        for (partition, id) in parts.iter().zip(ids) {
            if let Err(e) = writer
                .put_files(&partition.name, partition.part_files(), id)
                .await
            {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
        Ok((writer.commit().await?, kept))
    })?;
    let (report, kept) = committed.map_err(bad)?;
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
