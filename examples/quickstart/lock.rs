//! The lock part of the quick start: file locks on one host, no server.

use palisade::lock::{Coordinator, JobInfo, LockError, RunOutcome, Wait};

/// Shows palisade-lock on its embedded default (a `flock` file per lock name).
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("palisade-quickstart-{}", std::process::id()));
    let coordinator = Coordinator::file(&dir)?;

    let guard = coordinator.lock("daily_etl").await?;
    println!(
        "[lock] took \"daily_etl\" with fencing token {}",
        guard.fencing_token()
    );
    match coordinator.try_lock("daily_etl").await {
        Err(LockError::Held { .. }) => {
            println!("[lock] a second try_lock is refused while it is held")
        }
        other => println!("[lock] unexpected: {other:?}"),
    }
    guard.release().await?;

    let outcome = coordinator
        .run_exclusive("daily_etl", JobInfo::new("daily_etl"), Wait::No, |ctx| {
            let registry = coordinator.registry();
            async move {
                let running = registry.running().await.unwrap_or_default();
                println!(
                    "[lock] run_exclusive runs the job with token {} ({} job(s) registered)",
                    ctx.fencing_token(),
                    running.len()
                );
                "rows written"
            }
        })
        .await?;
    if let RunOutcome::Ran(result) = outcome {
        println!(
            "[lock] job finished: {result}; tokens only grow, so storage can refuse stale writers"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
