//! The idempotency part of the quick start.

use palisade::idempotency::{
    FileStore, IdempotencyStore, OnceOptions, PartitionedWriter, store_from_url,
};

/// Shows palisade-idempotency on its embedded default: a local directory and a file store.
pub async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("palisade-quickstart-{}", std::process::id()));
    let store = store_from_url(&format!("file://{}", dir.display()))?;

    // Write a small partitioned dataset twice: the second run finds nothing changed.
    for run in 1..=2 {
        let mut writer = PartitionedWriter::open(&store, "sales").await?;
        for day in 1..=3 {
            let csv = format!("day,amount\n2024-01-0{day},{}\n", day * 100);
            writer.put(&format!("date=2024-01-0{day}"), csv).await?;
        }
        let report = writer.commit().await?;
        println!(
            "[idempotency] run {run}: {} partitions written, {} unchanged, {} bytes written",
            report.written.len(),
            report.unchanged.len(),
            report.bytes_written
        );
    }

    // Run a job once per key; a retry replays the recorded result.
    let keys = FileStore::open(dir.join("keys"))?;
    let options = OnceOptions::default();
    for attempt in 1..=2 {
        let outcome = keys
            .once("invoice-2024-01", "v1", &options, || async {
                Ok::<_, std::io::Error>("sent 3 invoices".to_string())
            })
            .await?;
        let how = if outcome.is_replayed() {
            "replayed"
        } else {
            "executed"
        };
        println!(
            "[idempotency] attempt {attempt}: {how}: {}",
            outcome.into_inner()
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
