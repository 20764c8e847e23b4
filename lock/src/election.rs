//! Leader election: the lock recipe with a value, plus observing who leads.

use std::sync::Arc;

use futures::stream::BoxStream;

use crate::backend::{Holder, Kind, LockBackend, Wait};
use crate::error::{LockError, validate_name};
use crate::guard::LockGuard;

/// Leader elections. Candidates queue in arrival order; the first one leads until it resigns or
/// its session is lost, then the next one leads.
#[derive(Clone)]
pub struct Election {
    pub(crate) backend: Arc<dyn LockBackend>,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election").finish_non_exhaustive()
    }
}

/// The current leader of an election.
pub type Leader = Holder;

impl Election {
    /// Waits until this candidate leads `name`, announcing `value` (an address, an id…).
    pub async fn campaign(
        &self,
        name: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<Leadership, LockError> {
        validate_name(name)?;
        let held = self
            .backend
            .acquire(Kind::Election, name, value.into(), Wait::Forever)
            .await?;
        tracing::info!(election = name, "became leader");
        Ok(Leadership {
            guard: LockGuard::new(name, held),
        })
    }

    /// The current leader of `name`, if any.
    pub async fn leader(&self, name: &str) -> Result<Option<Leader>, LockError> {
        validate_name(name)?;
        self.backend.holder(Kind::Election, name).await
    }

    /// The leader of `name` now and after each change (`None` while nobody leads). Survives
    /// server restarts and compactions.
    pub fn observe(&self, name: &str) -> BoxStream<'static, Option<Leader>> {
        self.backend.observe(Kind::Election, name)
    }
}

/// This process leads an election until [`Leadership::resign`], drop, or the session is lost.
#[derive(Debug)]
pub struct Leadership {
    guard: LockGuard,
}

impl Leadership {
    /// The election name.
    pub fn name(&self) -> &str {
        self.guard.name()
    }

    /// A token that strictly increases with every new leader of this election.
    pub fn fencing_token(&self) -> u64 {
        self.guard.fencing_token()
    }

    /// Resolves when leadership is lost with the session.
    pub async fn lost(&self) {
        self.guard.lost().await;
    }

    /// Whether leadership is lost now.
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// Steps down, so the next candidate leads.
    pub async fn resign(self) -> Result<(), LockError> {
        self.guard.release().await
    }
}
