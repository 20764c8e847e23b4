//! `palisade publish` of 1,000 partitions / 1 GiB next to `cp -r` + `sync` (first run), and the
//! unchanged rerun next to `rsync --checksum` onto an up-to-date copy, in the same run.
//!
//! A plain bench binary (each measurement is seconds long, so criterion's sampling would take
//! many minutes): `cargo bench -p palisade-cli --bench publish`. Environment knobs:
//! `PUBLISH_BENCH_PARTITIONS` (default 1000), `PUBLISH_BENCH_MIB` (total size, default 1024),
//! `PUBLISH_BENCH_RUNS` (default 3; the median is reported), `PUBLISH_BENCH_DIR` (where the
//! trees are made; default the system temp dir). Needs `rsync` on the PATH.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `parts` partitions `date=N/` of two part files each, `total` bytes in all, with
/// incompressible content, plus Spark's `_SUCCESS`.
fn generate(root: &Path, parts: usize, total: usize) {
    let per_file = total / parts / 2;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; per_file];
    for p in 0..parts {
        let dir = root.join(format!("date={p:04}"));
        std::fs::create_dir_all(&dir).expect("create partition directory");
        for f in 0..2 {
            for chunk in buf.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let bytes = state.to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            std::fs::write(dir.join(format!("part-{f:05}-c000.snappy.parquet")), &buf)
                .expect("write part file");
        }
    }
    std::fs::write(root.join("_SUCCESS"), "").expect("write _SUCCESS");
}

fn run(what: &str, command: &mut Command) -> Duration {
    let started = Instant::now();
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = started.elapsed();
    assert!(out.status.success(), "{what} failed: {out:?}");
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that is not ours means another bench was asked.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && a != "publish")
    {
        return;
    }
    let parts = env("PUBLISH_BENCH_PARTITIONS", 1000);
    let mib = env("PUBLISH_BENCH_MIB", 1024);
    let runs = env("PUBLISH_BENCH_RUNS", 3).max(1);
    let base = std::env::var("PUBLISH_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), Into::into);
    let scratch = tempfile::Builder::new()
        .prefix("palisade-publish-bench-")
        .tempdir_in(base)
        .expect("scratch directory");
    let src = scratch.path().join("src");
    eprintln!(
        "generating {parts} partitions, {mib} MiB in {}",
        src.display()
    );
    generate(&src, parts, mib << 20);
    let bin = env!("CARGO_BIN_EXE_palisade");
    let (s, root) = (
        src.display().to_string(),
        scratch.path().display().to_string(),
    );

    let (mut cp, mut first, mut rsync, mut rerun) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        let copy = format!("{root}/copy");
        let dest = format!("{root}/dest");
        let _ = std::fs::remove_dir_all(&copy);
        let _ = std::fs::remove_dir_all(&dest);
        run("sync", &mut sh("sync"));
        cp.push(run(
            "cp -r + sync",
            &mut sh(&format!("cp -r {s} {copy} && sync")),
        ));
        run("sync", &mut sh("sync"));
        first.push(run(
            "publish",
            Command::new(bin).args(["publish", &s, &format!("file://{dest}")]),
        ));
        // The copy is up to date: rsync reads both sides to compare checksums, copies nothing.
        rsync.push(run(
            "rsync --checksum",
            Command::new("rsync").args(["-a", "--checksum", &format!("{s}/"), &format!("{copy}/")]),
        ));
        rerun.push(run(
            "publish rerun",
            Command::new(bin).args(["publish", &s, &format!("file://{dest}")]),
        ));
    }
    let (cp, first, rsync, rerun) = (median(cp), median(first), median(rsync), median(rerun));
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("\n{parts} partitions, {mib} MiB, median of {runs} runs\n");
    println!("| case | palisade publish | peer | peer time | ratio (publish / peer) |");
    println!("|---|---|---|---|---|");
    println!(
        "| first run | {:.2} s | `cp -r` + `sync` | {:.2} s | {:.2}x |",
        first.as_secs_f64(),
        cp.as_secs_f64(),
        ratio(first, cp)
    );
    println!(
        "| unchanged rerun | {:.2} s | `rsync -a --checksum` (up-to-date copy) | {:.2} s | {:.2}x |",
        rerun.as_secs_f64(),
        rsync.as_secs_f64(),
        ratio(rerun, rsync)
    );
}
