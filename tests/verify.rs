//! `palisade verify`, and what `publish`/`manifest` do with names that need escaping and with
//! nested datasets: real processes on a local DEST and on S3 (moto).

mod common;

use common::{Palisade, wait_bounded};
use palisade_testkit::S3;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Exit codes (cli/src/exit.rs).
const UNSOUND: i32 = 65;
const CONFIG: i32 = 78;

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn run(mut c: Command) -> Output {
    c.env_remove("PALISADE_FENCING_TOKEN");
    wait_bounded(
        c.spawn().expect("palisade starts"),
        Duration::from_secs(120),
    )
}

/// Spark's escaping of Hive partition values, non-ASCII, spaces, `+`, `=`.
const NAMES: &[&str] = &[
    "slot=2024-01-01 10%3A00%3A00",
    "city=Zürich",
    "k=a+b c",
    "k=x=y",
];

#[test]
fn verify_says_sound_then_names_a_missing_file_and_exits_65() {
    let p = Palisade::new(None);
    let src = p.dir.path().join("src");
    for (i, n) in NAMES.iter().enumerate() {
        write(&src.join(n).join("part-0.csv"), &format!("id\n{i}\n"));
    }
    let dest = p.dir.path().join("dest");
    let url = format!("file://{}", dest.display());
    let out = run(p.command(&["publish", src.to_str().unwrap(), &url]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = run(p.command(&["verify", "--hashes", &url]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sound") && text.contains("4 objects"),
        "{text}"
    );

    std::fs::remove_file(dest.join("city=Zürich/part-0.csv")).unwrap();
    let out = run(p.command(&["verify", &url]));
    assert_eq!(out.status.code(), Some(UNSOUND), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NOT SOUND")
            && text.contains("missing")
            && text.contains("city=Zürich/part-0.csv"),
        "{text}"
    );
    let out = run(p.command(&["verify", "--json", &url]));
    assert_eq!(out.status.code(), Some(UNSOUND), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["sound"], false, "{v}");
    assert_eq!(v["problems"][0]["problem"], "missing", "{v}");
    assert_eq!(v["problems"][0]["object"], "city=Zürich/part-0.csv", "{v}");

    // A DEST where nothing was ever published (a typo in a nightly check) is not "sound".
    let nothing = format!("file://{}", p.dir.path().join("dset").display());
    std::fs::create_dir_all(p.dir.path().join("dset")).unwrap();
    let out = run(p.command(&["verify", &nothing]));
    assert_eq!(out.status.code(), Some(66), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NO DATASET"), "{text}");
    let out = run(p.command(&["verify", "--json", &nothing]));
    assert_eq!(out.status.code(), Some(66), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(
        (&v["sound"], &v["dataset"]),
        (&false.into(), &false.into()),
        "{v}"
    );
}

#[test]
fn on_s3_names_are_kept_byte_for_byte_and_nested_datasets_are_refused() {
    let s3 = S3::start().expect("moto starts (scripts/setup installs moto[server])");
    s3.create_bucket("lake").unwrap();
    let p = Palisade::new(None);
    let on_moto = |args: &[&str]| -> Output {
        let mut c = p.command(args);
        c.env("AWS_ENDPOINT_URL", s3.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", s3.access_key())
            .env("AWS_SECRET_ACCESS_KEY", s3.secret_key())
            .env("AWS_REGION", s3.region());
        run(c)
    };
    let src = p.dir.path().join("src");
    for (i, n) in NAMES.iter().enumerate() {
        write(&src.join(n).join("part-0.csv"), &format!("id\n{i}\n"));
    }
    let dest = "s3://lake/tables/sales";
    let out = on_moto(&["publish", src.to_str().unwrap(), dest]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // `manifest` prints the keys as they are: the partition path byte for byte.
    let out = on_moto(&["manifest", dest]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout);
    for n in NAMES {
        let prefix = format!("{dest}/{n}/part-0-");
        assert!(
            listed.lines().any(|l| l.starts_with(&prefix)),
            "no line starts with {prefix:?}:\n{listed}"
        );
    }
    let out = on_moto(&["verify", "--hashes", dest]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A publish into a dataset inside this one, or around it, is refused and writes nothing.
    for nested in ["s3://lake/tables/sales/eu", "s3://lake/tables"] {
        let out = on_moto(&["publish", src.to_str().unwrap(), nested]);
        assert_eq!(out.status.code(), Some(CONFIG), "{nested}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("nest"), "{nested}: {err}");
    }
    let out = on_moto(&["verify", "--hashes", dest]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the refused publishes changed nothing: {out:?}"
    );
}

#[test]
fn publish_retains_replaced_versions_for_readers_and_retain_0s_deletes_them() {
    let p = Palisade::new(None);
    let src = p.dir.path().join("src");
    let dest = p.dir.path().join("dest");
    let url = format!("file://{}", dest.display());
    let publish = |v: u32, extra: &[&str]| {
        write(&src.join("date=1/part-0.csv"), &format!("id\n{v}\n"));
        let mut args = vec!["publish", src.to_str().unwrap(), url.as_str()];
        args.extend_from_slice(extra);
        let out = run(p.command(&args));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    };
    let retained = || -> usize {
        let out = run(p.command(&["verify", "--json", &url]));
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["retained"].as_array().map_or(0, Vec::len)
    };
    publish(0, &[]);
    // A reader is inside version 0's partition directory (it holds the directory open and opens
    // its files by name later, relative to it); two publishes replace the partition. An open
    // file would survive deletion anyway: the directory's files must still be there to open.
    let partition = std::fs::File::open(dest.join("date=1")).unwrap();
    let inside = format!(
        "/proc/self/fd/{}/part-0.csv",
        std::os::fd::AsRawFd::as_raw_fd(&partition)
    );
    publish(1, &[]);
    publish(2, &[]);
    assert_eq!(retained(), 2, "versions 0 and 1 wait for the retention");
    let text =
        std::fs::read_to_string(&inside).expect("version 0's file, opened after 2 publishes");
    assert_eq!(text, "id\n0\n");
    let out = run(p.command(&["verify", &url]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("retained"),
        "{out:?}"
    );
    publish(3, &["--retain", "0s"]);
    assert_eq!(retained(), 0, "--retain 0s deletes what is kept");
    assert!(
        std::fs::read_to_string(&inside).is_err(),
        "version 0's directory is deleted once nothing is retained"
    );
    let out = run(p.command(&["publish", "--retain", "soon", src.to_str().unwrap(), &url]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad duration is a usage error: {out:?}"
    );
}
