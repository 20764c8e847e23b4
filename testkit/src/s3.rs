//! An S3-compatible server: moto's standalone server (`moto_server`, from PyPI's `moto[server]`).

use crate::Error;
use crate::net::{free_port, http};
use crate::process::{Server, find_binary, on_fresh_ports};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use tempfile::TempDir;

/// The PyPI package (with its extra) that provides `moto_server`.
pub(crate) const MOTO_PACKAGE: &str = "moto[server]";

const REGION: &str = "us-east-1";
const ACCESS_KEY: &str = "palisade-test-access-key";
const SECRET_KEY: &str = "palisade-test-secret-key";

/// A running S3-compatible server (moto's `moto_server`) on a free loopback port.
///
/// ```no_run
/// # fn main() -> Result<(), palisade_testkit::Error> {
/// let s3 = palisade_testkit::S3::start()?; // waits until it answers HTTP
/// s3.create_bucket("datasets")?;
/// // object_store::aws::AmazonS3Builder::new()
/// //     .with_endpoint(s3.endpoint()).with_allow_http(true)
/// //     .with_region(s3.region()).with_bucket_name("datasets")
/// //     .with_access_key_id(s3.access_key()).with_secret_access_key(s3.secret_key())
/// //     .build()
/// s3.restart()?; // same port, but empty: moto keeps nothing on disk
/// # Ok(()) }
/// ```
///
/// moto accepts any credentials and does not check signatures; [`S3::access_key`] and
/// [`S3::secret_key`] are fixed values for clients that insist on having some. moto keeps
/// everything in memory: after [`S3::kill`] and [`S3::restart`] there are no buckets and no
/// objects. Dropping the handle kills the server.
///
/// # Conditional writes
///
/// moto honours the two preconditions object_store's `AmazonS3` sends (checked by
/// `testkit/tests/s3.rs`): `PutMode::Create` (`If-None-Match: *`) on an existing key fails
/// with 412, which object_store reports as `AlreadyExists`; `PutMode::Update` (`If-Match:
/// <etag>`, `S3ConditionalPut::ETagMatch`, the default) fails with 412 (`Precondition`) on a
/// stale e-tag and with 404 on a missing key (object_store turns that into `Precondition`
/// too), as real S3 does. So a manifest committed by compare-and-swap, and a fenced writer
/// that commits after a newer one, behave as on S3.
///
/// **What moto lacks:** real S3 makes the check and the write one atomic step; moto checks
/// and then stores the body without a lock across the two, so writers that race on one key
/// *in the same instant* can all succeed. The test
/// `racing_conditional_writes_with_large_bodies_can_all_win_on_moto` (ignored by default)
/// shows it with 8 MB bodies; with small bodies it was not seen, but nothing guarantees it.
/// A test that two racing writers cannot both commit proves nothing on moto: prove it on a
/// store whose conditional writes are atomic (object_store's `InMemory` for both modes; its
/// `LocalFileSystem` has `Create` only) and use moto for the sequential cases (a stale
/// e-tag, an existing key).
#[derive(Debug)]
pub struct S3 {
    server: Server,
    addr: SocketAddr,
    _dir: TempDir,
}

impl S3 {
    /// Starts `moto_server -H 127.0.0.1 -p PORT` on a free port (or `python3 -m moto.server`
    /// when only the Python module is installed), and waits (at most
    /// [`STARTUP_TIMEOUT`](crate::STARTUP_TIMEOUT)) until it answers HTTP.
    ///
    /// `PALISADE_MOTO_SERVER_BIN` overrides the program. A missing moto is
    /// [`Error::MissingBinary`] naming `moto[server]` and `scripts/setup`.
    pub fn start() -> Result<S3, Error> {
        let (program, prefix) = moto_command()?;
        on_fresh_ports(|| {
            let dir = tempfile::Builder::new()
                .prefix("palisade-s3-")
                .tempdir()
                .map_err(Error::io("creating a directory for moto_server's log"))?;
            let port = free_port().map_err(Error::io("finding a free port"))?;
            let mut args = prefix.clone();
            args.extend(["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from));
            let label = format!("moto_server 127.0.0.1:{port}");
            let log = dir.path().join("moto_server.log");
            let s3 = S3 {
                server: Server::new(label, program.clone(), args, log),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                _dir: dir,
            };
            s3.server.spawn()?;
            s3.wait_answering()?;
            Ok(s3)
        })
    }

    fn wait_answering(&self) -> Result<(), Error> {
        // `GET /` is ListBuckets: 200 once the server has loaded its S3 backend.
        self.server
            .wait_ready(|| matches!(http(self.addr, "GET", "/", ""), Ok((200, _))))
    }

    /// The endpoint URL for an S3 client: `http://127.0.0.1:PORT` (path-style requests).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The region to configure clients with (`us-east-1`, where buckets need no location).
    pub fn region(&self) -> &'static str {
        REGION
    }

    /// A fixed access key id for clients (moto accepts any).
    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    /// A fixed secret access key for clients (moto does not check signatures).
    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// Creates a bucket (`PUT /NAME`). S3's naming rules apply: 3 to 63 lowercase letters,
    /// digits, dots and hyphens. Creating a bucket that exists succeeds (moto answers 200 in
    /// `us-east-1`, as S3 does for the bucket's owner).
    pub fn create_bucket(&self, name: &str) -> Result<(), Error> {
        let context = format!("creating bucket `{name}` on {}", self.server.label);
        if name.is_empty() || name.contains('/') {
            return Err(Error::Io {
                context,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a bucket name is one non-empty path segment",
                ),
            });
        }
        let (status, body) =
            http(self.addr, "PUT", &format!("/{name}"), "").map_err(Error::io(&context))?;
        if status == 200 {
            return Ok(());
        }
        Err(Error::Io {
            context,
            source: std::io::Error::other(format!(
                "HTTP {status}: {}",
                xml_error_code(&body).unwrap_or(&body)
            )),
        })
    }

    /// The process id, or `None` while killed.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with `SIGKILL`; every bucket and object is lost (moto keeps them in
    /// memory only).
    pub fn kill(&self) -> Result<(), Error> {
        self.server.kill()
    }

    /// Stops the server with `SIGSTOP`: connections are accepted by the kernel but nothing is
    /// answered, so clients time out.
    pub fn pause(&self) -> Result<(), Error> {
        self.server.signal(Signal::SIGSTOP)
    }

    /// Continues a paused server with `SIGCONT`.
    pub fn resume(&self) -> Result<(), Error> {
        self.server.signal(Signal::SIGCONT)
    }

    /// Kills the server if it runs, starts it again on the same port and waits until it
    /// answers. It comes back **empty**: no buckets, no objects (moto keeps state in memory).
    pub fn restart(&self) -> Result<(), Error> {
        self.server.kill()?;
        self.server.spawn()?;
        self.wait_answering()
    }
}

/// The program and the arguments before `-H ... -p ...`: `moto_server`, or `python3 -m
/// moto.server` when only the module is installed.
fn moto_command() -> Result<(PathBuf, Vec<String>), Error> {
    let missing = find_binary("moto_server", MOTO_PACKAGE, "PALISADE_MOTO_SERVER_BIN");
    if let Ok(program) = missing {
        return Ok((program, Vec::new()));
    }
    if let Ok(python) = find_binary("python3", MOTO_PACKAGE, "PALISADE_TESTKIT_PYTHON3_BIN") {
        let importable = Command::new(&python)
            .args(["-c", "import moto.server, flask"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if importable {
            return Ok((python, ["-m", "moto.server"].map(String::from).into()));
        }
    }
    missing.map(|program| (program, Vec::new()))
}

/// The `<Code>` of an S3 XML error body.
fn xml_error_code(body: &str) -> Option<&str> {
    let start = body.find("<Code>")? + "<Code>".len();
    let len = body[start..].find("</Code>")?;
    Some(&body[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_body_gives_its_code() {
        let body = "<?xml version=\"1.0\"?><Error><Code>InvalidBucketName</Code>\
                    <Message>The specified bucket is not valid.</Message></Error>";
        assert_eq!(xml_error_code(body), Some("InvalidBucketName"));
        assert_eq!(xml_error_code("plain text"), None);
    }

    #[test]
    fn a_missing_moto_names_the_pip_package_and_the_setup_command() {
        let error = Error::MissingBinary {
            binary: "moto_server",
            package: MOTO_PACKAGE,
        };
        let message = error.to_string();
        assert!(message.contains("moto[server]"), "{message}");
        assert!(message.contains("pip install"), "{message}");
        assert!(message.contains("scripts/setup"), "{message}");
        assert!(!message.contains("apt-get"), "{message}");
    }
}
