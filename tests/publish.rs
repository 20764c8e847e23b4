//! End-to-end tests of `palisade publish` and `palisade manifest`: real processes on a local
//! DEST (file://), SIGKILLed at random points, fenced and racing, and on S3 (moto).
//!
//! They run the `palisade` binary that `cargo test --workspace` / `cargo nextest run
//! --workspace` build next to this test (scripts/test does both).

mod common;

use common::{Palisade, wait_bounded, wait_for_file};
use palisade_testkit::{Etcd, S3};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Exit codes of `publish` (cli/src/exit.rs).
const BAD_INPUT: i32 = 66;
const UNAVAILABLE: i32 = 69;
const CONFLICT: i32 = 73;
const FENCED: i32 = 77;

/// A scratch directory with `palisade`, and helpers for SRC trees and DEST.
struct Fixture {
    p: Palisade,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            p: Palisade::new(None),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.p.dir.path().join(rel)
    }

    fn dest(&self) -> String {
        format!("file://{}", self.path("dest").display())
    }

    /// `palisade ARGS` without an inherited fencing token or AWS settings.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.p.command(args);
        c.env_remove("PALISADE_FENCING_TOKEN");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let child = self.command(args).spawn().expect("palisade starts");
        wait_bounded(child, Duration::from_secs(120))
    }

    /// `publish --json ARGS`, which must succeed; returns the JSON summary.
    fn publish(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["publish", "--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert_eq!(out.status.code(), Some(0), "publish {args:?}: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "quiet when stderr is not a terminal: {out:?}"
        );
        serde_json::from_slice(&out.stdout).expect("publish --json prints one JSON object")
    }
}

fn write(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn written(summary: &serde_json::Value) -> Vec<String> {
    summary["written"]
        .as_array()
        .expect("written")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn bytes_written(summary: &serde_json::Value) -> u64 {
    summary["bytes_written"].as_u64().expect("bytes_written")
}

/// What a plain directory reader (a Hive-style glob of `<partition>/*`) sees under `dest`:
/// partition directory -> file name -> content, skipping `_` and `.` names as such readers do.
fn read_dir_dataset(dest: &Path) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, BTreeMap<String, Vec<u8>>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('_') || name.starts_with('.') {
                continue;
            }
            let path = e.path();
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if path.is_dir() {
                walk(&path, &child, out);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.entry(rel.to_string()).or_default().insert(name, bytes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dest, "", &mut out);
    out
}

/// A Spark-like output: `parts` partitions `date=N/` of `files` part files with random-looking
/// names, `_SUCCESS` and `.crc` files; `version` changes every file's content.
fn spark_output(root: &Path, parts: usize, files: usize, version: u32, size: usize) {
    let _ = std::fs::remove_dir_all(root);
    write(&root.join("_SUCCESS"), "");
    for p in 0..parts {
        for f in 0..files {
            let name = format!("part-{f:05}-{version:08x}.csv");
            let mut body = format!("v{version} date={p} file {f}\n").into_bytes();
            body.resize(size.max(body.len()), b'x');
            write(&root.join(format!("date={p}/{name}")), &body);
            write(&root.join(format!("date={p}/.{name}.crc")), "crc");
        }
    }
    write(&root.join("_temporary/0/date=99/part-00000.csv"), "partial");
}

#[test]
fn a_rerun_over_unchanged_src_writes_nothing() {
    let f = Fixture::new();
    let src = f.path("out");
    spark_output(&src, 3, 2, 1, 1000);
    let first = f.publish(&[src.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&first), ["date=0", "date=1", "date=2"], "{first}");
    assert!(bytes_written(&first) >= 6000, "{first}");

    // The destination is a plain Hive-style tree with exactly SRC's data files.
    let seen = read_dir_dataset(&f.path("dest"));
    assert_eq!(seen.len(), 3, "{:?}", seen.keys());
    for (p, files) in &seen {
        assert_eq!(files.len(), 2, "{p}: {:?}", files.keys());
        for content in files.values() {
            assert!(content.starts_with(format!("v1 {p} ").as_bytes()));
        }
    }

    let again = f.publish(&[src.to_str().unwrap(), &f.dest()]);
    assert_eq!(bytes_written(&again), 0, "{again}");
    assert!(written(&again).is_empty(), "{again}");
    assert_eq!(again["unchanged"], 3);
    assert!(again["bytes_hashed"].as_u64().unwrap() >= 6000);

    // Spark renames its part files every run: names do not count by default...
    for p in 0..3 {
        let dir = src.join(format!("date={p}"));
        for f in 0..2 {
            let from = dir.join(format!("part-{f:05}-00000001.csv"));
            std::fs::rename(&from, dir.join(format!("part-{f:05}-renamed.csv"))).unwrap();
        }
    }
    let renamed = f.publish(&[src.to_str().unwrap(), &f.dest()]);
    assert_eq!(bytes_written(&renamed), 0, "{renamed}");
    // ...unless --names.
    let named = f.publish(&["--names", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&named).len(), 3, "{named}");

    // `manifest` lists exactly the live files.
    let out = f.run(&["manifest", &f.dest()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(listed.len(), 6, "{listed:?}");
    for file in &listed {
        assert!(Path::new(file).is_file(), "{file} is listed but missing");
        assert!(file.contains("renamed"), "{file}");
    }
    let out = f.run(&["manifest", "--json", &f.dest()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["partitions"].as_array().unwrap().len(), 3, "{json}");
}

#[test]
fn rows_mode_ignores_splits_and_order_and_rewrites_only_the_changed_partition() {
    let f = Fixture::new();
    let src = f.path("out");
    let rows = |p: usize| -> Vec<String> {
        (0..50)
            .map(|i| format!("{i},name-{p}-{i},{}.5", i * p))
            .collect()
    };
    let write_split = |parts: usize, files: usize, reverse: bool| {
        let _ = std::fs::remove_dir_all(&src);
        for p in 0..parts {
            let mut r = rows(p);
            if reverse {
                r.reverse();
            }
            for (i, chunk) in r.chunks(r.len().div_ceil(files)).enumerate() {
                let mut body = String::from("id,name,amount\n");
                for line in chunk {
                    body.push_str(line);
                    body.push('\n');
                }
                write(&src.join(format!("p={p}/part-{i}-{files}.csv")), body);
            }
            // JSON lines next to the CSV in the same partition.
            let mut json = String::new();
            for i in 0..10 {
                let i = if reverse { 9 - i } else { i };
                json.push_str(&format!("{{\"k\":{i},\"v\":\"{p}\"}}\n"));
            }
            write(&src.join(format!("p={p}/extra-{files}.jsonl")), json);
        }
    };
    write_split(3, 2, false);
    let first = f.publish(&["--content", "rows", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&first).len(), 3, "{first}");

    // The same rows in 5 part files per partition, in reverse order: nothing is written.
    write_split(3, 5, true);
    let resplit = f.publish(&["--content", "rows", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(bytes_written(&resplit), 0, "{resplit}");
    assert!(written(&resplit).is_empty(), "{resplit}");

    // One changed row rewrites exactly its partition.
    let file = src.join("p=1/part-0-5.csv");
    let body = std::fs::read_to_string(&file).unwrap();
    let changed = body.replacen("name-1-", "NAME-1-", 1);
    assert_ne!(body, changed);
    std::fs::write(&file, changed).unwrap();
    let one = f.publish(&["--content", "rows", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&one), ["p=1"], "{one}");
    assert!(bytes_written(&one) > 0);
    let seen = read_dir_dataset(&f.path("dest"));
    assert_eq!(
        seen["p=1"].len(),
        6,
        "p=1 now holds the 5-file split: {:?}",
        seen["p=1"].keys()
    );
    assert_eq!(
        seen["p=0"].len(),
        3,
        "p=0 kept its 2-file split: {:?}",
        seen["p=0"].keys()
    );
}

#[test]
fn dry_run_writes_nothing_and_remove_missing_removes() {
    let f = Fixture::new();
    let src = f.path("out");
    spark_output(&src, 3, 1, 1, 100);
    let out = f.run(&["publish", "--dry-run", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("dry run") && table.contains("date=2"),
        "{table}"
    );
    assert!(
        read_dir_dataset(&f.path("dest")).is_empty(),
        "dry run wrote nothing"
    );
    assert!(!f.path("dest/_manifest.json").exists());

    f.publish(&[src.to_str().unwrap(), &f.dest()]);
    std::fs::remove_dir_all(src.join("date=1")).unwrap();
    let kept = f.publish(&[src.to_str().unwrap(), &f.dest()]);
    assert_eq!(kept["kept"], serde_json::json!(["date=1"]), "{kept}");
    assert!(f.path("dest/date=1").is_dir());
    let plan = f.publish(&[
        "--dry-run",
        "--remove-missing",
        src.to_str().unwrap(),
        &f.dest(),
    ]);
    assert_eq!(plan["removed"], serde_json::json!(["date=1"]), "{plan}");
    assert!(f.path("dest/date=1").is_dir(), "a dry run removes nothing");
    let removed = f.publish(&["--remove-missing", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(
        removed["removed"],
        serde_json::json!(["date=1"]),
        "{removed}"
    );
    assert!(!f.path("dest/date=1").exists());
    assert_eq!(read_dir_dataset(&f.path("dest")).len(), 2);
}

#[test]
fn bad_input_is_one_line_naming_the_file_and_publishes_nothing() {
    let f = Fixture::new();
    let one_line = |out: &Output, code: i32, needle: &str| {
        assert_eq!(out.status.code(), Some(code), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("palisade: "), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
    };
    let missing = f.path("no-such-dir");
    let out = f.run(&["publish", missing.to_str().unwrap(), &f.dest()]);
    one_line(&out, BAD_INPUT, "no-such-dir");

    // A job that wrote nothing (only Spark's marker files).
    let empty = f.path("empty");
    write(&empty.join("_SUCCESS"), "");
    let out = f.run(&[
        "publish",
        "--remove-missing",
        empty.to_str().unwrap(),
        &f.dest(),
    ]);
    one_line(&out, BAD_INPUT, "--allow-empty");

    let src = f.path("out");
    write(&src.join("date=1/good.parquet"), "PAR1 but not really");
    let out = f.run(&[
        "publish",
        "--content",
        "rows",
        src.to_str().unwrap(),
        &f.dest(),
    ]);
    one_line(&out, BAD_INPUT, "good.parquet");
    assert!(
        !f.path("dest/_manifest.json").exists(),
        "nothing half-published"
    );
    assert!(read_dir_dataset(&f.path("dest")).is_empty());

    // A symlink out of SRC (the way a `..` path would escape it).
    let outside = f.path("secret.csv");
    write(&outside, "secret");
    std::os::unix::fs::symlink(&outside, src.join("date=1/escape.csv")).unwrap();
    let out = f.run(&["publish", src.to_str().unwrap(), &f.dest()]);
    one_line(&out, BAD_INPUT, "escape.csv");
    std::fs::remove_file(src.join("date=1/escape.csv")).unwrap();

    // A file outside any key=value directory.
    write(&src.join("loose.csv"), "x");
    let out = f.run(&["publish", src.to_str().unwrap(), &f.dest()]);
    one_line(&out, BAD_INPUT, "loose.csv");
    std::fs::remove_file(src.join("loose.csv")).unwrap();

    // A partition directory name that is not a valid path segment.
    write(&src.join("date=1\u{7}/x.csv"), "x");
    let out = f.run(&["publish", src.to_str().unwrap(), &f.dest()]);
    one_line(&out, BAD_INPUT, "x.csv");
    std::fs::remove_dir_all(src.join("date=1\u{7}")).unwrap();

    // A DEST that cannot be written or reached.
    let out = f.run(&["publish", src.to_str().unwrap(), "file:///dev/null/dest"]);
    one_line(&out, UNAVAILABLE, "/dev/null");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = f
        .command(&["publish", src.to_str().unwrap(), "s3://bucket/table"])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    one_line(&out, UNAVAILABLE, "127.0.0.1");
    let out = f.run(&["publish", src.to_str().unwrap(), "nope://x"]);
    one_line(&out, 78, "nope://x");
}

#[test]
fn an_older_fencing_token_is_refused_and_changes_nothing() {
    let f = Fixture::new();
    let (a, b) = (f.path("a"), f.path("b"));
    spark_output(&a, 2, 1, 1, 100);
    spark_output(&b, 2, 1, 2, 100);
    f.publish(&["--fencing-token", "6", b.to_str().unwrap(), &f.dest()]);
    let before = read_dir_dataset(&f.path("dest"));

    let out = f.run(&[
        "publish",
        "--fencing-token",
        "5",
        a.to_str().unwrap(),
        &f.dest(),
    ]);
    assert_eq!(out.status.code(), Some(FENCED), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fenc"),
        "{out:?}"
    );
    // The token can come from the environment, as `palisade run --lock` passes it.
    let out = f
        .command(&["publish", a.to_str().unwrap(), &f.dest()])
        .env("PALISADE_FENCING_TOKEN", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(FENCED), "{out:?}");
    // A token that is not a number is a configuration error; an empty one counts as none.
    let out = f
        .command(&["publish", a.to_str().unwrap(), &f.dest()])
        .env("PALISADE_FENCING_TOKEN", "five")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let out = f
        .command(&["publish", a.to_str().unwrap(), &f.dest()])
        .env("PALISADE_FENCING_TOKEN", "")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(FENCED),
        "no token on a fenced dataset: {out:?}"
    );
    // No token on a fenced dataset is refused too, unless opted out.
    let out = f.run(&["publish", a.to_str().unwrap(), &f.dest()]);
    assert_eq!(out.status.code(), Some(FENCED), "{out:?}");
    assert_eq!(
        read_dir_dataset(&f.path("dest")),
        before,
        "B's dataset is intact"
    );

    let newer = f.publish(&["--fencing-token", "7", a.to_str().unwrap(), &f.dest()]);
    assert_eq!(newer["fencing_token"], 7);
    assert_eq!(written(&newer).len(), 2);
    // An explicit opt-out commits without a token (and keeps the recorded one).
    let unfenced = f.publish(&["--allow-unfenced", b.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&unfenced).len(), 2, "{unfenced}");
    let out = f.run(&[
        "publish",
        "--fencing-token",
        "6",
        a.to_str().unwrap(),
        &f.dest(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(FENCED),
        "token 7 is still recorded: {out:?}"
    );
}

/// Whether process `pid` has a regular file under `dir` open (from /proc).
fn reading_under(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| target.starts_with(dir) && target.is_file())
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

#[test]
fn two_concurrent_publishes_one_commits_the_other_exits_with_the_conflict_code() {
    let f = Fixture::new();
    let (a, b) = (f.path("a"), f.path("b"));
    spark_output(&a, 4, 2, 1, 4 << 20);
    spark_output(&b, 4, 2, 2, 1000);
    let a_src = a.canonicalize().unwrap();
    let mut first = f
        .command(&["publish", "--json", a.to_str().unwrap(), &f.dest()])
        .spawn()
        .unwrap();
    // A has opened the dataset once it reads a file of SRC (it scans directories, opens DEST,
    // and only then hashes files); stop it there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reading_under(first.id(), &a_src) {
        assert!(Instant::now() < deadline, "A never started reading SRC");
        assert!(
            first.try_wait().unwrap().is_none(),
            "A finished before it could be paused"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    palisade_testkit::pause_process(first.id()).expect("pause");
    let second = f.publish(&[b.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&second).len(), 4);
    palisade_testkit::resume_process(first.id()).expect("resume");
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "A did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(CONFLICT), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another writer"), "{stderr}");
    // B's commit is what readers see; nothing of A is.
    for files in read_dir_dataset(&f.path("dest")).values() {
        for content in files.values() {
            assert!(content.starts_with(b"v2 "), "only B's data is visible");
        }
    }
    // Nothing lost: A's rerun commits.
    let rerun = f.publish(&[a.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&rerun).len(), 4, "{rerun}");
}

/// Whether a publish has staged a partition under `dest` (`_staging/<run>/p<n>/`).
fn staged(dest: &Path) -> bool {
    let Ok(runs) = std::fs::read_dir(dest.join("_staging")) else {
        return false;
    };
    runs.filter_map(Result::ok)
        .filter_map(|run| std::fs::read_dir(run.path()).ok())
        .flatten()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with('p'))
}

#[test]
fn a_publish_paused_after_staging_with_an_older_token_is_fenced_at_commit() {
    let f = Fixture::new();
    let (a, b) = (f.path("a"), f.path("b"));
    spark_output(&a, 4, 2, 1, 4 << 20);
    spark_output(&b, 4, 2, 2, 1000);
    // Holder A (token 5) opens the dataset and stages its first partition (in the writer's
    // staging area, `_staging/<run>/p<n>/`)...
    let mut first = f
        .command(&[
            "publish",
            "--fencing-token",
            "5",
            a.to_str().unwrap(),
            &f.dest(),
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !staged(&f.path("dest")) {
        assert!(Instant::now() < deadline, "A never staged a partition");
        assert!(
            first.try_wait().unwrap().is_none(),
            "A finished before it could be paused"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // ...and freezes; holder B (token 6) publishes meanwhile.
    palisade_testkit::pause_process(first.id()).expect("pause");
    let second = f.publish(&["--fencing-token", "6", b.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&second).len(), 4);
    palisade_testkit::resume_process(first.id()).expect("resume");
    let out = wait_bounded(first, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(FENCED), "{out:?}");
    for files in read_dir_dataset(&f.path("dest")).values() {
        for content in files.values() {
            assert!(content.starts_with(b"v2 "), "the dataset is B's");
        }
    }
    let out = f.run(&["manifest", "--json", &f.dest()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fencing_token"], 6, "{json}");
}

#[test]
fn file_units_are_compared_one_file_at_a_time() {
    let f = Fixture::new();
    let src = f.path("out");
    write(&src.join("a.csv"), "1\n");
    write(&src.join("events/2024-01-01.jsonl"), "{}\n");
    write(&src.join("_SUCCESS"), "");
    let first = f.publish(&["--unit", "file", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(
        written(&first),
        ["a.csv", "events/2024-01-01.jsonl"],
        "{first}"
    );
    assert_eq!(std::fs::read(f.path("dest/a.csv/a.csv")).unwrap(), b"1\n");
    write(&src.join("a.csv"), "2\n");
    let second = f.publish(&["--unit", "file", src.to_str().unwrap(), &f.dest()]);
    assert_eq!(written(&second), ["a.csv"], "{second}");
}

/// A tiny deterministic PRNG (xorshift), seeded per run and printed, for kill points.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Checks what a plain directory reader and a manifest reader see: every partition complete,
/// all of one version (of those published), never a mix or a torn file.
fn check_readers(
    f: &Fixture,
    parts: usize,
    files_of: &dyn Fn(u32) -> usize,
    size: usize,
) -> BTreeMap<String, u32> {
    let mut versions = BTreeMap::new();
    for (p, files) in read_dir_dataset(&f.path("dest")) {
        let mut seen: Option<u32> = None;
        for (name, content) in &files {
            assert_eq!(content.len(), size, "{p}/{name} is whole");
            let text = String::from_utf8_lossy(&content[..40.min(content.len())]).to_string();
            let v: u32 = text[1..text.find(' ').unwrap()].parse().unwrap();
            assert!(text.contains(&format!(" {p} ")), "{p}/{name}: {text}");
            assert!(
                seen.is_none_or(|s| s == v),
                "{p} mixes versions {seen:?} and {v}"
            );
            seen = Some(v);
        }
        let v = seen.expect("a partition directory is never empty");
        assert_eq!(files.len(), files_of(v), "{p} has all files of version {v}");
        versions.insert(p, v);
    }
    assert!(versions.len() <= parts);
    // Through the manifest: every listed file exists and is whole.
    let out = f.run(&["manifest", &f.dest()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for file in String::from_utf8_lossy(&out.stdout).lines() {
        let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len as usize, size, "{file} listed by the manifest is whole");
    }
    versions
}

#[test]
fn sigkill_at_random_points_leaves_whole_partitions_and_a_rerun_converges() {
    let f = Fixture::new();
    let src = f.path("out");
    let (parts, size) = (12, 256 << 10);
    // Version v has 1 + v % 3 files per partition, so a mix of versions is visible as a count.
    let files_of = |v: u32| 1 + (v % 3) as usize;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill-point seed {seed}");
    let mut rng = Rng(seed);

    spark_output(&src, parts, files_of(0), 0, size);
    f.publish(&[src.to_str().unwrap(), &f.dest()]);
    // How long a publish that replaces every partition takes, start to exit.
    spark_output(&src, parts, files_of(1000), 1000, size);
    let started = Instant::now();
    f.publish(&[src.to_str().unwrap(), &f.dest()]);
    let full = started.elapsed().as_micros() as u64;

    // Kill points anywhere from startup to a bit past the end of a full publish; kills that
    // land after the publish finished do not count. How long a publish takes changes while the
    // suite runs (the first one measured may have shared the disk with other tests), so the
    // window adapts: a quarter shorter after a publish that finished before its kill, a
    // twentieth longer after a kill that landed. It settles where about one publish in seven
    // finishes, so kill points still reach the commit at the end.
    let mut window = full + full / 10;
    let (mut kills, mut version, mut committed, mut killed_after_commit) = (0, 0u32, 0, 0);
    while kills < 20 {
        version += 1;
        assert!(
            version <= 80,
            "only {kills} of {version} publishes were killed in time (window now {window} us)"
        );
        spark_output(&src, parts, files_of(version), version, size);
        let child = f
            .command(&["publish", src.to_str().unwrap(), &f.dest()])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.next() % window.max(1)));
        signal(child.id(), nix::sys::signal::Signal::SIGKILL);
        let out = wait_bounded(child, Duration::from_secs(30));
        let killed = out.status.code().is_none();
        if killed {
            kills += 1;
            window += window / 20;
        } else {
            window = (window - window / 4).max(1_000);
        }
        let seen = check_readers(&f, parts, &files_of, size);
        if seen.values().any(|v| *v == version) {
            committed += 1;
            killed_after_commit += usize::from(killed);
        }
    }

    eprintln!(
        "{kills} kills in {version} publishes, {committed} of them committed ({killed_after_commit} \
         killed after their commit; a full publish took {full} us; the kill window ended at \
         {window} us)"
    );
    // A rerun converges to SRC.
    f.publish(&[src.to_str().unwrap(), &f.dest()]);
    let versions = check_readers(&f, parts, &files_of, size);
    assert_eq!(versions.len(), parts);
    assert!(versions.values().all(|v| *v == version), "{versions:?}");
    let again = f.publish(&[src.to_str().unwrap(), &f.dest()]);
    assert_eq!(bytes_written(&again), 0);
}

#[test]
fn a_paused_lock_holder_cannot_publish_over_the_newer_holder() {
    let etcd = Etcd::start().expect("etcd starts");
    let p = Palisade::new(Some(&etcd));
    let bin = common::binary();
    let dir = p.dir.path();
    spark_output(&dir.join("a"), 2, 1, 1, 100);
    spark_output(&dir.join("b"), 2, 1, 2, 100);
    let dest = format!("file://{}", dir.join("dest").display());
    // A's job: wait for `go`, then publish with the token `run --lock` gave it.
    let script_a = format!(
        "touch started; while [ ! -e go ]; do sleep 0.05; done; \
         {bin} publish a {dest}; echo $? > a-code",
        bin = bin.display()
    );
    let a = p.spawn(&[
        "run", "--lock", "etl", "--ttl", "2s", "--", "sh", "-c", &script_a,
    ]);
    wait_for_file(&dir.join("started"), "A's job to start");
    palisade_testkit::pause_process(a.id()).expect("pause");

    // B gets the lock once A's lease ran out, and publishes with its higher token.
    let script_b = format!("{} publish b {dest}", bin.display());
    let b = p.output(&[
        "run",
        "--lock",
        "etl",
        "--wait-for",
        "30s",
        "--",
        "sh",
        "-c",
        &script_b,
    ]);
    assert_eq!(b.status.code(), Some(0), "B publishes: {b:?}");

    // A's job wakes up (its supervisor is still paused) and tries to publish: fenced.
    std::fs::write(dir.join("go"), "").unwrap();
    wait_for_file(&dir.join("a-code"), "A's publish to finish");
    let code = std::fs::read_to_string(dir.join("a-code")).unwrap();
    assert_eq!(code.trim(), FENCED.to_string(), "A's publish is fenced");
    for files in read_dir_dataset(&dir.join("dest")).values() {
        for content in files.values() {
            assert!(content.starts_with(b"v2 "), "the dataset is B's");
        }
    }
    palisade_testkit::resume_process(a.id()).expect("resume");
    // Its job has ended by now, so A reports either the lost lease (76) or the job's own exit.
    let status = p.finish(a);
    assert!(matches!(status.code(), Some(76) | Some(0)), "{status:?}");
}

#[test]
fn on_s3_a_rerun_writes_nothing_and_an_older_token_is_fenced() {
    let s3 = S3::start().expect("moto starts (pip install 'moto[server]', see scripts/setup)");
    s3.create_bucket("datasets").unwrap();
    let f = Fixture::new();
    let (a, b) = (f.path("a"), f.path("b"));
    spark_output(&a, 3, 2, 1, 10_000);
    spark_output(&b, 3, 2, 2, 10_000);
    let dest = "s3://datasets/tables/sales";
    let run = |args: &[&str]| -> Output {
        f.command(args)
            .env("AWS_ENDPOINT_URL", s3.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", s3.access_key())
            .env("AWS_SECRET_ACCESS_KEY", s3.secret_key())
            .env("AWS_REGION", s3.region())
            .output()
            .unwrap()
    };
    let json = |out: Output| -> serde_json::Value {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = json(run(&[
        "publish",
        "--json",
        "--fencing-token",
        "6",
        a.to_str().unwrap(),
        dest,
    ]));
    assert_eq!(written(&first).len(), 3, "{first}");
    let again = json(run(&[
        "publish",
        "--json",
        "--fencing-token",
        "6",
        a.to_str().unwrap(),
        dest,
    ]));
    assert_eq!(bytes_written(&again), 0, "{again}");

    let out = run(&["publish", "--fencing-token", "5", b.to_str().unwrap(), dest]);
    assert_eq!(out.status.code(), Some(FENCED), "{out:?}");

    let listed = json(run(&["manifest", "--json", dest]));
    let files: Vec<&str> = listed["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
        })
        .collect();
    assert_eq!(files.len(), 6, "{listed}");
    assert!(
        files
            .iter()
            .all(|f| f.starts_with("s3://datasets/tables/sales/date=")),
        "{files:?}"
    );
}

/// Runs `palisade ARGS` against moto, with the AWS settings in the environment.
fn on_moto(f: &Fixture, s3: &S3, args: &[&str]) -> std::process::Child {
    f.command(args)
        .env("AWS_ENDPOINT_URL", s3.endpoint())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_key())
        .env("AWS_REGION", s3.region())
        .spawn()
        .expect("palisade starts")
}

/// Starts `publish ARGS` against moto and freezes it once it has opened DEST (it reads SRC's
/// files only after opening), runs `meanwhile`, thaws it and returns its output.
fn paused_while(
    f: &Fixture,
    s3: &S3,
    args: &[&str],
    src: &Path,
    meanwhile: impl FnOnce(),
) -> Output {
    let src = src.canonicalize().unwrap();
    let child = on_moto(f, s3, args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reading_under(child.id(), &src) {
        assert!(
            Instant::now() < deadline,
            "the publish never started reading SRC"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    palisade_testkit::pause_process(child.id()).expect("pause");
    meanwhile();
    palisade_testkit::resume_process(child.id()).expect("resume");
    wait_bounded(child, Duration::from_secs(60))
}

#[test]
fn on_s3_a_publish_that_lost_the_race_conflicts_or_is_fenced_and_changes_nothing() {
    // moto checks conditional writes sequentially, which is what these races need: the
    // loser's commit comes after the winner's (see palisade_testkit::S3 on what moto lacks).
    let s3 = S3::start().expect("moto starts (pip install 'moto[server]', see scripts/setup)");
    s3.create_bucket("datasets").unwrap();
    let f = Fixture::new();
    let (a, b) = (f.path("a"), f.path("b"));
    spark_output(&a, 4, 2, 1, 4 << 20);
    spark_output(&b, 4, 2, 2, 1000);
    let dest = "s3://datasets/races";
    let ok = |args: &[&str]| {
        let out = wait_bounded(on_moto(&f, &s3, args), Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    };
    let files = || -> Vec<String> {
        let out = wait_bounded(
            on_moto(&f, &s3, &["manifest", dest]),
            Duration::from_secs(60),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };

    // Without tokens: B commits while A is frozen after opening; A's commit conflicts.
    let out = paused_while(&f, &s3, &["publish", a.to_str().unwrap(), dest], &a, || {
        ok(&["publish", b.to_str().unwrap(), dest])
    });
    assert_eq!(out.status.code(), Some(CONFLICT), "{out:?}");
    let after_b = files();
    assert_eq!(after_b.len(), 8, "{after_b:?}");

    // With tokens: B (6) commits while A (5) is frozen; A is fenced.
    ok(&["publish", "--fencing-token", "4", a.to_str().unwrap(), dest]);
    let out = paused_while(
        &f,
        &s3,
        &["publish", "--fencing-token", "5", a.to_str().unwrap(), dest],
        &a,
        || ok(&["publish", "--fencing-token", "6", b.to_str().unwrap(), dest]),
    );
    assert_eq!(out.status.code(), Some(FENCED), "{out:?}");
    let listed = files();
    assert_eq!(listed.len(), 8, "{listed:?}");
    assert!(
        listed.iter().all(|f| !after_b.contains(f)),
        "token 6 rewrote every partition"
    );
}

/// Reads one partition directory the way a careful plain reader does: it opens the directory,
/// then lists and reads through that open handle (`/proc/self/fd/N/...`), so a swap in the
/// middle cannot mix versions. `Err(true)` if the version it opened was deleted meanwhile
/// (replaced versions are retained, so this must not happen); `Err(false)` if the directory was
/// missing (only between the two renames where `RENAME_EXCHANGE` is unavailable).
fn read_partition_through_handle(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, bool> {
    use std::os::fd::AsRawFd;
    let handle = std::fs::File::open(dir).map_err(|_| false)?;
    let via = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&via).map_err(|_| true)? {
        let name = entry
            .map_err(|_| true)?
            .file_name()
            .to_string_lossy()
            .to_string();
        if name.starts_with('_') || name.starts_with('.') {
            continue;
        }
        files.insert(
            name.clone(),
            std::fs::read(via.join(&name)).map_err(|_| true)?,
        );
    }
    if files.is_empty() {
        return Err(true); // an opened version emptied by a deletion
    }
    Ok(files)
}

#[test]
fn a_reader_during_publishes_sees_every_partition_whole() {
    let f = Fixture::new();
    let src = f.path("out");
    let (parts, size) = (6, 64 << 10);
    let files_of = |v: u32| 1 + (v % 3) as usize;
    spark_output(&src, parts, files_of(0), 0, size);
    f.publish(&[src.to_str().unwrap(), &f.dest()]);

    let done = std::sync::atomic::AtomicBool::new(false);
    let dest = f.path("dest");
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let (mut snapshots, mut retried) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for p in 0..parts {
                    let files = match read_partition_through_handle(&dest.join(format!("date={p}")))
                    {
                        Ok(files) => files,
                        Err(deleted) => {
                            assert!(
                                !deleted,
                                "date={p}: the version the reader opened was deleted under it \
                                 (publish retains replaced versions for an hour)"
                            );
                            retried += 1;
                            continue;
                        }
                    };
                    let versions: std::collections::BTreeSet<u32> = files
                        .values()
                        .map(|c| {
                            assert_eq!(c.len(), size, "a file is whole");
                            let text = String::from_utf8_lossy(&c[..20]).to_string();
                            text[1..text.find(' ').unwrap()].parse().unwrap()
                        })
                        .collect();
                    assert_eq!(versions.len(), 1, "date={p} mixes versions {versions:?}");
                    let v = *versions.first().unwrap();
                    assert_eq!(files.len(), files_of(v), "date={p} has all of version {v}");
                    snapshots += 1;
                }
            }
            (snapshots, retried)
        });
        for version in 1..=12 {
            spark_output(&src, parts, files_of(version), version, size);
            f.publish(&[src.to_str().unwrap(), &f.dest()]);
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (snapshots, retried) = reader.join().expect("the reader's checks hold");
        eprintln!("{snapshots} whole partition snapshots read, {retried} re-listed");
        assert!(snapshots > 0);
    });
}
