//! Guarantees of the partition writer, on the local directory and on an object store.

use std::sync::Arc;

use bytes::Bytes;
use palisade_idempotency::{
    ContentHasher, Dataset, DatasetStore, Error, PartitionedWriter, store_from_url,
};

/// Each test runs on both backends.
fn stores() -> Vec<(tempfile::TempDir, DatasetStore)> {
    let dir = tempfile::tempdir().unwrap();
    let local = DatasetStore::local(dir.path());
    vec![
        (dir, local),
        (tempfile::tempdir().unwrap(), DatasetStore::memory()),
    ]
}

fn content(p: usize, version: u32) -> Bytes {
    Bytes::from(format!("partition {p} version {version}\n").repeat(50))
}

async fn write_all(
    store: &DatasetStore,
    parts: &[(usize, u32)],
    remove: bool,
) -> palisade_idempotency::Report {
    let mut w = PartitionedWriter::builder(store, "sales")
        .remove_missing(remove)
        .open()
        .await
        .unwrap();
    for &(p, v) in parts {
        w.put(&format!("date=2024-01-{p:02}"), content(p, v))
            .await
            .unwrap();
    }
    w.commit().await.unwrap()
}

#[tokio::test]
async fn rerun_writes_nothing_and_one_change_writes_one() {
    for (_dir, store) in stores() {
        let parts: Vec<(usize, u32)> = (1..=10).map(|p| (p, 1)).collect();
        let first = write_all(&store, &parts, false).await;
        assert_eq!(first.written.len(), 10);
        assert!(first.bytes_written > 0);

        let second = write_all(&store, &parts, false).await;
        assert_eq!(second.bytes_written, 0, "{store:?}");
        assert!(second.written.is_empty());
        assert_eq!(second.unchanged.len(), 10);
        assert!(!second.manifest_written);
        assert_eq!(second.bytes_hashed, first.bytes_written);

        let mut changed = parts.clone();
        changed[3].1 = 2;
        let third = write_all(&store, &changed, false).await;
        assert_eq!(third.written, vec!["date=2024-01-04".to_string()]);
        assert_eq!(third.bytes_written, content(4, 2).len() as u64);

        let ds = Dataset::open(&store, "sales").await.unwrap();
        assert_eq!(
            ds.read("date=2024-01-04").await.unwrap().unwrap(),
            content(4, 2)
        );
        assert_eq!(
            ds.read("date=2024-01-05").await.unwrap().unwrap(),
            content(5, 1)
        );
    }
}

#[tokio::test]
async fn partitions_are_removed_only_when_asked() {
    for (_dir, store) in stores() {
        let parts: Vec<(usize, u32)> = (1..=5).map(|p| (p, 1)).collect();
        write_all(&store, &parts, false).await;
        let kept = write_all(&store, &parts[..3], false).await;
        assert!(kept.removed.is_empty());
        assert_eq!(
            Dataset::open(&store, "sales")
                .await
                .unwrap()
                .partitions()
                .len(),
            5
        );

        let removed = write_all(&store, &parts[..3], true).await;
        assert_eq!(removed.removed, vec!["date=2024-01-04", "date=2024-01-05"]);
        assert_eq!(removed.bytes_written, 0);
        let ds = Dataset::open(&store, "sales").await.unwrap();
        assert_eq!(ds.partitions().len(), 3);
        assert!(ds.read("date=2024-01-05").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn removed_partition_leaves_no_files_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = DatasetStore::local(dir.path());
    write_all(&store, &[(1, 1), (2, 1)], false).await;
    write_all(&store, &[(1, 2)], true).await;
    assert!(!dir.path().join("sales/date=2024-01-02").exists());
    let files: Vec<_> = std::fs::read_dir(dir.path().join("sales/date=2024-01-01"))
        .unwrap()
        .collect();
    assert_eq!(
        files.len(),
        1,
        "the replaced object is deleted after commit"
    );
}

#[tokio::test]
async fn bad_partition_names_are_errors_and_write_nothing() {
    for (dir, store) in stores() {
        let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
        for bad in [
            "../escape",
            "/abs",
            "a//b",
            "",
            "a/../../b",
            "_manifest.json",
        ] {
            let err = w.put(bad, "x").await.unwrap_err();
            assert!(
                matches!(err, Error::InvalidPartition { .. }),
                "{bad:?}: {err}"
            );
        }
        let r = w.commit().await.unwrap();
        assert!(!r.manifest_written);
        assert!(!dir.path().join("escape").exists());
    }
}

#[tokio::test]
async fn duplicate_put_is_an_error() {
    for (_dir, store) in stores() {
        let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
        w.put("a", "1").await.unwrap();
        assert!(matches!(
            w.put("a", "2").await,
            Err(Error::DuplicatePartition { .. })
        ));
    }
}

#[tokio::test]
async fn two_writers_one_commits_the_other_conflicts() {
    for (_dir, store) in stores() {
        write_all(&store, &[(1, 1), (2, 1)], false).await;
        let mut a = PartitionedWriter::open(&store, "sales").await.unwrap();
        let mut b = PartitionedWriter::open(&store, "sales").await.unwrap();
        a.put("date=2024-01-01", content(1, 2)).await.unwrap();
        b.put("date=2024-01-02", content(2, 3)).await.unwrap();
        let (ra, rb) = tokio::join!(a.commit(), b.commit());
        let (ok, err) = match (ra, rb) {
            (Ok(r), Err(e)) | (Err(e), Ok(r)) => (r, e),
            other => panic!("exactly one writer must commit: {other:?}"),
        };
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert_eq!(ok.written.len(), 1);
        // Nothing is lost: the winner's partition is new, the other one is its old version.
        let ds = Dataset::open(&store, "sales").await.unwrap();
        let one = ds.read("date=2024-01-01").await.unwrap().unwrap();
        let two = ds.read("date=2024-01-02").await.unwrap().unwrap();
        assert!(
            (one == content(1, 2) && two == content(2, 1))
                || (one == content(1, 1) && two == content(2, 3))
        );
        // The loser reruns and converges.
        let rerun = write_all(&store, &[(1, 2), (2, 3)], false).await;
        assert_eq!(rerun.written.len(), 1);
    }
}

#[tokio::test]
async fn stale_fencing_token_is_fenced_and_changes_nothing() {
    for (dir, store) in stores() {
        // Holder A (token 5) stages; holder B (token 6) commits; A's commit is fenced.
        let mut a = PartitionedWriter::builder(&store, "sales")
            .fencing_token(5)
            .open()
            .await
            .unwrap();
        a.put("date=2024-01-01", content(1, 5)).await.unwrap();
        a.put("date=2024-01-02", content(2, 5)).await.unwrap();

        let mut b = PartitionedWriter::builder(&store, "sales")
            .fencing_token(6)
            .open()
            .await
            .unwrap();
        b.put("date=2024-01-01", content(1, 6)).await.unwrap();
        b.commit().await.unwrap();

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
        let ds = Dataset::open(&store, "sales").await.unwrap();
        assert_eq!(ds.partitions(), vec!["date=2024-01-01"]);
        assert_eq!(
            ds.read("date=2024-01-01").await.unwrap().unwrap(),
            content(1, 6)
        );
        assert_eq!(ds.manifest().unwrap().fencing_token, Some(6));
        if store.is_local() {
            // A's staged data is gone, and no stray object is visible.
            let staging = dir.path().join("sales/_staging");
            assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
            assert!(!dir.path().join("sales/date=2024-01-02").exists());
        }

        // A stale token is refused at open too.
        let err = PartitionedWriter::builder(&store, "sales")
            .fencing_token(5)
            .open()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }));

        // No token on a fenced dataset: refused unless opted out.
        let err = PartitionedWriter::open(&store, "sales").await.unwrap_err();
        assert!(
            matches!(err, Error::FencingTokenRequired { recorded: 6 }),
            "{err}"
        );
        let mut w = PartitionedWriter::builder(&store, "sales")
            .allow_unfenced(true)
            .open()
            .await
            .unwrap();
        w.put("date=2024-01-03", content(3, 0)).await.unwrap();
        let r = w.commit().await.unwrap();
        assert_eq!(r.written.len(), 1);
        let m = Dataset::open(&store, "sales").await.unwrap();
        assert_eq!(m.manifest().unwrap().fencing_token, Some(6));
    }
}

#[tokio::test]
async fn a_newer_token_is_recorded_even_when_nothing_changed() {
    for (_dir, store) in stores() {
        let mut w = PartitionedWriter::builder(&store, "t")
            .fencing_token(1)
            .open()
            .await
            .unwrap();
        w.put("a", "x").await.unwrap();
        w.commit().await.unwrap();
        let mut w = PartitionedWriter::builder(&store, "t")
            .fencing_token(9)
            .open()
            .await
            .unwrap();
        w.put("a", "x").await.unwrap();
        let r = w.commit().await.unwrap();
        assert_eq!(r.bytes_written, 0);
        assert!(r.manifest_written);
        let err = PartitionedWriter::builder(&store, "t")
            .fencing_token(8)
            .open()
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Fenced {
                ours: 8,
                recorded: 9
            }
        ));
    }
}

#[tokio::test]
async fn corrupt_manifest_is_a_clear_error_never_a_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_from_url(&format!("file://{}", dir.path().display())).unwrap();
    write_all(&store, &[(1, 1)], false).await;
    let mpath = dir.path().join("sales/_manifest.json");
    let good = std::fs::read(&mpath).unwrap();
    std::fs::write(&mpath, &good[..good.len() / 3]).unwrap();

    let err = PartitionedWriter::open(&store, "sales").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::CorruptManifest { .. }));
    assert!(msg.contains(&mpath.display().to_string()), "{msg}");
    assert!(
        msg.contains("restore") && msg.contains("delete it"),
        "{msg}"
    );
    // The data is untouched.
    assert_eq!(
        std::fs::read_dir(dir.path().join("sales/date=2024-01-01"))
            .unwrap()
            .count(),
        1
    );

    std::fs::write(&mpath, b"\0\0garbage").unwrap();
    assert!(matches!(
        Dataset::open(&store, "sales").await,
        Err(Error::CorruptManifest { .. })
    ));
}

#[tokio::test]
async fn other_hash_version_is_detected_not_mistaken() {
    let dir = tempfile::tempdir().unwrap();
    let store = DatasetStore::local(dir.path());
    write_all(&store, &[(1, 1), (2, 1)], false).await;
    let mpath = dir.path().join("sales/_manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(
        &mpath,
        text.replace("\"canonical_encoding\": 1", "\"canonical_encoding\": 2"),
    )
    .unwrap();

    let err = PartitionedWriter::open(&store, "sales").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::IncompatibleManifest {
                field: "canonical_encoding",
                ..
            }
        ),
        "{err}"
    );
    // Explicit opt-in: the run must cover every old partition ...
    let mut w = PartitionedWriter::builder(&store, "sales")
        .rewrite_on_version_change(true)
        .open()
        .await
        .unwrap();
    w.put("date=2024-01-01", content(1, 1)).await.unwrap();
    assert!(matches!(
        w.commit().await,
        Err(Error::Config {
            field: "rewrite_on_version_change",
            ..
        })
    ));
    // ... then every partition is rewritten once, and the manifest is current again.
    let mut w = PartitionedWriter::builder(&store, "sales")
        .rewrite_on_version_change(true)
        .open()
        .await
        .unwrap();
    w.put("date=2024-01-01", content(1, 1)).await.unwrap();
    w.put("date=2024-01-02", content(2, 1)).await.unwrap();
    assert_eq!(w.commit().await.unwrap().written.len(), 2);
    assert_eq!(
        write_all(&store, &[(1, 1), (2, 1)], false)
            .await
            .bytes_written,
        0
    );
}

#[tokio::test]
async fn streams_and_files_hash_like_bytes() {
    for (dir, store) in stores() {
        let data = content(7, 1);
        let mut w = PartitionedWriter::open(&store, "s").await.unwrap();
        w.put("p", data.clone()).await.unwrap();
        w.commit().await.unwrap();

        let chunks: Vec<Result<Bytes, std::io::Error>> = data
            .chunks(100)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut w = PartitionedWriter::open(&store, "s").await.unwrap();
        w.put_stream("p", futures::stream::iter(chunks))
            .await
            .unwrap();
        let file = dir.path().join("input.bin");
        std::fs::write(&file, b"new content").unwrap();
        w.put_file("q", &file).await.unwrap();
        let r = w.commit().await.unwrap();
        assert_eq!(r.unchanged, vec!["p"]);
        assert_eq!(r.written, vec!["q"]);
        assert_eq!(r.bytes_written, 11);

        let mut w = PartitionedWriter::open(&store, "s").await.unwrap();
        w.put_file("q", &file).await.unwrap();
        let big: Vec<Result<Bytes, std::io::Error>> = (0..40)
            .map(|i| Ok(Bytes::from(vec![i as u8; 1 << 18])))
            .collect();
        w.put_stream("big", futures::stream::iter(big))
            .await
            .unwrap();
        let r = w.commit().await.unwrap();
        assert_eq!(r.written, vec!["big"]);
        let ds = Dataset::open(&store, "s").await.unwrap();
        assert_eq!(ds.read("big").await.unwrap().unwrap().len(), 40 << 18);

        // A failing stream stages nothing.
        let mut w = PartitionedWriter::open(&store, "s").await.unwrap();
        let failing = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"a")),
            Err(std::io::Error::other("disk gone")),
        ]);
        assert!(matches!(
            w.put_stream("x", failing).await,
            Err(Error::Input { .. })
        ));
    }
}

#[tokio::test]
async fn row_hash_identity_ignores_row_order() {
    for (_dir, store) in stores() {
        let rows = [("a", 1), ("b", 2), ("c", 3)];
        let encode = |rs: &[(&str, i32)]| {
            let mut h = ContentHasher::unordered();
            let mut csv = String::new();
            for r in rs {
                h.add_row(r).unwrap();
                csv.push_str(&format!("{},{}\n", r.0, r.1));
            }
            (h.finish(), csv)
        };
        let (h1, csv1) = encode(&rows);
        let mut w = PartitionedWriter::open(&store, "r").await.unwrap();
        w.put_with_rows_hash("p", h1, csv1).await.unwrap();
        w.commit().await.unwrap();

        let reversed: Vec<_> = rows.iter().rev().cloned().collect();
        let (h2, csv2) = encode(&reversed);
        let mut w = PartitionedWriter::open(&store, "r").await.unwrap();
        w.put_with_rows_hash("p", h2, csv2).await.unwrap();
        assert_eq!(w.commit().await.unwrap().bytes_written, 0);
    }
}

#[tokio::test]
async fn local_file_system_object_store_is_refused_clearly() {
    // object_store's LocalFileSystem has no conditional update: the writer must say so rather
    // than race. (Use store_from_url("file://...") for local directories.)
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let store = DatasetStore::from(fs);
    let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
    w.put("a", "1").await.unwrap();
    let first = w.commit().await;
    let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
    w.put("a", "2").await.unwrap();
    let second = w.commit().await;
    let refused = [first, second]
        .into_iter()
        .any(|r| matches!(r, Err(Error::ConditionalPutUnsupported { .. })));
    assert!(
        refused,
        "LocalFileSystem must be refused for manifest updates"
    );
}

#[tokio::test]
async fn orphans_of_a_dropped_writer_are_swept_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = DatasetStore::local(dir.path());
    write_all(&store, &[(1, 1)], false).await;
    let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
    w.put("date=2024-01-01", content(1, 2)).await.unwrap();
    drop(w); // like a crash: staged data remains, its run lock is released
    let staging = dir.path().join("sales/_staging");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 2);
    let w = PartitionedWriter::open(&store, "sales").await.unwrap();
    assert_eq!(
        std::fs::read_dir(&staging).unwrap().count(),
        2,
        "only our own run remains"
    );
    w.abort().await.unwrap();
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
}

#[tokio::test]
async fn object_store_orphans_are_swept_after_the_grace_period() {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let mem = Arc::new(object_store::memory::InMemory::new());
    let store = DatasetStore::from(mem.clone());
    let count = || async {
        let all: Vec<_> = mem.list(None).try_collect().await.unwrap();
        all.len()
    };
    write_all(&store, &[(1, 1)], false).await;
    assert_eq!(count().await, 2, "manifest + one object");
    let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
    w.put("date=2024-01-01", content(1, 2)).await.unwrap();
    drop(w); // a crashed run: its upload stays, unreferenced
    assert_eq!(count().await, 3);
    // Within the grace period the orphan is kept (a live writer may still commit it) ...
    PartitionedWriter::open(&store, "sales")
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    assert_eq!(count().await, 3);
    // ... and past it, it is swept; the committed data stays.
    let w = PartitionedWriter::builder(&store, "sales")
        .orphan_grace(std::time::Duration::ZERO)
        .open()
        .await
        .unwrap();
    w.abort().await.unwrap();
    assert_eq!(count().await, 2);
    let ds = Dataset::open(&store, "sales").await.unwrap();
    assert_eq!(
        ds.read("date=2024-01-01").await.unwrap().unwrap(),
        content(1, 1)
    );
}

#[tokio::test]
async fn deleting_the_manifest_to_recover_loses_no_data_before_the_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let store = DatasetStore::local(dir.path());
    write_all(&store, &[(1, 1), (2, 1)], false).await;
    std::fs::remove_file(dir.path().join("sales/_manifest.json")).unwrap();
    let count = |p: usize| {
        std::fs::read_dir(dir.path().join(format!("sales/date=2024-01-{p:02}")))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // Opening without a manifest sweeps nothing.
    let mut w = PartitionedWriter::open(&store, "sales").await.unwrap();
    assert_eq!((count(1), count(2)), (1, 1));
    w.put("date=2024-01-01", content(1, 1)).await.unwrap();
    w.put("date=2024-01-02", content(2, 1)).await.unwrap();
    let r = w.commit().await.unwrap();
    assert_eq!(
        r.written.len(),
        2,
        "without a manifest every partition is rewritten"
    );
    // The next open sweeps the objects no manifest names.
    PartitionedWriter::open(&store, "sales")
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    assert_eq!((count(1), count(2)), (1, 1));
    let ds = Dataset::open(&store, "sales").await.unwrap();
    assert_eq!(
        ds.read("date=2024-01-02").await.unwrap().unwrap(),
        content(2, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_with_different_tokens_never_both_commit() {
    for (_dir, store) in stores() {
        let mut token = 10;
        for round in 0..20u32 {
            let (low, high) = (token, token + 1);
            token += 2;
            let mut a = PartitionedWriter::builder(&store, "race")
                .fencing_token(low)
                .open()
                .await
                .unwrap();
            let mut b = PartitionedWriter::builder(&store, "race")
                .fencing_token(high)
                .open()
                .await
                .unwrap();
            a.put("p", format!("low {round}")).await.unwrap();
            b.put("p", format!("high {round}")).await.unwrap();
            let (ra, rb) = tokio::join!(tokio::spawn(a.commit()), tokio::spawn(b.commit()));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert!(
                ra.is_ok() != rb.is_ok(),
                "round {round}: exactly one must commit: {ra:?} {rb:?}"
            );
            let ds = Dataset::open(&store, "race").await.unwrap();
            let got = ds.read("p").await.unwrap().unwrap();
            let recorded = ds.manifest().unwrap().fencing_token;
            if ra.is_ok() {
                assert_eq!(got, format!("low {round}"));
                assert_eq!(recorded, Some(low));
                assert!(matches!(rb, Err(Error::Conflict { .. })));
            } else {
                assert_eq!(got, format!("high {round}"));
                assert_eq!(recorded, Some(high));
                assert!(matches!(
                    ra,
                    Err(Error::Fenced { .. }) | Err(Error::Conflict { .. })
                ));
            }
        }
    }
}

#[test]
fn writer_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = DatasetStore::memory();
        let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
        {
            let f = w.put("a", "x");
            send(&f);
            f.await.unwrap();
        }
        {
            let f = w.put_stream(
                "b",
                futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from("y"))]),
            );
            send(&f);
            f.await.unwrap();
        }
        {
            let f = w.put_file("c", "/nonexistent/file");
            send(&f);
            assert!(matches!(f.await, Err(Error::Io { .. })));
        }
        let f = w.commit();
        send(&f);
        f.await.unwrap();
    });
}
