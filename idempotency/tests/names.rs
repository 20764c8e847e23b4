//! Partition names reach the store byte for byte: Hive partitions whose values Spark escapes
//! (`slot=2024-01-01 10%3A00%3A00`), non-ASCII, spaces, `%`, `:`, `+` and `=`. Checked on a real
//! S3 API (moto) with a reader we did not write: pyarrow's Hive partitioning must read the same
//! partition values from S3 as from the source directory. And the orphan sweep keeps them.

#[path = "support/moto.rs"]
mod moto;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use palisade_idempotency::{ContentHash, Dataset, DatasetStore, PartFile, PartitionedWriter};

/// Partition directories as Spark writes them (values escaped the Hive way), one CSV each.
const PARTITIONS: &[&str] = &[
    "p=2024-01-01 10%3A00%3A00",
    "p=Zürich",
    "p=a+b c",
    "p=x:y",
    "p=50%25 off",
    "p=日本",
];

fn source() -> tempfile::TempDir {
    let src = tempfile::tempdir().unwrap();
    for (i, p) in PARTITIONS.iter().enumerate() {
        let dir = src.path().join(p);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("part-0.csv"), format!("id\n{i}\n")).unwrap();
    }
    src
}

async fn publish(store: &DatasetStore, src: &Path) {
    let mut w = PartitionedWriter::open(store, "ds").await.unwrap();
    for p in PARTITIONS {
        let file = PartFile::new("part-0.csv", src.join(p).join("part-0.csv"));
        w.put_files(p, vec![file], ContentHash::of_bytes(p.as_bytes()))
            .await
            .unwrap();
    }
    w.commit().await.unwrap();
}

const READ_BOTH: &str = r#"
import json, sys
import pyarrow.dataset as ds
import pyarrow.fs as pafs
src, endpoint, key, secret, region, root = sys.argv[1:7]
s3 = pafs.S3FileSystem(endpoint_override=endpoint, access_key=key, secret_key=secret,
                       region=region, scheme="http")
def rows(path, fs):
    t = ds.dataset(path, filesystem=fs, format="csv", partitioning="hive").to_table()
    return sorted(zip(t.column("id").to_pylist(), t.column("p").to_pylist()))
keys = sorted(i.path for i in s3.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File)
print(json.dumps({"src": rows(src, pafs.LocalFileSystem()), "s3": rows(root, s3), "keys": keys}))
"#;

/// What pyarrow reads from SRC and from S3, and the S3 keys it lists; `None` where Python or
/// pyarrow is missing.
fn pyarrow_view(src: &Path, s3: &palisade_testkit::S3) -> Option<serde_json::Value> {
    let probe = Command::new("python3")
        .args(["-c", "import pyarrow"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED the pyarrow check: python3 with pyarrow is not on PATH (scripts/setup \
             installs it into .venv; scripts/test puts .venv/bin on PATH)"
        );
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", READ_BOTH])
        .arg(src)
        .arg(s3.endpoint())
        .args([
            s3.access_key(),
            s3.secret_key(),
            s3.region(),
            "lake/base/ds",
        ])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("pyarrow's JSON"))
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_names_reach_s3_byte_for_byte_and_survive_the_sweep() {
    let s3 = moto::start().await;
    let client: Arc<dyn ObjectStore> = Arc::new(moto::client(&s3, "lake"));
    let store = DatasetStore::object_store(client, "base").unwrap();
    let src = source();
    publish(&store, src.path()).await;

    // The manifest reader's view: each partition, and the object keys it names, unchanged.
    let ds = Dataset::open(&store, "ds").await.unwrap();
    let live = ds.live_files();
    let names: Vec<&str> = live.iter().map(|(p, _)| p.as_str()).collect();
    let mut want: Vec<&str> = PARTITIONS.to_vec();
    want.sort();
    assert_eq!(names, want);
    for (p, files) in &live {
        assert!(
            files.iter().all(|f| f.starts_with(&format!("{p}/part-0-"))),
            "{p}: {files:?}"
        );
    }

    if let Some(view) = pyarrow_view(src.path(), &s3) {
        let keys: Vec<String> = serde_json::from_value(view["keys"].clone()).unwrap();
        for p in PARTITIONS {
            let prefix = format!("lake/base/ds/{p}/part-0-");
            assert!(
                keys.iter().any(|k| k.starts_with(&prefix)),
                "no S3 key starts with {prefix:?}: {keys:?}"
            );
        }
        assert_eq!(
            view["src"], view["s3"],
            "pyarrow reads other partition values from S3 than from SRC"
        );
        assert_eq!(view["src"].as_array().map(Vec::len), Some(PARTITIONS.len()));
    }

    // A writer that sweeps every unreferenced object at once keeps all of them.
    PartitionedWriter::builder(&store, "ds")
        .orphan_grace(Duration::ZERO)
        .open()
        .await
        .unwrap()
        .abort()
        .await
        .unwrap();
    let ds = Dataset::open(&store, "ds").await.unwrap();
    for (i, p) in PARTITIONS.iter().enumerate() {
        let got = ds
            .read_file(p, "part-0.csv")
            .await
            .unwrap_or_else(|e| panic!("{p}: swept although live: {e}"))
            .unwrap();
        assert_eq!(&got[..], format!("id\n{i}\n").as_bytes(), "{p}");
    }
    // A rerun finds everything unchanged.
    let mut w = PartitionedWriter::open(&store, "ds").await.unwrap();
    for p in PARTITIONS {
        let file = PartFile::new("part-0.csv", src.path().join(p).join("part-0.csv"));
        let written = w
            .put_files(p, vec![file], ContentHash::of_bytes(p.as_bytes()))
            .await
            .unwrap();
        assert!(!written, "{p} was written again");
    }
    w.abort().await.unwrap();
}
