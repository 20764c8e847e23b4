//! `RedisLimiter` over `rediss://` against a real redis-server on `tls-port` (palisade-testkit's
//! throw-away CA), and a typed error for each refused certificate. Needs the `tls` feature.
#![cfg(feature = "tls")]

use std::path::Path;
use std::time::{Duration, Instant};

use palisade_ratelimit::redis_crate::{ClientTlsConfig, TlsCertificates};
use palisade_ratelimit::{
    Error, Limit, Policy, RateLimiter, RedisLimiter, TlsProblem, connect, connect_with_tls,
    connect_with_tls_lazy,
};
use palisade_testkit::{CertFiles, Redis, RedisOptions, TlsFiles};

/// Every connection attempt below must end (with a connection or an error) within this.
const BOUND: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(1);

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

async fn connect_bounded(
    url: &str,
    certs: TlsCertificates,
) -> Result<palisade_ratelimit::redis_crate::aio::ConnectionManager, Error> {
    let started = Instant::now();
    let result = tokio::time::timeout(BOUND, connect_with_tls(url, certs, TIMEOUT))
        .await
        .unwrap_or_else(|_| panic!("connect_with_tls({url}) hung for {BOUND:?}"));
    assert!(started.elapsed() < BOUND);
    result
}

fn tls_problem(result: Result<impl std::fmt::Debug, Error>) -> TlsProblem {
    match result {
        Err(Error::Tls { problem, source }) => {
            let line = Error::Tls { problem, source }.to_string();
            assert!(!line.contains('\n'), "one line: {line}");
            problem
        }
        other => panic!("expected Error::Tls, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limit_holds_over_tls_with_a_client_certificate() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    let conn = connect_bounded(&redis.url(), certs(&files.ca, Some(&files.client())))
        .await
        .expect("connect over TLS with the client certificate");
    let limiter = RedisLimiter::builder(conn)
        .limit(Limit::new(3, Duration::from_secs(60)).expect("limit"))
        .prefix("tls-test")
        .timeout(TIMEOUT)
        .build()
        .expect("limiter");
    let mut allowed = 0;
    for _ in 0..5 {
        if limiter.check("k").await.expect("decision over TLS").allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "3 per minute, decided on the TLS server");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_required_client_certificates_needs_only_the_ca() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(
        RedisOptions::default()
            .tls(&files)
            .tls_auth_clients(false)
            .user("limiter", "pw"),
    )
    .expect("redis with TLS");
    let url = redis.url().replace("rediss://", "rediss://limiter:pw@");
    let conn = connect_bounded(&url, certs(&files.ca, None))
        .await
        .expect("connect over TLS with the CA and an ACL user");
    let limiter = RedisLimiter::builder(conn)
        .limit(Limit::new(1, Duration::from_secs(60)).expect("limit"))
        .build()
        .expect("limiter");
    assert!(limiter.check("k").await.expect("decision").allowed);
    assert!(!limiter.check("k").await.expect("decision").allowed);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_refused_certificate_is_a_typed_error_that_says_whose() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    let url = redis.url();

    let wrong_ca = connect_bounded(&url, certs(&files.wrong_ca, Some(&files.client()))).await;
    assert_eq!(
        tls_problem(wrong_ca),
        TlsProblem::ServerCertificateUntrusted
    );

    let expired = connect_bounded(&url, certs(&files.ca, Some(&files.expired_client))).await;
    assert_eq!(tls_problem(expired), TlsProblem::ClientCertificateExpired);

    let foreign = connect_bounded(&url, certs(&files.ca, Some(&files.wrong_ca_client))).await;
    assert_eq!(tls_problem(foreign), TlsProblem::ClientCertificateUntrusted);

    let none = connect_bounded(&url, certs(&files.ca, None)).await;
    assert_eq!(tls_problem(none), TlsProblem::ClientCertificateRequired);

    // `connect` trusts the system's roots only, which never include a throw-away CA.
    let roots = tokio::time::timeout(BOUND, connect(&url, TIMEOUT))
        .await
        .expect("connect ends in time");
    assert_eq!(tls_problem(roots), TlsProblem::ServerCertificateUntrusted);

    let message = tls_problem_message(
        connect_bounded(&url, certs(&files.ca, Some(&files.expired_client))).await,
    );
    assert!(message.contains("expired"), "{message}");
}

fn tls_problem_message(result: Result<impl std::fmt::Debug, Error>) -> String {
    result.expect_err("refused").to_string()
}

#[tokio::test]
async fn a_plain_url_with_tls_certificates_is_a_config_error() {
    let files = TlsFiles::generate().expect("certificates");
    let result = connect_with_tls("redis://127.0.0.1:1/", certs(&files.ca, None), TIMEOUT).await;
    assert!(
        matches!(result, Err(Error::InvalidConfig { field: "tls", .. })),
        "{result:?}"
    );
}

/// With a lazy connection the first decision connects: a refused certificate is still a typed
/// error there, not an outage that a FailOpen policy would quietly admit through.
#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_connection_reports_a_refused_certificate_whatever_the_policy() {
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    let conn = connect_with_tls_lazy(
        &redis.url(),
        certs(&files.wrong_ca, Some(&files.client())),
        TIMEOUT,
    )
    .expect("a lazy connection is made without connecting");
    let limiter = RedisLimiter::builder(conn)
        .limit(Limit::per_second(5).unwrap())
        .on_unavailable(Policy::FailOpen)
        .timeout(BOUND)
        .build()
        .unwrap();
    let decided = tokio::time::timeout(BOUND * 2, limiter.check("k"))
        .await
        .expect("the decision ends in time");
    assert_eq!(tls_problem(decided), TlsProblem::ServerCertificateUntrusted);
}
