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
    // The same windows with other maxima: a limit changed while running (the keys do not
    // depend on `max`, so the new limits read the same history).
    let changed: Vec<Limit> = limits
        .iter()
        .map(|l| Limit::new(l.max() * 2 / 3 + 1, l.window()).expect("valid"))
        .collect();
    let limiters: Vec<RedisLimiter<ConnectionManager>> = [limits, changed]
        .into_iter()
        .map(|limits| {
            RedisLimiter::builder(conn.clone())
                .algorithm(algo)
                .prefix(format!("replay{seed}"))
                .limits(limits)
                .build()
                .expect("valid config")
        })
        .collect();
    let params_of = |l: &RedisLimiter<ConnectionManager>| -> Vec<Params> {
        l.inner
            .args
            .chunks_exact(3)
            .map(|c| Params {
                max: c[0] as u32,
                window_us: c[1],
                burst: c[2] as u32,
            })
            .collect()
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut states: HashMap<&str, Vec<A::State>> = HashMap::new();
    let mut now: i64 = 1_700_000_000_000_000 + rng.random_range(0..1_000_000);
    let shortest = params_of(&limiters[0])
        .iter()
        .map(|p| p.window_us)
        .min()
        .unwrap_or(1);
    let (mut admitted, mut denied) = (0, 0);
    for step in 0..steps {
        // Mostly small steps (bursts inside one window), sometimes jumps across windows, and
        // occasionally the clock stepping back a little.
        now += match rng.random_range(0..10) {
            0 => rng.random_range(shortest..3 * shortest),
            1 => -rng.random_range(0..shortest / 50 + 1),
            _ => rng.random_range(0..shortest / 20 + 1),
        };
        // Mostly the original limits, sometimes the changed ones.
        let limiter = &limiters[usize::from(rng.random_bool(0.2))];
        let params = params_of(limiter);
        let capacity = limiter.capacity();
        let key = ["a", "b", "c"][rng.random_range(0..3)];
        let cost = match rng.random_range(0..10) {
            0 => 0, // a peek
            1..=6 => 1,
            _ => rng.random_range(1..=capacity),
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
    // Keys expire on Redis by real time (PEXPIRE), while the replay injects its own times: the
    // windows are long enough that the injected clock (about a fortieth of the shortest window
    // per step) always runs far ahead of the real one, even on a loaded machine, so no key
    // expires in real time while it still matters at the injected time.
    let configs = [
        vec![Limit::new(5, ms(100_000)).unwrap()],
        vec![
            Limit::new(3, ms(10_000)).unwrap(),
            Limit::new(10, ms(200_000)).unwrap(),
        ],
        vec![Limit::new(7, ms(33_300)).unwrap()],
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

/// Long logs: more members expire at once than one decision trims, and denials search far.
#[tokio::test(flavor = "multi_thread")]
async fn long_logs_trim_and_search_like_the_model() {
    let redis = palisade_testkit::Redis::start().expect("start redis-server");
    let conn = connect(&redis.url(), Duration::from_secs(5))
        .await
        .expect("connect");
    let window = 3_600_000_000; // an hour: nothing expires in real time during the test
    let limiter = RedisLimiter::builder(conn.clone())
        .prefix("long")
        .limit(Limit::new(1000, Duration::from_micros(window as u64)).unwrap())
        .build()
        .expect("valid config");
    let params = [Params {
        max: 1000,
        window_us: window,
        burst: 1000,
    }];
    let mut state = vec![algorithm::LogState::default()];
    let mut rng = StdRng::seed_from_u64(7);
    let t0: i64 = 1_700_000_000_000_000;
    let mut steps: Vec<(i64, u32)> = (0..600).map(|i| (t0 + i, 1)).collect();
    // Denials that must search far back, peeks, then most of the log expiring at once.
    steps.extend((0..50).map(|i| (t0 + 1000 + i, rng.random_range(0..=1000))));
    steps.extend((0..20).map(|i| (t0 + window + 300 + i, rng.random_range(0..=600))));
    for (i, &(now, cost)) in steps.iter().enumerate() {
        let model = decide::<algorithm::SlidingLog>(&mut state, &params, now, cost);
        let script = limiter.check_at("k", cost, now).await.expect("script runs");
        assert_eq!(script, model, "step {i}: cost {cost} at {now}");
    }
    let mut c = conn.clone();
    let members: usize = redis::cmd("ZCARD")
        .arg(&limiter.redis_keys("k")[0])
        .query_async(&mut c)
        .await
        .expect("ZCARD");
    assert_eq!(members, state[0].entries.len(), "the same members are kept");
}
