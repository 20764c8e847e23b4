//! `palisade run --lock NAME -- COMMAND`: run a command while holding a lock.

use crate::backend::BackendArgs;
use crate::child::{Child, exit_code};
use crate::exit::{CliError, HELD, LEASE_LOST};
use crate::progress::Progress;
use clap::Args;
use palisade_lock::{JobInfo, LockError, RunOutcome, Wait};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Flags of `palisade run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lock to hold while COMMAND runs.
    #[arg(long, value_name = "NAME")]
    pub lock: String,

    /// Wait until the lock is free (in arrival order) instead of exiting with 75.
    #[arg(long, conflicts_with = "wait_for")]
    pub wait: bool,

    /// Wait at most this long for the lock (e.g. `90s`, `10m`), then exit with 75.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub wait_for: Option<Duration>,

    /// Lease time-to-live on etcd: if palisade cannot renew its lease for this long (crash,
    /// pause, partition), the lock is free for others and the command here is terminated.
    /// Ignored by the file backend, whose lock lives exactly as long as the process.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", value_name = "DURATION")]
    pub ttl: Duration,

    /// After the lease is lost: how long COMMAND has to exit after SIGTERM before SIGKILL.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", value_name = "DURATION")]
    pub grace: Duration,

    /// Metadata shown in `palisade jobs` (repeatable), e.g. `--meta owner=data-team`.
    #[arg(long = "meta", value_parser = parse_key_value, value_name = "KEY=VALUE")]
    pub meta: Vec<(String, String)>,

    /// The job's name in the registry (default: the lock name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub backend: BackendArgs,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// Runs the command under the lock and returns palisade's exit code.
pub async fn run(args: RunArgs) -> Result<u8, CliError> {
    let coordinator = args.backend.coordinator(args.ttl).await?;
    let mut job = JobInfo::new(args.name.clone().unwrap_or_else(|| args.lock.clone()))
        .command(args.command.clone());
    for (key, value) in &args.meta {
        job = job.meta(key.clone(), value.clone());
    }
    let wait = match (args.wait, args.wait_for) {
        (true, _) => Wait::Forever,
        (false, Some(d)) => Wait::Up(d),
        (false, None) => Wait::No,
    };
    let progress = match wait {
        Wait::No => None,
        _ => Some(Progress::start(format!("waiting for lock `{}`", args.lock))),
    };
    let progress = Mutex::new(progress);
    // The child outlives the job future when the lease is lost (run_exclusive drops the future
    // at once); this slot keeps it reachable so it can be terminated gracefully.
    let child: Arc<Mutex<Option<Arc<Child>>>> = Arc::default();
    let slot = child.clone();
    let command = args.command.clone();
    let lock = args.lock.clone();
    let outcome = coordinator
        .run_exclusive(&args.lock, job, wait, |ctx| {
            drop(progress.lock().map(|mut p| p.take()));
            async move {
                let env = [
                    ("PALISADE_FENCING_TOKEN", ctx.fencing_token().to_string()),
                    ("PALISADE_LOCK", lock),
                ];
                let started = Arc::new(Child::spawn(&command, &env)?);
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(started.clone());
                Ok::<_, CliError>(started.wait().await)
            }
        })
        .await;
    drop(progress);
    match outcome {
        Ok(RunOutcome::Ran(status)) => Ok(exit_code(status?)),
        Ok(RunOutcome::Skipped { holder }) => {
            eprintln!("palisade: {}", held_message(&args.lock, holder.as_ref()));
            Ok(HELD)
        }
        Err(LockError::Lost) => {
            let running = child.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut message = format!("the lease on lock `{}` was lost", args.lock);
            if let Some(child) = running {
                eprintln!(
                    "palisade: {message}: sending SIGTERM to the command (pid {}), SIGKILL after {}",
                    child.pid(),
                    humantime::format_duration(args.grace)
                );
                let (status, killed) = child.terminate(args.grace).await;
                message = format!(
                    "{message}; the command was {} ({status})",
                    if killed { "killed" } else { "terminated" }
                );
            }
            Err(CliError::new(LEASE_LOST, message))
        }
        Err(other) => Err(other.into()),
    }
}

/// "lock `x` is held by job `y` on host h (pid 1, since ..., fencing token 7)".
pub fn held_message(lock: &str, holder: Option<&JobInfo>) -> String {
    match holder {
        Some(h) => format!(
            "lock `{lock}` is held by job `{}` on host {} (pid {}, since {}{}); not running the command",
            h.name,
            h.host,
            h.pid,
            humantime::format_rfc3339_seconds(h.started_at()),
            h.fencing_token
                .map(|t| format!(", fencing token {t}"))
                .unwrap_or_default(),
        ),
        None => format!("lock `{lock}` is held by another process; not running the command"),
    }
}
