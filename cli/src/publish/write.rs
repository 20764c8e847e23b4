//! The write step of `publish`: every partition goes to `put_files`, which writes only the
//! changed ones, then the commit.

use super::output;
use palisade_idempotency::source::Partition;
use palisade_idempotency::{ContentHash, PartitionedWriter, Report, Result};

/// Puts every partition and commits; aborts the run on the first error.
pub async fn write_all(
    mut writer: PartitionedWriter,
    parts: &[Partition],
    ids: &[ContentHash],
    expected_writes: usize,
) -> Result<Report> {
    let bar = output::bar(expected_writes as u64, "writing", false);
    for (p, id) in parts.iter().zip(ids) {
        match writer.put_files(&p.name, p.part_files(), *id).await {
            Ok(true) => bar.inc(1),
            Ok(false) => {}
            Err(e) => {
                bar.finish_and_clear();
                let _ = writer.abort().await;
                return Err(e);
            }
        }
    }
    bar.set_message("committing");
    let report = writer.commit().await;
    bar.finish_and_clear();
    report
}
