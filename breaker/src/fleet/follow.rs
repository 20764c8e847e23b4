//! The background tasks of a fleet breaker: the sync loop (report, read the state, ask for probe
//! permits) and the pub/sub listener that wakes it when the state changes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::{Instant, MissedTickBehavior};

use super::decide::{Counts, SyncInput};
use super::{Shared, TOKEN_MASK, redis};
use crate::State;
use crate::sync::lock_std;

/// The outcomes counted by the local breaker, to report their growth.
#[derive(Debug, Clone, Copy, Default)]
struct Lifetime {
    successes: u64,
    failures: u64,
    slow: u64,
}

impl Lifetime {
    fn read(shared: &Shared) -> Lifetime {
        let (successes, failures, slow) = shared.local.lifetime_outcomes();
        Lifetime {
            successes,
            failures,
            slow,
        }
    }

    fn since(self, earlier: Lifetime) -> Counts {
        let failures = self.failures.saturating_sub(earlier.failures);
        Counts {
            calls: self.successes.saturating_sub(earlier.successes) + failures,
            failures,
            slow: self.slow.saturating_sub(earlier.slow),
        }
    }
}

/// Syncs every `sync_interval`, and whenever woken (a pub/sub message, a settled probe, a call
/// that wants a probe permit). Runs until aborted.
pub(super) async fn sync_loop(shared: Arc<Shared>) {
    let mut conn = None;
    let mut reported = Lifetime::read(&shared);
    let mut last_report = Instant::now();
    let mut tick = tokio::time::interval(shared.sync_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.wake.notified() => {}
        }
        sync_once(&shared, &mut conn, &mut reported, &mut last_report).await;
    }
}

async fn sync_once(
    shared: &Shared,
    conn: &mut Option<::redis::aio::MultiplexedConnection>,
    reported: &mut Lifetime,
    last_report: &mut Instant,
) {
    let now = Lifetime::read(shared);
    // A process whose local breaker opened reports at once: the fleet may need to know.
    let due =
        last_report.elapsed() >= shared.report_interval || shared.local.state() == State::Open;
    let mut input = SyncInput::default();
    if due {
        input.report = now.since(*reported);
    }
    {
        let mut pending = lock_std(&shared.pending_probes);
        input.probe_gen = pending.0;
        input.probes = std::mem::take(&mut pending.1);
    }
    let word = shared.probe_word.load(Ordering::Acquire);
    input.want_probe = shared.want_probe.load(Ordering::Relaxed) && word & TOKEN_MASK == 0;

    let result = match conn {
        Some(c) => {
            redis::sync(
                c,
                &shared.keys,
                &shared.params,
                &input,
                None,
                shared.timeout,
            )
            .await
        }
        None => match redis::connect(&shared.client, shared.timeout).await {
            Ok(mut c) => {
                let r = redis::sync(
                    &mut c,
                    &shared.keys,
                    &shared.params,
                    &input,
                    None,
                    shared.timeout,
                )
                .await;
                *lock_std(&shared.conn) = Some(c.clone());
                *conn = Some(c);
                r
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(reply) => {
            if due {
                *reported = now;
                *last_report = Instant::now();
            }
            shared.apply(reply);
        }
        Err(e) => {
            // Outcomes counted while Redis is away are not reported later: by then they would
            // describe the past.
            *reported = now;
            *last_report = Instant::now();
            *conn = None;
            *lock_std(&shared.conn) = None;
            shared.unavailable(&e);
        }
    }
}

/// Listens on the breaker's channel and wakes the sync loop on every message (and after every
/// (re)subscription, which may follow a missed message). Reconnects after a pause when the
/// connection is lost; the sync loop's polling covers the gaps.
pub(super) async fn listen(shared: Arc<Shared>) {
    let retry = shared.sync_interval.max(Duration::from_millis(200));
    loop {
        let subscribed = async {
            let mut pubsub = shared.client.get_async_pubsub().await?;
            pubsub.subscribe(&shared.keys.channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        if let Ok(Ok(pubsub)) = tokio::time::timeout(shared.timeout, subscribed).await {
            shared.wake.notify_one();
            let mut messages = pubsub.into_on_message();
            while messages.next().await.is_some() {
                shared.wake.notify_one();
            }
        }
        tokio::time::sleep(retry).await;
    }
}
