//! Hashing throughput of `put` on a 1 GiB input, next to the peers on the same file in the same
//! run: `b3sum --num-threads 1` (if installed), the blake3 crate's raw hasher (one thread, the
//! same 1 MiB reads, and `update_mmap` as b3sum hashes files), and `sha256sum`.
//!
//! `cargo bench -p palisade-idempotency --bench hashing -- --warm-up-time 1 --measurement-time 3`

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use palisade_idempotency::{DatasetStore, PartitionedWriter};

const SIZE: u64 = 1 << 30;

fn make_input(path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..(SIZE >> 20) {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

fn raw_blake3(path: &Path) -> blake3::Hash {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run_tool(cmd: &str, args: &[&str], path: &Path) {
    let out = Command::new(cmd).args(args).arg(path).output().unwrap();
    assert!(out.status.success(), "{cmd} failed");
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input.bin");
    make_input(&input);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = DatasetStore::local(tmp.path().join("out"));
    // Commit the input once, so every measured `put_file` hashes it and finds it unchanged.
    rt.block_on(async {
        let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
        w.put_file("big", &input).await.unwrap();
        w.commit().await.unwrap();
    });
    // Flush the 2 GiB just written, so writeback does not run during the first measurement.
    let _ = Command::new("sync").status();

    let mut g = c.benchmark_group("hash_1GiB");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(SIZE));
    g.bench_function("palisade put_file (unchanged)", |b| {
        b.to_async(&rt).iter(|| async {
            let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
            w.put_file("big", &input).await.unwrap();
            let r = w.commit().await.unwrap();
            assert_eq!(r.bytes_written, 0);
        })
    });
    let in_memory = bytes::Bytes::from(std::fs::read(&input).unwrap());
    g.bench_function("palisade put (1 GiB already in memory, unchanged)", |b| {
        b.to_async(&rt).iter(|| async {
            let mut w = PartitionedWriter::open(&store, "t").await.unwrap();
            w.put("big", in_memory.clone()).await.unwrap();
            let r = w.commit().await.unwrap();
            assert_eq!(r.bytes_written, 0);
        })
    });
    g.bench_function("blake3 crate raw hasher (1 thread)", |b| {
        b.iter(|| raw_blake3(&input))
    });
    g.bench_function("blake3 crate raw hasher on tokio's blocking pool", |b| {
        b.to_async(&rt).iter(|| {
            let input = input.clone();
            async move {
                tokio::task::spawn_blocking(move || raw_blake3(&input))
                    .await
                    .unwrap()
            }
        })
    });
    g.bench_function("blake3 crate update_mmap (1 thread, as b3sum does)", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new();
            h.update_mmap(&input).unwrap();
            h.finalize()
        })
    });
    if have("b3sum") {
        g.bench_function("b3sum --num-threads 1", |b| {
            b.iter(|| run_tool("b3sum", &["--num-threads", "1"], &input))
        });
    } else {
        eprintln!("b3sum is not installed: comparing with the blake3 crate's raw hasher only");
    }
    if have("sha256sum") {
        g.bench_function("sha256sum", |b| {
            b.iter(|| run_tool("sha256sum", &[], &input))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
