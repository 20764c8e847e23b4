//! palisade-lock against etcd-client's built-in `lock`/`unlock` (etcd's v3lock service, on a
//! lease we keep alive), on the same testkit etcd in one run:
//!
//! - criterion: uncontended acquire + release (also the file and memory backends, for scale),
//!   of a lock and of a 3-slot semaphore on each backend;
//! - then, printed as a table: handoff latency (release by one holder to acquisition by the
//!   next) with 16 contenders, p50 and p99; and etcd requests per handoff with 4 and 64
//!   contenders.
//!
//! Run: `cargo bench -p palisade-lock --bench lock -- --warm-up-time 1 --measurement-time 3`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::Criterion;
use etcd_client::{Client, LockOptions};
use palisade_lock::Coordinator;
use tokio::time::Instant;

const TTL: i64 = 10;

async fn client(endpoints: &[String]) -> Client {
    Client::connect(endpoints, None).await.expect("connect")
}

async fn palisade(endpoints: &[String]) -> Coordinator {
    Coordinator::etcd(client(endpoints).await)
        .namespace("bench/")
        .lease_ttl(Duration::from_secs(10))
        .connect()
        .await
        .expect("coordinator")
}

/// A lease with a keepalive task, for the built-in lock (which otherwise gets a 60 s lease that
/// nobody renews).
async fn kept_alive_lease(c: &Client) -> i64 {
    let mut c2 = c.clone();
    let id = c2.lease_grant(TTL, None).await.expect("grant").id();
    tokio::spawn(async move {
        let Ok((mut keeper, mut stream)) = c2.lease_keep_alive(id).await else {
            return;
        };
        loop {
            if keeper.keep_alive().await.is_err() || stream.message().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    });
    id
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// (acquired, released) instants of every critical section.
type Spans = Arc<Mutex<Vec<(Instant, Instant)>>>;

fn handoffs(spans: &Spans) -> Vec<Duration> {
    let mut s = spans.lock().unwrap().clone();
    s.sort_by_key(|(a, _)| *a);
    let mut out: Vec<Duration> = s
        .windows(2)
        .map(|w| w[1].0.saturating_duration_since(w[0].1))
        .collect();
    out.sort();
    out
}

async fn contend_palisade(
    endpoints: &[String],
    contenders: usize,
    rounds: usize,
) -> (Vec<Duration>, f64) {
    let mut cs = Vec::new();
    for _ in 0..contenders {
        cs.push(palisade(endpoints).await);
    }
    let spans: Spans = Arc::default();
    let before = palisade_lock::stats::requests();
    let mut tasks = Vec::new();
    for c in cs {
        let spans = spans.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let g = c.lock("handoff").await.expect("lock");
                let acquired = Instant::now();
                let released = Instant::now();
                spans.lock().unwrap().push((acquired, released));
                g.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let requests = palisade_lock::stats::requests() - before;
    let n = (contenders * rounds) as f64;
    (handoffs(&spans), requests as f64 / n)
}

async fn contend_builtin(
    endpoints: &[String],
    contenders: usize,
    rounds: usize,
) -> (Vec<Duration>, f64) {
    let mut cs = Vec::new();
    for _ in 0..contenders {
        let c = client(endpoints).await;
        let lease = kept_alive_lease(&c).await;
        cs.push((c, lease));
    }
    let spans: Spans = Arc::default();
    let mut tasks = Vec::new();
    for (mut c, lease) in cs {
        let spans = spans.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let resp = c
                    .lock(
                        "bench-builtin/handoff",
                        Some(LockOptions::new().with_lease(lease)),
                    )
                    .await
                    .expect("lock");
                let acquired = Instant::now();
                let released = Instant::now();
                spans.lock().unwrap().push((acquired, released));
                c.unlock(resp.key().to_vec()).await.expect("unlock");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // lock + unlock: two requests from the client per handoff (the server runs the recipe).
    (handoffs(&spans), 2.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = palisade_testkit::Etcd::start().expect("start etcd");
    let endpoints = etcd.endpoints();
    let mut criterion = Criterion::default().configure_from_args();

    let (coordinator, mut builtin, lease) = rt.block_on(async {
        let c = palisade(&endpoints).await;
        let b = client(&endpoints).await;
        let lease = kept_alive_lease(&b).await;
        (c, b, lease)
    });
    let dir = tempfile::tempdir().unwrap();
    let file = Coordinator::file(dir.path()).unwrap();
    let memory = Coordinator::memory();
    {
        let mut group = criterion.benchmark_group("uncontended_acquire_release");
        group.bench_function("palisade_etcd", |b| {
            b.to_async(&rt).iter(|| async {
                coordinator
                    .lock("uncontended")
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            })
        });
        let semaphore = coordinator.semaphore("uncontended-sem", 3).unwrap();
        group.bench_function("palisade_etcd_semaphore_3", |b| {
            b.to_async(&rt).iter(|| async {
                semaphore.acquire().await.unwrap().release().await.unwrap();
            })
        });
        group.bench_function("etcd_client_builtin_lock", |b| {
            b.to_async(&rt).iter(|| {
                let mut c = builtin.clone();
                async move {
                    let r = c
                        .lock(
                            "bench-builtin/uncontended",
                            Some(LockOptions::new().with_lease(lease)),
                        )
                        .await
                        .unwrap();
                    c.unlock(r.key().to_vec()).await.unwrap();
                }
            })
        });
        group.bench_function("palisade_file", |b| {
            b.to_async(&rt).iter(|| async {
                file.lock("uncontended")
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            })
        });
        let file_semaphore = file.semaphore("uncontended-sem", 3).unwrap();
        group.bench_function("palisade_file_semaphore_3", |b| {
            b.to_async(&rt).iter(|| async {
                file_semaphore
                    .acquire()
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            })
        });
        let memory_semaphore = memory.semaphore("uncontended-sem", 3).unwrap();
        group.bench_function("palisade_memory_semaphore_3", |b| {
            b.to_async(&rt).iter(|| async {
                memory_semaphore
                    .acquire()
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            })
        });
        group.bench_function("palisade_memory", |b| {
            b.to_async(&rt).iter(|| async {
                memory
                    .lock("uncontended")
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            })
        });
        group.finish();
    }
    criterion.final_summary();
    let _ = &mut builtin;

    rt.block_on(async {
        println!(
            "\nhandoff latency, 16 contenders (release by one holder -> acquisition by the next)"
        );
        println!("| implementation | handoffs | p50 | p99 |");
        println!("|---|---|---|---|");
        let (p, _) = contend_palisade(&endpoints, 16, 15).await;
        let (b, _) = contend_builtin(&endpoints, 16, 15).await;
        for (name, h) in [("palisade-lock", &p), ("etcd-client lock/unlock", &b)] {
            println!(
                "| {name} | {} | {:.2?} | {:.2?} |",
                h.len(),
                percentile(h, 0.5),
                percentile(h, 0.99)
            );
        }
        println!(
            "p99 ratio palisade/built-in: {:.2}",
            percentile(&p, 0.99).as_secs_f64() / percentile(&b, 0.99).as_secs_f64()
        );
        println!("\netcd requests per handoff (client side; keepalives excluded)");
        println!("| contenders | palisade-lock | etcd-client lock/unlock |");
        println!("|---|---|---|");
        for (n, rounds) in [(4, 20), (64, 3)] {
            let (_, p) = contend_palisade(&endpoints, n, rounds).await;
            let (_, b) = contend_builtin(&endpoints, n, rounds).await;
            println!("| {n} | {p:.2} | {b:.2} |");
        }
    });
    drop(etcd);
}
