//! palisade-lock on an etcd that serves clients over TLS only and requires a client certificate
//! (palisade-testkit's throw-away CA), and on an etcd with a root password. Needs `tls`.
#![cfg(feature = "tls")]

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use palisade_lock::{Coordinator, LockError};
use palisade_testkit::{CertFiles, Etcd, TlsFiles};

const TTL: Duration = Duration::from_secs(2);
/// Every connect or lock call below must end within this.
const BOUND: Duration = Duration::from_secs(15);

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tls_options(ca: &Path, client: &CertFiles) -> ConnectOptions {
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .identity(Identity::from_pem(read(&client.cert), read(&client.key)));
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_tls(tls)
}

async fn coordinator(
    endpoints: &[String],
    options: ConnectOptions,
) -> Result<Coordinator, LockError> {
    let connect = async {
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| LockError::Backend {
                op: "connect",
                source: Box::new(e),
            })?;
        Coordinator::etcd(client)
            .namespace("tls-test/")
            .lease_ttl(TTL)
            .connect()
            .await
    };
    tokio::time::timeout(BOUND, connect)
        .await
        .unwrap_or_else(|_| panic!("connecting a coordinator took more than {BOUND:?}"))
}

async fn start(tls: Option<&TlsFiles>) -> Etcd {
    let tls = tls.cloned();
    tokio::task::spawn_blocking(move || match tls {
        Some(files) => Etcd::start_tls(&files),
        None => Etcd::start_with_auth("correct horse"),
    })
    .await
    .expect("join")
    .expect("etcd starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn locks_over_tls_with_a_client_certificate_exclude_and_fence() {
    let files = TlsFiles::generate().expect("certificates");
    let etcd = start(Some(&files)).await;
    let options = tls_options(&files.ca, &files.client());
    let a = coordinator(&etcd.endpoints(), options.clone())
        .await
        .expect("a coordinator over TLS");
    let b = coordinator(&etcd.endpoints(), options)
        .await
        .expect("another coordinator over TLS");

    let first = a.try_lock("job").await.expect("a takes the lock");
    let held = b.try_lock("job").await;
    assert!(matches!(held, Err(LockError::Held { .. })), "{held:?}");
    let first_token = first.fencing_token();
    first.release().await.expect("release over TLS");
    let second = tokio::time::timeout(BOUND, b.lock("job"))
        .await
        .expect("b gets the lock in time")
        .expect("b takes the lock");
    assert!(
        second.fencing_token() > first_token,
        "fencing tokens increase"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_certificate_of_another_ca_is_a_tls_error_at_once() {
    let files = TlsFiles::generate().expect("certificates");
    let etcd = start(Some(&files)).await;
    let started = Instant::now();
    let result = coordinator(
        &etcd.endpoints(),
        tls_options(&files.wrong_ca, &files.client()),
    )
    .await;
    match &result {
        Err(LockError::Tls { source, .. }) => {
            let text = source.to_string();
            assert!(text.contains("UnknownIssuer"), "names the cause: {text}");
        }
        other => panic!("expected LockError::Tls, got {other:?}"),
    }
    assert!(
        started.elapsed() < TTL,
        "not retried for the lease TTL: {:?}",
        started.elapsed()
    );
    let line = result.expect_err("refused").to_string();
    assert!(!line.contains('\n'), "one line: {line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_client_certificate_is_an_error_within_the_lease_ttl() {
    // etcd (Go) closes the connection on a client certificate it refuses; the client sees a
    // transport error, retried until the session's budget (the TTL) is spent: an error, not a
    // hang. The CLI tells the reasons apart (cli/tests/tls.rs).
    let files = TlsFiles::generate().expect("certificates");
    let etcd = start(Some(&files)).await;
    for client in [&files.expired_client, &files.wrong_ca_client] {
        let started = Instant::now();
        let result = coordinator(&etcd.endpoints(), tls_options(&files.ca, client)).await;
        assert!(
            matches!(
                result,
                Err(LockError::Backend { .. } | LockError::Tls { .. })
            ),
            "{client:?}: {result:?}"
        );
        assert!(
            started.elapsed() < TTL + Duration::from_secs(5),
            "{client:?}: gave up after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn locks_on_an_etcd_with_auth_need_the_password() {
    let etcd = start(None).await;
    let options = |password: &str| {
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_user("root", password)
    };
    let c = coordinator(&etcd.endpoints(), options("correct horse"))
        .await
        .expect("root with its password");
    let guard = c.try_lock("job").await.expect("lock as root");
    assert!(guard.fencing_token() > 0);

    let wrong = coordinator(&etcd.endpoints(), options("battery staple")).await;
    let text = wrong.expect_err("a wrong password is refused").to_string();
    assert!(text.contains("authentication failed"), "{text}");
}
