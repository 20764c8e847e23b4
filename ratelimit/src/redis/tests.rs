//! The Lua scripts against the Rust model: the same (time, key, cost) sequences, replayed
//! through both, must give identical decisions. Needs `redis-server` (palisade-testkit).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::algorithm::{self, decide};

async fn replay<A: algorithm::Algorithm>(
    conn: &ConnectionManager,
    algo: Algorithm,
    limits: Vec<Limit>,
    seed: u64,
    steps: usize,
) {
    let limiter = RedisLimiter::builder(conn.clone())
        .algorithm(algo)
        .prefix(format!("replay{seed}"))
        .limits(limits.clone())
        .build()
        .expect("valid config");
    let params: Vec<Params> = limiter
        .inner
        .args
        .chunks_exact(3)
        .map(|c| Params {
            max: c[0] as u32,
            window_us: c[1],
            burst: c[2] as u32,
        })
        .collect();
    let capacity = limiter.capacity();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut states: HashMap<&str, Vec<A::State>> = HashMap::new();
    let mut now: i64 = 1_700_000_000_000_000 + rng.random_range(0..1_000_000);
    let shortest = params.iter().map(|p| p.window_us).min().unwrap_or(1);
    let (mut admitted, mut denied) = (0, 0);
    for step in 0..steps {
        // Mostly small steps (bursts inside one window), sometimes jumps across windows, and
        // occasionally the clock stepping back a little.
        now += match rng.random_range(0..10) {
            0 => rng.random_range(shortest..3 * shortest),
            1 => -rng.random_range(0..shortest / 50 + 1),
            _ => rng.random_range(0..shortest / 20 + 1),
        };
        let key = ["a", "b", "c"][rng.random_range(0..3)];
        let cost = if rng.random_bool(0.7) {
            1
        } else {
            rng.random_range(1..=capacity)
        };
        let state = states
            .entry(key)
            .or_insert_with(|| params.iter().map(|_| A::State::default()).collect());
        let model = decide::<A>(state, &params, now, cost);
        let script = limiter.check_at(key, cost, now).await.expect("script runs");
        assert_eq!(
            script, model,
            "{algo:?} seed {seed} step {step}: key {key} cost {cost} at {now}: script (left) and model (right) disagree"
        );
        if model.0 { admitted += 1 } else { denied += 1 }
    }
    assert!(
        admitted > 0 && denied > 0,
        "{algo:?}: the sequence must exercise both outcomes ({admitted}/{denied})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lua_scripts_decide_exactly_like_the_rust_model() {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let conn = connect(&redis.url(), Duration::from_secs(5))
        .await
        .expect("connect");
    let ms = Duration::from_millis;
    let configs = [
        vec![Limit::new(5, ms(1000)).unwrap()],
        vec![
            Limit::new(3, ms(100)).unwrap(),
            Limit::new(10, ms(2000)).unwrap(),
        ],
        vec![Limit::new(7, ms(333)).unwrap()],
    ];
    for (i, limits) in configs.into_iter().enumerate() {
        let seed = i as u64 * 100;
        replay::<algorithm::SlidingLog>(&conn, Algorithm::SlidingLog, limits.clone(), seed, 400)
            .await;
        replay::<algorithm::WindowCounter>(
            &conn,
            Algorithm::SlidingWindowCounter,
            limits.clone(),
            seed + 1,
            400,
        )
        .await;
        replay::<algorithm::Gcra>(
            &conn,
            Algorithm::Gcra { burst: 3 },
            limits.clone(),
            seed + 2,
            400,
        )
        .await;
    }
}
