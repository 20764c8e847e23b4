//! The write step of a publish: every partition of SRC goes to
//! [`PartitionedWriter::put_files`], which writes only those whose identity changed, then the
//! commit. Readers see all of it at the commit, or none of it.

use super::Partition;
use crate::{ContentHash, PartitionedWriter, Report, Result};

/// A step of [`write_all`], reported to its progress callback (for progress bars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// This partition was written (its identity was new or changed).
    Written(&'a str),
    /// Every partition is put; the commit starts.
    Committing,
}

/// Puts every partition (with its identity, in the same order) and commits, returning the
/// commit's [`Report`]. On the first error the run is aborted (its staged objects dropped, the
/// dataset unchanged) and the error returned.
pub async fn write_all(
    mut writer: PartitionedWriter,
    partitions: &[Partition],
    identities: &[ContentHash],
    on_progress: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<Report> {
    for (p, id) in partitions.iter().zip(identities) {
        match writer.put_files(&p.name, p.part_files(), *id).await {
            Ok(true) => on_progress(Progress::Written(&p.name)),
            Ok(false) => {}
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
    }
    on_progress(Progress::Committing);
    writer.commit().await
}
