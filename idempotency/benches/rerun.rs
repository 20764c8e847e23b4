//! A rerun over 1,000 unchanged partitions (100 MiB) next to a full rewrite of them, on the
//! local-directory store (fsync + rename + lock file), in the same run.
//!
//! `cargo bench -p palisade-idempotency --bench rerun -- --warm-up-time 1 --measurement-time 3`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use palisade_idempotency::{DatasetStore, PartitionedWriter};

const PARTITIONS: usize = 1_000;
const PART_SIZE: usize = 100 << 10;

fn dataset(version: u64) -> Vec<(String, Bytes)> {
    (0..PARTITIONS)
        .map(|p| {
            let line = format!("partition {p} version {version} ");
            let bytes: Vec<u8> = line.bytes().cycle().take(PART_SIZE).collect();
            (
                format!("date=2024-{:02}-{:02}/part={p}", p % 12 + 1, p % 28 + 1),
                Bytes::from(bytes),
            )
        })
        .collect()
}

async fn write(store: &DatasetStore, data: &[(String, Bytes)]) -> palisade_idempotency::Report {
    let mut w = PartitionedWriter::open(store, "t").await.unwrap();
    for (name, bytes) in data {
        w.put(name, bytes.clone()).await.unwrap();
    }
    w.commit().await.unwrap()
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let versions = [dataset(0), dataset(1)];

    let unchanged_store = DatasetStore::local(tmp.path().join("unchanged"));
    rt.block_on(write(&unchanged_store, &versions[0]));
    let rewrite_store = DatasetStore::local(tmp.path().join("rewrite"));
    rt.block_on(write(&rewrite_store, &versions[0]));
    let next = AtomicU64::new(1);

    let mut g = c.benchmark_group("1000_partitions_100MiB");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes((PARTITIONS * PART_SIZE) as u64));
    g.bench_function("rerun, unchanged", |b| {
        b.to_async(&rt).iter(|| async {
            let r = write(&unchanged_store, &versions[0]).await;
            assert_eq!(r.bytes_written, 0);
        })
    });
    g.bench_function("full rewrite", |b| {
        b.to_async(&rt).iter(|| async {
            let v = next.fetch_add(1, Ordering::Relaxed) % 2;
            let r = write(&rewrite_store, &versions[v as usize]).await;
            assert_eq!(r.written.len(), PARTITIONS);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
