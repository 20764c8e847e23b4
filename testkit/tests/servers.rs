//! The testkit against the real servers: start each, use it, kill, pause, resume and restart it.

use etcd_client::{Client, ConnectOptions};
use palisade_testkit::{Etcd, EtcdCluster, Redis, RedisCluster, RedisOptions};
use redis::AsyncCommands;
use std::time::Duration;
use tokio::time::timeout;

const CALL: Duration = Duration::from_secs(5);
const STUCK: Duration = Duration::from_millis(700);

async fn etcd_client(endpoints: Vec<String>) -> Client {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2));
    Client::connect(endpoints, Some(options))
        .await
        .expect("connect to the testkit's etcd")
}

async fn etcd_get(client: &mut Client, key: &str) -> Option<String> {
    let response = timeout(CALL, client.get(key, None))
        .await
        .expect("etcd get answered in time")
        .expect("etcd get succeeded");
    response
        .kvs()
        .first()
        .map(|kv| kv.value_str().expect("utf-8 value").to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_put_get_kill_restart_pause_resume() {
    let etcd = Etcd::start().expect("etcd starts");
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let mut client = etcd_client(etcd.endpoints()).await;
    client.put("k", "v1", None).await.expect("put");
    assert_eq!(etcd_get(&mut client, "k").await.as_deref(), Some("v1"));

    etcd.kill().expect("kill");
    assert!(etcd.pid().is_none());
    let refused = timeout(CALL, client.get("k", None)).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a killed etcd must not answer"
    );
    assert!(etcd.pause().is_err(), "pausing a killed server is an error");

    etcd.restart().expect("restart");
    let mut client = etcd_client(etcd.endpoints()).await;
    assert_eq!(
        etcd_get(&mut client, "k").await.as_deref(),
        Some("v1"),
        "restart keeps the data directory"
    );

    etcd.pause().expect("pause");
    let stuck = timeout(STUCK, client.get("k", None)).await;
    assert!(!matches!(stuck, Ok(Ok(_))), "a paused etcd must not answer");
    etcd.resume().expect("resume");
    assert_eq!(etcd_get(&mut client, "k").await.as_deref(), Some("v1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_cluster_survives_losing_its_leader() {
    let cluster = EtcdCluster::start(3).expect("3-member etcd cluster starts");
    assert_eq!(cluster.len(), 3);
    let endpoints = cluster.endpoints();
    let mut first = etcd_client(vec![endpoints[0].clone()]).await;
    first.put("shared", "one", None).await.expect("put");
    let mut third = etcd_client(vec![endpoints[2].clone()]).await;
    assert_eq!(etcd_get(&mut third, "shared").await.as_deref(), Some("one"));

    let leader = cluster.leader().expect("a leader");
    cluster.member(leader).kill().expect("kill the leader");
    let survivor = (leader + 1) % 3;
    let mut client = etcd_client(vec![endpoints[survivor].clone()]).await;
    timeout(Duration::from_secs(10), async {
        // The survivors need an election before they accept writes again.
        while client.put("shared", "two", None).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the two survivors accept writes within 10 s");
    let new_leader = cluster.leader().expect("a new leader");
    assert_ne!(new_leader, leader);

    cluster
        .member(leader)
        .restart()
        .expect("the old leader rejoins");
    let mut rejoined = etcd_client(vec![endpoints[leader].clone()]).await;
    assert_eq!(
        etcd_get(&mut rejoined, "shared").await.as_deref(),
        Some("two")
    );
}

async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("valid url");
    timeout(CALL, client.get_multiplexed_async_connection())
        .await
        .expect("connected in time")
        .expect("connected")
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_set_get_kill_restart_pause_resume() {
    let redis = Redis::start().expect("redis starts");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    let mut conn = redis_connection(&redis.url()).await;
    let () = conn.set("k", "v").await.expect("set");
    let value: String = conn.get("k").await.expect("get");
    assert_eq!(value, "v");

    redis.pause().expect("pause");
    let stuck = timeout(STUCK, conn.get::<_, Option<String>>("k")).await;
    // The redis crate may give up first with its own response timeout: either way, no answer.
    assert!(
        !matches!(stuck, Ok(Ok(_))),
        "a paused redis must not answer"
    );
    redis.resume().expect("resume");

    redis.kill().expect("kill");
    let client = redis::Client::open(redis.url()).expect("valid url");
    assert!(
        timeout(CALL, client.get_multiplexed_async_connection())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "a killed redis must refuse connections"
    );

    redis.restart().expect("restart");
    let mut conn = redis_connection(&redis.url()).await;
    let value: Option<String> = conn.get("k").await.expect("get");
    assert_eq!(value, None, "redis runs without persistence");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_with_password_and_acl_user() {
    let redis = Redis::start_with(
        RedisOptions::default()
            .password("pw")
            .user("alice", "secret"),
    )
    .expect("redis with auth starts");
    let mut anonymous = redis_connection(&redis.url()).await;
    let denied: redis::RedisResult<Option<String>> = anonymous.get("k").await;
    assert!(denied.is_err(), "no password, no access");

    let url = format!("redis://alice:secret@127.0.0.1:{}/", redis.port());
    let mut alice = redis_connection(&url).await;
    let () = alice.set("k", "v").await.expect("alice may write");
    let url = format!("redis://:pw@127.0.0.1:{}/", redis.port());
    let mut default_user = redis_connection(&url).await;
    let value: String = default_user.get("k").await.expect("default user may read");
    assert_eq!(value, "v");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_serves_every_slot_and_survives_a_node_restart() {
    let cluster = RedisCluster::start(3).expect("redis cluster starts");
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut conn = timeout(CALL, client.get_async_connection())
        .await
        .expect("connected in time")
        .expect("connected");
    for i in 0..30 {
        let () = conn.set(format!("key-{i}"), i).await.expect("set");
    }
    for i in 0..30 {
        let value: i32 = conn.get(format!("key-{i}")).await.expect("get");
        assert_eq!(value, i);
    }

    cluster
        .node(1)
        .restart()
        .expect("node 1 restarts and the cluster is ok again");
    let mut fresh = timeout(CALL, client.get_async_connection())
        .await
        .expect("connected in time")
        .expect("connected");
    for i in 0..30 {
        timeout(Duration::from_secs(10), async {
            loop {
                match fresh.set::<_, _, ()>(format!("again-{i}"), i).await {
                    Ok(()) => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("every slot is writable again within 10 s");
    }
}
