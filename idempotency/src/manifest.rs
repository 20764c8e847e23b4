//! The manifest: the dataset's commit point.
//!
//! `<prefix>/_manifest.json` names, for every live partition, the one object that holds its
//! content, with the BLAKE3 hash and size of that content. It is replaced atomically (rename on
//! a local disk, a conditional put on object stores), so a reader that reads the manifest first
//! and then the objects it names always sees one committed version of every partition: objects
//! named by a manifest are written completely before the manifest, and deleted only after a
//! later manifest stops naming them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hash::{CANONICAL_ENCODING_VERSION, ContentHash, HASH_ALGORITHM};
use crate::partition::{is_object_file_name, validate_partition};

/// The manifest's file name under the dataset prefix.
pub const MANIFEST_FILE: &str = "_manifest.json";

/// The newest version of the manifest's own layout, which this version reads and writes.
///
/// Format 2 added multi-file partitions ([`PartitionEntry::files`]). A manifest without any
/// multi-file partition is still written as format [`MANIFEST_FORMAT_SINGLE_FILE`], so versions
/// of this crate that only know format 1 keep reading it; one that has multi-file partitions is
/// written as format 2, which those versions refuse with [`Error::IncompatibleManifest`] (never
/// mistaking it for a corrupt manifest). Both formats are current for this version: reading a
/// format 1 manifest rewrites nothing.
pub const MANIFEST_FORMAT: u32 = 2;

/// The manifest layout without multi-file partitions (format 1).
pub const MANIFEST_FORMAT_SINGLE_FILE: u32 = 1;

/// One file of a multi-file partition, as committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's name relative to the partition directory (may contain `/`).
    pub name: String,
    /// Where the file is stored, relative to the dataset prefix: `<partition>/<name>` on a local
    /// directory, `<partition>/<dir>/<stem>-<run16><ext>` on object stores (a unique name per
    /// version that keeps the file's extension).
    pub object: String,
    /// The file's size in bytes.
    pub size: u64,
    /// BLAKE3 of the file's bytes.
    pub hash: ContentHash,
}

/// One live partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The object holding the partition's content, relative to the dataset prefix. For a
    /// multi-file partition: its directory, `<partition>/` (the files are in [`files`](Self::files)).
    pub object: String,
    /// The content's size in bytes (the sum of the files' sizes for a multi-file partition).
    pub size: u64,
    /// BLAKE3 of the stored bytes (readers can verify what they read against it). For a
    /// multi-file partition: the BLAKE3 of its file listing ([`files_digest`]), so equal
    /// values mean the same names with the same contents.
    pub hash: ContentHash,
    /// The row-content hash the writer compared, when it was given one
    /// ([`put_with_rows_hash`](crate::PartitionedWriter::put_with_rows_hash)); `None` when the
    /// partition's identity is its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_hash: Option<ContentHash>,
    /// Multi-file partitions ([`put_files`](crate::PartitionedWriter::put_files)): the content
    /// identity the caller gave, which the writer compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<ContentHash>,
    /// Multi-file partitions: their files, sorted by name. Empty for a single-object partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
}

impl PartitionEntry {
    /// Whether this partition is made of several files ([`files`](Self::files)).
    pub fn is_multi_file(&self) -> bool {
        !self.files.is_empty()
    }

    /// The objects holding this partition's data, relative to the dataset prefix: the one
    /// [`object`](Self::object), or every file's object for a multi-file partition.
    pub fn objects(&self) -> Vec<&str> {
        if self.is_multi_file() {
            self.files.iter().map(|f| f.object.as_str()).collect()
        } else {
            vec![self.object.as_str()]
        }
    }
}

/// Objects a commit replaced or removed, kept on an object store for readers that are still
/// reading the version that named them, until the writer's retention has passed
/// ([`WriterBuilder::retain`](crate::WriterBuilder::retain)); the first commit after that deletes
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredVersion {
    /// The generation of the commit that stopped naming them.
    pub generation: u64,
    /// When that commit was written, in milliseconds since the Unix epoch on the **store's**
    /// clock. `None` in the manifest of that commit itself: its own `last_modified` is the time,
    /// and the next writer records it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at_ms: Option<i64>,
    /// The objects, relative to the dataset prefix.
    pub objects: Vec<String>,
}

/// The BLAKE3 of a multi-file partition's listing: for each file sorted by name, its name's
/// length and bytes, its size and its hash (all little-endian, length-prefixed, so no two
/// listings encode alike). Recorded as the partition's [`PartitionEntry::hash`].
pub fn files_digest(files: &[FileEntry]) -> ContentHash {
    let mut sorted: Vec<&FileEntry> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = blake3::Hasher::new();
    h.update(b"palisade-files-v1");
    h.update(&(sorted.len() as u64).to_le_bytes());
    for f in sorted {
        h.update(&(f.name.len() as u64).to_le_bytes());
        h.update(f.name.as_bytes());
        h.update(&f.size.to_le_bytes());
        h.update(f.hash.as_bytes());
    }
    h.finalize().into()
}

/// A committed version of the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest layout version ([`MANIFEST_FORMAT_SINGLE_FILE`], or [`MANIFEST_FORMAT`] when
    /// it has multi-file partitions).
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
    /// The id of the run that wrote this manifest: after a manifest write whose answer was lost
    /// or wrong, the writer reads the manifest back and knows by this id whether its write
    /// landed. Absent in manifests written before this field existed (older readers ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
    /// The live partitions, by name.
    pub partitions: BTreeMap<String, PartitionEntry>,
    /// Object stores: versions replaced by recent commits, kept until the retention has passed.
    /// Older readers of the format ignore this field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<RetiredVersion>,
}

impl Manifest {
    /// An empty manifest of this version (generation 0: nothing committed yet).
    pub fn empty() -> Self {
        Self {
            format: MANIFEST_FORMAT_SINGLE_FILE,
            hash_algorithm: HASH_ALGORITHM.to_string(),
            canonical_encoding: CANONICAL_ENCODING_VERSION,
            generation: 0,
            fencing_token: None,
            commit_id: None,
            partitions: BTreeMap::new(),
            retired: Vec::new(),
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
        let format_ok = (MANIFEST_FORMAT_SINGLE_FILE..=MANIFEST_FORMAT).contains(&m.format);
        if !format_ok && !accept_other_versions {
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
            if entry.is_multi_file() {
                check_multi_file(name, entry).map_err(corrupt)?;
                continue;
            }
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
        for r in &m.retired {
            if let Some(bad) = r.objects.iter().find(|o| !is_safe_relative(o)) {
                return Err(corrupt(format!(
                    "retired object {bad:?} of generation {} is not a path inside the dataset",
                    r.generation
                )));
            }
        }
        Ok(m)
    }

    /// Every object this manifest keeps: the live partitions' objects and the retained
    /// versions' (an orphan sweep must keep them, and a clean-up must not delete them).
    pub fn kept_objects(&self) -> impl Iterator<Item = &str> {
        self.partitions.values().flat_map(|e| e.objects()).chain(
            self.retired
                .iter()
                .flat_map(|r| r.objects.iter().map(String::as_str)),
        )
    }

    /// Whether this manifest was written by a current format, hash and encoding version.
    pub fn is_current_version(&self) -> bool {
        (MANIFEST_FORMAT_SINGLE_FILE..=MANIFEST_FORMAT).contains(&self.format)
            && self.hash_algorithm == HASH_ALGORITHM
            && self.canonical_encoding == CANONICAL_ENCODING_VERSION
    }

    /// The oldest layout that can hold this manifest: format 2 only if it has a multi-file
    /// partition, so that older versions of this crate keep reading everything else.
    pub fn needed_format(&self) -> u32 {
        if self.partitions.values().any(PartitionEntry::is_multi_file) {
            MANIFEST_FORMAT
        } else {
            MANIFEST_FORMAT_SINGLE_FILE
        }
    }
}

/// Checks a multi-file entry: its directory, file names and objects stay inside the partition.
fn check_multi_file(name: &str, entry: &PartitionEntry) -> std::result::Result<(), String> {
    if entry.object != format!("{name}/") {
        return Err(format!(
            "multi-file partition {name:?} names directory {:?}, which is not its own",
            entry.object
        ));
    }
    let mut seen = BTreeSet::new();
    for f in &entry.files {
        validate_partition(&f.name)
            .map_err(|e| format!("partition {name:?} has a bad file name {:?}: {e}", f.name))?;
        if !seen.insert(f.name.as_str()) {
            return Err(format!("partition {name:?} lists file {:?} twice", f.name));
        }
        let ok = f
            .object
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(is_safe_relative);
        if !ok {
            return Err(format!(
                "partition {name:?} names object {:?}, which is not one of its own",
                f.object
            ));
        }
    }
    Ok(())
}

/// A relative path of non-empty segments, none of them `.` or `..`, without backslashes.
pub(crate) fn is_safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
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
                identity: None,
                files: Vec::new(),
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

    /// A manifest as the first version of this crate wrote it (format 1, no multi-file fields).
    const FORMAT_1: &str = r#"{
  "format": 1,
  "hash_algorithm": "blake3",
  "canonical_encoding": 1,
  "generation": 4,
  "fencing_token": 7,
  "partitions": {
    "date=1": {
      "object": "date=1/part-0123456789abcdef-0123456789abcdef.csv",
      "size": 4,
      "hash": "0000000000000000000000000000000000000000000000000000000000000000"
    }
  }
}"#;

    #[test]
    fn format_1_manifests_stay_readable_and_are_written_back_as_format_1() {
        let m = Manifest::decode(FORMAT_1.as_bytes(), "m", false).unwrap();
        assert!(m.is_current_version());
        assert_eq!(m.needed_format(), MANIFEST_FORMAT_SINGLE_FILE);
        let e = &m.partitions["date=1"];
        assert!(!e.is_multi_file() && e.identity.is_none());
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            !text.contains("files") && !text.contains("identity"),
            "{text}"
        );
    }

    fn multi() -> Manifest {
        let mut m = sample();
        let files = vec![FileEntry {
            name: "sub/part-0.parquet".into(),
            object: "date=2/sub/part-0.parquet".into(),
            size: 3,
            hash: ContentHash::of_bytes(b"abc"),
        }];
        m.partitions.insert(
            "date=2".into(),
            PartitionEntry {
                object: "date=2/".into(),
                size: 3,
                hash: files_digest(&files),
                rows_hash: None,
                identity: Some(ContentHash::of_bytes(b"id")),
                files,
            },
        );
        m.format = m.needed_format();
        m
    }

    #[test]
    fn multi_file_entries_round_trip_as_format_2() {
        let m = multi();
        assert_eq!(m.format, 2);
        assert_eq!(Manifest::decode(&m.encode(), "m", false).unwrap(), m);
        assert_eq!(
            m.partitions["date=2"].objects(),
            vec!["date=2/sub/part-0.parquet"]
        );
        let mut future = m.clone();
        future.format = 3;
        assert!(matches!(
            Manifest::decode(&future.encode(), "m", false),
            Err(Error::IncompatibleManifest {
                field: "format",
                ..
            })
        ));
    }

    #[test]
    fn multi_file_entries_cannot_escape_their_partition() {
        for (object, name) in [
            ("date=1/x", "x"),
            ("date=2/../x", "x"),
            ("date=2//x", "x"),
            ("date=2/x", "../x"),
            ("date=2/x", "_SUCCESS"),
        ] {
            let mut m = multi();
            let e = m.partitions.get_mut("date=2").unwrap();
            e.files[0].object = object.into();
            e.files[0].name = name.into();
            assert!(
                matches!(
                    Manifest::decode(&m.encode(), "m", false),
                    Err(Error::CorruptManifest { .. })
                ),
                "{object} {name}"
            );
        }
        let mut m = multi();
        m.partitions.get_mut("date=2").unwrap().object = "date=1/".into();
        assert!(Manifest::decode(&m.encode(), "m", false).is_err());
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
