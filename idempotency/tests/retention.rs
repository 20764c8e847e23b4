//! A reader in the middle of a read keeps its version: replaced partition versions are kept for
//! the writer's retention (default 1 hour) and deleted by the first commit (or, locally, open)
//! after it. On a local directory and on a real S3 API (moto) whose clock the test moves.

#[path = "support/faulty.rs"]
mod faulty;
#[path = "support/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use faulty::Faulty;
use object_store::ObjectStore;
use palisade_idempotency::{
    ContentHash, Dataset, DatasetStore, PartFile, PartitionedWriter, verify,
};

/// Version `v` of the dataset: partitions a and b, each with two files that name their version.
fn write_version(src: &Path, v: u32) -> Vec<(String, Vec<PartFile>, ContentHash)> {
    ["p=a", "p=b"]
        .iter()
        .map(|p| {
            let files = ["part-0.csv", "part-1.csv"]
                .iter()
                .map(|f| {
                    let path = src.join(format!("{v}-{p}-{f}"));
                    std::fs::write(&path, format!("{p} {f} version {v}\n").repeat(100)).unwrap();
                    PartFile::new(*f, path)
                })
                .collect();
            let id = ContentHash::of_bytes(format!("{p} {v}").as_bytes());
            (p.to_string(), files, id)
        })
        .collect()
}

async fn publish(store: &DatasetStore, src: &Path, v: u32, retain: Option<Duration>) {
    let mut b = PartitionedWriter::builder(store, "sales");
    if let Some(r) = retain {
        b = b.retain(r);
    }
    let mut w = b.open().await.unwrap();
    for (p, files, id) in write_version(src, v) {
        assert!(w.put_files(&p, files, id).await.unwrap(), "{p} changes");
    }
    w.commit().await.unwrap();
}

/// A careful plain reader: it opened the partition directory, and lists and reads through that
/// handle (`/proc/self/fd/N/...`) whenever it gets to it.
fn read_through(handle: &std::fs::File) -> Option<BTreeMap<String, String>> {
    let via = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&via).ok()? {
        let name = entry.ok()?.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        files.insert(name.clone(), std::fs::read_to_string(via.join(&name)).ok()?);
    }
    Some(files)
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_local_directory_a_reader_keeps_its_version_through_three_publishes() {
    let (dest, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = DatasetStore::local(dest.path());
    publish(&store, src.path(), 0, None).await;
    // The reader opens version 0 of p=a, then three publishes replace it. A `Dataset` opened
    // at version 0 reads by the manifest's paths, which now hold version 3.
    let handle = std::fs::File::open(dest.path().join("sales/p=a")).unwrap();
    let dataset = Dataset::open(&store, "sales").await.unwrap();
    for v in 1..=3 {
        publish(&store, src.path(), v, None).await;
    }
    for p in ["p=a", "p=b"] {
        let got = dataset.read_file(p, "part-1.csv").await;
        let want = format!("{p} part-1.csv version 0\n").repeat(100);
        let text = got.map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()));
        assert!(
            matches!(&text, Ok(Some(t)) if *t == want),
            "the Dataset opened at version 0 reads version 0 of {p}: {text:.80?}"
        );
    }
    let seen = read_through(&handle).expect("the opened version is still there");
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (name, content) in &seen {
        assert_eq!(
            content,
            &format!("p=a {name} version 0\n").repeat(100),
            "{name}"
        );
    }
    // The plain listing shows only the newest version; verify reports the retained ones.
    let now = std::fs::read_dir(dest.path().join("sales/p=a"))
        .unwrap()
        .count();
    assert_eq!(now, 2);
    let v = verify(&store, "sales", true).await.unwrap();
    assert!(v.is_sound(), "{v:?}");
    assert_eq!(
        v.retained.len(),
        6,
        "two partitions x three replaced versions: {v:?}"
    );
    assert!(v.unreferenced.is_empty(), "{v:?}");

    // After the retention (zero here), the next writer deletes them.
    publish(&store, src.path(), 4, Some(Duration::ZERO)).await;
    let v = verify(&store, "sales", false).await.unwrap();
    assert!(v.retained.is_empty(), "{v:?}");
    assert!(
        read_through(&handle).is_none_or(|f| f.is_empty()),
        "version 0 is gone after the retention"
    );
    assert!(
        dataset.read_file("p=a", "part-1.csv").await.is_err(),
        "version 0 cannot be read once it is no longer retained"
    );
}

/// A retention that is not zero runs out on a local directory: a commit with a 1 s retention
/// deletes the versions replaced over a second ago and keeps the one it replaces itself.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_local_directory_the_retention_runs_out_and_the_next_commit_deletes() {
    let (dest, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = DatasetStore::local(dest.path());
    // Long retentions first (a busy machine cannot make them run out), then one of 1 s.
    let (long, short) = (
        Some(Duration::from_secs(3600)),
        Some(Duration::from_secs(1)),
    );
    publish(&store, src.path(), 0, long).await;
    let handle = std::fs::File::open(dest.path().join("sales/p=a")).unwrap();
    publish(&store, src.path(), 1, long).await; // replaces version 0
    publish(&store, src.path(), 2, long).await; // and version 1
    let replaced = std::time::Instant::now();
    let generations = |v: &palisade_idempotency::Verification| {
        let mut g: Vec<u64> = v.retained.iter().map(|r| r.generation).collect();
        g.dedup();
        g
    };
    let v = verify(&store, "sales", false).await.unwrap();
    assert_eq!(
        generations(&v),
        [2, 3],
        "both replaced versions are kept: {v:?}"
    );
    assert!(read_through(&handle).is_some_and(|f| f.len() == 2));
    // A lower bound only: however late this runs, versions 0 and 1 were replaced over a second
    // before the next commit.
    if let Some(left) = Duration::from_millis(1100).checked_sub(replaced.elapsed()) {
        tokio::time::sleep(left).await;
    }
    publish(&store, src.path(), 3, short).await;
    let v = verify(&store, "sales", false).await.unwrap();
    assert!(
        read_through(&handle).is_none_or(|f| f.is_empty()),
        "version 0 is deleted once its retention ran out: {v:?}"
    );
    // Version 1 went too; version 2, replaced by this commit, stays for its retention.
    assert_eq!(generations(&v), [4], "{v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_s3_a_reader_keeps_its_version_until_the_retention_passes_on_the_store_clock() {
    let s3 = moto::start().await;
    let inner: Arc<dyn ObjectStore> = Arc::new(moto::client(&s3, "lake"));
    let faulty = Arc::new(Faulty::new(inner));
    let dyn_store: Arc<dyn ObjectStore> = faulty.clone();
    let store = DatasetStore::object_store(dyn_store, "warehouse").unwrap();
    let src = tempfile::tempdir().unwrap();
    publish(&store, src.path(), 0, None).await;
    // A reader reads the manifest of version 0, then three publishes replace every partition.
    let reader = Dataset::open(&store, "sales").await.unwrap();
    for v in 1..=3 {
        publish(&store, src.path(), v, None).await;
    }
    for p in ["p=a", "p=b"] {
        for f in ["part-0.csv", "part-1.csv"] {
            let got = reader
                .read_file(p, f)
                .await
                .unwrap_or_else(|e| panic!("{p}/{f} of version 0 was deleted: {e}"))
                .unwrap();
            assert_eq!(
                &got[..],
                format!("{p} {f} version 0\n").repeat(100).as_bytes()
            );
        }
    }
    let v = verify(&store, "sales", false).await.unwrap();
    assert!(v.is_sound() && v.unreferenced.is_empty(), "{v:?}");
    assert_eq!(v.retained.len(), 3, "{v:?}");
    // A sweep of orphans keeps retained versions (they are not orphans).
    PartitionedWriter::builder(&store, "sales")
        .orphan_grace(Duration::ZERO)
        .open()
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    assert!(reader.read_file("p=a", "part-0.csv").await.is_ok());

    // The store's clock moves on by two hours: the next publish deletes what it retained.
    faulty.skew_ms.store(2 * 3_600_000, Ordering::SeqCst);
    publish(&store, src.path(), 4, None).await;
    let v = verify(&store, "sales", true).await.unwrap();
    assert!(v.is_sound() && v.unreferenced.is_empty(), "{v:?}");
    assert_eq!(
        v.retained.iter().map(|r| r.generation).collect::<Vec<_>>(),
        vec![5],
        "only version 3, replaced just now, is kept: {v:?}"
    );
    let err = reader.read_file("p=a", "part-0.csv").await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    let m = Dataset::open(&store, "sales").await.unwrap();
    assert_eq!(m.manifest().unwrap().generation, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn single_object_partitions_are_retained_too_and_zero_retention_deletes_at_once() {
    let s3 = moto::start().await;
    let inner: Arc<dyn ObjectStore> = Arc::new(moto::client(&s3, "lake"));
    let store = DatasetStore::object_store(inner.clone(), "w").unwrap();
    for (v, retain) in [(0, None), (1, None), (2, Some(Duration::ZERO))] {
        let mut b = PartitionedWriter::builder(&store, "t");
        if let Some(r) = retain {
            b = b.retain(r);
        }
        let mut w = b.open().await.unwrap();
        w.put("day=1", Bytes::from(format!("version {v}\n")))
            .await
            .unwrap();
        w.commit().await.unwrap();
        let listed = futures::TryStreamExt::try_collect::<Vec<_>>(
            inner.list(Some(&object_store::path::Path::parse("w/t/day=1").unwrap())),
        )
        .await
        .unwrap();
        let want = if retain.is_some() { 1 } else { v + 1 };
        assert_eq!(listed.len(), want, "version {v}: {listed:?}");
    }
}
