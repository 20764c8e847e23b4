//! `palisade run`, `limit` and `once` over TLS and with etcd's user/password, against real etcd
//! and redis-server processes (palisade-testkit's throw-away CA), through the built binary: each
//! works with the right files, and each wrong file or password ends the command within a bound
//! with exit 78 and one line that says which.
#![cfg(feature = "tls")]

use palisade_testkit::{Etcd, Redis, RedisOptions, TlsFiles};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// --connect-timeout of the etcd commands; a failing one must end within it plus `MARGIN`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_secs(5);
/// Any command here must end within this, or the test fails (and kills it).
const LIMIT: Duration = Duration::from_secs(30);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `palisade args` in a scratch directory with `env`, waits at most [`LIMIT`].
fn palisade(args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("scratch directory");
    let mut command = Command::new(env!("CARGO_BIN_EXE_palisade"));
    command
        .args(args)
        .current_dir(dir.path())
        .env("PALISADE_DIR", dir.path().join(".palisade"))
        .env("XDG_STATE_HOME", dir.path().join(".state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("PALISADE_") && key != "PALISADE_ETCD_BIN" {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let started = Instant::now();
    let mut child = command.spawn().expect("palisade starts");
    while child.try_wait().expect("waitpid").is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!("palisade {args:?} did not exit within {LIMIT:?}: {output:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("output");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// Asserts exit 78, one `palisade: ` line on stderr containing every one of `needles`, and an
/// end within `bound`.
fn assert_refused(what: &str, run: &Run, needles: &[&str], bound: Duration) {
    let stderr = run.stderr.trim();
    eprintln!("{what} ({:?}): {stderr}", run.took);
    assert_eq!(run.code, Some(78), "{what}: exit code; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
    assert!(stderr.starts_with("palisade: "), "{what}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: {needle:?} missing in: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(
        run.took < bound,
        "{what}: took {:?}, more than {bound:?}",
        run.took
    );
}

fn etcd_run(endpoint: &str, extra: &[&str], command: &[&str]) -> Vec<String> {
    let mut args = vec![
        "run",
        "--lock",
        "tls-job",
        "--etcd",
        endpoint,
        "--connect-timeout",
        "2s",
    ];
    args.extend(extra);
    args.push("--");
    args.extend(command);
    args.into_iter().map(String::from).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn run_over_tls_with_a_client_certificate() {
    let files = TlsFiles::generate().expect("certificates");
    let etcd = Etcd::start_tls(&files).expect("etcd with TLS");
    let args = etcd_run(
        &etcd.endpoint(),
        &[
            "--etcd-ca",
            p(&files.ca),
            "--etcd-cert",
            p(&files.client_cert),
            "--etcd-key",
            p(&files.client_key),
        ],
        &["sh", "-c", "echo token=$PALISADE_FENCING_TOKEN"],
    );
    let run = palisade(&strs(&args), &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let token: u64 = run
        .stdout
        .trim()
        .strip_prefix("token=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("a fencing token: {:?}", run.stdout));
    assert!(token > 0);

    // The same through the environment variables.
    let args = etcd_run(&etcd.endpoint(), &[], &["true"]);
    let env = [
        ("PALISADE_ETCD_CA", p(&files.ca)),
        ("PALISADE_ETCD_CERT", p(&files.client_cert)),
        ("PALISADE_ETCD_KEY", p(&files.client_key)),
    ];
    let run = palisade(&strs(&args), &env);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[test]
fn run_refuses_each_wrong_tls_file_with_one_line_that_says_which() {
    let files = TlsFiles::generate().expect("certificates");
    let etcd = Etcd::start_tls(&files).expect("etcd with TLS");
    let bound = CONNECT_TIMEOUT + MARGIN;
    let endpoint = etcd.endpoint();
    let run_with = |ca: &Path, cert: Option<(&Path, &Path)>| {
        let mut flags = vec!["--etcd-ca", p(ca)];
        if let Some((cert, key)) = cert {
            flags.extend(["--etcd-cert", p(cert), "--etcd-key", p(key)]);
        }
        palisade(&strs(&etcd_run(&endpoint, &flags, &["true"])), &[])
    };

    let run = run_with(
        &files.wrong_ca,
        Some((&files.client_cert, &files.client_key)),
    );
    assert_refused(
        "wrong CA",
        &run,
        &[
            "TLS: etcd's certificate is not signed by --etcd-ca",
            p(&files.wrong_ca),
        ],
        bound,
    );

    let expired = &files.expired_client;
    let run = run_with(&files.ca, Some((&expired.cert, &expired.key)));
    assert_refused(
        "expired client certificate",
        &run,
        &[
            "TLS: the client certificate --etcd-cert",
            p(&expired.cert),
            "expired on 2001-01-01",
        ],
        bound,
    );

    let foreign = &files.wrong_ca_client;
    let run = run_with(&files.ca, Some((&foreign.cert, &foreign.key)));
    assert_refused(
        "client certificate of another CA",
        &run,
        &[
            "TLS: etcd refused the client certificate --etcd-cert",
            p(&foreign.cert),
            "it is not signed by --etcd-ca",
        ],
        bound,
    );

    let run = run_with(&files.ca, None);
    assert_refused(
        "no client certificate",
        &run,
        &[
            "without a client certificate",
            "give --etcd-cert FILE and --etcd-key FILE",
        ],
        bound,
    );
}

#[test]
fn run_with_the_etcd_user_and_its_password_from_the_environment() {
    let etcd = Etcd::start_with_auth("open sesame").expect("etcd with auth");
    let bound = CONNECT_TIMEOUT + MARGIN;
    let args = etcd_run(&etcd.endpoint(), &["--etcd-user", "root"], &["true"]);

    let run = palisade(&strs(&args), &[("PALISADE_ETCD_PASSWORD", "open sesame")]);
    assert_eq!(run.code, Some(0), "the right password: {}", run.stderr);

    let run = palisade(&strs(&args), &[("PALISADE_ETCD_PASSWORD", "close sesame")]);
    assert_refused(
        "wrong password",
        &run,
        &[
            "etcd rejected the user/password: user `root`",
            "PALISADE_ETCD_PASSWORD",
        ],
        bound,
    );
    assert!(
        !run.stderr.contains("close sesame"),
        "no password in messages"
    );

    let run = palisade(&strs(&args), &[]);
    assert_refused(
        "no password",
        &run,
        &["--etcd-user needs the password in PALISADE_ETCD_PASSWORD"],
        bound,
    );

    let args = etcd_run(&etcd.endpoint(), &[], &["true"]);
    let run = palisade(&strs(&args), &[]);
    assert_refused(
        "no user",
        &run,
        &["etcd requires a user", "--etcd-user"],
        bound,
    );
}

fn limit_args<'a>(url: &'a str, flags: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["limit", "--key", "tls", "--rate", "2/1h", "--redis", url];
    args.extend(flags);
    args.extend(extra);
    args.extend(["--", "true"]);
    args
}

#[test]
fn limit_and_once_over_rediss_with_the_ca_and_a_client_certificate() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    let url = redis.url();
    let flags = [
        "--redis-ca",
        p(&files.ca),
        "--redis-cert",
        p(&files.client_cert),
        "--redis-key",
        p(&files.client_key),
    ];
    for n in 0..2 {
        let run = palisade(&limit_args(&url, &flags, &[]), &[]);
        assert_eq!(run.code, Some(0), "run {n} is admitted: {}", run.stderr);
    }
    let run = palisade(&limit_args(&url, &flags, &["--wait-for", "100ms"]), &[]);
    assert_eq!(
        run.code,
        Some(75),
        "the third in the hour is not: {}",
        run.stderr
    );

    let once = |env: &[(&str, &str)], flags: &[&str]| {
        let mut args = vec!["once", "--key", "tls-once", "--store", url.as_str()];
        args.extend(flags);
        args.extend(["--", "sh", "-c", "echo ran"]);
        palisade(&args, env)
    };
    let run = once(&[], &flags);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "ran");
    // The second time, through the environment variables: replayed, not run.
    let env = [
        ("PALISADE_REDIS_CA", p(&files.ca)),
        ("PALISADE_REDIS_CERT", p(&files.client_cert)),
        ("PALISADE_REDIS_KEY", p(&files.client_key)),
    ];
    let run = once(&env, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "", "not run again");
    assert!(run.stderr.contains("already ran"), "{}", run.stderr);
}

#[test]
fn limit_and_once_refuse_each_wrong_tls_file_with_one_line_that_says_which() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    let url = redis.url();
    let bound = Duration::from_secs(10);
    let (good, expired, foreign) = (
        files.client(),
        &files.expired_client,
        &files.wrong_ca_client,
    );
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "wrong CA",
            vec![
                "--redis-ca",
                p(&files.wrong_ca),
                "--redis-cert",
                p(&good.cert),
                "--redis-key",
                p(&good.key),
            ],
            vec![
                "TLS: Redis's certificate is not signed by --redis-ca",
                p(&files.wrong_ca),
            ],
        ),
        (
            "no CA: the system's roots",
            vec!["--redis-cert", p(&good.cert), "--redis-key", p(&good.key)],
            vec![
                "TLS: Redis's certificate is not signed by a CA among the system's roots",
                "--redis-ca FILE",
            ],
        ),
        (
            "expired client certificate",
            vec![
                "--redis-ca",
                p(&files.ca),
                "--redis-cert",
                p(&expired.cert),
                "--redis-key",
                p(&expired.key),
            ],
            vec![
                "TLS: the client certificate --redis-cert",
                p(&expired.cert),
                "expired on 2001-01-01",
            ],
        ),
        (
            "client certificate of another CA",
            vec![
                "--redis-ca",
                p(&files.ca),
                "--redis-cert",
                p(&foreign.cert),
                "--redis-key",
                p(&foreign.key),
            ],
            vec![
                "TLS: Redis refused the client certificate --redis-cert",
                p(&foreign.cert),
                "not signed by a CA Redis trusts",
            ],
        ),
        (
            "no client certificate",
            vec!["--redis-ca", p(&files.ca)],
            vec![
                "TLS: Redis requires a client certificate: give --redis-cert FILE and --redis-key FILE",
            ],
        ),
    ];
    for (what, flags, needles) in &cases {
        let run = palisade(&limit_args(&url, flags, &[]), &[]);
        assert_refused(&format!("limit: {what}"), &run, needles, bound);

        let mut args = vec!["once", "--key", "k", "--store", url.as_str()];
        args.extend(flags.iter().copied());
        args.extend(["--", "true"]);
        let run = palisade(&args, &[]);
        assert_refused(&format!("once: {what}"), &run, needles, bound);
    }

    let plain = format!("redis://{}/", redis.addr());
    let run = palisade(&limit_args(&plain, &["--redis-ca", p(&files.ca)], &[]), &[]);
    assert_refused(
        "TLS files with redis://",
        &run,
        &["need a rediss:// URL"],
        bound,
    );
}
