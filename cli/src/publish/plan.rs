//! The plan: which partitions a publish writes, leaves alone, and removes.

use palisade_idempotency::source::Partition;
use palisade_idempotency::{ContentHash, Manifest, PartitionEntry};
use serde::Serialize;

/// What happens to one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Not in the dataset yet: written.
    New,
    /// Its identity differs from the committed one: written.
    Changed,
    /// Its identity is the committed one: nothing is written.
    Unchanged,
}

/// One partition of SRC and what happens to it.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// The partition name.
    pub partition: String,
    /// New, changed or unchanged.
    pub action: Action,
    /// Its files.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
}

/// Everything a publish would do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// SRC's partitions, sorted by name.
    pub items: Vec<Item>,
    /// Committed partitions that SRC no longer has, removed with `--remove-missing`.
    pub removed: Vec<String>,
    /// Committed partitions that SRC no longer has, kept (no `--remove-missing`).
    pub kept: Vec<String>,
}

impl Plan {
    /// The items that are written.
    pub fn writes(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| i.action != Action::Unchanged)
    }
}

/// The identity the manifest records for a partition, as `put_files` compares it (`None` for
/// a partition written otherwise, which `put_files` always rewrites).
pub fn committed_identity(entry: &PartitionEntry) -> Option<ContentHash> {
    entry.identity
}

/// Compares SRC's partitions (with their identities, in the same order) with the manifest.
pub fn plan(
    partitions: &[Partition],
    identities: &[ContentHash],
    manifest: &Manifest,
    remove_missing: bool,
) -> Plan {
    let items: Vec<Item> = partitions
        .iter()
        .zip(identities)
        .map(|(p, id)| Item {
            partition: p.name.clone(),
            action: match manifest.partitions.get(&p.name) {
                None => Action::New,
                Some(e) if committed_identity(e) == Some(*id) => Action::Unchanged,
                Some(_) => Action::Changed,
            },
            files: p.files.len(),
            bytes: p.size(),
        })
        .collect();
    let missing: Vec<String> = manifest
        .partitions
        .keys()
        .filter(|k| partitions.binary_search_by(|p| p.name.cmp(k)).is_err())
        .cloned()
        .collect();
    let (removed, kept) = if remove_missing {
        (missing, Vec::new())
    } else {
        (Vec::new(), missing)
    };
    Plan {
        items,
        removed,
        kept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: ContentHash) -> PartitionEntry {
        PartitionEntry {
            object: "x".into(),
            size: 1,
            hash: ContentHash::of_bytes(b"stored bytes"),
            rows_hash: None,
            identity: Some(id),
            files: vec![],
        }
    }

    #[test]
    fn new_changed_unchanged_and_missing() {
        let (a, b) = (ContentHash::of_bytes(b"a"), ContentHash::of_bytes(b"b"));
        let mut m = Manifest::empty();
        m.partitions.insert("d=1".into(), entry(a));
        m.partitions.insert("d=2".into(), entry(a));
        m.partitions.insert("d=9".into(), entry(a));
        let parts: Vec<Partition> = ["d=1", "d=2", "d=3"]
            .iter()
            .map(|n| Partition {
                name: n.to_string(),
                files: vec![],
            })
            .collect();
        let p = plan(&parts, &[a, b, b], &m, false);
        let actions: Vec<Action> = p.items.iter().map(|i| i.action).collect();
        assert_eq!(actions, [Action::Unchanged, Action::Changed, Action::New]);
        assert_eq!(p.kept, ["d=9"]);
        assert!(p.removed.is_empty());
        assert_eq!(p.writes().count(), 2);
        let p = plan(&parts, &[a, b, b], &m, true);
        assert_eq!(p.removed, ["d=9"]);
    }
}
