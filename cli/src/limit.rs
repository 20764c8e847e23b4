//! `palisade limit --key KEY --rate N/PERIOD -- COMMAND`: wait until a rate limit admits one
//! call, then run the command.

use crate::backend::default_dir;
use crate::child::{Child, exit_code};
use crate::exit::{CONFIG, CliError, HELD, INTERNAL, UNAVAILABLE, chain};
use crate::file_limiter::{FileLimiter, Rate};
use crate::progress::Progress;
use crate::tls::RedisTlsArgs;
use clap::Args;
use palisade_ratelimit::{Error, Limit, Policy, RateLimiter, RedisLimiter};
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
    pub rate: Rate,

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
    let progress = Progress::start(format!(
        "rate limit `{}` ({})",
        args.key,
        rate_text(args.rate)
    ));
    let admitted = match &args.redis {
        Some(url) => redis_acquire(&args, url).await,
        None => file_acquire(&args).await,
    };
    drop(progress);
    admitted?;
    let env = [("PALISADE_LIMIT_KEY", args.key.clone())];
    let child = Child::spawn_forwarding(&args.command, &env)?;
    Ok(exit_code(child.wait().await))
}

fn rate_text(rate: Rate) -> String {
    format!("{}/{}", rate.max, humantime::format_duration(rate.period))
}

async fn redis_acquire(args: &LimitArgs, url: &str) -> Result<(), CliError> {
    let limit = Limit::new(args.rate.max, args.rate.period).map_err(to_cli)?;
    let conn = connect(args, url).await?;
    let limiter = RedisLimiter::builder(conn)
        .limit(limit)
        .prefix("palisade:limit:")
        .timeout(args.timeout)
        .on_unavailable(Policy::FailClosed)
        .build()
        .map_err(to_cli)?;
    let acquired = match args.wait_for {
        Some(wait) => {
            let deadline = tokio::time::Instant::now() + wait;
            limiter.acquire_with_deadline(&args.key, 1, deadline).await
        }
        None => limiter.acquire(&args.key).await,
    };
    acquired.map(drop).map_err(to_cli)
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
        other => to_cli(other),
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
        .map_err(to_cli)
}

async fn file_acquire(args: &LimitArgs) -> Result<(), CliError> {
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    let limiter = FileLimiter::new(&dir).map_err(|e| {
        CliError::new(
            CONFIG,
            format!("cannot use {} for rate limits: {e}", dir.display()),
        )
    })?;
    let deadline = args.wait_for.map(|w| tokio::time::Instant::now() + w);
    loop {
        let (limiter, key, rate) = (limiter.clone(), args.key.clone(), args.rate);
        let decision = tokio::task::spawn_blocking(move || limiter.check(&key, rate))
            .await
            .map_err(|e| CliError::new(INTERNAL, e.to_string()))?
            .map_err(|e| {
                CliError::new(
                    INTERNAL,
                    format!("rate limit file in {}: {e}", dir.display()),
                )
            })?;
        let retry_after = match decision {
            Ok(()) => return Ok(()),
            Err(retry_after) => retry_after,
        };
        let wake = tokio::time::Instant::now() + retry_after + jitter(retry_after);
        if deadline.is_some_and(|d| wake > d) {
            return Err(CliError::new(
                HELD,
                format!(
                    "rate limit `{}` ({}) would not admit the run within --wait-for",
                    args.key,
                    rate_text(args.rate)
                ),
            ));
        }
        tokio::time::sleep_until(wake).await;
    }
}

/// Up to 10% (at most 50 ms) more, so processes denied together do not retry together.
fn jitter(base: Duration) -> Duration {
    let spread = (base / 10).min(Duration::from_millis(50));
    let nanos = u64::try_from(spread.as_nanos()).unwrap_or(0);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let seed = std::process::id() as u64
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
    Duration::from_nanos(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) % nanos)
}

fn to_cli(error: Error) -> CliError {
    let code = match &error {
        Error::Unavailable(_) | Error::Timeout(_) | Error::Redis(_) => UNAVAILABLE,
        Error::DeadlineExceeded(_) => HELD,
        Error::InvalidConfig { .. } | Error::CostExceedsLimit { .. } => CONFIG,
        _ => INTERNAL,
    };
    CliError::new(code, chain(&error))
}
