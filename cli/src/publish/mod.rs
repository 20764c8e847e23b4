//! `palisade publish SRC DEST` and `palisade manifest DEST`: make the dataset at DEST equal to a
//! local directory that any job wrote, writing only the partitions whose content changed,
//! atomically for readers, fenced against older lock holders.
//!
//! The steps: [`scan`] SRC into partitions, compute each partition's [`identity`] (bytes or
//! rows), compare with the manifest ([`plan`]), then hand every partition to
//! palisade-idempotency's `PartitionedWriter::put_files` (which writes only those whose identity
//! changed) and commit. Everything a reader sees changes at the commit, or not at all.

pub mod identity;
pub mod output;
pub mod plan;
pub mod rows;
pub mod scan;

use crate::exit::{BAD_INPUT, CONFIG, CONFLICT, CliError, FENCED, INTERNAL, UNAVAILABLE, chain};
use clap::Args;
use identity::{Content, IdentityOptions};
use palisade_idempotency::{Dataset, DatasetStore, Error, PartitionedWriter};
use rows::Format;
use scan::{ScanOptions, Unit};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Flags of `palisade publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The local directory a job wrote (Spark's, pandas', dbt's output directory).
    #[arg(value_name = "SRC")]
    pub src: PathBuf,

    /// The dataset: file:///path, s3://bucket/prefix (credentials, region and endpoint from the
    /// AWS_* environment variables), gs://bucket/prefix and az://container/prefix (with the
    /// `gcp`/`azure` features; GOOGLE_*/AZURE_* variables), memory:// (tests).
    #[arg(value_name = "DEST")]
    pub dest: String,

    /// What one partition is: a Hive-style `key=value/` directory (nested keys allowed), or
    /// every file on its own (it becomes the directory DEST/<path>/ holding that file).
    #[arg(long, value_enum, default_value = "dir")]
    pub unit: Unit,

    /// What decides that a partition changed: the bytes of its files (names and order do not
    /// count), or the rows of its Parquet/CSV/JSON-lines files (order and split do not count).
    #[arg(long, value_enum, default_value = "bytes")]
    pub content: Content,

    /// With --content bytes: file names count too (a renamed file is a change).
    #[arg(long)]
    pub names: bool,

    /// With --content rows: the files' format (auto: by extension).
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,

    /// Publish only files whose path relative to SRC matches one of these globs (`*` stays in
    /// one directory, `**` crosses them), e.g. `**/*.parquet`.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Skip files whose path relative to SRC matches this glob. Names starting with `_` or `.`
    /// (Spark's _SUCCESS, _temporary/, .*.crc) and *.crc files are always skipped.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// Remove the committed partitions that SRC no longer has (default: keep them).
    #[arg(long)]
    pub remove_missing: bool,

    /// Accept a SRC without any data file (with --remove-missing this empties DEST). By
    /// default an empty SRC is refused (exit 66): it is usually a job that wrote nothing.
    #[arg(long)]
    pub allow_empty: bool,

    /// Print the plan (what would be written and removed) and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// The lock holder's fencing token (`palisade run --lock` sets PALISADE_FENCING_TOKEN):
    /// the commit is refused (exit 77) if a higher token has already committed.
    /// An empty PALISADE_FENCING_TOKEN counts as none.
    #[arg(long, env = "PALISADE_FENCING_TOKEN", value_name = "TOKEN")]
    pub fencing_token: Option<String>,

    /// Commit without a fencing token to a dataset that records one (default: refused).
    #[arg(long)]
    pub allow_unfenced: bool,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// How long to wait for another publish's commit on a local DEST.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", value_name = "DURATION")]
    pub lock_timeout: Duration,

    /// Partitions hashed at once (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Flags of `palisade manifest`.
#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// The dataset (as for `publish`).
    #[arg(value_name = "DEST")]
    pub dest: String,

    /// Print one JSON object (generation, fencing token, partitions and their files).
    #[arg(long)]
    pub json: bool,
}

/// Opens DEST. `s3://` is configured from the standard AWS_* environment variables
/// (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP...),
/// `gs://` and `az://` (features `gcp`, `azure`) from GOOGLE_*/AZURE_* ones; everything else
/// goes through `palisade_idempotency::store_from_url`.
pub fn open_store(dest: &str) -> Result<DatasetStore, CliError> {
    if let Some(rest) = dest
        .strip_prefix("s3://")
        .or_else(|| dest.strip_prefix("s3a://"))
    {
        let (bucket, base) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(CliError::config(format!("DEST {dest:?}: no bucket")));
        }
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry_config())
            .build()
            .map_err(|e| CliError::config(format!("DEST {dest:?}: {e}")))?;
        return object_dataset(dest, Arc::new(store), base);
    }
    #[cfg(feature = "gcp")]
    if let Some(rest) = dest.strip_prefix("gs://") {
        let base = rest.split_once('/').map_or("", |(_, b)| b);
        let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_url(dest)
            .with_retry(retry_config())
            .build()
            .map_err(|e| CliError::config(format!("DEST {dest:?}: {e}")))?;
        return object_dataset(dest, Arc::new(store), base);
    }
    #[cfg(feature = "azure")]
    if let Some(rest) = dest.strip_prefix("az://") {
        let base = rest.split_once('/').map_or("", |(_, b)| b);
        let store = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_url(dest)
            .with_retry(retry_config())
            .build()
            .map_err(|e| CliError::config(format!("DEST {dest:?}: {e}")))?;
        return object_dataset(dest, Arc::new(store), base);
    }
    palisade_idempotency::store_from_url(dest).map_err(|e| CliError::config(chain(&e)))
}

/// A few retries within 15 s: an unreachable endpoint fails the publish in seconds instead of
/// after object_store's default 3 minutes.
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(15),
        ..Default::default()
    }
}

fn object_dataset(
    dest: &str,
    store: Arc<dyn object_store::ObjectStore>,
    base: &str,
) -> Result<DatasetStore, CliError> {
    DatasetStore::object_store(store, base.trim_matches('/'))
        .map_err(|e| CliError::config(format!("DEST {dest:?}: {}", chain(&e))))
}

/// Maps a writer error to the exit code and a one-line message.
fn to_cli(error: Error, src: &Path) -> CliError {
    let code = match &error {
        Error::Fenced { .. } | Error::FencingTokenRequired { .. } => FENCED,
        Error::Conflict { .. } | Error::LockTimeout { .. } => CONFLICT,
        Error::InvalidPartition { .. } | Error::Input { .. } => BAD_INPUT,
        Error::Io { path, .. } if path.starts_with(src) => BAD_INPUT,
        Error::Io { .. } | Error::Store { .. } => UNAVAILABLE,
        Error::UnsupportedUrl { .. } | Error::Config { .. } => CONFIG,
        _ => INTERNAL,
    };
    CliError::new(code, chain(&error))
}

/// Runs `palisade publish` and returns the exit code.
pub async fn publish(args: PublishArgs) -> Result<u8, CliError> {
    let started = Instant::now();
    let fencing_token: Option<u64> = match args.fencing_token.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(t) => Some(t.parse().map_err(|_| {
            CliError::config(format!(
                "--fencing-token / PALISADE_FENCING_TOKEN {t:?}: expected a non-negative integer"
            ))
        })?),
    };
    let store = open_store(&args.dest)?;
    let scan_opts = ScanOptions {
        unit: args.unit,
        include: args.include.clone(),
        exclude: args.exclude.clone(),
    };
    let src = args.src.clone();
    let partitions = tokio::task::spawn_blocking(move || scan::scan(&src, &scan_opts))
        .await
        .map_err(|e| CliError::new(INTERNAL, e.to_string()))?
        .map_err(|e| CliError::new(BAD_INPUT, e.0))?;
    if partitions.is_empty() && !args.allow_empty {
        return Err(CliError::new(
            BAD_INPUT,
            format!(
                "SRC {} holds no data files (after skipping _*, .* and *.crc names and applying \
                 --include/--exclude); refusing to publish an empty dataset, pass --allow-empty \
                 if that is intended",
                args.src.display()
            ),
        ));
    }
    let src_root = args.src.canonicalize().unwrap_or_else(|_| args.src.clone());

    // Open first: an unreachable DEST or a fenced token fails before any hashing.
    let mut builder = PartitionedWriter::builder(&store, "")
        .allow_unfenced(args.allow_unfenced)
        .remove_missing(args.remove_missing)
        .lock_timeout(args.lock_timeout);
    if let Some(token) = fencing_token {
        builder = builder.fencing_token(token);
    }
    let writer = builder.open().await.map_err(|e| to_cli(e, &src_root))?;

    let id_opts = IdentityOptions {
        content: args.content,
        names: args.names,
        format: args.format,
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
        }),
    };
    let total: u64 = partitions.iter().map(scan::Partition::size).sum();
    let bar = output::bar(total, "hashing", true);
    let hashed = Arc::new(AtomicU64::new(0));
    let hashing = {
        let (bar, hashed) = (bar.clone(), hashed.clone());
        tokio::task::spawn_blocking(move || {
            let on_bytes = |n: u64| {
                bar.inc(n);
                hashed.fetch_add(n, Ordering::Relaxed);
            };
            let ids = identity::identities(&partitions, &id_opts, &on_bytes);
            ids.map(|ids| (partitions, ids))
        })
        .await
        .map_err(|e| CliError::new(INTERNAL, e.to_string()))
        .and_then(|r| r.map_err(|e| CliError::new(BAD_INPUT, e)))
    };
    let (parts, ids) = match hashing {
        Ok(v) => v,
        Err(e) => {
            bar.finish_and_clear();
            // Nothing was staged yet; drop this run's staging area now rather than at the next open.
            let _ = writer.abort().await;
            return Err(e);
        }
    };
    bar.finish_and_clear();
    let bytes_hashed = hashed.load(Ordering::Relaxed);
    let the_plan = plan::plan(&parts, &ids, writer.manifest(), args.remove_missing);

    let mut summary = output::Summary {
        src: args.src.display().to_string(),
        dest: args.dest.clone(),
        dry_run: args.dry_run,
        written: the_plan.writes().map(|i| i.partition.clone()).collect(),
        unchanged: the_plan.items.len() - the_plan.writes().count(),
        removed: the_plan.removed.clone(),
        kept: the_plan.kept.clone(),
        bytes_written: the_plan.writes().map(|i| i.bytes).sum(),
        bytes_hashed,
        generation: writer.manifest().generation,
        fencing_token,
        seconds: 0.0,
        plan: None,
    };
    if args.dry_run {
        writer.abort().await.map_err(|e| to_cli(e, &src_root))?;
        summary.plan = Some(the_plan);
    } else {
        let report = write::write_all(writer, &parts, &ids, the_plan.writes().count())
            .await
            .map_err(|e| to_cli(e, &src_root))?;
        summary.written = report.written;
        summary.unchanged = report.unchanged.len();
        summary.removed = report.removed;
        summary.bytes_written = report.bytes_written;
        summary.generation = report.generation;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).map_err(|e| CliError::new(INTERNAL, e.to_string()))?
        );
    } else {
        print!("{}", summary.table());
    }
    Ok(0)
}

mod write {
    //! The write step: every partition goes to `put_files`, which writes only changed ones.

    use super::output;
    use super::scan::Partition;
    use palisade_idempotency::{ContentHash, PartitionedWriter, Report, Result};

    pub async fn write_all(
        mut writer: PartitionedWriter,
        parts: &[Partition],
        ids: &[ContentHash],
        expected_writes: usize,
    ) -> Result<Report> {
        let bar = output::bar(expected_writes as u64, "writing", false);
        for (p, id) in parts.iter().zip(ids) {
            let files = p
                .files
                .iter()
                .map(|f| palisade_idempotency::PartFile {
                    name: f.name.clone(),
                    path: f.path.clone(),
                })
                .collect();
            match writer.put_files(&p.name, files, *id).await {
                Ok(true) => bar.inc(1),
                Ok(false) => {}
                Err(e) => {
                    bar.finish_and_clear();
                    let _ = writer.abort().await;
                    return Err(e);
                }
            }
        }
        bar.set_message("committing");
        let report = writer.commit().await;
        bar.finish_and_clear();
        report
    }
}

/// Runs `palisade manifest` and returns the exit code.
pub async fn manifest(args: ManifestArgs) -> Result<u8, CliError> {
    let store = open_store(&args.dest)?;
    let dataset = Dataset::open(&store, "")
        .await
        .map_err(|e| to_cli(e, Path::new("/nonexistent")))?;
    if dataset.manifest().is_none() {
        eprintln!(
            "palisade: no dataset at {} yet (nothing was ever published)",
            args.dest
        );
    }
    let files = dataset.live_files();
    let base = args.dest.trim_end_matches('/');
    let shown = |rel: &str| match base.strip_prefix("file://") {
        Some(path) => format!("{path}/{rel}"),
        None => format!("{base}/{rel}"),
    };
    if args.json {
        let m = dataset.manifest();
        let value = serde_json::json!({
            "dest": args.dest,
            "generation": m.map_or(0, |m| m.generation),
            "fencing_token": m.and_then(|m| m.fencing_token),
            "partitions": files.iter().map(|(name, files)| serde_json::json!({
                "name": name,
                "files": files.iter().map(|f| shown(f)).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{value}");
    } else {
        for (_, part_files) in &files {
            for f in part_files {
                println!("{}", shown(f));
            }
        }
    }
    Ok(0)
}
