//! The fault proxy against real etcd and Redis: each mode, switched on open connections and on
//! new ones, with a direct client beside the proxied one to show that only the proxied client
//! is cut off.

use etcd_client::{Client, ConnectOptions};
use palisade_testkit::{Direction, Etcd, EtcdCluster, FaultProxy, Mode, Redis};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use std::time::{Duration, Instant};

/// The proxied client's own request timeout: what a blackholed request must wait for.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// A bound for every wait that should end at once, generous for a busy machine.
const PROMPT: Duration = Duration::from_secs(10);

async fn etcd_client(endpoint: String, timeout: Duration) -> Client {
    let options = ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(timeout);
    tokio::time::timeout(PROMPT, Client::connect([endpoint], Some(options)))
        .await
        .expect("connecting to etcd took longer than the bound")
        .expect("connect to etcd")
}

async fn redis_connection(url: String, timeout: Duration) -> MultiplexedConnection {
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout));
    redis::Client::open(url)
        .expect("redis URL")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect to redis")
}

fn via(proxy: &FaultProxy) -> String {
    format!("http://{}", proxy.addr())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_etcd_client_gets_no_answer_and_no_error_until_its_own_timeout() {
    let etcd = Etcd::start().expect("start etcd");
    let proxy = etcd.proxy().expect("start proxy");
    let mut cut = etcd_client(via(&proxy), CLIENT_TIMEOUT).await;
    let mut direct = etcd_client(etcd.endpoint(), CLIENT_TIMEOUT).await;
    cut.put("k", "before", None)
        .await
        .expect("put through the proxy");

    proxy.blackhole();
    let started = Instant::now();
    let outcome = tokio::time::timeout(PROMPT, cut.get("k", None))
        .await
        .expect("a blackholed request must end at the client's own timeout");
    let waited = started.elapsed();
    assert!(
        outcome.is_err(),
        "a blackholed request got an answer: {outcome:?}"
    );
    assert!(
        waited >= CLIENT_TIMEOUT - Duration::from_millis(100),
        "a blackholed request failed after {waited:?}, before the client's timeout of {CLIENT_TIMEOUT:?}: the proxy must stay silent, not reset"
    );
    // Meanwhile a client that does not go through the proxy is served.
    direct
        .put("k", "during", None)
        .await
        .expect("direct put during the partition");

    // The partition heals: the same client, on its open connection, works again.
    proxy.pass();
    let value = tokio::time::timeout(PROMPT, async {
        loop {
            if let Ok(reply) = cut.get("k", None).await {
                return reply.kvs()[0].value().to_vec();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the proxied client must work again after pass()");
    assert_eq!(value, b"during");
    let stats = proxy.stats();
    assert!(
        stats.connections_accepted >= 1 && stats.bytes_to_upstream > 0 && stats.bytes_to_client > 0,
        "{stats:?}"
    );
}

/// The client half of an HTTP/2 connection's start: the preface and an empty SETTINGS frame.
/// etcd answers it with its own SETTINGS, which shows the connection reaches etcd.
const HTTP2_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Reads from `stream` until it fails, within PROMPT, and returns that failure: a reset must
/// end the connection with an RST (ECONNRESET), not a FIN (a read of 0 bytes) or silence.
async fn read_until_failure(stream: &mut tokio::net::TcpStream, what: &str) -> std::io::Error {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(PROMPT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => panic!("{what}: closed with a FIN, not reset"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| panic!("{what}: neither reset nor closed within {PROMPT:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_connection_gets_an_rst_at_once_and_new_connections_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = Etcd::start().expect("start etcd");
    let proxy = etcd.proxy().expect("start proxy");

    // An open connection that reaches etcd through the proxy.
    let mut open = tokio::net::TcpStream::connect(proxy.addr())
        .await
        .expect("connect to the proxy");
    open.write_all(HTTP2_START).await.expect("send the preface");
    let mut first = [0u8; 9];
    tokio::time::timeout(PROMPT, open.read_exact(&mut first))
        .await
        .expect("etcd must answer the preface through the proxy")
        .expect("read etcd's SETTINGS");
    assert_eq!(first[3], 4, "etcd's first frame is SETTINGS: {first:?}");

    proxy.reset();
    let err = read_until_failure(&mut open, "an open connection").await;
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(proxy.stats().connections_reset >= 1, "{:?}", proxy.stats());

    // A new connection is accepted and reset at once: the connect itself may already report the
    // RST, or the first read does. (Nothing is written to it: a write that met the RST would take
    // the error, and the read after it would see an end of file.)
    let err = match tokio::net::TcpStream::connect(proxy.addr()).await {
        Ok(mut fresh) => read_until_failure(&mut fresh, "a new connection").await,
        Err(e) => e,
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// What an etcd client makes of a reset proxy: it is never served, and the request ends (with
/// the proxy's RST or the client's own timeout). It does not always end at once: etcd-client
/// balances over its endpoints even when it has one, and a request that arrives after the RST
/// waits for an endpoint that can reconnect, up to the client's timeout. (This is why every
/// request palisade-lock sends has a timeout of its own.)
#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_client_behind_a_reset_proxy_is_never_served() {
    let etcd = Etcd::start().expect("start etcd");
    let proxy = etcd.proxy().expect("start proxy");
    let mut client = etcd_client(via(&proxy), CLIENT_TIMEOUT).await;
    client
        .put("k", "v", None)
        .await
        .expect("put through the proxy");

    proxy.reset();
    let outcome = tokio::time::timeout(PROMPT, client.get("k", None))
        .await
        .expect("a request to a reset proxy must end by the client's own timeout");
    assert!(outcome.is_err(), "a reset connection answered: {outcome:?}");
    assert!(proxy.stats().connections_reset >= 1, "{:?}", proxy.stats());

    let options = ConnectOptions::new()
        .with_connect_timeout(CLIENT_TIMEOUT)
        .with_timeout(CLIENT_TIMEOUT);
    let fresh = tokio::time::timeout(PROMPT, async {
        let mut c = Client::connect([via(&proxy)], Some(options)).await?;
        c.get("k", None).await
    })
    .await
    .expect("a new client of a reset proxy must fail by its own timeout, not hang");
    assert!(fresh.is_err(), "a new connection in reset mode was served");
}

#[tokio::test(flavor = "multi_thread")]
async fn latency_delays_each_direction() {
    let etcd = Etcd::start().expect("start etcd");
    let proxy = etcd.proxy().expect("start proxy");
    let mut client = etcd_client(via(&proxy), Duration::from_secs(30)).await;
    client.put("k", "v", None).await.expect("put");

    let delay = Duration::from_millis(150);
    proxy.latency(delay);
    assert_eq!(proxy.mode(), Mode::Latency(delay));
    let started = Instant::now();
    client
        .get("k", None)
        .await
        .expect("get through a slow link");
    let round_trip = started.elapsed();
    assert!(
        round_trip >= 2 * delay,
        "a request and its answer took {round_trip:?}, less than twice the latency of {delay:?}"
    );

    proxy.pass();
    let started = Instant::now();
    client.get("k", None).await.expect("get after pass");
    println!(
        "round trip: {round_trip:?} with {delay:?} each way, {:?} without",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_way_to_redis_applies_requests_whose_answers_never_arrive() {
    let redis = Redis::start().expect("start redis");
    let proxy = redis.proxy().expect("start proxy");
    let url = format!("redis://{}/", proxy.addr());
    let mut cut = redis_connection(url.clone(), CLIENT_TIMEOUT).await;
    let mut direct = redis_connection(redis.url(), PROMPT).await;
    let _: () = redis::cmd("SET")
        .arg("a")
        .arg("0")
        .query_async(&mut cut)
        .await
        .expect("set");

    // Requests reach Redis, answers do not: the write is applied and the client sees a timeout.
    proxy.one_way(Direction::ToUpstream);
    let outcome: redis::RedisResult<()> = redis::cmd("SET")
        .arg("a")
        .arg("1")
        .query_async(&mut cut)
        .await;
    assert!(
        outcome.is_err(),
        "an answer came back through a one-way link"
    );
    let value: String = redis::cmd("GET")
        .arg("a")
        .query_async(&mut direct)
        .await
        .expect("get");
    assert_eq!(value, "1", "the request must have reached Redis");

    // Answers flow, requests do not: nothing is applied.
    proxy.pass();
    let mut other = redis_connection(url, CLIENT_TIMEOUT).await;
    proxy.one_way(Direction::ToClient);
    let outcome: redis::RedisResult<()> = redis::cmd("SET")
        .arg("b")
        .arg("1")
        .query_async(&mut other)
        .await;
    assert!(
        outcome.is_err(),
        "a request crossed a link that only carries answers"
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg("b")
        .query_async(&mut direct)
        .await
        .expect("exists");
    assert_eq!(exists, 0, "the request must not have reached Redis");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_redis_connection_hangs_and_a_reset_one_fails_at_once() {
    let redis = Redis::start().expect("start redis");
    let proxy = redis.proxy().expect("start proxy");
    let url = format!("redis://{}/", proxy.addr());
    let mut conn = redis_connection(url.clone(), CLIENT_TIMEOUT).await;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("ping");
    let before = proxy.stats();

    proxy.blackhole();
    let started = Instant::now();
    let outcome: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(outcome.is_err());
    assert!(
        started.elapsed() >= CLIENT_TIMEOUT - Duration::from_millis(100),
        "a blackholed PING failed after {:?}, before the client's timeout",
        started.elapsed()
    );
    assert_eq!(
        proxy.stats().bytes_to_client,
        before.bytes_to_client,
        "nothing may come back"
    );

    proxy.reset();
    let started = Instant::now();
    let outcome = tokio::time::timeout(PROMPT, redis::cmd("PING").query_async::<String>(&mut conn))
        .await
        .expect("a reset connection must fail at once, not hang");
    assert!(outcome.is_err(), "a reset connection answered");
    // A new connection is reset as soon as it is made: the connect (its HELLO) fails.
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(30)));
    let fresh = tokio::time::timeout(
        PROMPT,
        redis::Client::open(url)
            .expect("redis URL")
            .get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .expect("a refused connection must fail at once, not wait for its 30 s timeout");
    assert!(fresh.is_err(), "a reset proxy served a new connection");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_partitioned_member_loses_its_leader_and_the_others_elect_one() {
    let cluster = EtcdCluster::start_with_peer_proxies(3).expect("start cluster");
    let old = cluster.leader().expect("a leader");
    cluster.partition(old).expect("partition");

    // The two others elect a new leader among themselves.
    let deadline = Instant::now() + PROMPT;
    let new = loop {
        let leader = cluster.leader().expect("the majority keeps a leader");
        if leader != old {
            break leader;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader within {PROMPT:?} of the partition"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(new, old);

    // A write through a majority member succeeds; the partitioned member cannot serve a
    // linearizable read (it has no quorum).
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let majority = cluster.member(new).endpoint();
        let minority = cluster.member(old).endpoint();
        let mut ok = etcd_client(majority, Duration::from_secs(5)).await;
        ok.put("p", "1", None)
            .await
            .expect("a write on the majority side");
        let mut cut = etcd_client(minority, Duration::from_secs(2)).await;
        assert!(
            cut.get("p", None).await.is_err(),
            "the partitioned member served a linearizable read"
        );
        // Cut off both ways, it never hears of the new leader (a one-way cut would let the new
        // leader's heartbeats reach it).
        let new_id = ok
            .status()
            .await
            .expect("status")
            .header()
            .expect("header")
            .member_id();
        let seen = cut
            .status()
            .await
            .expect("a member answers status without a quorum");
        assert_ne!(
            seen.leader(),
            new_id,
            "the partitioned member hears the new leader"
        );
    });

    cluster.heal(old).expect("heal");
    runtime.block_on(async {
        let mut healed = etcd_client(cluster.member(old).endpoint(), Duration::from_secs(2)).await;
        let value = tokio::time::timeout(PROMPT, async {
            loop {
                if let Ok(reply) = healed.get("p", None).await
                    && let Some(kv) = reply.kvs().first()
                {
                    return kv.value().to_vec();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the healed member must catch up");
        assert_eq!(value, b"1");
    });
}

#[test]
fn partition_needs_peer_proxies() {
    let cluster = EtcdCluster::start(1).expect("start");
    let error = cluster.partition(0).expect_err("no proxies");
    assert!(
        error.to_string().contains("start_with_peer_proxies"),
        "{error}"
    );
    assert!(cluster.peer_proxy(0).is_none());
}
