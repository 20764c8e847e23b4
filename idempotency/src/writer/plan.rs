//! The commit plan: from the manifest a run started from, what it staged and its options, the
//! next manifest and what the commit deletes afterwards. Pure: no I/O, no clock; both targets
//! (local directory, object store) carry out the same plan.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, PartitionEntry, RetiredVersion};

/// What a run proposes to commit.
#[derive(Debug, Clone)]
pub(crate) struct Proposal<'a> {
    /// The manifest the run started from (`Manifest::empty()` if none).
    pub base: &'a Manifest,
    /// The partitions it wrote, with their new entries.
    pub staged: BTreeMap<&'a str, &'a PartitionEntry>,
    /// The partitions it put whose content was already committed.
    pub unchanged: &'a BTreeSet<String>,
    /// Remove the partitions not put in this run.
    pub remove_missing: bool,
    /// The base was written by another version: every partition must be put again.
    pub rewrite_all: bool,
    /// The writer's fencing token.
    pub fencing_token: Option<u64>,
    /// This run's id, recorded in the manifest it writes.
    pub commit_id: &'a str,
    /// Every partition owns its directory, which a commit replaces whole (local directory; old
    /// versions are retained there by the `swap` module, not through the manifest).
    pub whole_directories: bool,
    /// How long replaced objects are kept for readers of older versions (object stores).
    pub retain: Duration,
    /// When the base manifest was written, on the store's clock (ms since the epoch).
    pub base_written_at_ms: Option<i64>,
    /// The store's clock now (ms), when the base retains versions whose time may be up.
    pub now_ms: Option<i64>,
}

/// What a commit does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The manifest to write; `None` when nothing changed (nothing is written).
    pub next: Option<Manifest>,
    /// The partitions removed.
    pub removed: Vec<String>,
    /// Objects to delete after the commit (object stores): retained versions whose retention
    /// has passed, and with no retention the objects the base names and the next one does not.
    /// On a local directory old versions leave with their directories.
    pub obsolete: Vec<String>,
}

const NESTED_MULTI: &str = "a multi-file partition's directory belongs to it alone: no other \
                            partition can lie inside it";
const NESTED_LOCAL: &str = "on a local directory every partition's directory belongs to it alone \
                            (it is replaced whole): no other partition can lie inside it";

/// Plans a commit; refuses one that cannot be made (see the errors).
pub(crate) fn plan(p: &Proposal<'_>) -> Result<Plan> {
    let put = |k: &str| p.staged.contains_key(k) || p.unchanged.contains(k);
    if p.rewrite_all && !p.remove_missing && p.base.partitions.keys().any(|k| !put(k)) {
        // Their recorded hashes were made by the old version and cannot be carried over.
        return Err(Error::Config {
            field: "rewrite_on_version_change",
            reason: "needs every partition of the old manifest to be put in the run that \
                     rewrites it (or `remove_missing(true)`); nothing was committed",
        });
    }
    let removed: Vec<String> = if p.remove_missing {
        p.base
            .partitions
            .keys()
            .filter(|k| !put(k))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let mut next = p.base.clone();
    next.hash_algorithm = crate::hash::HASH_ALGORITHM.to_string();
    next.canonical_encoding = crate::hash::CANONICAL_ENCODING_VERSION;
    next.generation = p.base.generation + 1;
    next.fencing_token = match (p.base.fencing_token, p.fencing_token) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    next.commit_id = Some(p.commit_id.to_string());
    for (name, entry) in &p.staged {
        next.partitions
            .insert((*name).to_string(), (*entry).clone());
    }
    for name in &removed {
        next.partitions.remove(name);
    }
    next.format = next.needed_format();
    check_nesting(&next, p.whole_directories)?;
    let changed = !p.staged.is_empty()
        || !removed.is_empty()
        || next.fencing_token != p.base.fencing_token
        || !p.base.is_current_version();
    if !changed {
        return Ok(Plan {
            next: None,
            removed,
            obsolete: Vec::new(),
        });
    }
    let obsolete = if p.whole_directories {
        next.retired.clear();
        Vec::new()
    } else {
        retire(p, &mut next)
    };
    Ok(Plan {
        next: Some(next),
        removed,
        obsolete,
    })
}

/// Object stores: records the objects the base names and `next` does not as a version retired
/// by this commit, and drops the base's retired versions whose retention has passed. Returns the
/// objects to delete after the commit.
fn retire(p: &Proposal<'_>, next: &mut Manifest) -> Vec<String> {
    let live: BTreeSet<String> = next
        .partitions
        .values()
        .flat_map(|e| e.objects())
        .map(str::to_string)
        .collect();
    let replaced: Vec<String> = p
        .base
        .partitions
        .values()
        .flat_map(|e| e.objects())
        .filter(|o| !live.contains(*o))
        .map(str::to_string)
        .collect();
    let retain_ms = i64::try_from(p.retain.as_millis()).unwrap_or(i64::MAX);
    let mut obsolete = Vec::new();
    let mut retired = Vec::new();
    for r in &p.base.retired {
        let at = r.retired_at_ms.or(p.base_written_at_ms);
        let expired = p.retain.is_zero()
            || matches!((p.now_ms, at), (Some(now), Some(at)) if now.saturating_sub(at) >= retain_ms);
        if expired {
            obsolete.extend(r.objects.iter().filter(|o| !live.contains(*o)).cloned());
        } else {
            retired.push(RetiredVersion {
                retired_at_ms: at,
                ..r.clone()
            });
        }
    }
    if p.retain.is_zero() {
        obsolete.extend(replaced);
    } else if !replaced.is_empty() {
        retired.push(RetiredVersion {
            generation: next.generation,
            retired_at_ms: None,
            objects: replaced,
        });
    }
    next.retired = retired;
    obsolete
}

/// Refuses a manifest where a partition lies inside the directory of a multi-file partition
/// (or, with `whole_directories`, of any partition).
pub(crate) fn check_nesting(m: &Manifest, whole_directories: bool) -> Result<()> {
    for (name, e) in &m.partitions {
        if !(whole_directories || e.is_multi_file()) {
            continue;
        }
        let inside = format!("{name}/");
        if let Some((other, _)) = m
            .partitions
            .range(inside.clone()..)
            .next()
            .filter(|(k, _)| k.starts_with(&inside))
        {
            return Err(Error::InvalidPartition {
                name: other.clone(),
                reason: if e.is_multi_file() {
                    NESTED_MULTI
                } else {
                    NESTED_LOCAL
                },
            });
        }
    }
    Ok(())
}

/// The open-time fencing check.
pub(crate) fn check_fence(ours: Option<u64>, allow_unfenced: bool, m: &Manifest) -> Result<()> {
    match (ours, m.fencing_token) {
        (Some(ours), Some(recorded)) if ours < recorded => Err(Error::Fenced { ours, recorded }),
        (None, Some(recorded)) if !allow_unfenced => Err(Error::FencingTokenRequired { recorded }),
        _ => Ok(()),
    }
}

/// The commit-time check against the manifest found in the store: fencing first (a newer holder
/// is the more useful error), then the generation.
pub(crate) fn check_current(
    ours: Option<u64>,
    allow_unfenced: bool,
    prefix: &str,
    base: &Manifest,
    current: Option<&Manifest>,
) -> Result<()> {
    if let Some(c) = current {
        check_fence(ours, allow_unfenced, c)?;
    }
    let found = current.map(|m| m.generation).unwrap_or(0);
    if found != base.generation {
        return Err(Error::Conflict {
            prefix: prefix.to_string(),
            expected: (base.generation > 0).then_some(base.generation),
            found: current.map(|m| m.generation),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use crate::manifest::FileEntry;
    use proptest::prelude::*;

    const NAMES: [&str; 6] = ["a=1", "a=2", "b=1", "b=1/c=1", "c=1", "d=1"];

    fn entry(name: &str, version: u8, multi: bool) -> PartitionEntry {
        let hash = ContentHash::of_bytes(&[version]);
        let hex = hash.to_hex();
        if multi {
            let file = FileEntry {
                name: "part-0.csv".into(),
                object: format!("{name}/part-0-{}.csv", &hex[..16]),
                size: 1,
                hash,
            };
            PartitionEntry {
                object: format!("{name}/"),
                size: 1,
                hash: crate::manifest::files_digest(std::slice::from_ref(&file)),
                rows_hash: None,
                identity: Some(hash),
                files: vec![file],
            }
        } else {
            PartitionEntry {
                object: format!("{name}/part-{}-{}", &hex[..16], &hex[16..32]),
                size: 1,
                hash,
                rows_hash: None,
                identity: None,
                files: Vec::new(),
            }
        }
    }

    #[derive(Debug, Clone)]
    struct Case {
        base: Manifest,
        staged: BTreeMap<String, PartitionEntry>,
        unchanged: BTreeSet<String>,
        remove_missing: bool,
        fencing: (Option<u64>, Option<u64>),
        whole_directories: bool,
        retain: Duration,
        elapsed_ms: i64,
    }

    fn case() -> impl Strategy<Value = Case> {
        let per_name = proptest::collection::vec((0u8..4, any::<bool>()), NAMES.len());
        let retired =
            proptest::collection::vec((proptest::option::of(0i64..2_000_000), 1usize..3), 0..3);
        (
            per_name,
            any::<bool>(),
            proptest::option::of(0u64..4),
            proptest::option::of(0u64..4),
            any::<bool>(),
            (
                retired,
                prop_oneof![Just(0u64), Just(3_600_000)],
                0i64..8_000_000,
            ),
        )
            .prop_map(
                |(
                    per,
                    remove_missing,
                    base_fence,
                    ours,
                    whole,
                    (retired, retain_ms, elapsed_ms),
                )| {
                    let mut base = Manifest::empty();
                    base.generation = 7;
                    base.fencing_token = base_fence;
                    for (i, (at, n)) in retired.into_iter().enumerate() {
                        base.retired.push(RetiredVersion {
                            generation: 3 + i as u64,
                            retired_at_ms: at,
                            objects: (0..n).map(|j| format!("old/part-{i}-{j}")).collect(),
                        });
                    }
                    let (mut staged, mut unchanged) = (BTreeMap::new(), BTreeSet::new());
                    for (name, (what, multi)) in NAMES.iter().zip(per) {
                        // 0: absent; 1: in base, not put; 2: in base, put unchanged; 3: written.
                        if what >= 1 && !(what == 3 && multi) {
                            base.partitions
                                .insert(name.to_string(), entry(name, 1, multi));
                        }
                        match what {
                            2 => {
                                unchanged.insert(name.to_string());
                            }
                            3 => {
                                staged.insert(name.to_string(), entry(name, 2, multi));
                            }
                            _ => {}
                        }
                    }
                    Case {
                        base,
                        staged,
                        unchanged,
                        remove_missing,
                        fencing: (base_fence, ours),
                        whole_directories: whole,
                        retain: Duration::from_millis(retain_ms),
                        elapsed_ms,
                    }
                },
            )
    }

    fn propose(c: &Case) -> Proposal<'_> {
        Proposal {
            base: &c.base,
            staged: c.staged.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            unchanged: &c.unchanged,
            remove_missing: c.remove_missing,
            rewrite_all: false,
            fencing_token: c.fencing.1,
            commit_id: "0123456789abcdef",
            whole_directories: c.whole_directories,
            retain: c.retain,
            base_written_at_ms: Some(1_000_000),
            now_ms: Some(1_000_000 + c.elapsed_ms),
        }
    }

    proptest! {
        #[test]
        fn the_next_manifest_is_the_base_with_the_run_applied(c in case()) {
            let p = propose(&c);
            let plan = match plan(&p) {
                Ok(plan) => plan,
                Err(Error::InvalidPartition { name, .. }) => {
                    // Refused only for a real nesting.
                    prop_assert!(name.contains('/'));
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            let put = |k: &String| c.staged.contains_key(k) || c.unchanged.contains(k);
            let removed: Vec<String> = c.base.partitions.keys()
                .filter(|k| c.remove_missing && !put(k)).cloned().collect();
            prop_assert_eq!(&plan.removed, &removed);
            let fence_moved = match c.fencing { (Some(a), Some(b)) => b > a, (None, Some(_)) => true, _ => false };
            let Some(next) = &plan.next else {
                prop_assert!(c.staged.is_empty() && removed.is_empty() && !fence_moved);
                prop_assert!(plan.obsolete.is_empty());
                return Ok(());
            };
            prop_assert_eq!(next.generation, c.base.generation + 1);
            prop_assert_eq!(next.commit_id.as_deref(), Some("0123456789abcdef"));
            let want_fence = match c.fencing { (Some(a), Some(b)) => Some(a.max(b)), (a, b) => a.or(b) };
            prop_assert_eq!(next.fencing_token, want_fence);
            for (k, e) in &next.partitions {
                match c.staged.get(k) {
                    Some(s) => prop_assert_eq!(e, s),
                    None => prop_assert_eq!(Some(e), c.base.partitions.get(k)),
                }
                prop_assert!(!removed.contains(k));
            }
            for k in c.staged.keys() {
                prop_assert!(next.partitions.contains_key(k));
            }
            // Nothing the next manifest names or retains is deleted; every object the base
            // named or retained is named, retained or deleted (nothing leaks).
            let live: BTreeSet<&str> = next.partitions.values().flat_map(|e| e.objects()).collect();
            let kept: BTreeSet<&str> = next.retired.iter().flat_map(|r| r.objects.iter().map(String::as_str)).collect();
            for o in &plan.obsolete {
                prop_assert!(!live.contains(o.as_str()) && !kept.contains(o.as_str()), "{o} is live or retained");
            }
            if c.whole_directories {
                prop_assert!(plan.obsolete.is_empty() && next.retired.is_empty());
            } else {
                let before = c.base.partitions.values().flat_map(|e| e.objects())
                    .chain(c.base.retired.iter().flat_map(|r| r.objects.iter().map(String::as_str)));
                for o in before {
                    prop_assert!(live.contains(o) || kept.contains(o) || plan.obsolete.iter().any(|x| x == o), "{o} leaks");
                }
                if c.retain.is_zero() {
                    prop_assert!(next.retired.is_empty());
                }
                // A retained version stays exactly while its time is not up; only the one this
                // commit retires has no time yet (its manifest's own write time is it).
                let retain_ms = c.retain.as_millis() as i64;
                for r in &next.retired {
                    match r.retired_at_ms {
                        None => prop_assert_eq!(r.generation, next.generation),
                        Some(at) => prop_assert!(1_000_000 + c.elapsed_ms - at < retain_ms),
                    }
                }
                for r in &c.base.retired {
                    let at = r.retired_at_ms.unwrap_or(1_000_000);
                    let kept_it = next.retired.iter().any(|x| x.generation == r.generation);
                    prop_assert_eq!(kept_it, !c.retain.is_zero() && 1_000_000 + c.elapsed_ms - at < retain_ms);
                }
            }
        }
    }

    #[test]
    fn nesting_is_refused_for_multi_file_partitions_and_for_every_local_partition() {
        let mut m = Manifest::empty();
        m.partitions.insert("b=1".into(), entry("b=1", 1, false));
        m.partitions
            .insert("b=1/c=1".into(), entry("b=1/c=1", 1, false));
        check_nesting(&m, false).unwrap();
        assert!(check_nesting(&m, true).is_err());
        m.partitions.insert("b=1".into(), entry("b=1", 1, true));
        let err = check_nesting(&m, false).unwrap_err().to_string();
        assert!(
            err.contains("b=1/c=1") && err.contains("multi-file"),
            "{err}"
        );
    }

    #[test]
    fn a_rewrite_needs_every_old_partition() {
        let mut base = Manifest::empty();
        base.generation = 1;
        base.partitions.insert("a=1".into(), entry("a=1", 1, false));
        let none = BTreeSet::new();
        let p = Proposal {
            base: &base,
            staged: BTreeMap::new(),
            unchanged: &none,
            remove_missing: false,
            rewrite_all: true,
            fencing_token: None,
            commit_id: "x",
            whole_directories: false,
            retain: Duration::from_secs(3600),
            base_written_at_ms: None,
            now_ms: None,
        };
        assert!(matches!(
            plan(&p),
            Err(Error::Config {
                field: "rewrite_on_version_change",
                ..
            })
        ));
    }
}
