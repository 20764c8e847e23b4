//! The partition writer on a real S3 API (moto, from the testkit): conditional puts of the
//! manifest, a rerun writing nothing, the fenced race, and a conflict between two writers.
//!
//! moto honours `If-None-Match`/`If-Match` when writes come one after another (the testkit's own
//! S3 tests show it); it does not make racing conditional writes exclusive, so the races here are
//! driven step by step (stage, let the other commit, then commit), as they happen on real S3.

#[path = "support/moto.rs"]
mod moto;

use object_store::ObjectStore;
use palisade_idempotency::{Dataset, DatasetStore, Error, PartFile, PartitionedWriter};
use palisade_testkit::S3;
use std::sync::Arc;

async fn start() -> (S3, DatasetStore) {
    let s3 = moto::start().await;
    let store: Arc<dyn ObjectStore> = Arc::new(moto::client(&s3, "lake"));
    let store = DatasetStore::object_store(store, "warehouse").expect("a valid base path");
    (s3, store)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_on_s3_writes_nothing_and_one_change_writes_one_partition() {
    let (_s3, store) = start().await;
    let days = |changed: &str| {
        (1..=3)
            .map(|d| {
                let body = if d == 2 {
                    changed.to_string()
                } else {
                    format!("day {d}\n")
                };
                (format!("date=2024-01-0{d}"), body)
            })
            .collect::<Vec<_>>()
    };
    for (round, (expect_written, body)) in [(3, "day 2\n"), (0, "day 2\n"), (1, "day 2, fixed\n")]
        .into_iter()
        .enumerate()
    {
        let mut writer = PartitionedWriter::open(&store, "sales").await.unwrap();
        for (partition, content) in days(body) {
            writer.put(&partition, content).await.unwrap();
        }
        let report = writer.commit().await.unwrap();
        assert_eq!(
            report.written.len(),
            expect_written,
            "round {round}: {report:?}"
        );
        if expect_written == 0 {
            assert_eq!(report.bytes_written, 0);
        }
    }
    let dataset = Dataset::open(&store, "sales").await.unwrap();
    let read = dataset.read("date=2024-01-02").await.unwrap().unwrap();
    assert_eq!(&read[..], b"day 2, fixed\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fenced_race_on_s3_leaves_the_newer_holders_dataset() {
    let (_s3, store) = start().await;
    // Holder A (token 5) stages its output...
    let mut a = PartitionedWriter::builder(&store, "t")
        .fencing_token(5)
        .open()
        .await
        .unwrap();
    a.put("date=1", "from A").await.unwrap();
    // ...then B (token 6) takes over and commits.
    let mut b = PartitionedWriter::builder(&store, "t")
        .fencing_token(6)
        .open()
        .await
        .unwrap();
    b.put("date=1", "from B").await.unwrap();
    b.commit().await.unwrap();
    // A wakes up: its commit is refused, and readers still see B's data.
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
    let dataset = Dataset::open(&store, "t").await.unwrap();
    assert_eq!(
        &dataset.read("date=1").await.unwrap().unwrap()[..],
        b"from B"
    );
    assert_eq!(dataset.manifest().unwrap().fencing_token, Some(6));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_writers_on_s3_one_commits_the_other_conflicts_and_multi_file_partitions_work() {
    let (_s3, store) = start().await;
    let tmp = tempfile::tempdir().unwrap();
    let part = |name: &str, body: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, body).unwrap();
        PartFile {
            name: name.to_string(),
            path,
        }
    };
    let identity = |s: &str| palisade_idempotency::ContentHash::of_bytes(s.as_bytes());
    let mut first = PartitionedWriter::open(&store, "events").await.unwrap();
    let mut second = PartitionedWriter::open(&store, "events").await.unwrap();
    first
        .put_files(
            "day=1",
            vec![part("a.csv", "1\n"), part("b.csv", "2\n")],
            identity("v1"),
        )
        .await
        .unwrap();
    second
        .put_files("day=1", vec![part("c.csv", "3\n")], identity("v2"))
        .await
        .unwrap();
    first.commit().await.unwrap();
    let err = second.commit().await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    let dataset = Dataset::open(&store, "events").await.unwrap();
    let live = dataset.live_files();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].1.len(), 2, "the first writer's two files: {live:?}");
    assert_eq!(
        &dataset.read_file("day=1", "b.csv").await.unwrap().unwrap()[..],
        b"2\n"
    );
}
