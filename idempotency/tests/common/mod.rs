//! What the crash tests share: a writer run in a child process (this same test binary, run
//! again with an environment variable) that reports on stdout when its writer is open and when
//! it has committed.

use std::path::Path;
use std::process::{Command, Stdio};

/// Tells the parent (on stdout) that the child reached `step` ("opened", "committed").
pub fn announce(step: &str) {
    use std::io::Write;
    let mut out = std::io::stdout();
    writeln!(out, "{step}").expect("stdout");
    out.flush().expect("stdout");
}

/// Runs the test `child_test` of this binary in a child process with `env = "<dir>|<v>"`, and
/// returns once its writer is open (or the child ended), so that the kill delays fall inside the
/// writer's work, not process start. The receiver gets a message when the child has committed.
pub fn spawn_child(
    child_test: &str,
    env: &str,
    dir: &Path,
    v: u32,
) -> (std::process::Child, std::sync::mpsc::Receiver<()>) {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            child_test,
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(env, format!("{}|{v}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if line.map(|l| l.contains("opened")).unwrap_or(true) {
            break;
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("committed") {
                let _ = tx.send(());
            }
        }
    });
    (child, rx)
}
