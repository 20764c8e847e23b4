//! `RedisStore` over `rediss://` against a real redis-server on `tls-port` (palisade-testkit's
//! throw-away CA): run-once records over TLS, and a refused certificate is an error, not a hang.
//! Needs the `tls` feature.
#![cfg(feature = "tls")]

use std::path::Path;
use std::time::{Duration, Instant};

use palisade_idempotency::{Error, IdempotencyStore, OnceOptions, Outcome, RedisStore};
use palisade_testkit::{CertFiles, Redis, RedisOptions, TlsFiles};
use redis::{ClientTlsConfig, TlsCertificates};

const BOUND: Duration = Duration::from_secs(10);

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn certs(ca: &Path, client: Option<&CertFiles>) -> TlsCertificates {
    TlsCertificates {
        root_cert: Some(read(ca)),
        client_tls: client.map(|c| ClientTlsConfig {
            client_cert: read(&c.cert),
            client_key: read(&c.key),
        }),
    }
}

async fn connect_bounded(url: &str, certs: TlsCertificates) -> Result<RedisStore, Error> {
    tokio::time::timeout(BOUND, RedisStore::connect_with_tls(url, certs))
        .await
        .unwrap_or_else(|_| panic!("connect_with_tls({url}) hung for {BOUND:?}"))
}

fn options() -> OnceOptions {
    OnceOptions::default()
        .ttl(Duration::from_secs(60))
        .in_progress_ttl(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_runs_once_over_tls_with_a_client_certificate() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    let store = connect_bounded(&redis.url(), certs(&files.ca, Some(&files.client())))
        .await
        .expect("connect over TLS");
    let first = store
        .once("k", "fp", &options(), || async {
            Ok::<_, std::io::Error>(7)
        })
        .await
        .expect("first run");
    assert_eq!(first, Outcome::Executed(7));
    let again = connect_bounded(&redis.url(), certs(&files.ca, Some(&files.client())))
        .await
        .expect("a second connection")
        .once("k", "fp", &options(), || async {
            Ok::<_, std::io::Error>(8)
        })
        .await
        .expect("second run");
    assert_eq!(
        again,
        Outcome::Replayed(7),
        "the record lives on the TLS server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_certificates_are_errors_within_a_bound() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    for (what, ca, client) in [
        ("wrong CA", &files.wrong_ca, Some(files.client())),
        (
            "expired client",
            &files.ca,
            Some(files.expired_client.clone()),
        ),
        (
            "client of the wrong CA",
            &files.ca,
            Some(files.wrong_ca_client.clone()),
        ),
    ] {
        let started = Instant::now();
        let result = connect_bounded(&redis.url(), certs(ca, client.as_ref())).await;
        match result {
            Err(Error::Redis { op: "connect", .. }) => {}
            other => panic!("{what}: expected Error::Redis, got {:?}", other.err()),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: gave up after {:?}",
            started.elapsed()
        );
    }
}
