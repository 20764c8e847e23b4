//! The testkit's TLS and auth servers, used as palisade uses them: etcd over TLS with client
//! certificates, etcd with a root password, Redis on `tls-port`; each also restarted.

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use palisade_testkit::{CertFiles, Etcd, Redis, RedisOptions, TlsFiles};
use redis::AsyncCommands;
use std::time::Duration;
use tokio::time::timeout;

const CALL: Duration = Duration::from_secs(5);

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn etcd_tls(ca: &std::path::Path, client: Option<&CertFiles>) -> ConnectOptions {
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)));
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(read(&client.cert), read(&client.key)));
    }
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_tls(tls)
}

async fn put_get(client: &mut Client) -> Result<String, etcd_client::Error> {
    client.put("k", "v", None).await?;
    let response = client.get("k", None).await?;
    Ok(response
        .kvs()
        .first()
        .map(|kv| kv.value_str().unwrap_or("?").to_string())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_takes_the_client_certificate_and_survives_a_restart() {
    let files = TlsFiles::generate().expect("certificates");
    let etcd = Etcd::start_tls(&files).expect("etcd starts with TLS");
    assert!(etcd.endpoint().starts_with("https://127.0.0.1:"));

    let options = etcd_tls(&files.ca, Some(&files.client()));
    let mut client = timeout(
        CALL,
        Client::connect(etcd.endpoints(), Some(options.clone())),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let value = timeout(CALL, put_get(&mut client)).await.expect("in time");
    assert_eq!(value.expect("put and get over TLS"), "v");

    etcd.restart().expect("restart keeps TLS");
    let mut client = Client::connect(etcd.endpoints(), Some(options))
        .await
        .expect("connect after restart");
    let value = timeout(CALL, put_get(&mut client)).await.expect("in time");
    assert_eq!(value.expect("put and get after restart"), "v");

    // Without a client certificate the server refuses (--client-cert-auth).
    let options = etcd_tls(&files.ca, None);
    let refused = async {
        let mut client = Client::connect(etcd.endpoints(), Some(options)).await?;
        put_get(&mut client).await
    };
    let refused = timeout(CALL, refused).await.expect("refused in time");
    assert!(refused.is_err(), "no client certificate: {refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_with_auth_takes_the_root_password_only() {
    let etcd = Etcd::start_with_auth("s3cret \"quoted\"").expect("etcd starts with auth");
    let options = |password: &str| {
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2))
            .with_user("root", password)
    };
    let mut client = timeout(
        CALL,
        Client::connect(etcd.endpoints(), Some(options("s3cret \"quoted\""))),
    )
    .await
    .expect("in time")
    .expect("the right password logs in");
    let value = timeout(CALL, put_get(&mut client)).await.expect("in time");
    assert_eq!(value.expect("put and get as root"), "v");

    let wrong = timeout(
        CALL,
        Client::connect(etcd.endpoints(), Some(options("guess"))),
    )
    .await
    .expect("in time");
    assert!(wrong.is_err(), "a wrong password is refused");

    let mut anonymous = Client::connect(etcd.endpoints(), None)
        .await
        .expect("connect without a user");
    let refused = timeout(CALL, anonymous.put("k", "x", None))
        .await
        .expect("in time");
    assert!(refused.is_err(), "a request without a user is refused");

    etcd.restart().expect("restart with auth on");
    let mut client = Client::connect(etcd.endpoints(), Some(options("s3cret \"quoted\"")))
        .await
        .expect("the password still works after a restart");
    let value = timeout(CALL, put_get(&mut client)).await.expect("in time");
    assert_eq!(value.expect("put and get after restart"), "v");
}

fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn redis_client(redis: &Redis, ca: &std::path::Path, client: Option<&CertFiles>) -> redis::Client {
    let certs = redis::TlsCertificates {
        client_tls: client.map(|c| redis::ClientTlsConfig {
            client_cert: read(&c.cert),
            client_key: read(&c.key),
        }),
        root_cert: Some(read(ca)),
    };
    redis::Client::build_with_tls(redis.url(), certs).expect("a TLS client")
}

async fn set_get(client: &redis::Client) -> redis::RedisResult<String> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let () = conn.set("k", "v").await?;
    conn.get("k").await
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_over_tls_requires_a_client_certificate_and_survives_a_restart() {
    install_crypto_provider();
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(RedisOptions::default().tls(&files)).expect("redis with TLS");
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));

    let client = redis_client(&redis, &files.ca, Some(&files.client()));
    let value = timeout(CALL, set_get(&client)).await.expect("in time");
    assert_eq!(value.expect("set and get over TLS"), "v");

    let anonymous = redis_client(&redis, &files.ca, None);
    let refused = timeout(CALL, set_get(&anonymous)).await.expect("in time");
    assert!(refused.is_err(), "no client certificate: {refused:?}");

    let plain = redis::Client::open(format!("redis://{}/", redis.addr())).expect("client");
    let refused = timeout(CALL, set_get(&plain)).await.expect("in time");
    assert!(refused.is_err(), "plain text is not served: {refused:?}");

    redis.restart().expect("restart keeps TLS");
    let value = timeout(CALL, set_get(&client)).await.expect("in time");
    assert_eq!(value.expect("set and get after restart"), "v");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_over_tls_without_required_client_certificates() {
    install_crypto_provider();
    let files = TlsFiles::generate().expect("certificates");
    let redis = Redis::start_with(
        RedisOptions::default()
            .tls_auth_clients(false)
            .tls(&files)
            .password("pw"),
    )
    .expect("redis with TLS");
    let url = redis.url().replace("rediss://", "rediss://:pw@");
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(read(&files.ca)),
    };
    let client = redis::Client::build_with_tls(url, certs).expect("client");
    let value = timeout(CALL, set_get(&client)).await.expect("in time");
    assert_eq!(value.expect("set and get with the CA only"), "v");
}
