//! `palisade once --key KEY -- COMMAND`: run a command once per key, replay its exit code after.

use crate::backend::default_dir;
use crate::child::{Child, exit_code};
use crate::exit::{CliError, INTERNAL, LEASE_LOST, chain};
use crate::progress::Progress;
use crate::tls::RedisTlsArgs;
use clap::Args;
use nix::sys::signal::Signal;
use palisade_idempotency::{Error, FileStore, IdempotencyStore, OnceOptions, Outcome, RedisStore};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Flags of `palisade once`.
#[derive(Debug, Args)]
pub struct OnceArgs {
    /// The idempotency key: one successful run per key (e.g. `etl-2024-01-31`).
    #[arg(long, value_name = "KEY")]
    pub key: String,

    /// Where run-once records live: a directory (`file:///path`, the default is
    /// $XDG_STATE_HOME/palisade/once or ~/.local/state/palisade/once) for one host, or
    /// `redis://[user:password@]host:port/` (`rediss://` for TLS) for a fleet.
    #[arg(long, env = "PALISADE_ONCE_STORE", value_name = "URL")]
    pub store: Option<String>,

    /// TLS files for a `rediss://` --store.
    #[command(flatten)]
    pub tls: RedisTlsArgs,

    /// How long a completed run is remembered (and replayed).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7days", value_name = "DURATION")]
    pub ttl: Duration,

    /// How long the key stays claimed after palisade died (or lost touch with the store): while
    /// the command runs, palisade renews the claim every third of this, however long it runs. If
    /// the claim is lost (renewals failed this long, or another run took the key over), the
    /// command gets SIGTERM (a third of this, at most 10s, before the claim ends) and SIGKILL,
    /// and palisade exits 76.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m", value_name = "DURATION")]
    pub claim_ttl: Duration,

    /// Exit 75 at once when the key runs elsewhere, instead of waiting for that run to end.
    #[arg(long, conflicts_with = "wait_for")]
    pub no_wait: bool,

    /// Wait at most this long for a run elsewhere to end (default: without limit; a run whose
    /// runner died stops blocking after --claim-ttl).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub wait_for: Option<Duration>,

    /// Record a failed run (non-zero exit) too, so it is replayed instead of retried.
    #[arg(long)]
    pub record_failures: bool,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// What is recorded for a key: how the run ended, and where.
#[derive(Debug, Serialize, Deserialize)]
struct Ran {
    exit_code: u8,
    host: String,
    finished_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the command exited with {0}")]
struct Failed(u8);

/// Runs the command once per key and returns palisade's exit code.
pub async fn once(args: OnceArgs) -> Result<u8, CliError> {
    let options = OnceOptions::default()
        .ttl(args.ttl)
        .in_progress_ttl(args.claim_ttl);
    let options = if args.no_wait {
        options
    } else {
        // "Forever": ten years is beyond any run, and keeps the deadline arithmetic finite.
        options.wait(
            args.wait_for
                .unwrap_or(Duration::from_secs(10 * 365 * 24 * 3600)),
        )
    };
    options.validate().map_err(CliError::from)?;
    match args.store.as_deref() {
        Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
            let store = connect(url, &args.tls).await?;
            run(&store, &args, &options).await
        }
        Some(url) => {
            let dir = url.strip_prefix("file://").ok_or_else(|| {
                CliError::config(format!(
                    "--store {url:?}: expected file:///path, redis:// or rediss://"
                ))
            })?;
            run(
                &FileStore::open(dir).map_err(CliError::from)?,
                &args,
                &options,
            )
            .await
        }
        None => {
            let dir: PathBuf = default_dir().join("once");
            run(
                &FileStore::open(dir).map_err(CliError::from)?,
                &args,
                &options,
            )
            .await
        }
    }
}

async fn run(
    store: &(impl IdempotencyStore + Clone + 'static),
    args: &OnceArgs,
    options: &OnceOptions,
) -> Result<u8, CliError> {
    // The same key with another command is a mistake worth stopping for.
    let fingerprint = serde_json::to_string(&args.command).unwrap_or_default();
    let progress = (!args.no_wait).then(|| Progress::start(format!("key `{}`", args.key)));
    let record_failures = args.record_failures;
    let command = args.command.clone();
    let grace = (args.claim_ttl / 3).min(MAX_GRACE);
    // The command, once started: to kill it if the claim is lost (the job's future is dropped
    // then, before the command has exited).
    let child: Arc<Mutex<Option<Arc<Child>>>> = Arc::default();
    let slot = child.clone();
    let outcome = store
        .once_with_claim(&args.key, &fingerprint, options, move |claim| async move {
            // The token identifies this run of the key: a command that records it with its
            // effect (in the same write) can tell, when it runs again after a lost claim,
            // that the effect was already made (the run-once contract).
            let env = [
                ("PALISADE_ONCE_KEY", claim.key().to_string()),
                ("PALISADE_ONCE_TOKEN", claim.token().as_str().to_string()),
            ];
            let started = Child::spawn_forwarding(&command, &env)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(started.clone());
            let status = tokio::select! {
                status = started.wait() => status,
                // Renewals have failed for so long that the claim ends within `grace` (or it was
                // taken over): SIGTERM now, SIGKILL when `once` cancels this job, so the command
                // has stopped before another run of the key can start.
                () = claim.expiring(grace) => {
                    eprintln!(
                        "palisade: the claim on key `{}` could not be renewed and ends in {}: \
                         sending SIGTERM to the command (pid {}), SIGKILL when it ends",
                        claim.key(),
                        left(claim.deadline()),
                        started.pid(),
                    );
                    started.signal(Signal::SIGTERM);
                    started.wait().await
                }
            };
            // What the command left running in its process group goes before the claim does.
            started.signal(Signal::SIGKILL);
            let code = exit_code(status);
            if code != 0 && !record_failures {
                return Err(Box::new(Failed(code)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Ran {
                exit_code: code,
                host: hostname(),
                finished_at_ms: now_ms(),
            })
        })
        .await;
    drop(progress);
    match outcome {
        Ok(Outcome::Executed(ran)) => Ok(ran.exit_code),
        Ok(Outcome::Replayed(ran)) => {
            eprintln!(
                "palisade: key `{}` already ran on {} at {} (exit code {}); not running it again",
                args.key,
                ran.host,
                humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + Duration::from_millis(ran.finished_at_ms)
                ),
                ran.exit_code
            );
            Ok(ran.exit_code)
        }
        Err(Error::Job(error)) => {
            if let Some(Failed(code)) = error.downcast_ref::<Failed>() {
                return Ok(*code);
            }
            match error.downcast::<CliError>() {
                Ok(cli) => Err(*cli),
                Err(other) => Err(CliError::new(INTERNAL, other.to_string())),
            }
        }
        Err(error @ Error::ClaimLost { .. }) => {
            let running = child.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut message = chain(&error);
            if let Some(running) = running {
                // Another run of the key may be starting: the command must be gone now.
                let status = running.kill().await;
                message = format!(
                    "{message}; the command (pid {}) was stopped ({status})",
                    running.pid()
                );
            }
            Err(CliError::new(LEASE_LOST, message))
        }
        Err(error) => Err(error.into()),
    }
}

/// The most time a command gets between SIGTERM and SIGKILL when its claim is running out.
const MAX_GRACE: Duration = Duration::from_secs(10);

/// How long until `deadline`, for a message.
fn left(deadline: tokio::time::Instant) -> String {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    humantime::format_duration(Duration::from_millis(left.as_millis() as u64)).to_string()
}

/// Connects the Redis store, over TLS with the --redis-ca/--redis-cert files when given; a refused
/// certificate is one line that says whose (exit 78).
#[cfg(feature = "tls")]
async fn connect(url: &str, tls: &RedisTlsArgs) -> Result<RedisStore, CliError> {
    let connected = match tls.certificates(url)? {
        Some(certs) => RedisStore::connect_with_tls(url, certs).await,
        None => RedisStore::connect(url).await,
    };
    connected.map_err(|error| {
        let refused = match &error {
            Error::Redis { source, .. } => palisade_ratelimit::TlsProblem::find(source)
                .map(|problem| (problem, source.to_string())),
            _ => None,
        };
        match refused {
            Some((problem, detail)) => {
                tls.files()
                    .refused(problem, crate::tls::Signed::Unknown, &detail)
            }
            None => error.into(),
        }
    })
}

#[cfg(not(feature = "tls"))]
async fn connect(url: &str, tls: &RedisTlsArgs) -> Result<RedisStore, CliError> {
    tls.certificates(url)?;
    RedisStore::connect(url).await.map_err(CliError::from)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
