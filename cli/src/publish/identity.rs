//! A partition's content identity: what decides whether it changed since the last publish.
//!
//! - `--content bytes` (default): BLAKE3 of every file; the partition's identity is a BLAKE3
//!   over the sorted per-file hashes, so the order of files does not count, and neither do
//!   their names (Spark names part files with a new random id every run) unless `--names`.
//! - `--content rows`: the rows of the partition's Parquet, CSV or JSON-lines files, in
//!   palisade-idempotency's order-insensitive row hash (see [`super::rows`]).
//!
//! Each mode hashes under its own BLAKE3 key, so switching modes rewrites every partition once.

use super::rows::{self, Format};
use super::scan::Partition;
use palisade_idempotency::ContentHash;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the identity of a partition is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Content {
    /// The bytes of its files.
    Bytes,
    /// The rows of its Parquet, CSV or JSON-lines files, in any order and split.
    Rows,
}

/// How identities are computed.
#[derive(Debug, Clone, Copy)]
pub struct IdentityOptions {
    /// Bytes or rows.
    pub content: Content,
    /// Whether file names count (bytes mode).
    pub names: bool,
    /// The file format in rows mode.
    pub format: Format,
    /// Partitions hashed at once.
    pub threads: usize,
}

/// BLAKE3 of a file (the crate's one read-and-hash loop); reports bytes as it reads.
pub fn hash_file(path: &Path, on_bytes: &(dyn Fn(u64) + Sync)) -> Result<ContentHash, String> {
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let (hash, _) = ContentHash::of_reader(f, |chunk| {
        on_bytes(chunk.len() as u64);
        Ok(())
    })
    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(hash)
}

/// The identity of one partition.
pub fn identity(
    partition: &Partition,
    opts: &IdentityOptions,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<ContentHash, String> {
    match opts.content {
        Content::Bytes => {
            let mut entries: Vec<(String, ContentHash)> = Vec::new();
            for f in &partition.files {
                let name = if opts.names {
                    f.name.clone()
                } else {
                    String::new()
                };
                entries.push((name, hash_file(&f.path, on_bytes)?));
            }
            entries.sort();
            let key = if opts.names {
                "palisade publish bytes+names v1"
            } else {
                "palisade publish bytes v1"
            };
            let mut h = blake3::Hasher::new_derive_key(key);
            h.update(&(entries.len() as u64).to_be_bytes());
            for (name, hash) in &entries {
                h.update(&(name.len() as u64).to_be_bytes());
                h.update(name.as_bytes());
                h.update(hash.as_bytes());
            }
            Ok(h.finalize().into())
        }
        Content::Rows => {
            let paths: Vec<&Path> = partition.files.iter().map(|f| f.path.as_path()).collect();
            let rows = rows::hash_partition(&paths, opts.format, on_bytes)?;
            let mut h = blake3::Hasher::new_derive_key("palisade publish rows v1");
            h.update(rows.finish().as_bytes());
            Ok(h.finalize().into())
        }
    }
}

/// The identities of all partitions, `opts.threads` partitions at a time; the first error
/// stops the work and is returned.
pub fn identities(
    partitions: &[Partition],
    opts: &IdentityOptions,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<Vec<ContentHash>, String> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<ContentHash>>> = Mutex::new(vec![None; partitions.len()]);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..opts.threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= partitions.len() || failed.lock().map_or(true, |f| f.is_some()) {
                        return;
                    }
                    match identity(&partitions[i], opts, on_bytes) {
                        Ok(h) => {
                            if let Ok(mut r) = results.lock() {
                                r[i] = Some(h);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    results
        .into_inner()
        .map_err(|_| "a hashing thread panicked".to_string())?
        .into_iter()
        .map(|h| h.ok_or_else(|| "a hashing thread panicked".to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::scan::SrcFile;

    fn part(dir: &Path, files: &[(&str, &str)]) -> Partition {
        Partition {
            name: "p=1".into(),
            files: files
                .iter()
                .map(|(n, content)| {
                    let path = dir.join(n);
                    std::fs::write(&path, content).unwrap();
                    SrcFile {
                        name: n.to_string(),
                        path,
                        size: content.len() as u64,
                    }
                })
                .collect(),
        }
    }

    fn opts(content: Content, names: bool) -> IdentityOptions {
        IdentityOptions {
            content,
            names,
            format: Format::Auto,
            threads: 2,
        }
    }

    #[test]
    fn bytes_identity_ignores_names_and_order_unless_asked() {
        let d = tempfile::tempdir().unwrap();
        let a = part(
            d.path(),
            &[("part-0-aaa.csv", "1\n"), ("part-1-aaa.csv", "2\n")],
        );
        let b = part(
            d.path(),
            &[("part-0-bbb.csv", "2\n"), ("part-1-bbb.csv", "1\n")],
        );
        let o = opts(Content::Bytes, false);
        assert_eq!(identity(&a, &o, &|_| {}), identity(&b, &o, &|_| {}));
        let named = opts(Content::Bytes, true);
        assert_ne!(identity(&a, &named, &|_| {}), identity(&b, &named, &|_| {}));
        let c = part(
            d.path(),
            &[("part-0-ccc.csv", "1\n"), ("part-1-ccc.csv", "3\n")],
        );
        assert_ne!(identity(&a, &o, &|_| {}), identity(&c, &o, &|_| {}));
        // Modes never share identities.
        assert_ne!(
            identity(&a, &o, &|_| {}).unwrap(),
            identity(&a, &opts(Content::Rows, false), &|_| {}).unwrap()
        );
    }

    #[test]
    fn parallel_identities_keep_order_and_count_bytes() {
        let d = tempfile::tempdir().unwrap();
        let parts: Vec<Partition> = (0..20)
            .map(|i| {
                let sub = d.path().join(i.to_string());
                std::fs::create_dir(&sub).unwrap();
                part(&sub, &[("f.csv", &format!("x\n{i}\n"))])
            })
            .collect();
        let counted = std::sync::atomic::AtomicU64::new(0);
        let o = opts(Content::Bytes, false);
        let all = identities(&parts, &o, &|n| {
            counted.fetch_add(n, Ordering::Relaxed);
        })
        .unwrap();
        for (p, h) in parts.iter().zip(&all) {
            assert_eq!(identity(p, &o, &|_| {}).unwrap(), *h);
        }
        let total: u64 = parts.iter().map(Partition::size).sum();
        assert_eq!(counted.load(Ordering::Relaxed), total);
        std::fs::remove_file(&parts[7].files[0].path).unwrap();
        let e = identities(&parts, &o, &|_| {}).unwrap_err();
        assert!(e.contains("7/f.csv"), "{e}");
    }
}
