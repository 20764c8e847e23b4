//! The `palisade` command: guard any job from cron, Airflow or a shell with a lock, a
//! run-once key or a rate limit, and publish its output idempotently (`publish`).

mod backend;
mod child;
mod exit;
mod jobs;
mod limit;
mod once;
mod progress;
mod publish;
mod run;
mod signals;
mod tls;
mod unlock;
mod watchdog;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// Guard any command with a lock (with fencing tokens and a registry of running jobs), a
/// run-once key, or a rate limit; publish a job's output idempotently and fenced. Locks live in
/// a directory on this host by default, and in etcd with --etcd (or PALISADE_ETCD_ENDPOINTS)
/// for a fleet.
#[derive(Debug, Parser)]
#[command(name = "palisade", version, after_help = exit::TABLE)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run COMMAND while holding a lock; exit 75 if someone else holds it.
    ///
    /// COMMAND runs in its own process group with PALISADE_FENCING_TOKEN (strictly increasing
    /// across holders of the lock: hand it to the storage the job writes) and PALISADE_LOCK in
    /// its environment, and is listed by `palisade jobs` while it runs. SIGINT, SIGTERM, SIGHUP
    /// and SIGQUIT are passed on to it (while palisade still waits, they make it give up its
    /// place in the queue). When renewals of the lease fail, it gets SIGTERM --grace before the
    /// lease deadline and SIGKILL at the deadline, and palisade exits 76. If palisade dies, a
    /// watchdog kills the command's process group at once.
    ///
    /// Example: palisade run --lock daily_etl --wait-for 10m --meta owner=data -- ./etl.sh
    #[command(after_help = exit::TABLE)]
    Run(run::RunArgs),
    /// List the jobs running under `palisade run`, as a table or JSON lines; --watch follows them.
    #[command(after_help = exit::TABLE)]
    Jobs(jobs::JobsArgs),
    /// Run COMMAND once per --key: later invocations with the same key exit with the recorded
    /// exit code without running it (and say so on stderr).
    ///
    /// A run that fails (non-zero exit) records nothing, so the next invocation runs it again
    /// (unless --record-failures). An invocation that finds the key running elsewhere waits
    /// for that run (exit 75 with --no-wait, or when --wait-for runs out). Records live in a
    /// directory on this host by default, or in Redis with --store redis://... for a fleet.
    /// COMMAND gets PALISADE_ONCE_KEY in its environment.
    ///
    /// Example: palisade once --key "load-$(date +%F)" -- ./load.sh
    #[command(after_help = exit::TABLE)]
    Once(once::OnceArgs),
    /// Wait until a rate limit admits one run, then run COMMAND.
    ///
    /// The limit is exact (a sliding log): never more than N runs start in any window of
    /// PERIOD. Without --redis it is shared by every process of this host through a file per
    /// key in --dir; with --redis, by every host. A Redis that cannot be reached fails the run
    /// (exit 69) rather than running it unlimited. COMMAND gets PALISADE_LIMIT_KEY and
    /// PALISADE_LIMIT_ADMITTED_AT_US (its admission, in microseconds since the Unix epoch on the
    /// limit's own clock: Redis's TIME, or this host's).
    ///
    /// Example: palisade limit --key partner-api --rate 10/min -- ./sync.sh
    #[command(after_help = exit::TABLE)]
    Limit(limit::LimitArgs),
    /// Make the dataset at DEST equal to the local directory SRC, writing only the partitions
    /// whose content changed, atomically for readers, fenced against older lock holders.
    ///
    /// A partition is a Hive-style `key=value/` directory of SRC (or every file, --unit file).
    /// Its identity is the BLAKE3 of its files (names and order do not count, unless --names)
    /// or, with --content rows, the rows of its Parquet/CSV/JSON-lines files in any order and
    /// split. Only partitions whose identity differs from DEST's manifest are written. On a
    /// local DEST a changed partition directory is swapped in whole; on object stores the
    /// manifest is the commit point (read through it with `palisade manifest`). Inside
    /// `palisade run --lock` the lock's fencing token (PALISADE_FENCING_TOKEN) is checked by
    /// the commit: a holder whose lease ran out cannot overwrite a newer holder's output.
    ///
    /// Example: palisade run --lock daily -- sh -c 'spark-submit job.py && palisade publish out/ s3://bucket/table/'
    #[command(after_help = exit::TABLE)]
    Publish(publish::PublishArgs),
    /// Print the live files of the dataset at DEST, one per line (or --json): what a reader
    /// that needs one consistent version reads.
    #[command(after_help = exit::TABLE)]
    Manifest(publish::ManifestArgs),
    /// Check the dataset at DEST against its manifest without changing it: every object it
    /// names exists with its recorded size (and, with --hashes, content); leftovers of crashed
    /// runs and an unfinished commit are reported. Exit 0 when sound, 65 when not: for nightly
    /// checks of a lake.
    #[command(after_help = exit::TABLE)]
    Verify(publish::verify::VerifyArgs),
    /// Break a lock whose holder is stuck: shows the holder (host, pid, since, fencing token)
    /// and, after asking (or with --yes), revokes its session on etcd, so its `palisade run`
    /// stops its command (exit 76 there) and the next waiter gets the lock. On the file backend
    /// it is refused (exit 75) while the holder process lives: stop that process instead.
    #[command(after_help = exit::TABLE)]
    Unlock(unlock::UnlockArgs),
    /// Internal: kills a guarded command's process group when palisade dies (see `run`).
    #[command(name = "__watchdog", hide = true)]
    Watchdog(watchdog::WatchdogArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("palisade: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Jobs(args) => jobs::jobs(args).await,
            Command::Once(args) => once::once(args).await,
            Command::Limit(args) => limit::limit(args).await,
            Command::Publish(args) => publish::publish(args).await,
            Command::Manifest(args) => publish::manifest(args).await,
            Command::Verify(args) => publish::verify::verify(args).await,
            Command::Unlock(args) => unlock::unlock(args).await,
            Command::Watchdog(args) => watchdog::watch(args).await,
        }
    });
    // Give background releases (a dropped guard) a moment, but never hang on exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("palisade: {error}");
            ExitCode::from(error.code)
        }
    }
}
