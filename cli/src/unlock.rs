//! `palisade unlock NAME`: an operator breaks a lock whose holder is stuck.

use crate::backend::BackendArgs;
use crate::exit::{CONFIG, CliError, HELD};
use clap::Args;
use palisade_lock::{Holder, LockError};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

/// Flags of `palisade unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// The lock to break.
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Break it without asking (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,

    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Shows the holder and breaks the lock: on etcd the holder's session lease is revoked, so its
/// `palisade run` sees the lease lost and stops its command (exit 76 there) and the next waiter
/// gets the lock; on the file backend it is refused while the holder process lives.
pub async fn unlock(args: UnlockArgs) -> Result<u8, CliError> {
    let coordinator = args.backend.coordinator(Duration::from_secs(30)).await?;
    let result = unlock_with(&coordinator, &args).await;
    let _ = coordinator.close().await;
    result
}

async fn unlock_with(
    coordinator: &palisade_lock::Coordinator,
    args: &UnlockArgs,
) -> Result<u8, CliError> {
    let name = &args.name;
    let Some(holder) = coordinator.holder(name).await? else {
        eprintln!("palisade: lock {name:?} is free: nothing to unlock");
        return Ok(0);
    };
    let who = describe(&holder);
    if args.backend.etcd.is_empty() {
        // A flock lives exactly as long as its holder process: nothing to break.
        return Err(CliError::new(
            HELD,
            format!(
                "lock {name:?} is held by {who}; a file lock is freed by the kernel when that \
                 process exits, so it cannot be broken while it lives: stop the process instead"
            ),
        ));
    }
    eprintln!("palisade: lock {name:?} is held by {who}");
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::new(
                CONFIG,
                format!(
                    "not breaking lock {name:?} without --yes (stdin is not a terminal to ask)"
                ),
            ));
        }
        eprint!(
            "Break it? The holder's session is revoked: its command is stopped and the next \
             waiter gets the lock. [y/N] "
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("palisade: not broken");
            return Ok(1);
        }
    }
    match coordinator.break_lock(name).await {
        Ok(Some(broken)) => {
            println!(
                "broke lock {name:?}: revoked the session of {}",
                describe(&broken)
            );
            Ok(0)
        }
        Ok(None) => {
            println!("lock {name:?} was released meanwhile: nothing to break");
            Ok(0)
        }
        Err(e @ LockError::Held { .. }) => Err(CliError::new(HELD, e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// `job `x` on host h pid 12 since ... (fencing token 7): cmd`, or the token alone.
fn describe(holder: &Holder) -> String {
    match holder.job_info() {
        Some(job) => format!(
            "job `{}` on {} pid {} since {} (fencing token {}){}",
            job.name,
            job.host,
            job.pid,
            humantime::format_rfc3339_seconds(job.started_at()),
            holder.fencing_token,
            if job.command.is_empty() {
                String::new()
            } else {
                format!(": {}", job.command.join(" "))
            }
        ),
        None => format!("a holder with fencing token {}", holder.fencing_token),
    }
}
