//! The publish plan: which of SRC's partitions a publish writes (new or changed), which it
//! leaves alone (unchanged), and what becomes of the committed partitions SRC no longer has
//! (kept, or removed with `remove_missing`).
//!
//! The plan compares the [identities](super::identities) with the manifest exactly as
//! [`PartitionedWriter::put_files`](crate::PartitionedWriter::put_files) does, so what it
//! announces is what [`write_all`](super::write_all) then writes. `palisade publish --dry-run`
//! and the Python package's `publish(dry_run=True)` print it instead of writing.

use super::Partition;
use crate::{ContentHash, Manifest, PartitionEntry};
use serde::Serialize;

/// What happens to one partition of SRC.
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

impl Action {
    /// The action's name as serialized: `new`, `changed` or `unchanged`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::New => "new",
            Action::Changed => "changed",
            Action::Unchanged => "unchanged",
        }
    }
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
    /// Committed partitions that SRC no longer has, removed (`remove_missing`).
    pub removed: Vec<String>,
    /// Committed partitions that SRC no longer has, kept (no `remove_missing`).
    pub kept: Vec<String>,
}

impl Plan {
    /// The items that are written (new or changed).
    pub fn writes(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| i.action != Action::Unchanged)
    }

    /// The names of the partitions that are written, in name order.
    pub fn written(&self) -> Vec<String> {
        self.writes().map(|i| i.partition.clone()).collect()
    }

    /// How many of SRC's partitions are left as they are.
    pub fn unchanged(&self) -> usize {
        self.items.len() - self.writes().count()
    }

    /// The total size of the partitions that are written.
    pub fn bytes_to_write(&self) -> u64 {
        self.writes().map(|i| i.bytes).sum()
    }
}

/// The identity the manifest records for a partition, as `put_files` compares it (`None` for
/// a partition written otherwise, which `put_files` always rewrites).
fn committed_identity(entry: &PartitionEntry) -> Option<ContentHash> {
    entry.identity
}

/// Compares SRC's partitions (sorted by name, as [`scan`](super::scan()) returns them) and
/// their identities (in the same order) with the committed manifest.
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
        assert_eq!(p.written(), ["d=2", "d=3"]);
        assert_eq!(p.unchanged(), 1);
        assert_eq!(p.bytes_to_write(), 0);
        let p = plan(&parts, &[a, b, b], &m, true);
        assert_eq!(p.removed, ["d=9"]);
        assert!(p.kept.is_empty());
    }

    #[test]
    fn actions_serialize_lowercase() {
        for action in [Action::New, Action::Changed, Action::Unchanged] {
            let json = serde_json::to_string(&action).unwrap();
            assert_eq!(json, format!("\"{}\"", action.as_str()));
        }
    }
}
