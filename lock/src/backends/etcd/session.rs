//! The session lease and its keepalive.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::rpc::{backoff, budget, retry};
use crate::error::LockError;
use crate::session::{Liveness, Session};

/// A granted lease, renewed by a background task until it is lost or this value is dropped
/// (then the lease is revoked, so our keys go at once instead of after the TTL).
pub(crate) struct EtcdSession {
    pub(crate) lease: i64,
    pub(crate) ttl: Duration,
    pub(crate) liveness: Arc<Liveness>,
    client: Client,
    keepalive: JoinHandle<()>,
}

impl EtcdSession {
    pub(crate) async fn grant(
        client: Client,
        ttl: Duration,
        rpc_timeout: Duration,
    ) -> Result<Arc<Self>, LockError> {
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let resp = retry("grant lease", rpc_timeout, budget(ttl), || {
            let mut c = client.clone();
            async move { c.lease_grant(ttl_secs, None).await }
        })
        .await?;
        let lease = resp.id();
        if lease == 0 {
            // Lease 0 means "no lease": a key put with it would never expire. Never use it.
            return Err(LockError::Backend {
                op: "grant lease",
                source: "etcd granted lease id 0".into(),
            });
        }
        let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
        let liveness = Liveness::until(sent + trusted(granted));
        let keepalive = tokio::spawn(keep_alive(client.clone(), lease, granted, liveness.clone()));
        tracing::info!(lease = format_args!("{lease:x}"), ttl = ?granted, "session started");
        Ok(Arc::new(EtcdSession {
            lease,
            ttl: granted,
            liveness,
            client,
            keepalive,
        }))
    }

    pub(crate) fn handle(&self) -> Session {
        Session {
            liveness: self.liveness.clone(),
            lease_id: Some(self.lease),
            ttl: Some(self.ttl),
        }
    }
}

impl Drop for EtcdSession {
    fn drop(&mut self) {
        self.keepalive.abort();
        self.liveness.mark_lost();
        let mut client = self.client.clone();
        let lease = self.lease;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
            });
        }
    }
}

/// Renews `lease` about every third of its TTL. The deadline moves to (send time of an
/// acknowledged renewal + granted TTL); when it passes without one, or etcd answers TTL 0 (the
/// lease is gone), the session is lost for good and the task ends.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, liveness: Arc<Liveness>) {
    let interval = ttl / 3;
    let mut delays = backoff();
    'reconnect: loop {
        if liveness.is_lost() {
            break;
        }
        let opened = {
            let mut c = client.clone();
            let until_lost = liveness
                .deadline()
                .map_or(interval, |d| d.saturating_duration_since(Instant::now()));
            tokio::time::timeout(until_lost.min(interval), c.lease_keep_alive(lease)).await
        };
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            other => {
                tracing::debug!(lease = format_args!("{lease:x}"), error = ?other.err(), "keepalive stream failed; retrying");
                let delay = delays.next().unwrap_or(Duration::from_secs(1));
                sleep_unless_lost(&liveness, delay).await;
                continue 'reconnect;
            }
        };
        loop {
            let sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                let delay = delays.next().unwrap_or(Duration::from_secs(1));
                sleep_unless_lost(&liveness, delay).await;
                continue 'reconnect;
            }
            let wait = liveness
                .deadline()
                .map_or(interval, |d| d.saturating_duration_since(sent))
                .min(interval.max(Duration::from_millis(200)));
            match tokio::time::timeout(wait, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() <= 0 => {
                    tracing::warn!(
                        lease = format_args!("{lease:x}"),
                        "lease expired or revoked on etcd: session lost"
                    );
                    liveness.mark_lost();
                    return;
                }
                Ok(Ok(Some(resp))) => {
                    let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
                    liveness.renew(sent + trusted(granted));
                    delays = backoff();
                }
                _ => {
                    tracing::debug!(
                        lease = format_args!("{lease:x}"),
                        "keepalive got no answer; reconnecting"
                    );
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    sleep_unless_lost(&liveness, delay).await;
                    continue 'reconnect;
                }
            }
            sleep_unless_lost(
                &liveness,
                (sent + interval).saturating_duration_since(Instant::now()),
            )
            .await;
            if liveness.is_lost() {
                break 'reconnect;
            }
        }
    }
    if liveness
        .deadline()
        .is_some_and(|deadline| Instant::now() >= deadline)
    {
        tracing::warn!(
            lease = format_args!("{lease:x}"),
            "no renewal acknowledged within the TTL: session lost"
        );
    } else {
        // Ended on purpose (the session was dropped or closed): nothing to warn about.
        tracing::debug!(lease = format_args!("{lease:x}"), "session ended");
    }
    liveness.mark_lost();
    // We no longer count on the lease; if etcd still has it (we were cut off, not expired),
    // revoke it so our keys do not block others until it expires.
    let mut c = client.clone();
    let _ = tokio::time::timeout(ttl, c.lease_revoke(lease)).await;
}

/// How much of a granted TTL the local deadline counts on: all but 1 %. The deadline starts
/// from the send time of the renewal (before etcd received it), so it already ends before etcd's
/// expiry; the margin also covers a local clock that runs up to 1 % slower than etcd's
/// (NTP slews by at most 0.05 %).
fn trusted(granted: Duration) -> Duration {
    granted - granted / 100
}

async fn sleep_unless_lost(liveness: &Liveness, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = liveness.lost() => {}
    }
}
