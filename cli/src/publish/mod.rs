//! `palisade publish SRC DEST` and `palisade manifest DEST`: make the dataset at DEST equal to a
//! local directory that any job wrote, writing only the partitions whose content changed,
//! atomically for readers, fenced against older lock holders.
//!
//! The steps, all palisade-idempotency's `source` module (the one implementation, shared with
//! the Python package): scan SRC into partitions and compute each partition's identity (bytes
//! or rows), compare with the manifest (`source::plan`), then `source::write_all` hands every
//! partition to `PartitionedWriter::put_files` (which writes only those whose identity changed)
//! and commits.
//! Everything a reader sees changes at the commit, or not at all. This module adds the flags,
//! the progress bars, the exit codes and the output.

pub mod choices;
pub mod output;
pub mod verify;

use crate::exit::{BAD_INPUT, CliError, INTERNAL, chain};
use choices::{Content, Format, Unit};
use clap::Args;
use palisade_idempotency::source::{self, IdentityOptions, Partition, ScanOptions};
use palisade_idempotency::{ContentHash, Dataset, DatasetStore, PartitionedWriter, StoreOptions};
use std::path::PathBuf;
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

    /// How long replaced partition versions are kept for readers that are still reading them;
    /// the first publish after that deletes them. `0s` deletes them right after the commit.
    /// On object stores, objects listed before this publish stay readable by key until then; on
    /// file:// only open handles keep the old version (paths listed before then resolve to the
    /// new version's files or are gone).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h", value_name = "DURATION")]
    pub retain: Duration,

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

/// Opens DEST through the crate's `store_from_url_with`: `s3://` configured from the standard
/// AWS_* environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
/// AWS_REGION, AWS_ALLOW_HTTP...), `gs://` and `az://` (features `gcp`, `azure`) from
/// GOOGLE_*/AZURE_* ones. A few retries within 15 s: an unreachable endpoint fails the command
/// in seconds instead of after object_store's default 3 minutes.
pub fn open_store(dest: &str) -> Result<DatasetStore, CliError> {
    let options = StoreOptions::default().retry(3, Duration::from_secs(15));
    palisade_idempotency::store_from_url_with(dest, &options)
        .map_err(|e| CliError::config(format!("DEST {dest:?}: {}", chain(&e))))
}

/// Runs `palisade publish` and returns the exit code: scan SRC, open DEST (an unreachable DEST
/// or a fenced token fails before any hashing), compute the identities, plan, write.
pub async fn publish(args: PublishArgs) -> Result<u8, CliError> {
    let started = Instant::now();
    let fencing_token = parse_token(args.fencing_token.as_deref())?;
    let store = open_store(&args.dest)?;
    let partitions = scan_src(&args).await?;
    let writer = open_writer(&store, &args, fencing_token).await?;
    let (parts, ids, bytes_hashed) = match identities(&args, partitions).await {
        Ok(hashed) => hashed,
        Err(e) => {
            // Nothing was staged yet; drop this run's staging area now rather than at the next open.
            let _ = writer.abort().await;
            return Err(e);
        }
    };
    let the_plan = source::plan(&parts, &ids, writer.manifest(), args.remove_missing);
    let mut summary = output::Summary::planned(&args, &the_plan, writer.manifest(), bytes_hashed);
    summary.fencing_token = fencing_token;
    if args.dry_run {
        writer.abort().await?;
        summary.plan = Some(the_plan);
    } else {
        let bar = output::bar(the_plan.writes().count() as u64, "writing", false);
        let report = source::write_all(writer, &parts, &ids, &mut |step| match step {
            source::Progress::Written(_) => bar.inc(1),
            source::Progress::Committing => bar.set_message("committing"),
        })
        .await;
        bar.finish_and_clear();
        summary.record(report?);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    output::print(&summary, args.json)
}

fn parse_token(token: Option<&str>) -> Result<Option<u64>, CliError> {
    match token.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) => t.parse().map(Some).map_err(|_| {
            CliError::config(format!(
                "--fencing-token / PALISADE_FENCING_TOKEN {t:?}: expected a non-negative integer"
            ))
        }),
    }
}

async fn scan_src(args: &PublishArgs) -> Result<Vec<Partition>, CliError> {
    let scan_opts = ScanOptions {
        unit: args.unit.into(),
        include: args.include.clone(),
        exclude: args.exclude.clone(),
    };
    let src = args.src.clone();
    let partitions = tokio::task::spawn_blocking(move || source::scan(&src, &scan_opts))
        .await
        .map_err(|e| CliError::new(INTERNAL, e.to_string()))?
        .map_err(|e| CliError::new(BAD_INPUT, e.to_string()))?;
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
    Ok(partitions)
}

async fn open_writer(
    store: &DatasetStore,
    args: &PublishArgs,
    fencing_token: Option<u64>,
) -> Result<PartitionedWriter, CliError> {
    let mut builder = PartitionedWriter::builder(store, "")
        .allow_unfenced(args.allow_unfenced)
        .remove_missing(args.remove_missing)
        .retain(args.retain)
        .lock_timeout(args.lock_timeout);
    if let Some(token) = fencing_token {
        builder = builder.fencing_token(token);
    }
    Ok(builder.open().await?)
}

/// Every partition's identity, hashed on `--threads` threads with a progress bar; returns the
/// partitions, their identities and the bytes read.
async fn identities(
    args: &PublishArgs,
    partitions: Vec<Partition>,
) -> Result<(Vec<Partition>, Vec<ContentHash>, u64), CliError> {
    let id_opts = IdentityOptions {
        content: args.content.into(),
        names: args.names,
        format: args.format.into(),
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
        }),
    };
    let total: u64 = partitions.iter().map(Partition::size).sum();
    let bar = output::bar(total, "hashing", true);
    let hashed = Arc::new(AtomicU64::new(0));
    let (b, h) = (bar.clone(), hashed.clone());
    let result = tokio::task::spawn_blocking(move || {
        let on_bytes = |n: u64| {
            b.inc(n);
            h.fetch_add(n, Ordering::Relaxed);
        };
        source::identities(&partitions, &id_opts, &on_bytes).map(|ids| (partitions, ids))
    })
    .await;
    bar.finish_and_clear();
    let (parts, ids) = result
        .map_err(|e| CliError::new(INTERNAL, e.to_string()))?
        .map_err(|e| CliError::new(BAD_INPUT, e.to_string()))?;
    Ok((parts, ids, hashed.load(Ordering::Relaxed)))
}

/// Runs `palisade manifest` and returns the exit code.
pub async fn manifest(args: ManifestArgs) -> Result<u8, CliError> {
    let store = open_store(&args.dest)?;
    let dataset = Dataset::open(&store, "").await?;
    if dataset.manifest().is_none() {
        eprintln!(
            "palisade: no dataset at {} yet (nothing was ever published)",
            args.dest
        );
    }
    let files = dataset.live_files();
    let shown = |rel: &str| shown(&args.dest, rel);
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

/// An object of the dataset at `dest` as users address it: a path for `file://`, the URL
/// otherwise; the object's key below DEST byte for byte.
fn shown(dest: &str, rel: &str) -> String {
    let base = dest.trim_end_matches('/');
    match base.strip_prefix("file://") {
        Some(path) => format!("{path}/{rel}"),
        None => format!("{base}/{rel}"),
    }
}
