//! What the world does to a dataset on an object store (real S3 API: moto from the testkit):
//! a manifest write that is applied but answered with an error, a store whose clock is not
//! ours, and another dataset nested inside ours or around it.

#[path = "support/faulty.rs"]
mod faulty;
#[path = "support/moto.rs"]
mod moto;

use faulty::{Faulty, ManifestFault};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};
use palisade_idempotency::{
    ContentHash, Dataset, DatasetStore, Error, PartFile, PartitionedWriter,
};

async fn moto_store(s3: &palisade_testkit::S3) -> Arc<dyn ObjectStore> {
    Arc::new(moto::client(s3, "lake"))
}

fn dataset(store: &Arc<Faulty>) -> DatasetStore {
    let dyn_store: Arc<dyn ObjectStore> = store.clone();
    DatasetStore::object_store(dyn_store, "warehouse").unwrap()
}

/// Every partition of the committed manifest reads back whole.
async fn assert_all_readable(store: &DatasetStore, prefix: &str, want: &[(&str, &[u8])]) {
    let ds = Dataset::open(store, prefix).await.expect("dataset opens");
    let m = ds.manifest().expect("a committed manifest");
    assert_eq!(m.partitions.len(), want.len(), "{:?}", m.partitions.keys());
    for (name, bytes) in want {
        let got = ds
            .read(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: the committed object is gone: {e}"))
            .unwrap_or_else(|| panic!("{name}: not in the manifest"));
        assert_eq!(&got[..], *bytes, "{name}");
    }
}

async fn applied_manifest_write_reported_as_failed(fault: ManifestFault) {
    let s3 = moto::start().await;
    let faulty = Arc::new(Faulty::new(moto_store(&s3).await));
    let store = dataset(&faulty);
    let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
    w.put("day=1", Bytes::from_static(b"one\n")).await.unwrap();
    w.commit().await.unwrap();

    let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
    w.put("day=1", Bytes::from_static(b"one, again\n"))
        .await
        .unwrap();
    w.put("day=2", Bytes::from_static(b"two\n")).await.unwrap();
    faulty.arm(fault);
    let report = w.commit().await.unwrap_or_else(|e| {
        panic!("{fault:?}: the manifest was written, so the commit happened: {e}")
    });
    assert_eq!(report.generation, 2, "{fault:?}");
    assert!(report.manifest_written, "{fault:?}");
    // Nothing the new manifest names was deleted.
    assert_all_readable(
        &store,
        "sales",
        &[("day=1", b"one, again\n"), ("day=2", b"two\n")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_write_applied_then_answered_with_an_error_is_a_commit() {
    applied_manifest_write_reported_as_failed(ManifestFault::AppliedThenError).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_write_applied_then_answered_with_precondition_is_a_commit() {
    applied_manifest_write_reported_as_failed(ManifestFault::AppliedThenPrecondition).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unclear_manifest_write_keeps_the_uploads_and_says_so() {
    let s3 = moto::start().await;
    let faulty = Arc::new(Faulty::new(moto_store(&s3).await));
    let store = dataset(&faulty);
    let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
    w.put("day=1", Bytes::from_static(b"one\n")).await.unwrap();
    faulty.arm(ManifestFault::LostAndUnreadable);
    let err = w.commit().await.unwrap_err();
    assert!(
        matches!(err, Error::CommitUnknown { .. }),
        "an unclear outcome is its own error, not a conflict: {err}"
    );
    assert!(err.to_string().contains("kept"), "{err}");
    // The upload was not deleted: had the write landed after all, its manifest names it.
    faulty.unreadable.store(false, Ordering::SeqCst);
    let listed: Vec<ObjectMeta> = faulty
        .list(Some(&Path::from("warehouse/sales/day=1")))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(listed.len(), 1, "the run's upload is kept: {listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_clock_behind_ours_does_not_sweep_a_running_writers_uploads() {
    let s3 = moto::start().await;
    let faulty = Faulty::new(moto_store(&s3).await);
    // The store's clock is two hours behind ours (or ours ahead): every object looks two
    // hours old to a writer that compares `last_modified` with its own clock.
    faulty.skew_ms.store(-2 * 3_600_000, Ordering::SeqCst);
    let faulty = Arc::new(faulty);
    let store = dataset(&faulty);
    let mut first = PartitionedWriter::open(&store, "sales").await.unwrap();
    first
        .put("day=1", Bytes::from_static(b"one\n"))
        .await
        .unwrap();
    first.commit().await.unwrap();

    // A long job: opened and uploading...
    let mut running = PartitionedWriter::open(&store, "sales").await.unwrap();
    running
        .put("day=2", Bytes::from_static(b"two\n"))
        .await
        .unwrap();
    // ...while another writer opens and sweeps leftovers older than the default hour.
    let other = PartitionedWriter::open(&store, "sales").await.unwrap();
    other.abort().await.unwrap();
    running.commit().await.unwrap();
    assert_all_readable(&store, "sales", &[("day=1", b"one\n"), ("day=2", b"two\n")]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_older_than_the_grace_on_the_store_clock_are_swept() {
    let s3 = moto::start().await;
    let faulty = Arc::new(Faulty::new(moto_store(&s3).await));
    let store = dataset(&faulty);
    let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
    w.put("day=1", Bytes::from_static(b"one\n")).await.unwrap();
    w.commit().await.unwrap();
    // A crashed run's upload: written, never committed (dropped without abort).
    let mut crashed = PartitionedWriter::open(&store, "sales").await.unwrap();
    crashed
        .put("day=2", Bytes::from_static(b"two\n"))
        .await
        .unwrap();
    std::mem::forget(crashed);
    let count = || async {
        faulty
            .list(Some(&Path::from("warehouse/sales")))
            .filter(|m| {
                std::future::ready(
                    m.as_ref()
                        .is_ok_and(|m| m.location.as_ref().contains("part-")),
                )
            })
            .count()
            .await
    };
    assert_eq!(count().await, 2);
    // Within the grace: kept.
    PartitionedWriter::open(&store, "sales")
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    assert_eq!(count().await, 2, "an upload younger than the grace is kept");
    // Past the grace (zero here): swept, and the live object is kept.
    PartitionedWriter::builder(&store, "sales")
        .orphan_grace(Duration::ZERO)
        .open()
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    assert_eq!(count().await, 1, "the orphan is swept");
    assert_all_readable(&store, "sales", &[("day=1", b"one\n")]).await;
}

// ---------- nested datasets ----------

fn files(dir: &std::path::Path, names: &[&str]) -> Vec<PartFile> {
    names
        .iter()
        .map(|n| {
            let p = dir.join(n.replace('/', "_"));
            std::fs::write(&p, format!("{n}\n")).unwrap();
            PartFile::new(*n, p)
        })
        .collect()
}

async fn nested_datasets_are_refused(store: DatasetStore) {
    let tmp = tempfile::tempdir().unwrap();
    let id = |s: &str| ContentHash::of_bytes(s.as_bytes());
    // The outer dataset commits first, then one inside it.
    let mut outer = PartitionedWriter::open(&store, "sales").await.unwrap();
    outer
        .put("day=1", Bytes::from_static(b"outer\n"))
        .await
        .unwrap();
    outer.commit().await.unwrap();
    // Opening a dataset inside another is refused: the outer one's sweeps would take its data.
    let err = PartitionedWriter::open(&store, "sales/eu")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NestedDataset { .. }) && err.to_string().contains("sales/eu"),
        "{err}"
    );
    // An inner dataset that exists already (made before the outer one, by hand or by an older
    // version) is never touched by the outer one: opening the outer one is refused.
    let inner_store = store.clone();
    let mut inner = PartitionedWriter::open(&inner_store, "books/eu")
        .await
        .unwrap();
    inner
        .put_files("date=1", files(tmp.path(), &["part-0.csv"]), id("eu"))
        .await
        .unwrap();
    inner
        .put("date=2", Bytes::from_static(b"eu 2\n"))
        .await
        .unwrap();
    inner.commit().await.unwrap();
    let err = PartitionedWriter::open(&store, "books").await.unwrap_err();
    assert!(
        matches!(err, Error::NestedDataset { .. }) && err.to_string().contains("books/eu"),
        "{err}"
    );
    let ds = Dataset::open(&store, "books/eu").await.unwrap();
    assert_eq!(&ds.read("date=2").await.unwrap().unwrap()[..], b"eu 2\n");
    assert_eq!(
        &ds.read_file("date=1", "part-0.csv").await.unwrap().unwrap()[..],
        b"part-0.csv\n"
    );
    // Siblings are fine.
    PartitionedWriter::open(&store, "books-eu")
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    PartitionedWriter::open(&store, "sales")
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_datasets_are_refused_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    nested_datasets_are_refused(DatasetStore::local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_datasets_are_refused_on_s3() {
    let s3 = moto::start().await;
    let faulty = Arc::new(Faulty::new(moto_store(&s3).await));
    nested_datasets_are_refused(dataset(&faulty)).await;
}
