//! `palisade run --lock NAME -- COMMAND`: run a command while holding a lock.

use crate::backend::BackendArgs;
use crate::child::{Child, exit_code};
use crate::exit::{CliError, HELD, INTERNAL, LEASE_LOST};
use crate::progress::Progress;
use crate::signals::{self, StopSignals};
use clap::Args;
use nix::sys::signal::Signal;
use palisade_lock::{JobInfo, LockError, RunOutcome, Wait};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Flags of `palisade run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lock to hold while COMMAND runs.
    #[arg(long, value_name = "NAME")]
    pub lock: String,

    /// Make the lock a semaphore of N slots: at most N commands run at once under this name
    /// (every run of one name must give the same N). Without it the lock admits one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: Option<u32>,

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

    /// When renewals fail: COMMAND gets SIGTERM this long before the lease ends and SIGKILL
    /// when it ends, so it has stopped before another holder can start. On etcd it must be
    /// shorter than two thirds of --ttl (renewals are due every third). Default: 10s, or a
    /// third of --ttl when that is shorter.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub grace: Option<Duration>,

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
    let grace = match args.grace {
        Some(grace) if !args.backend.etcd.is_empty() => check_grace(grace, args.ttl)?,
        Some(grace) => grace,
        None => DEFAULT_GRACE.min(args.ttl / 3),
    };
    // From here to the end, INT/TERM/HUP/QUIT are ours: none of them can end palisade without
    // its clean-up (giving up a wait, or passing the signal on to the command).
    let mut signals = StopSignals::install()
        .map_err(|e| CliError::new(INTERNAL, format!("cannot install signal handlers: {e}")))?;
    let coordinator = tokio::select! {
        coordinator = args.backend.coordinator(args.ttl) => coordinator?,
        signal = signals.recv() => return Ok(signals::exit_code(signal)),
    };
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
        _ => Some(Progress::start(match args.slots {
            Some(n) => format!("waiting for one of the {n} slots of `{}`", args.lock),
            None => format!("waiting for lock `{}`", args.lock),
        })),
    };
    let progress = Mutex::new(progress);
    // The command, once started. The job future sets it in the same poll that spawns the
    // command, and signals are handled in this task between polls, so a signal finds either no
    // command (palisade is still waiting) or the command (to pass the signal on), never a
    // command that it cannot see.
    let child: Arc<Mutex<Option<Arc<Child>>>> = Arc::default();
    let slot = child.clone();
    let command = args.command.clone();
    let lock = args.lock.clone();
    let run_job = |ctx: palisade_lock::JobContext| {
        drop(progress.lock().map(|mut p| p.take()));
        async move {
            let env = [
                ("PALISADE_FENCING_TOKEN", ctx.fencing_token().to_string()),
                ("PALISADE_LOCK", lock.clone()),
            ];
            let started = Arc::new(Child::spawn(&command, &env, ctx.lock_fd())?);
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(started.clone());
            let status = tokio::select! {
                status = started.wait() => status,
                // Renewals have failed for so long that the lease ends within --grace: the
                // command gets SIGTERM now and SIGKILL at the deadline (when run_exclusive
                // drops this future), so it has stopped before anyone else can hold the lock.
                () = ctx.expiring(grace) => {
                    eprintln!(
                        "palisade: the lease on lock `{lock}` has not been renewed and ends in {}: \
                         sending SIGTERM to the command (pid {}), SIGKILL when it ends",
                        left(ctx.deadline()),
                        started.pid(),
                    );
                    started.signal(Signal::SIGTERM);
                    started.wait().await
                }
            };
            // What the command left running in its process group goes before the lock does.
            started.signal(Signal::SIGKILL);
            Ok::<_, CliError>(status)
        }
    };
    // With --slots the same job runs under one slot of a semaphore, with the same guarantees.
    let exclusive = match args.slots {
        Some(permits) => futures::future::Either::Left(
            coordinator.run_limited(&args.lock, permits, job, wait, run_job),
        ),
        None => futures::future::Either::Right(
            coordinator.run_exclusive(&args.lock, job, wait, run_job),
        ),
    };
    let mut exclusive = Box::pin(exclusive);
    let mut suspend = JobControl::install()?;
    let outcome = loop {
        tokio::select! {
            outcome = &mut exclusive => break outcome,
            event = suspend.recv() => {
                let running = child.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // Ctrl-Z: the command stops with palisade, and goes on with it after `fg`, unless
                // the lease ran out meanwhile (then run_exclusive reports it lost and the
                // command, still stopped, is killed without running another instruction).
                match (event, running) {
                    (Suspend::Stop, Some(running)) => running.signal(Signal::SIGSTOP),
                    (Suspend::Continue, Some(running)) if !coordinator.session().is_lost() => {
                        running.signal(Signal::SIGCONT)
                    }
                    _ => {}
                }
                if event == Suspend::Stop {
                    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
                }
            }
            signal = signals.recv() => {
                let running = child.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(running) = running {
                    running.signal(signal);
                    continue;
                }
                // Still waiting: leave the queue, and revoke the lease so that the waiter's key
                // is gone now, not when the TTL runs out.
                drop(exclusive);
                drop(progress);
                if let Err(e) = coordinator.close().await {
                    eprintln!("palisade: could not give up the session on {signal}: {e}");
                }
                eprintln!("palisade: {signal} while waiting for lock `{}`: gave up", args.lock);
                return Ok(signals::exit_code(signal));
            }
        }
    };
    drop(exclusive);
    drop(progress);
    // palisade exits next, and the runtime does not run background clean-ups at exit: give up
    // the session now, so that no key of ours (a skipped run's place in the queue, a registry
    // entry) blocks the next run until the TTL runs out. A lost lease needs nothing.
    if !matches!(outcome, Err(LockError::Lost))
        && let Err(e) = coordinator.close().await
    {
        tracing::warn!(error = %e, "could not revoke the session lease; its keys expire with the TTL");
    }
    match outcome {
        Ok(RunOutcome::Ran(status)) => Ok(exit_code(status?)),
        Ok(RunOutcome::Skipped { holder }) => {
            let message = held_message(&args.lock, holder.as_ref());
            match args.slots {
                Some(n) => eprintln!(
                    "palisade: all {n} slots of `{}` are held; the earliest: {message}",
                    args.lock
                ),
                None => eprintln!("palisade: {message}"),
            }
            Ok(HELD)
        }
        Err(LockError::Lost) => {
            let running = child.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut message = format!("the lease on lock `{}` was lost", args.lock);
            if let Some(child) = running {
                // The deadline has passed: another process may hold the lock now.
                let status = child.kill().await;
                message = format!(
                    "{message}; the command (pid {}) was stopped ({status})",
                    child.pid()
                );
            }
            Err(CliError::new(LEASE_LOST, message))
        }
        Err(other) => Err(other.into()),
    }
}

/// Job control from a terminal: Ctrl-Z (SIGTSTP) and `fg`/`bg` (SIGCONT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspend {
    Stop,
    Continue,
}

struct JobControl {
    stop: tokio::signal::unix::Signal,
    cont: tokio::signal::unix::Signal,
}

impl JobControl {
    fn install() -> Result<JobControl, CliError> {
        use tokio::signal::unix::{SignalKind, signal};
        let failed = |e: std::io::Error| {
            CliError::new(INTERNAL, format!("cannot install signal handlers: {e}"))
        };
        Ok(JobControl {
            stop: signal(SignalKind::from_raw(Signal::SIGTSTP as i32)).map_err(failed)?,
            cont: signal(SignalKind::from_raw(Signal::SIGCONT as i32)).map_err(failed)?,
        })
    }

    async fn recv(&mut self) -> Suspend {
        tokio::select! {
            Some(()) = self.stop.recv() => Suspend::Stop,
            Some(()) = self.cont.recv() => Suspend::Continue,
        }
    }
}

/// The time a command gets between SIGTERM and SIGKILL unless `--grace` says otherwise.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// `--grace` must end after a renewal that is merely due: renewals go out every third of the
/// TTL, so a lease that is renewed on time always has more than two thirds of its TTL left, and
/// a grace shorter than that never stops a healthy job.
fn check_grace(grace: Duration, ttl: Duration) -> Result<Duration, CliError> {
    let limit = ttl * 2 / 3;
    if grace >= limit {
        return Err(CliError::config(format!(
            "--grace {} does not fit in --ttl {}: the command gets SIGTERM --grace before the \
             lease ends and renewals are due every third of the TTL, so --grace must be shorter \
             than two thirds of --ttl ({})",
            humantime::format_duration(grace),
            humantime::format_duration(ttl),
            humantime::format_duration(limit)
        )));
    }
    Ok(grace)
}

/// How long until `deadline`, for a message.
fn left(deadline: Option<tokio::time::Instant>) -> String {
    let left = deadline
        .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
        .unwrap_or_default();
    humantime::format_duration(Duration::from_millis(left.as_millis() as u64)).to_string()
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
