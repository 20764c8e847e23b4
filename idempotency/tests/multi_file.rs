//! Multi-file partitions (`put_files`): a Hive-style partition directory of several part files
//! whose names change every run, on the local directory and on an object store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::ObjectStore;
use palisade_idempotency::{
    ContentHash, Dataset, DatasetStore, Error, PartFile, PartitionedWriter, Report,
};

/// A partition's files: name -> content.
type Files = BTreeMap<String, String>;

/// The files of partition `p` at `version`: Spark-like names that change with every version.
fn files(p: usize, version: u32) -> Files {
    (0..3)
        .map(|i| {
            (
                format!("part-{i:05}-v{version}.c000.csv"),
                format!("p{p} file {i} version {version}\n").repeat(20 + i * 7),
            )
        })
        .collect()
}

/// The caller's identity: BLAKE3 of the contents, order-insensitive, names not counted.
fn identity(f: &Files) -> ContentHash {
    let mut hashes: Vec<ContentHash> = f
        .values()
        .map(|c| ContentHash::of_bytes(c.as_bytes()))
        .collect();
    hashes.sort();
    let mut h = blake3::Hasher::new();
    for x in hashes {
        h.update(x.as_bytes());
    }
    h.finalize().into()
}

/// Writes `f` under `src/<partition>/` and returns the `PartFile`s.
fn source(src: &Path, partition: &str, f: &Files) -> Vec<PartFile> {
    let dir = src.join(partition);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    f.iter()
        .map(|(name, content)| {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
            PartFile::new(name.clone(), path)
        })
        .collect()
}

/// One run: puts each `(partition, files)` and commits.
async fn run(store: &DatasetStore, src: &Path, parts: &[(String, Files)], remove: bool) -> Report {
    // No retention: these tests check that replaced versions are gone after the commit
    // (tests/retention.rs checks what the default retention keeps).
    let mut w = PartitionedWriter::builder(store, "t")
        .remove_missing(remove)
        .retain(std::time::Duration::ZERO)
        .open()
        .await
        .unwrap();
    for (name, f) in parts {
        let pf = source(src, name, f);
        w.put_files(name, pf, identity(f)).await.unwrap();
    }
    w.commit().await.unwrap()
}

/// What a plain directory reader sees in a local partition: visible files (no `.`/`_` names).
fn visible(dir: &Path) -> Files {
    let mut out = Files::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                out.insert(rel, std::fs::read_to_string(e.path()).unwrap());
            }
        }
    }
    out
}

/// Everything in a local partition directory, hidden files included.
fn all_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// What a reader through the manifest sees in a partition.
async fn through_manifest(store: &DatasetStore, partition: &str) -> Files {
    let ds = Dataset::open(store, "t").await.unwrap();
    let entry = ds.manifest().unwrap().partitions[partition].clone();
    let mut out = Files::new();
    for f in &entry.files {
        let bytes = ds.read_file(partition, &f.name).await.unwrap().unwrap();
        out.insert(f.name.clone(), String::from_utf8(bytes.to_vec()).unwrap());
    }
    out
}

async fn object_count(mem: &Arc<object_store::memory::InMemory>) -> usize {
    let all: Vec<_> = mem.list(None).try_collect().await.unwrap();
    all.len()
}

fn name(p: usize) -> String {
    format!("date=2024-01-{p:02}")
}

#[tokio::test]
async fn local_rerun_writes_nothing_and_a_change_swaps_exactly_that_directory() {
    let (tmp, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = DatasetStore::local(tmp.path());
    let parts: Vec<(String, Files)> = (1..=4).map(|p| (name(p), files(p, 1))).collect();
    let first = run(&store, src.path(), &parts, false).await;
    assert_eq!(first.written.len(), 4);
    let total: usize = parts
        .iter()
        .flat_map(|(_, f)| f.values())
        .map(String::len)
        .sum();
    assert_eq!(first.bytes_written, total as u64);
    assert_eq!(first.bytes_hashed, total as u64);
    for (n, f) in &parts {
        let dir = tmp.path().join("t").join(n);
        assert_eq!(
            &visible(&dir),
            f,
            "{n}: a real directory of exactly its files"
        );
        assert_eq!(
            all_names(&dir),
            f.keys().cloned().collect::<Vec<_>>(),
            "no marker left"
        );
        assert_eq!(&through_manifest(&store, n).await, f);
    }
    let m = Dataset::open(&store, "t").await.unwrap();
    assert_eq!(m.manifest().unwrap().format, 2);
    let e = &m.manifest().unwrap().partitions[&name(1)];
    assert_eq!(e.identity, Some(identity(&files(1, 1))));
    assert_eq!(e.files.len(), 3);
    assert_eq!(e.object, format!("{}/", name(1)));

    // Same identity: nothing written, not even read.
    let again = run(&store, src.path(), &parts, false).await;
    assert_eq!((again.bytes_written, again.bytes_hashed), (0, 0));
    assert_eq!(again.unchanged.len(), 4);
    assert!(!again.manifest_written);

    // The same contents under new names (Spark's next run): the identity is the caller's, so
    // nothing is written either.
    let renamed: Vec<(String, Files)> = parts
        .iter()
        .map(|(n, f)| {
            let f2 = f
                .iter()
                .map(|(k, v)| (format!("x-{k}"), v.clone()))
                .collect();
            (n.clone(), f2)
        })
        .collect();
    assert_eq!(
        run(&store, src.path(), &renamed, false).await.bytes_written,
        0
    );

    // One partition changes: exactly it is rewritten, with exactly the new files.
    let mut changed = parts.clone();
    changed[2].1 = files(3, 2);
    let before_other = all_names(&tmp.path().join("t").join(name(2)));
    let r = run(&store, src.path(), &changed, false).await;
    assert_eq!(r.written, vec![name(3)]);
    let new_total: usize = files(3, 2).values().map(String::len).sum();
    assert_eq!(r.bytes_written, new_total as u64);
    let dir3 = tmp.path().join("t").join(name(3));
    assert_eq!(visible(&dir3), files(3, 2), "old names are gone");
    assert_eq!(
        all_names(&dir3),
        files(3, 2).keys().cloned().collect::<Vec<_>>()
    );
    assert_eq!(all_names(&tmp.path().join("t").join(name(2))), before_other);
    assert_eq!(through_manifest(&store, &name(3)).await, files(3, 2));
    // No leftovers: the old version was deleted after the commit.
    let staging = tmp.path().join("t/_staging");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    assert!(!tmp.path().join("t/_manifest.pending.json").exists());
}

#[tokio::test]
async fn memory_store_multi_file_partitions() {
    let src = tempfile::tempdir().unwrap();
    let mem = Arc::new(object_store::memory::InMemory::new());
    let store = DatasetStore::from(mem.clone());
    let parts: Vec<(String, Files)> = (1..=3).map(|p| (name(p), files(p, 1))).collect();
    let first = run(&store, src.path(), &parts, false).await;
    assert_eq!(first.written.len(), 3);
    assert_eq!(object_count(&mem).await, 1 + 9, "manifest + 3 files each");
    let ds = Dataset::open(&store, "t").await.unwrap();
    let live = ds.live_files();
    assert_eq!(live.len(), 3);
    for (p, objects) in &live {
        assert_eq!(objects.len(), 3);
        for o in objects {
            // Unique names that keep the extension.
            assert!(
                o.starts_with(&format!("{p}/part-")) && o.ends_with(".c000.csv"),
                "{o}"
            );
        }
    }
    for (n, f) in &parts {
        assert_eq!(&through_manifest(&store, n).await, f);
    }
    let again = run(&store, src.path(), &parts, false).await;
    assert_eq!(again.bytes_written, 0);

    let mut changed = parts.clone();
    changed[0].1 = files(1, 2);
    let r = run(&store, src.path(), &changed, false).await;
    assert_eq!(r.written, vec![name(1)]);
    assert_eq!(through_manifest(&store, &name(1)).await, files(1, 2));
    assert_eq!(
        object_count(&mem).await,
        1 + 9,
        "replaced objects are deleted"
    );

    let r = run(&store, src.path(), &changed[1..], true).await;
    assert_eq!(r.removed, vec![name(1)]);
    assert_eq!(object_count(&mem).await, 1 + 6);
    assert!(
        Dataset::open(&store, "t")
            .await
            .unwrap()
            .live_files()
            .iter()
            .all(|(p, _)| *p != name(1))
    );
}

#[tokio::test]
async fn memory_url_works() {
    let src = tempfile::tempdir().unwrap();
    let store = palisade_idempotency::store_from_url("memory:///base").unwrap();
    let parts = vec![(name(1), files(1, 1))];
    assert_eq!(
        run(&store, src.path(), &parts, false).await.written.len(),
        1
    );
    assert_eq!(
        run(&store, src.path(), &parts, false).await.bytes_written,
        0
    );
    assert_eq!(through_manifest(&store, &name(1)).await, files(1, 1));
}

#[tokio::test]
async fn remove_missing_removes_the_directory_only_when_asked() {
    let (tmp, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = DatasetStore::local(tmp.path());
    let parts: Vec<(String, Files)> = vec![
        ("k=1/j=a".to_string(), files(1, 1)),
        ("k=1/j=b".to_string(), files(2, 1)),
        ("k=2/j=a".to_string(), files(3, 1)),
    ];
    run(&store, src.path(), &parts, false).await;
    let kept = run(&store, src.path(), &parts[..1], false).await;
    assert!(kept.removed.is_empty());
    assert!(tmp.path().join("t/k=2/j=a").is_dir());
    let r = run(&store, src.path(), &parts[..1], true).await;
    assert_eq!(
        r.removed,
        vec!["k=1/j=b".to_string(), "k=2/j=a".to_string()]
    );
    assert_eq!(r.bytes_written, 0);
    assert!(!tmp.path().join("t/k=1/j=b").exists());
    assert!(
        !tmp.path().join("t/k=2").exists(),
        "empty parents are removed too"
    );
    assert_eq!(visible(&tmp.path().join("t/k=1/j=a")), files(1, 1));
    assert_eq!(
        Dataset::open(&store, "t").await.unwrap().partitions(),
        vec!["k=1/j=a"]
    );
    assert_eq!(
        std::fs::read_dir(tmp.path().join("t/_staging"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn fenced_commit_leaves_the_live_directory_untouched() {
    for local in [true, false] {
        let (tmp, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = if local {
            DatasetStore::local(tmp.path())
        } else {
            DatasetStore::memory()
        };
        let p = name(1);
        let mut b0 = PartitionedWriter::builder(&store, "t")
            .fencing_token(4)
            .open()
            .await
            .unwrap();
        b0.put_files(
            &p,
            source(src.path(), "s0", &files(1, 1)),
            identity(&files(1, 1)),
        )
        .await
        .unwrap();
        b0.commit().await.unwrap();

        // Holder A (token 5) stages a new version; holder B (token 6) commits another.
        let mut a = PartitionedWriter::builder(&store, "t")
            .fencing_token(5)
            .open()
            .await
            .unwrap();
        assert!(
            a.put_files(
                &p,
                source(src.path(), "sa", &files(1, 5)),
                identity(&files(1, 5))
            )
            .await
            .unwrap()
        );
        let mut b = PartitionedWriter::builder(&store, "t")
            .fencing_token(6)
            .open()
            .await
            .unwrap();
        b.put_files(
            &p,
            source(src.path(), "sb", &files(1, 6)),
            identity(&files(1, 6)),
        )
        .await
        .unwrap();
        b.commit().await.unwrap();
        let before = local.then(|| visible(&tmp.path().join("t").join(&p)));
        let err = a.commit().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Fenced {
                    ours: 5,
                    recorded: 6
                }
            ),
            "{err}"
        );
        assert_eq!(through_manifest(&store, &p).await, files(1, 6));
        if let Some(before) = before {
            let dir = tmp.path().join("t").join(&p);
            assert_eq!(visible(&dir), before);
            assert_eq!(visible(&dir), files(1, 6));
            assert_eq!(
                std::fs::read_dir(tmp.path().join("t/_staging"))
                    .unwrap()
                    .count(),
                0
            );
        }
    }
}

#[tokio::test]
async fn bad_files_and_nesting_are_refused() {
    let (tmp, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = DatasetStore::local(tmp.path());
    let f = files(1, 1);
    let good = source(src.path(), "s", &f);
    let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
    let id = identity(&f);
    for bad in [
        "../x",
        "/abs",
        "a//b",
        "_SUCCESS",
        ".hidden.crc",
        "a/../../b",
    ] {
        let pf = vec![PartFile::new(bad, good[0].path.clone())];
        let err = w.put_files("p=1", pf, id).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidPartition { .. }),
            "{bad:?}: {err}"
        );
    }
    let dup = vec![good[0].clone(), good[0].clone()];
    assert!(matches!(
        w.put_files("p=1", dup, id).await,
        Err(Error::InvalidPartition { .. })
    ));
    let clash = vec![
        PartFile::new("a", good[0].path.clone()),
        PartFile::new("a/b", good[1].path.clone()),
    ];
    assert!(matches!(
        w.put_files("p=1", clash, id).await,
        Err(Error::InvalidPartition { .. })
    ));
    assert!(matches!(
        w.put_files("p=1", vec![], id).await,
        Err(Error::InvalidPartition { .. })
    ));
    // A missing input file is an input error naming it.
    let missing = vec![PartFile::new("x.csv", src.path().join("nope.csv"))];
    let err = w.put_files("p=2", missing, id).await.unwrap_err();
    assert!(err.to_string().contains("nope.csv"), "{err}");

    // A partition inside a multi-file partition's directory is refused.
    w.put_files("p=1", good.clone(), id).await.unwrap();
    let err = w.put("p=1/q=2", "x").await;
    assert!(
        err.is_ok(),
        "put itself is fine; the commit refuses the nesting"
    );
    let err = w.commit().await.unwrap_err();
    assert!(matches!(err, Error::InvalidPartition { .. }), "{err}");
    assert!(!tmp.path().join("t/p=1").exists(), "nothing was committed");
    let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
    w.put("p=1/q=2", "x").await.unwrap();
    let err = w.put_files("p=1", good, id).await.unwrap_err();
    assert!(matches!(err, Error::InvalidPartition { .. }), "{err}");
}

#[tokio::test]
async fn single_object_and_multi_file_versions_replace_each_other() {
    for local in [true, false] {
        let (tmp, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = if local {
            DatasetStore::local(tmp.path())
        } else {
            DatasetStore::memory()
        };
        let p = name(1);
        let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
        w.put(&p, "single\n").await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(
            Dataset::open(&store, "t")
                .await
                .unwrap()
                .manifest()
                .unwrap()
                .format,
            1
        );

        run(&store, src.path(), &[(p.clone(), files(1, 1))], false).await;
        assert_eq!(through_manifest(&store, &p).await, files(1, 1));
        if local {
            assert_eq!(visible(&tmp.path().join("t").join(&p)), files(1, 1));
        }

        let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
        w.put(&p, "single again\n").await.unwrap();
        w.commit().await.unwrap();
        let ds = Dataset::open(&store, "t").await.unwrap();
        assert_eq!(ds.read(&p).await.unwrap().unwrap(), "single again\n");
        assert_eq!(ds.manifest().unwrap().format, 1, "back to the old format");
        assert_eq!(ds.live_files()[0].1.len(), 1);
        if local {
            let listed = all_names(&tmp.path().join("t").join(&p));
            assert_eq!(listed.len(), 1, "{listed:?}");
        }
    }
}

#[tokio::test]
async fn nested_names_and_large_files_stream() {
    for local in [true, false] {
        let (tmp, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = if local {
            DatasetStore::local(tmp.path())
        } else {
            DatasetStore::memory()
        };
        // 20 MiB: more than one 8 MiB chunk (multipart upload on object stores).
        let big: String = "0123456789abcdef".repeat(20 << 16);
        let f: Files = [
            ("sub/a.parquet".to_string(), big.clone()),
            ("b.parquet".to_string(), "small".to_string()),
        ]
        .into();
        let r = run(
            &store,
            src.path(),
            &[("y=1/m=2".to_string(), f.clone())],
            false,
        )
        .await;
        assert_eq!(r.bytes_written, (big.len() + 5) as u64);
        assert_eq!(through_manifest(&store, "y=1/m=2").await, f);
        if local {
            assert_eq!(visible(&tmp.path().join("t/y=1/m=2")), f);
        }
    }
}

#[test]
fn part_file_paths() {
    let f = PartFile::new("a/b.csv", PathBuf::from("/tmp/b.csv"));
    assert_eq!(f.name, "a/b.csv");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_one_commits_the_other_conflicts() {
    for local in [true, false] {
        let (tmp, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = if local {
            DatasetStore::local(tmp.path())
        } else {
            DatasetStore::memory()
        };
        let p = name(1);
        run(&store, src.path(), &[(p.clone(), files(1, 1))], false).await;
        for round in 0..5u32 {
            let mut a = PartitionedWriter::open(&store, "t").await.unwrap();
            let mut b = PartitionedWriter::open(&store, "t").await.unwrap();
            let (fa, fb) = (files(1, 10 + round * 2), files(1, 11 + round * 2));
            let sa = source(src.path(), &format!("a{round}"), &fa);
            let sb = source(src.path(), &format!("b{round}"), &fb);
            a.put_files(&p, sa, identity(&fa)).await.unwrap();
            b.put_files(&p, sb, identity(&fb)).await.unwrap();
            let (ra, rb) = tokio::join!(tokio::spawn(a.commit()), tokio::spawn(b.commit()));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            let (winner, err) = match (ra, rb) {
                (Ok(_), Err(e)) => (fa, e),
                (Err(e), Ok(_)) => (fb, e),
                other => panic!("round {round}: exactly one writer must commit: {other:?}"),
            };
            assert!(matches!(err, Error::Conflict { .. }), "{err}");
            assert_eq!(through_manifest(&store, &p).await, winner);
            if local {
                assert_eq!(visible(&tmp.path().join("t").join(&p)), winner);
                let staging = tmp.path().join("t/_staging");
                assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
            }
        }
    }
}
