//! `verify`: a read-only check that every object the manifest names is there, whole; on a local
//! directory and on a real S3 API (moto).

#[path = "support/moto.rs"]
mod moto;

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use palisade_idempotency::{
    ContentHash, DatasetStore, PartFile, PartitionedWriter, Problem, verify,
};

async fn commit_sample(store: &DatasetStore, src: &std::path::Path) {
    std::fs::write(src.join("a.csv"), "id\n1\n").unwrap();
    std::fs::write(src.join("b.csv"), "id\n2\n").unwrap();
    let mut w = PartitionedWriter::open(store, "sales").await.unwrap();
    w.put("day=1", Bytes::from_static(b"one\n")).await.unwrap();
    let files = vec![
        PartFile::new("a.csv", src.join("a.csv")),
        PartFile::new("b.csv", src.join("b.csv")),
    ];
    w.put_files("day=2 10%3A00", files, ContentHash::of_bytes(b"2"))
        .await
        .unwrap();
    w.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_on_a_local_directory_finds_missing_short_changed_and_stray_files() {
    let (dest, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = DatasetStore::local(dest.path());
    commit_sample(&store, src.path()).await;
    let v = verify(&store, "sales", true).await.unwrap();
    assert!(v.is_sound(), "{v:?}");
    assert_eq!((v.generation, v.objects, v.bytes), (1, 3, 14));
    assert!(v.unreferenced.is_empty(), "{v:?}");

    let table = dest.path().join("sales");
    let part = std::fs::read_dir(table.join("day=1"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-")
        })
        .expect("day=1's object");
    // Same size, other content: only the hash check sees it.
    std::fs::write(&part, b"ONE\n").unwrap();
    assert!(verify(&store, "sales", false).await.unwrap().is_sound());
    let v = verify(&store, "sales", true).await.unwrap();
    assert!(!v.is_sound());
    assert!(
        matches!(&v.problems[..], [Problem::WrongHash { object }] if object.starts_with("day=1/part-")),
        "{v:?}"
    );
    // Shorter, and a file gone; a stray file a plain reader would read.
    std::fs::write(&part, b"on").unwrap();
    std::fs::remove_file(table.join("day=2 10%3A00/b.csv")).unwrap();
    std::fs::write(table.join("day=2 10%3A00/extra.csv"), "id\n9\n").unwrap();
    let v = verify(&store, "sales", false).await.unwrap();
    assert_eq!(v.problems.len(), 2, "{v:?}");
    assert!(v.problems.iter().any(|p| matches!(
        p,
        Problem::WrongSize {
            expected: 4,
            found: 2,
            ..
        }
    )));
    assert!(v.problems.contains(&Problem::Missing {
        object: "day=2 10%3A00/b.csv".into()
    }));
    assert_eq!(v.unreferenced, vec!["day=2 10%3A00/extra.csv".to_string()]);
    // verify changes nothing.
    assert!(table.join("day=2 10%3A00/extra.csv").exists());

    // A decided commit not yet rolled forward is reported (and left alone).
    std::fs::write(
        table.join("_manifest.pending.json"),
        r#"{"manifest": {"generation": 2}, "swaps": [], "removals": []}"#,
    )
    .unwrap();
    let v = verify(&store, "sales", false).await.unwrap();
    assert_eq!(v.pending_commit, Some(2));
    assert!(table.join("_manifest.pending.json").exists());
    // Nothing committed yet: sound and empty.
    let v = verify(&store, "nothing-here", true).await.unwrap();
    assert!(v.is_sound() && v.generation == 0 && v.objects == 0, "{v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_on_s3_finds_missing_objects_and_crashed_uploads() {
    let s3 = moto::start().await;
    let client: Arc<dyn ObjectStore> = Arc::new(moto::client(&s3, "lake"));
    let store = DatasetStore::object_store(client.clone(), "base").unwrap();
    let src = tempfile::tempdir().unwrap();
    commit_sample(&store, src.path()).await;
    let v = verify(&store, "sales", true).await.unwrap();
    assert!(
        v.is_sound() && v.objects == 3 && v.unreferenced.is_empty(),
        "{v:?}"
    );

    // A crashed run's upload is reported as unreferenced; the dataset is still sound.
    let mut crashed = PartitionedWriter::open(&store, "sales").await.unwrap();
    crashed
        .put("day=3", Bytes::from_static(b"three\n"))
        .await
        .unwrap();
    std::mem::forget(crashed);
    let v = verify(&store, "sales", false).await.unwrap();
    assert!(v.is_sound(), "{v:?}");
    assert!(
        matches!(&v.unreferenced[..], [o] if o.starts_with("day=3/part-")),
        "{v:?}"
    );

    // An object deleted by hand, another replaced with other bytes of the same size.
    let listed: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(
        client.list(Some(&Path::parse("base/sales/day=2 10%3A00").unwrap())),
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    client.delete(&listed[0].location).await.unwrap();
    client
        .put(&listed[1].location, PutPayload::from_static(b"id\n7\n"))
        .await
        .unwrap();
    let v = verify(&store, "sales", true).await.unwrap();
    assert!(!v.is_sound());
    assert_eq!(v.problems.len(), 2, "{v:?}");
    assert!(
        v.problems
            .iter()
            .any(|p| matches!(p, Problem::Missing { .. }))
    );
    assert!(
        v.problems
            .iter()
            .any(|p| matches!(p, Problem::WrongHash { .. }))
    );
}
