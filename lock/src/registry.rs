//! The registry of jobs running under `run_exclusive`, over any backend.

use std::sync::Arc;

use futures::stream::BoxStream;

use crate::backend::LockBackend;
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};

/// The jobs that run right now under `run_exclusive`, on every process that shares the backend.
#[derive(Clone)]
pub struct JobRegistry {
    pub(crate) backend: Arc<dyn LockBackend>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRegistry").finish_non_exhaustive()
    }
}

impl JobRegistry {
    /// The jobs running now, ordered by lock name. Entries of dead processes are not listed.
    pub async fn running(&self) -> Result<Vec<JobInfo>, LockError> {
        let mut jobs = self.backend.running().await?;
        jobs.sort_by(|a, b| a.lock.cmp(&b.lock));
        Ok(jobs)
    }

    /// A stream of `Started`, `Finished` and `Expired` events from now on. It never ends on its
    /// own: after a server restart or a compaction it re-reads the registry and carries on, so a
    /// change is reported even if the events that made it were lost (as `Expired` when it cannot
    /// tell whether the job finished).
    pub fn watch(&self) -> BoxStream<'static, JobEvent> {
        self.backend.watch_jobs()
    }
}
