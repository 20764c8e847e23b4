//! The manifest: the dataset's commit point.
//!
//! `<prefix>/_manifest.json` names, for every live partition, the one object that holds its
//! content, with the BLAKE3 hash and size of that content. It is replaced atomically (rename on
//! a local disk, a conditional put on object stores), so a reader that reads the manifest first
//! and then the objects it names always sees one committed version of every partition: objects
//! named by a manifest are written completely before the manifest, and deleted only after a
//! later manifest stops naming them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hash::{CANONICAL_ENCODING_VERSION, ContentHash, HASH_ALGORITHM};
use crate::partition::{is_object_file_name, validate_partition};

/// The manifest's file name under the dataset prefix.
pub const MANIFEST_FILE: &str = "_manifest.json";

/// The version of the manifest's own layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// One live partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The object holding the partition's content, relative to the dataset prefix.
    pub object: String,
    /// The content's size in bytes.
    pub size: u64,
    /// BLAKE3 of the stored bytes (readers can verify what they read against it).
    pub hash: ContentHash,
    /// The row-content hash the writer compared, when it was given one
    /// ([`put_with_rows_hash`](crate::PartitionedWriter::put_with_rows_hash)); `None` when the
    /// partition's identity is its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_hash: Option<ContentHash>,
}

/// A committed version of the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest layout version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// The content hash algorithm ([`HASH_ALGORITHM`]).
    pub hash_algorithm: String,
    /// The canonical row encoding version ([`CANONICAL_ENCODING_VERSION`]).
    pub canonical_encoding: u32,
    /// Incremented by every commit; the first commit writes 1.
    pub generation: u64,
    /// The highest fencing token that has committed, if any writer used one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// The live partitions, by name.
    pub partitions: BTreeMap<String, PartitionEntry>,
}

impl Manifest {
    /// An empty manifest of this version (generation 0: nothing committed yet).
    pub fn empty() -> Self {
        Self {
            format: MANIFEST_FORMAT,
            hash_algorithm: HASH_ALGORITHM.to_string(),
            canonical_encoding: CANONICAL_ENCODING_VERSION,
            generation: 0,
            fencing_token: None,
            partitions: BTreeMap::new(),
        }
    }

    /// The bytes written to the store (pretty JSON, so people can read it).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and checks a manifest read from `path` (named in errors).
    ///
    /// A manifest that does not parse or is inconsistent is [`Error::CorruptManifest`]; one
    /// written by another format, hash algorithm or encoding is [`Error::IncompatibleManifest`]
    /// unless `accept_other_versions` (then the caller must treat every partition as changed).
    pub fn decode(bytes: &[u8], path: &str, accept_other_versions: bool) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptManifest {
            path: path.to_string(),
            reason,
        };
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        if m.format != MANIFEST_FORMAT && !accept_other_versions {
            return Err(Error::IncompatibleManifest {
                path: path.to_string(),
                field: "format",
                found: m.format.to_string(),
                supported: MANIFEST_FORMAT.to_string(),
            });
        }
        if m.hash_algorithm != HASH_ALGORITHM && !accept_other_versions {
            return Err(Error::IncompatibleManifest {
                path: path.to_string(),
                field: "hash_algorithm",
                found: m.hash_algorithm.clone(),
                supported: HASH_ALGORITHM.to_string(),
            });
        }
        if m.canonical_encoding != CANONICAL_ENCODING_VERSION && !accept_other_versions {
            return Err(Error::IncompatibleManifest {
                path: path.to_string(),
                field: "canonical_encoding",
                found: m.canonical_encoding.to_string(),
                supported: CANONICAL_ENCODING_VERSION.to_string(),
            });
        }
        if m.generation == 0 {
            return Err(corrupt("generation 0 is never committed".into()));
        }
        for (name, entry) in &m.partitions {
            validate_partition(name)
                .map_err(|e| corrupt(format!("bad partition name {name:?}: {e}")))?;
            let file = entry
                .object
                .strip_prefix(name.as_str())
                .and_then(|r| r.strip_prefix('/'));
            match file {
                Some(f) if !f.contains('/') && is_object_file_name(f) => {}
                _ => {
                    return Err(corrupt(format!(
                        "partition {name:?} names object {:?}, which is not one of its own",
                        entry.object
                    )));
                }
            }
        }
        Ok(m)
    }

    /// Whether this manifest was written by the current format, hash and encoding versions.
    pub fn is_current_version(&self) -> bool {
        self.format == MANIFEST_FORMAT
            && self.hash_algorithm == HASH_ALGORITHM
            && self.canonical_encoding == CANONICAL_ENCODING_VERSION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::empty();
        m.generation = 3;
        m.partitions.insert(
            "date=1".into(),
            PartitionEntry {
                object: "date=1/part-0123456789abcdef-0123456789abcdef.bin".into(),
                size: 4,
                hash: ContentHash::of_bytes(b"abcd"),
                rows_hash: None,
            },
        );
        m
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode(), "m", false).unwrap(), m);
    }

    #[test]
    fn truncated_is_corrupt_and_named() {
        let bytes = sample().encode();
        let err =
            Manifest::decode(&bytes[..bytes.len() / 2], "/data/_manifest.json", false).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::CorruptManifest { .. }));
        assert!(
            msg.contains("/data/_manifest.json") && msg.contains("restore"),
            "{msg}"
        );
    }

    #[test]
    fn foreign_object_is_corrupt() {
        let mut m = sample();
        m.partitions.get_mut("date=1").unwrap().object = "../etc/passwd".into();
        assert!(matches!(
            Manifest::decode(&m.encode(), "m", false),
            Err(Error::CorruptManifest { .. })
        ));
    }

    #[test]
    fn other_versions_are_detected() {
        let mut m = sample();
        m.hash_algorithm = "sha256".into();
        assert!(matches!(
            Manifest::decode(&m.encode(), "m", false),
            Err(Error::IncompatibleManifest {
                field: "hash_algorithm",
                ..
            })
        ));
        let mut m = sample();
        m.canonical_encoding = 2;
        assert!(matches!(
            Manifest::decode(&m.encode(), "m", false),
            Err(Error::IncompatibleManifest {
                field: "canonical_encoding",
                ..
            })
        ));
        assert!(
            !Manifest::decode(&m.encode(), "m", true)
                .unwrap()
                .is_current_version()
        );
    }
}
