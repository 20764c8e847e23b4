//! An exclusive ETL job under etcd: it holds the lock `daily_sales` while it runs, is listed in
//! the job registry, and writes a partitioned dataset with its fencing token, so that a holder
//! that outlived its lease can never overwrite a newer holder's output.
//!
//! It uses the etcd at `PALISADE_ETCD_ENDPOINTS` (comma-separated URLs) if set; otherwise it
//! starts a throwaway etcd on a free loopback port with palisade-testkit (needs the `etcd`
//! binary: `scripts/setup` installs it).
//!
//! Run it with `cargo run --example guarded_etl --features etcd`.

use palisade::idempotency::{PartitionedWriter, store_from_url};
use palisade::lock::{Coordinator, JobInfo, RunOutcome, Wait};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (_etcd, endpoints) = match std::env::var("PALISADE_ETCD_ENDPOINTS") {
        Ok(list) => (None, list.split(',').map(String::from).collect::<Vec<_>>()),
        Err(_) => {
            let etcd = tokio::task::spawn_blocking(palisade_testkit::Etcd::start).await??;
            println!("started a throwaway etcd at {}", etcd.endpoint());
            let endpoints = etcd.endpoints();
            (Some(etcd), endpoints)
        }
    };
    let client = palisade::etcd_client::Client::connect(endpoints, None).await?;
    let coordinator = Coordinator::etcd(client)
        .namespace("palisade-example/")
        .lease_ttl(Duration::from_secs(10))
        .connect()
        .await?;

    let out = tempfile::tempdir()?;
    let store = store_from_url(&format!("file://{}", out.path().display()))?;
    // Two nightly runs over the same input: the second holds a newer token and writes nothing.
    for night in 1..=2 {
        let job = JobInfo::new("daily_sales")
            .command(["guarded_etl"])
            .meta("dataset", "sales");
        let registry = coordinator.registry();
        let store = store.clone();
        let outcome = coordinator
            .run_exclusive(
                "daily_sales",
                job,
                Wait::Up(Duration::from_secs(30)),
                |ctx| async move {
                    for running in registry.running().await? {
                        println!(
                            "night {night}: registry lists `{}` on {} (pid {}, fencing token {:?})",
                            running.lock, running.host, running.pid, running.fencing_token
                        );
                    }
                    let mut writer = PartitionedWriter::builder(&store, "sales")
                        .fencing_token(ctx.fencing_token())
                        .open()
                        .await?;
                    for day in 1..=3 {
                        let rows = format!("day,amount\n2024-01-0{day},{}\n", day * 100);
                        writer.put(&format!("date=2024-01-0{day}"), rows).await?;
                    }
                    let report = writer.commit().await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((ctx.fencing_token(), report))
                },
            )
            .await?;
        match outcome {
            RunOutcome::Ran(result) => {
                let (token, report) = result?;
                println!(
                    "night {night}: committed with fencing token {token}: {} written, {} unchanged, {} bytes",
                    report.written.len(),
                    report.unchanged.len(),
                    report.bytes_written
                );
            }
            RunOutcome::Skipped { holder } => {
                println!("night {night}: skipped, held by {holder:?}")
            }
        }
    }
    println!(
        "after the runs the registry lists {} jobs",
        coordinator.registry().running().await?.len()
    );
    Ok(())
}
