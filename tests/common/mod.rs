//! Helpers shared by the end-to-end tests: the `palisade` binary in a scratch directory.

#![allow(dead_code)]

use palisade_testkit::Etcd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The `palisade` binary that cargo built for this workspace (or `PALISADE_TEST_BIN`, to run
/// these tests against another build, e.g. an older one to show that a new test fails there).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PALISADE_TEST_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/palisade
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("palisade"))
        .expect("the target directory");
    assert!(
        path.is_file(),
        "{} is missing: run the workspace's tests (`cargo nextest run --workspace` or \
         `cargo test --workspace`, as scripts/test does), which build it",
        path.display()
    );
    path
}

/// Runs `palisade` in a scratch directory, on the file backend (in that directory) or on etcd.
pub struct Palisade {
    pub dir: TempDir,
    etcd: Option<String>,
}

impl Palisade {
    pub fn new(etcd: Option<&Etcd>) -> Palisade {
        Palisade {
            dir: tempfile::tempdir().expect("a scratch directory"),
            etcd: etcd.map(|e| e.endpoints().join(",")),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary());
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("PALISADE_DIR", self.dir.path().join(".palisade"))
            .env("XDG_STATE_HOME", self.dir.path().join(".state"))
            .env_remove("PALISADE_ONCE_STORE")
            .env_remove("PALISADE_ETCD_ENDPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(endpoints) = &self.etcd {
            command.env("PALISADE_ETCD_ENDPOINTS", endpoints);
        }
        command
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("palisade starts")
    }

    /// Runs to completion, at most 60 s.
    pub fn output(&self, args: &[&str]) -> Output {
        let child = self.spawn(args);
        wait_bounded(child, Duration::from_secs(60))
    }

    /// Waits (at most 60 s) for a spawned palisade to exit.
    pub fn finish(&self, child: Child) -> ExitStatus {
        wait_bounded(child, Duration::from_secs(60)).status
    }
}

/// Waits (at most `limit`) for a spawned process to exit, and returns its output; kills it and
/// fails with its output if it does not.
pub fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("waitpid").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!("palisade did not exit within {limit:?}: {output:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Waits (at most 30 s) until `path` exists.
pub fn wait_for_file(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out after 30 s waiting for {what} ({})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
