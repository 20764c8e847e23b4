//! The write step of `publish`: every partition goes to `put_files`, which writes only the
//! changed ones, then the commit.

use super::output;
use super::scan::Partition;
use palisade_idempotency::{ContentHash, PartFile, PartitionedWriter, Report, Result};

/// Puts every partition and commits; aborts the run on the first error.
pub async fn write_all(
    mut writer: PartitionedWriter,
    parts: &[Partition],
    ids: &[ContentHash],
    expected_writes: usize,
) -> Result<Report> {
    let bar = output::bar(expected_writes as u64, "writing", false);
    for (p, id) in parts.iter().zip(ids) {
        let files = p
            .files
            .iter()
            .map(|f| PartFile::new(f.name.clone(), f.path.clone()))
            .collect();
        match writer.put_files(&p.name, files, *id).await {
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
