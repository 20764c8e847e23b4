//! `palisade limit --key KEY --rate N/PERIOD -- COMMAND`: wait until a rate limit admits one
//! call, then run the command.

use crate::backend::default_dir;
use crate::child::{Child, exit_code};
use crate::exit::{CONFIG, CliError, HELD, chain};
use crate::progress::Progress;
use crate::tls::RedisTlsArgs;
use clap::Args;
use palisade_ratelimit::{Decision, Error, FileLimiter, Limit, Policy, RateLimiter, RedisLimiter};
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `palisade limit`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// The key the limit applies to (e.g. the API the command calls).
    #[arg(long, value_name = "KEY")]
    pub key: String,

    /// At most N runs in any window of PERIOD: `100/s`, `5/min`, `1000/1h`, `3/10s`.
    #[arg(long, value_name = "N/PERIOD")]
    pub rate: Limit,

    /// Share the limit through Redis (every host): `redis://[user:password@]host:port/`
    /// (`rediss://` for TLS, with --redis-ca and --redis-cert/--redis-key as needed).
    /// Without it, the limit is shared by the processes of this host through files in --dir.
    #[arg(long, env = "PALISADE_REDIS_URL", value_name = "URL")]
    pub redis: Option<String>,

    /// TLS files for a `rediss://` --redis.
    #[command(flatten)]
    pub tls: RedisTlsArgs,

    /// Directory of the host-local limit (default: $XDG_STATE_HOME/palisade or
    /// ~/.local/state/palisade).
    #[arg(long, env = "PALISADE_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Give up (exit 75) if the limit does not admit the run within this long.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub wait_for: Option<Duration>,

    /// How long one Redis round trip may take before it counts as unavailable (exit 69).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s", value_name = "DURATION")]
    pub timeout: Duration,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Waits for the limit, runs the command, and returns palisade's exit code.
pub async fn limit(args: LimitArgs) -> Result<u8, CliError> {
    let progress = Progress::start(format!("rate limit `{}` ({})", args.key, args.rate));
    let admitted = match &args.redis {
        Some(url) => acquire(&args, &redis_limiter(&args, url).await?).await,
        None => acquire(&args, &file_limiter(&args)?).await,
    };
    drop(progress);
    let decision = admitted?;
    // The admission's time on the limit's own clock (Redis's TIME, or the host's clock for the
    // file limit), for commands that log it: the window is counted on that clock.
    let admitted_at = decision
        .server_time
        .map_or_else(String::new, |t| t.as_micros().to_string());
    let env = [
        ("PALISADE_LIMIT_KEY", args.key.clone()),
        ("PALISADE_LIMIT_ADMITTED_AT_US", admitted_at),
    ];
    let child = Child::spawn_forwarding(&args.command, &env)?;
    Ok(exit_code(child.wait().await))
}

/// The limit shared through Redis by every host; an unreachable Redis fails the run.
async fn redis_limiter(args: &LimitArgs, url: &str) -> Result<RedisLimiter, CliError> {
    let conn = connect(args, url).await?;
    RedisLimiter::builder(conn)
        .limit(args.rate)
        .prefix("palisade:limit")
        .timeout(args.timeout)
        .on_unavailable(Policy::FailClosed)
        .build()
        .map_err(CliError::from)
}

/// The limit shared by the processes of this host through files in `--dir`/limits.
fn file_limiter(args: &LimitArgs) -> Result<FileLimiter, CliError> {
    let dir = args.dir.clone().unwrap_or_else(default_dir).join("limits");
    FileLimiter::new(&dir, args.rate).map_err(|e| {
        CliError::new(
            CONFIG,
            format!(
                "cannot use {} for rate limits: {}",
                dir.display(),
                chain(&e)
            ),
        )
    })
}

/// Waits for one admission (the crate's `acquire`: the limiter's `retry_after` plus jitter,
/// never polling), at most `--wait-for`.
async fn acquire(args: &LimitArgs, limiter: &impl RateLimiter) -> Result<Decision, CliError> {
    let acquired = match args.wait_for {
        Some(wait) => {
            let deadline = tokio::time::Instant::now() + wait;
            limiter.acquire_with_deadline(&args.key, 1, deadline).await
        }
        None => limiter.acquire(&args.key).await,
    };
    acquired.map_err(|error| match error {
        Error::DeadlineExceeded(_) => CliError::new(
            HELD,
            format!(
                "rate limit `{}` ({}) would not admit the run within --wait-for",
                args.key, args.rate
            ),
        ),
        other => other.into(),
    })
}

/// Connects to Redis, over TLS with the --redis-ca/--redis-cert files when given; a refused
/// certificate is one line that says whose (exit 78).
#[cfg(feature = "tls")]
async fn connect(
    args: &LimitArgs,
    url: &str,
) -> Result<palisade_ratelimit::redis_crate::aio::ConnectionManager, CliError> {
    let connected = match args.tls.certificates(url)? {
        Some(certs) => palisade_ratelimit::connect_with_tls(url, certs, args.timeout).await,
        None => palisade_ratelimit::connect(url, args.timeout).await,
    };
    connected.map_err(|error| match error {
        Error::Tls { problem, source } => {
            args.tls
                .files()
                .refused(problem, crate::tls::Signed::Unknown, &source.to_string())
        }
        other => other.into(),
    })
}

#[cfg(not(feature = "tls"))]
async fn connect(
    args: &LimitArgs,
    url: &str,
) -> Result<palisade_ratelimit::redis_crate::aio::ConnectionManager, CliError> {
    args.tls.certificates(url)?;
    palisade_ratelimit::connect(url, args.timeout)
        .await
        .map_err(CliError::from)
}
