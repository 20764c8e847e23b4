//! `palisade.publish`: make the dataset at DEST equal to a local directory, writing only the
//! partitions whose content changed, atomically for readers, fenced against older lock holders.
//!
//! A thin user of palisade-idempotency, like the `palisade publish` command: the crate's
//! `source` module finds the partitions in SRC, computes their identities (bytes or rows),
//! plans (`source::plan`) and writes them (`source::write_all`) through its `PartitionedWriter`
//! (content-hash skip, atomic manifest, fencing, retention).
//! Both use the same code, so a dataset published by the command and then by Python from the
//! same SRC (or the reverse) is unchanged the second time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade_idempotency::source::{
    self, Content, Format, IdentityOptions, Plan, ScanOptions, Unit,
};
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
/// and `*.crc` files are skipped. `dry_run`: write nothing and return what would be done, as
/// `palisade publish --dry-run --json` does (the counts of the plan, the base generation, and
/// `plan`: `items` with partition, action, files, bytes; `removed`; `kept`).
#[pyfunction]
#[pyo3(signature = (src, dest, *, content="bytes", unit="dir", names=false, format="auto", include=Vec::new(), exclude=Vec::new(), threads=None, fencing_token=None, remove_missing=false, allow_unfenced=false, allow_empty=false, retain=3600.0, lock_timeout=30.0, dry_run=false))]
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
    dry_run: bool,
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
    let (plan, report, base_generation) = block_on(py, async move {
        let mut builder = PartitionedWriter::builder(&store, "")
            .allow_unfenced(allow_unfenced)
            .remove_missing(remove_missing)
            .retain(retain)
            .lock_timeout(lock_timeout);
        if let Some(token) = fencing_token {
            builder = builder.fencing_token(token);
        }
        let writer = builder.open().await?;
        let plan = source::plan(&parts, &ids, writer.manifest(), remove_missing);
        let base_generation = writer.manifest().generation;
        if dry_run {
            writer.abort().await?;
            return Ok((plan, None, base_generation));
        }
        let report = source::write_all(writer, &parts, &ids, &mut |_| {}).await?;
        Ok::<_, palisade_idempotency::Error>((plan, Some(report), base_generation))
    })?
    .map_err(bad)?;
    let d = PyDict::new(py);
    d.set_item("src", src.display().to_string())?;
    d.set_item("dest", &dest)?;
    d.set_item("dry_run", dry_run)?;
    match report {
        Some(report) => {
            d.set_item("written", report.written)?;
            d.set_item("unchanged", report.unchanged.len())?;
            d.set_item("removed", report.removed)?;
            d.set_item("kept", &plan.kept)?;
            d.set_item("bytes_written", report.bytes_written)?;
            d.set_item("generation", report.generation)?;
        }
        None => {
            d.set_item("written", plan.written())?;
            d.set_item("unchanged", plan.unchanged())?;
            d.set_item("removed", &plan.removed)?;
            d.set_item("kept", &plan.kept)?;
            d.set_item("bytes_written", plan.bytes_to_write())?;
            d.set_item("generation", base_generation)?;
        }
    }
    d.set_item("bytes_hashed", bytes_hashed)?;
    d.set_item("fencing_token", fencing_token)?;
    d.set_item("seconds", started.elapsed().as_secs_f64())?;
    if dry_run {
        d.set_item("plan", plan_dict(py, &plan)?)?;
    }
    Ok(d)
}

/// The plan as `palisade publish --dry-run --json` prints it: `items` (partition, action,
/// files, bytes), `removed`, `kept`.
fn plan_dict<'py>(py: Python<'py>, plan: &Plan) -> PyResult<Bound<'py, PyDict>> {
    let items = plan
        .items
        .iter()
        .map(|item| {
            let i = PyDict::new(py);
            i.set_item("partition", &item.partition)?;
            i.set_item("action", item.action.as_str())?;
            i.set_item("files", item.files)?;
            i.set_item("bytes", item.bytes)?;
            Ok(i)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let d = PyDict::new(py);
    d.set_item("items", items)?;
    d.set_item("removed", &plan.removed)?;
    d.set_item("kept", &plan.kept)?;
    Ok(d)
}
