//! The job registry and election observers: keys on the session lease, and watches that
//! resume after a server restart and re-read after a compaction.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use super::backend::EtcdBackend;
use super::lock::{first_created, holder_of};
use super::rpc::{budget, retry, while_alive};
use super::session::EtcdSession;
use super::stats::count_resync;
use super::watch::{ResumableWatch, Watched};
use crate::backend::{Holder, Registration, sealed::Sealed};
use crate::error::LockError;
use crate::job::{JobEvent, JobInfo};

fn run_prefix(ns: &str) -> String {
    format!("{ns}jobs/run/")
}

fn done_prefix(ns: &str) -> String {
    format!("{ns}jobs/done/")
}

pub(crate) async fn register(
    backend: &EtcdBackend,
    session: &Arc<EtcdSession>,
    job: JobInfo,
) -> Result<Box<dyn Registration>, LockError> {
    let key = format!("{}{}", run_prefix(&backend.ns), job.registry_key());
    let done = format!("{}{}", done_prefix(&backend.ns), job.registry_key());
    let value = job.to_bytes();
    let lease = session.lease;
    let resp = retry(
        "register job",
        backend.rpc_timeout(),
        while_alive(&session.liveness),
        || {
            let mut c = backend.client.clone();
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        },
    )
    .await?;
    let _ = resp;
    Ok(Box::new(EtcdRegistration {
        client: backend.client.clone(),
        session: session.clone(),
        key,
        done,
        value,
        rpc_timeout: backend.rpc_timeout(),
        finished: false,
    }))
}

struct EtcdRegistration {
    client: Client,
    session: Arc<EtcdSession>,
    key: String,
    done: String,
    /// Our entry (pid, start time and fencing token make it unique to this run); writes compare
    /// it so we never delete a later run's entry, and a put retried after a lost response is
    /// harmless.
    value: Vec<u8>,
    rpc_timeout: Duration,
    finished: bool,
}

impl std::fmt::Debug for EtcdRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistration")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Sealed for EtcdRegistration {}

#[async_trait]
impl Registration for EtcdRegistration {
    async fn finish(mut self: Box<Self>) -> Result<(), LockError> {
        self.finished = true;
        let lease = self.session.lease;
        let result = retry(
            "unregister job",
            self.rpc_timeout,
            while_alive(&self.session.liveness),
            || {
                let mut c = self.client.clone();
                // Delete the entry and leave a "done" record in the same revision, so watchers
                // tell a finish from an expiry.
                let txn = Txn::new()
                    .when([Compare::value(
                        self.key.as_str(),
                        CompareOp::Equal,
                        self.value.clone(),
                    )])
                    .and_then([
                        TxnOp::delete(self.key.as_str(), None),
                        TxnOp::put(
                            self.done.as_str(),
                            self.value.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        ),
                    ]);
                async move { c.txn(txn).await }
            },
        )
        .await;
        match result {
            Err(_) if self.session.liveness.is_lost() => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Cancelled (lease lost): remove the entry if it is still there; watchers see an expiry.
        let client = self.client.clone();
        let key = std::mem::take(&mut self.key);
        let value = std::mem::take(&mut self.value);
        let rpc_timeout = self.rpc_timeout;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = retry(
                    "unregister job",
                    rpc_timeout,
                    budget(rpc_timeout * 3),
                    || {
                        let mut c = client.clone();
                        let txn = Txn::new()
                            .when([Compare::value(
                                key.as_str(),
                                CompareOp::Equal,
                                value.clone(),
                            )])
                            .and_then([TxnOp::delete(key.as_str(), None)]);
                        async move { c.txn(txn).await }
                    },
                )
                .await;
            });
        }
    }
}

/// Reads the whole registry: the running entries (lock → job) and the done records, at one
/// revision.
async fn read_registry(
    client: &Client,
    ns: &str,
    rpc_timeout: Duration,
    give_up: impl Fn() -> bool,
) -> Result<(BTreeMap<String, JobInfo>, BTreeMap<String, JobInfo>, i64), LockError> {
    let (run, done) = (run_prefix(ns), done_prefix(ns));
    let resp = retry("read registry", rpc_timeout, give_up, || {
        let mut c = client.clone();
        let txn = Txn::new().and_then([
            TxnOp::get(run.as_str(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(done.as_str(), Some(GetOptions::new().with_prefix())),
        ]);
        async move { c.txn(txn).await }
    })
    .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let mut maps = [BTreeMap::new(), BTreeMap::new()];
    for (i, op) in resp.op_responses().into_iter().enumerate().take(2) {
        if let etcd_client::TxnOpResponse::Get(g) = op {
            for kv in g.kvs() {
                if let Some(job) = JobInfo::from_bytes(kv.value()) {
                    maps[i].insert(job.registry_key(), job);
                }
            }
        }
    }
    let [run_map, done_map] = maps;
    Ok((run_map, done_map, rev))
}

pub(crate) async fn running(backend: &EtcdBackend) -> Result<Vec<JobInfo>, LockError> {
    let rpc_timeout = backend.rpc_timeout();
    let (run, _, _) = read_registry(
        &backend.client,
        &backend.ns,
        rpc_timeout,
        budget(rpc_timeout * 3),
    )
    .await?;
    Ok(run.into_values().collect())
}

fn same_run(a: &JobInfo, b: &JobInfo) -> bool {
    a.fencing_token == b.fencing_token && a.started_at_ms == b.started_at_ms && a.pid == b.pid
}

/// The events that turn `known` into `now`, using `done` to tell finished from expired.
fn diff(
    known: &BTreeMap<String, JobInfo>,
    now: &BTreeMap<String, JobInfo>,
    done: &BTreeMap<String, JobInfo>,
    out: &mut VecDeque<JobEvent>,
) {
    for (lock, job) in known {
        if now.get(lock).is_some_and(|j| same_run(j, job)) {
            continue;
        }
        if done.get(lock).is_some_and(|j| same_run(j, job)) {
            out.push_back(JobEvent::Finished(job.clone()));
        } else {
            out.push_back(JobEvent::Expired(job.clone()));
        }
    }
    for (lock, job) in now {
        if !known.get(lock).is_some_and(|j| same_run(j, job)) {
            out.push_back(JobEvent::Started(job.clone()));
        }
    }
}

/// The registry watch: a task that follows `jobs/` from the revision it last saw, resumes from
/// there after a failure, and re-reads (diffing against what it knew) after a compaction.
pub(crate) fn watch(
    client: Client,
    ns: String,
    rpc_timeout: Duration,
) -> BoxStream<'static, JobEvent> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut known = BTreeMap::new();
        let mut resync = true;
        let options = WatchOptions::new().with_prefix().with_prev_key();
        let prefix = format!("{ns}jobs/");
        let mut watch = ResumableWatch::new(client.clone(), prefix, options, Some(rpc_timeout), 1);
        loop {
            if tx.is_closed() {
                return;
            }
            if resync {
                let Ok((now, done, at)) =
                    read_registry(&client, &ns, rpc_timeout, || tx.is_closed()).await
                else {
                    watch.pause(tx.closed()).await;
                    continue;
                };
                let mut events = VecDeque::new();
                // The first read reports what already runs; later ones what changed.
                diff(&known, &now, &done, &mut events);
                for e in events {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                known = now;
                watch.resume_at(at + 1);
                resync = false;
            }
            let resp = match watch.next(tx.closed()).await {
                Watched::Stopped => return,
                Watched::Broken => continue,
                Watched::Ended(resp) => {
                    tracing::debug!(
                        compacted = resp.compact_revision(),
                        "registry watch compacted; re-reading"
                    );
                    count_resync();
                    resync = true;
                    continue;
                }
                Watched::Events(resp) => resp,
            };
            watch.reset_backoff();
            let run = run_prefix(&ns);
            let done_pre = done_prefix(&ns);
            // Done records put in each revision of this response (a finish is one txn).
            let done_at: Vec<(i64, Vec<u8>)> = resp
                .events()
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .filter_map(|e| e.kv())
                .filter_map(|kv| {
                    kv.key()
                        .strip_prefix(done_pre.as_bytes())
                        .map(|lock| (kv.mod_revision(), lock.to_vec()))
                })
                .collect();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                watch.advance(kv.mod_revision() + 1);
                let Some(lock) = kv.key().strip_prefix(run.as_bytes()) else {
                    continue;
                };
                let lock_name = String::from_utf8_lossy(lock).into_owned();
                let event = match ev.event_type() {
                    EventType::Put => {
                        // A put retried after a lost response rewrites the same entry.
                        if ev.prev_kv().is_some_and(|p| p.value() == kv.value()) {
                            continue;
                        }
                        let Some(job) = JobInfo::from_bytes(kv.value()) else {
                            continue;
                        };
                        known.insert(lock_name, job.clone());
                        JobEvent::Started(job)
                    }
                    EventType::Delete => {
                        let job = ev
                            .prev_kv()
                            .and_then(|p| JobInfo::from_bytes(p.value()))
                            .or_else(|| known.get(&lock_name).cloned());
                        known.remove(&lock_name);
                        let Some(job) = job else { continue };
                        let finished = done_at
                            .iter()
                            .any(|(r, l)| *r == kv.mod_revision() && l.as_slice() == lock);
                        if finished {
                            JobEvent::Finished(job)
                        } else {
                            JobEvent::Expired(job)
                        }
                    }
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).boxed()
}

/// The holder of a lock/election prefix now and after every change: re-reads the owner after
/// each watch response, resumes after failures, re-reads after a compaction.
pub(crate) fn observe(
    client: Client,
    prefix: String,
    rpc_timeout: Duration,
) -> BoxStream<'static, Option<Holder>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut last: Option<Option<Holder>> = None;
        let options = WatchOptions::new().with_prefix();
        let mut watch = ResumableWatch::new(
            client.clone(),
            prefix.as_str(),
            options,
            Some(rpc_timeout),
            1,
        );
        loop {
            if tx.is_closed() {
                return;
            }
            let read = retry(
                "read leader",
                rpc_timeout,
                {
                    let tx = tx.clone();
                    move || tx.is_closed()
                },
                || {
                    let mut c = client.clone();
                    let prefix = prefix.clone();
                    async move { c.get(prefix, Some(first_created())).await }
                },
            );
            let Ok(resp) = read.await else {
                watch.pause(tx.closed()).await;
                continue;
            };
            let rev = resp.header().map_or(0, |h| h.revision());
            let now = resp.kvs().first().map(holder_of);
            if last.as_ref() != Some(&now) {
                if tx.send(now.clone()).await.is_err() {
                    return;
                }
                last = Some(now);
            }
            watch.resume_at(rev + 1);
            // Wait for the first change (or a failure / compaction), then re-read the owner.
            loop {
                match watch.next(tx.closed()).await {
                    Watched::Stopped => return,
                    Watched::Broken => break,
                    Watched::Ended(_) => {
                        count_resync();
                        break;
                    }
                    Watched::Events(resp) if resp.events().is_empty() => continue,
                    Watched::Events(_) => {
                        watch.reset_backoff();
                        break;
                    }
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|h| (h, rx)) }).boxed()
}
