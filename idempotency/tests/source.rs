//! `source`: scanning SRC into partitions, and their identities in bytes mode (moved here with
//! the code from the palisade CLI; rows mode: `source_rows.rs`, pinned values: `source_pins.rs`).

use palisade_idempotency::source::{
    Content, Format, IdentityOptions, Partition, ScanOptions, SrcFile, Unit, identities, identity,
    scan,
};
use std::path::Path;
use std::sync::atomic::Ordering;

fn tree(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, f.as_bytes()).unwrap();
    }
    dir
}

fn opts(unit: Unit) -> ScanOptions {
    ScanOptions {
        unit,
        include: vec![],
        exclude: vec![],
    }
}

fn names(parts: &[Partition]) -> Vec<(String, Vec<String>)> {
    parts
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.files.iter().map(|f| f.name.clone()).collect(),
            )
        })
        .collect()
}

#[test]
fn hive_directories_nested_and_spark_leftovers_skipped() {
    let d = tree(&[
        "_SUCCESS",
        "date=1/part-0.csv",
        "date=1/.part-0.csv.crc",
        "date=1/sub/part-1.csv",
        "date=2/region=eu/part-0.csv",
        "date=2/region=us/part-0.csv",
        "_temporary/0/date=3/part-9.csv",
        "date=4/_committed_1",
    ]);
    let parts = scan(d.path(), &opts(Unit::Dir)).unwrap();
    assert_eq!(
        names(&parts),
        vec![
            (
                "date=1".into(),
                vec!["part-0.csv".into(), "sub/part-1.csv".into()]
            ),
            ("date=2/region=eu".into(), vec!["part-0.csv".into()]),
            ("date=2/region=us".into(), vec!["part-0.csv".into()]),
        ]
    );
    assert_eq!(
        parts[0].size(),
        "date=1/part-0.csvdate=1/sub/part-1.csv".len() as u64
    );
}

#[test]
fn file_units() {
    let d = tree(&["a.csv", "date=1/b.csv", "x.crc"]);
    let parts = scan(d.path(), &opts(Unit::File)).unwrap();
    assert_eq!(
        names(&parts),
        vec![
            ("a.csv".into(), vec!["a.csv".into()]),
            ("date=1/b.csv".into(), vec!["b.csv".into()]),
        ]
    );
}

#[test]
fn include_and_exclude_globs() {
    let d = tree(&[
        "d=1/a.parquet",
        "d=1/a.json",
        "d=2/b.parquet",
        "d=3/c.parquet",
    ]);
    let o = ScanOptions {
        unit: Unit::Dir,
        include: vec!["**/*.parquet".into()],
        exclude: vec!["d=3/*".into()],
    };
    let parts = scan(d.path(), &o).unwrap();
    assert_eq!(
        names(&parts),
        vec![
            ("d=1".into(), vec!["a.parquet".into()]),
            ("d=2".into(), vec!["b.parquet".into()]),
        ]
    );
    let bad = ScanOptions {
        unit: Unit::Dir,
        include: vec!["[".into()],
        exclude: vec![],
    };
    assert!(
        scan(d.path(), &bad)
            .unwrap_err()
            .to_string()
            .contains("--include")
    );
}

#[test]
fn bad_inputs_name_the_file() {
    let missing = scan(Path::new("/nonexistent/src"), &opts(Unit::Dir)).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/src"),
        "{missing}"
    );

    let d = tree(&["loose.csv"]);
    let e = scan(d.path(), &opts(Unit::Dir)).unwrap_err();
    assert!(
        e.to_string().contains("loose.csv") && e.to_string().contains("--unit file"),
        "{e}"
    );

    let d = tree(&["d=1/a.csv", "d=1/e=2/b.csv"]);
    let e = scan(d.path(), &opts(Unit::Dir)).unwrap_err();
    assert!(e.to_string().contains("nested"), "{e}");

    let d = tree(&["d=1/a.csv"]);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "x").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("d=1/link")).unwrap();
    let e = scan(d.path(), &opts(Unit::Dir)).unwrap_err();
    assert!(
        e.to_string().contains("outside SRC") && e.to_string().contains("link"),
        "{e}"
    );
}

fn part(dir: &Path, files: &[(&str, &str)]) -> Partition {
    Partition {
        name: "p=1".into(),
        files: files
            .iter()
            .map(|(n, content)| {
                let path = dir.join(n);
                std::fs::write(&path, content).unwrap();
                SrcFile {
                    name: n.to_string(),
                    path,
                    size: content.len() as u64,
                }
            })
            .collect(),
    }
}

fn id_opts(content: Content, names: bool) -> IdentityOptions {
    IdentityOptions {
        content,
        names,
        format: Format::Auto,
        threads: 2,
    }
}

#[test]
fn bytes_identity_ignores_names_and_order_unless_asked() {
    let d = tempfile::tempdir().unwrap();
    let a = part(
        d.path(),
        &[("part-0-aaa.csv", "1\n"), ("part-1-aaa.csv", "2\n")],
    );
    let b = part(
        d.path(),
        &[("part-0-bbb.csv", "2\n"), ("part-1-bbb.csv", "1\n")],
    );
    let o = id_opts(Content::Bytes, false);
    assert_eq!(
        identity(&a, &o, &|_| {}).unwrap(),
        identity(&b, &o, &|_| {}).unwrap()
    );
    let named = id_opts(Content::Bytes, true);
    assert_ne!(
        identity(&a, &named, &|_| {}).unwrap(),
        identity(&b, &named, &|_| {}).unwrap()
    );
    let c = part(
        d.path(),
        &[("part-0-ccc.csv", "1\n"), ("part-1-ccc.csv", "3\n")],
    );
    assert_ne!(
        identity(&a, &o, &|_| {}).unwrap(),
        identity(&c, &o, &|_| {}).unwrap()
    );
    // Modes never share identities.
    assert_ne!(
        identity(&a, &o, &|_| {}).unwrap(),
        identity(&a, &id_opts(Content::Rows, false), &|_| {}).unwrap()
    );
}

#[test]
fn parallel_identities_keep_order_and_count_bytes() {
    let d = tempfile::tempdir().unwrap();
    let parts: Vec<Partition> = (0..20)
        .map(|i| {
            let sub = d.path().join(i.to_string());
            std::fs::create_dir(&sub).unwrap();
            part(&sub, &[("f.csv", &format!("x\n{i}\n"))])
        })
        .collect();
    let counted = std::sync::atomic::AtomicU64::new(0);
    let o = id_opts(Content::Bytes, false);
    let all = identities(&parts, &o, &|n| {
        counted.fetch_add(n, Ordering::Relaxed);
    })
    .unwrap();
    for (p, h) in parts.iter().zip(&all) {
        assert_eq!(identity(p, &o, &|_| {}).unwrap(), *h);
    }
    let total: u64 = parts.iter().map(Partition::size).sum();
    assert_eq!(counted.load(Ordering::Relaxed), total);
    std::fs::remove_file(&parts[7].files[0].path).unwrap();
    let e = identities(&parts, &o, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("7/f.csv"), "{e}");
}

#[test]
fn option_names_parse_and_errors_are_source_errors() {
    assert_eq!("file".parse::<Unit>().unwrap(), Unit::File);
    assert_eq!("rows".parse::<Content>().unwrap(), Content::Rows);
    assert_eq!("jsonl".parse::<Format>().unwrap(), Format::Jsonl);
    let e = "lines".parse::<Content>().unwrap_err();
    assert!(
        matches!(e, palisade_idempotency::Error::Source { .. }) && e.to_string().contains("rows"),
        "{e}"
    );
    let d = tree(&["d=1/a.csv"]);
    let parts = scan(d.path(), &ScanOptions::default()).unwrap();
    let files = parts[0].part_files();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].name, "a.csv");
    assert_eq!(files[0].path, parts[0].files[0].path);
}
