//! Crash safety of multi-file partitions on the local directory: a writer of `put_files` runs in
//! a child process (this test binary, re-run with an environment variable) and is SIGKILLed at
//! random points of multi-partition runs (at least 24 kills that land inside a run). After each
//! kill, every partition directory a plain reader sees is exactly the old or the new file set
//! with complete contents; after `Dataset::open` (which completes a decided commit) the
//! directories match the manifest exactly; and a rerun converges to what an uninterrupted run
//! produces (same manifest content, same files, no leftovers).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use palisade_idempotency::{ContentHash, Dataset, DatasetStore, PartFile, PartitionedWriter};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "PALISADE_IDEMPOTENCY_MULTI_CRASH_CHILD";
const PARTITIONS: usize = 12;
const KILLS: u32 = 24;

/// A partition's files: name -> content.
type Files = BTreeMap<String, Vec<u8>>;

/// The dataset of version `v`: about half of the partitions change between versions (with new
/// file names, as Spark gives them), and a few appear or disappear.
fn expected(v: u32) -> BTreeMap<String, Files> {
    (0..PARTITIONS)
        .filter(|p| !(p + v as usize).is_multiple_of(5))
        .map(|p| {
            let generation = if (p + v as usize).is_multiple_of(2) {
                v
            } else {
                v.saturating_sub(1)
            };
            let files: Files = (0..1 + (p + generation as usize) % 3)
                .map(|i| {
                    let line = format!("partition {p} file {i} generation {generation}\n");
                    let size = 4_000 + (p * 2_500 + i * 7_000) % 30_000;
                    let bytes = line.as_bytes().iter().cycle().take(size).copied().collect();
                    let name = if i == 2 {
                        format!("sub/part-{i:05}-g{generation}.csv")
                    } else {
                        format!("part-{i:05}-g{generation}.csv")
                    };
                    (name, bytes)
                })
                .collect();
            (format!("day={p:02}/kind=sales"), files)
        })
        .collect()
}

fn identity(f: &Files) -> ContentHash {
    let mut hashes: Vec<ContentHash> = f.values().map(|c| ContentHash::of_bytes(c)).collect();
    hashes.sort();
    let mut h = blake3::Hasher::new();
    for x in hashes {
        h.update(x.as_bytes());
    }
    h.finalize().into()
}

/// Where the job's output of version `v` lies (written by the parent before the child starts).
fn source_dir(dir: &Path, v: u32) -> PathBuf {
    dir.join(format!("src/v{v}"))
}

fn write_source(dir: &Path, v: u32) {
    for (p, files) in expected(v) {
        for (name, bytes) in files {
            let path = source_dir(dir, v).join(&p).join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }
}

async fn write_version(dir: &Path, v: u32, announce: bool) -> palisade_idempotency::Report {
    let store = DatasetStore::local(dir.join("out"));
    let mut w = PartitionedWriter::builder(&store, "table")
        .remove_missing(true)
        .open()
        .await
        .expect("open");
    if announce {
        common::announce("opened");
    }
    for (p, files) in expected(v) {
        let part_files = files
            .keys()
            .map(|n| PartFile::new(n.clone(), source_dir(dir, v).join(&p).join(n)))
            .collect();
        w.put_files(&p, part_files, identity(&files))
            .await
            .expect("put_files");
    }
    let report = w.commit().await.expect("commit");
    if announce {
        common::announce("committed");
    }
    report
}

/// The child side: runs one writer and exits. A no-op in a normal test run.
#[test]
fn multi_crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (dir, v) = spec.split_once('|').expect("dir|version");
    let v: u32 = v.parse().expect("version");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(write_version(Path::new(dir), v, true));
}

fn spawn_child(dir: &Path, v: u32) -> (std::process::Child, std::sync::mpsc::Receiver<()>) {
    common::spawn_child("multi_crash_child", CHILD_ENV, dir, v)
}

/// What a plain Hive-style reader sees: every directory holding visible files (names not
/// starting with `.` or `_`), as partition -> files. Files in subdirectories of a partition
/// (`sub/...`) belong to the partition two levels up (`day=../kind=..`).
fn plain_view(table: &Path) -> BTreeMap<String, Files> {
    let mut out: BTreeMap<String, Files> = BTreeMap::new();
    let mut stack = vec![table.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('_') || name.starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(table).unwrap().to_string_lossy().to_string();
                let parts: Vec<&str> = rel.split('/').collect();
                let partition = parts[..2].join("/");
                let file = parts[2..].join("/");
                let bytes = std::fs::read(&p).expect("read a visible file");
                out.entry(partition).or_default().insert(file, bytes);
            }
        }
    }
    out
}

/// Every name inside the partition directories, hidden ones included.
fn all_names(table: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![table.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if d == table && name.starts_with('_') {
                continue;
            }
            let rel = e
                .path()
                .strip_prefix(table)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if e.path().is_dir() {
                stack.push(e.path());
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

/// The reader-visible invariants after a kill during the run from `v - 1` to `v`. Returns
/// (the manifest is the new version, a decided commit was pending).
async fn check_after_kill(dir: &Path, v: u32) -> (bool, bool) {
    let table = dir.join("out/table");
    let (old, new) = (expected(v - 1), expected(v));
    // 1. The raw state a plain reader sees right after the kill: each partition directory is
    //    exactly its old or its new file set, complete.
    for (p, files) in plain_view(&table) {
        let ok = old.get(&p) == Some(&files) || new.get(&p) == Some(&files);
        assert!(
            ok,
            "version {v}: partition {p} shows {:?}, neither the old nor the new file set",
            files.keys().collect::<Vec<_>>()
        );
    }
    let pending = table.join("_manifest.pending.json").exists();
    // 2. Through the manifest (Dataset::open completes a decided commit): the whole dataset is
    //    the old or the new version, and every file it names is complete.
    let ds = Dataset::open(&DatasetStore::local(dir.join("out")), "table")
        .await
        .expect("manifest readable after a kill");
    let m = ds.manifest().expect("version 1 was committed");
    let ids: BTreeMap<String, ContentHash> = m
        .partitions
        .iter()
        .map(|(k, e)| (k.clone(), e.identity.expect("identity recorded")))
        .collect();
    let ids_of = |d: &BTreeMap<String, Files>| -> BTreeMap<String, ContentHash> {
        d.iter().map(|(k, f)| (k.clone(), identity(f))).collect()
    };
    let committed_new = ids == ids_of(&new);
    assert!(
        committed_new || ids == ids_of(&old),
        "version {v}: the manifest is neither the old nor the new dataset"
    );
    let want = if committed_new { &new } else { &old };
    for (p, files) in want {
        for (name, bytes) in files {
            let got = ds.read_file(p, name).await.expect("named file is complete");
            assert_eq!(
                got.as_deref(),
                Some(bytes.as_slice()),
                "version {v}: {p}/{name}"
            );
        }
    }
    // 3. After that, the directories are exactly what the manifest names.
    assert_eq!(
        &plain_view(&table),
        want,
        "version {v}: directories and manifest disagree after Dataset::open"
    );
    (committed_new, pending)
}

/// After a rerun: the manifest and the files equal an uninterrupted run's, with no leftovers.
async fn check_converged(dir: &Path, v: u32, reference: &Path) {
    let table = dir.join("out/table");
    let ds = Dataset::open(&DatasetStore::local(dir.join("out")), "table")
        .await
        .unwrap();
    let refds = Dataset::open(&DatasetStore::local(reference.join("out")), "table")
        .await
        .unwrap();
    let content = |m: &palisade_idempotency::Manifest| {
        m.partitions
            .iter()
            .map(|(k, e)| {
                let files: Vec<_> = e
                    .files
                    .iter()
                    .map(|f| (f.name.clone(), f.object.clone(), f.size, f.hash))
                    .collect();
                (k.clone(), (e.identity, e.hash, e.size, files))
            })
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        content(ds.manifest().unwrap()),
        content(refds.manifest().unwrap()),
        "version {v}: the rerun's manifest differs from an uninterrupted run's"
    );
    assert_eq!(&plain_view(&table), &expected(v), "version {v}: files");
    assert_eq!(
        all_names(&table),
        all_names(&reference.join("out/table")),
        "version {v}: leftovers (markers, stray files) remain"
    );
    assert_eq!(
        std::fs::read_dir(table.join("_staging")).unwrap().count(),
        0,
        "version {v}: staging leftovers remain"
    );
    assert!(!table.join("_manifest.pending.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_multi_file_runs_leaves_whole_directories_and_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reference = tempfile::tempdir().unwrap();
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("multi-file crash test seed {seed} (rerun with CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    write_source(dir, 1);
    write_source(dir, 2);
    assert!(spawn_child(dir, 1).0.wait().unwrap().success());
    let (mut child, committed) = spawn_child(dir, 2);
    let start = Instant::now();
    committed.recv().expect("the child reports its commit");
    // The estimate adapts: on a loaded machine the measured run can be much slower than the
    // next ones, and kills aimed past their end would keep missing.
    let mut run_time = start.elapsed();
    assert!(child.wait().unwrap().success());

    let (mut landed, mut before, mut after, mut pending_seen, mut finished) = (0, 0, 0, 0, 0);
    let mut v = 3;
    while landed < KILLS {
        assert!(
            v < 3 + 4 * KILLS,
            "kills keep missing the run; is the machine overloaded?"
        );
        write_source(dir, v);
        // The uninterrupted run of the same version, on a copy of the previous state, is the
        // reference the rerun must converge to: an uninterrupted run from v-1 to v.
        let _ = std::fs::remove_dir_all(reference.path().join("out"));
        copy_tree(&dir.join("out"), &reference.path().join("out"));
        let _ = std::fs::remove_dir_all(reference.path().join("src"));
        std::os::unix::fs::symlink(dir.join("src"), reference.path().join("src")).unwrap();
        // Kill delays span the writer's work up to about its commit; half of them are aimed at
        // the second half of the run, where the commit is (the swaps take a few milliseconds).
        let micros = run_time.as_micros() as u64;
        let delay = if rng.random_bool(0.5) {
            rng.random_range(0..(micros * 11 / 10).max(1))
        } else {
            rng.random_range(micros * 4 / 10..(micros * 9 / 10).max(micros * 4 / 10 + 1))
        };
        // A reader that opened version v-1 before the run; it must read all of it after the
        // kill wherever that lands (live, in the staging area of a commit under way, retired).
        let earlier = Dataset::open(&DatasetStore::local(dir.join("out")), "table")
            .await
            .unwrap();
        let (mut child, _) = spawn_child(dir, v);
        std::thread::sleep(Duration::from_micros(delay));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            finished += 1;
            run_time = (run_time * 3 / 4).max(Duration::from_millis(1));
        } else {
            landed += 1;
        }
        let in_flight = dir.join("out/table/_manifest.pending.json").exists();
        for (p, entry) in &earlier.manifest().expect("committed").partitions {
            for f in &entry.files {
                let got = earlier.read_file(p, &f.name).await;
                assert!(
                    matches!(got, Ok(Some(_))),
                    "version {v}: the reader of version {} cannot read {p}/{} after the kill \
                     (commit in flight: {in_flight}): {got:?}",
                    v - 1,
                    f.name
                );
            }
        }
        let (new, pending) = check_after_kill(dir, v).await;
        if new {
            after += 1;
        } else {
            before += 1;
        }
        if pending {
            pending_seen += 1;
        }
        let report = write_version(dir, v, false).await;
        if new {
            assert_eq!(
                report.bytes_written, 0,
                "version {v}: committed, yet rewritten"
            );
        }
        // The reference: the same version written without a kill, from the same starting point.
        write_version(reference.path(), v, false).await;
        check_converged(dir, v, reference.path()).await;
        let _ = std::fs::remove_dir_all(source_dir(dir, v - 1));
        v += 1;
    }
    eprintln!(
        "{landed} kills inside a {run_time:?} run: {before} left the old version, {after} the new \
         one, {pending_seen} a decided commit that was rolled forward ({finished} more children \
         finished before their kill)"
    );
    assert!(
        before > 0,
        "no kill landed before the commit point; the test is not testing"
    );
}

/// Copies the dataset directory (data, manifest; not the lock or staging) for the reference run.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name == "_staging" || name == "_retired" || name == "_manifest.lock" {
            continue;
        }
        let target = to.join(&name);
        if e.path().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
