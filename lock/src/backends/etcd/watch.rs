//! A watch that resumes where it left off.
//!
//! The registry watch, the holder observer and a held lock's watch on its own key each follow
//! one key or prefix for as long as someone needs it: they open a watch from a revision, and
//! when the watch cannot be opened or its stream fails they wait a backoff delay and open it
//! again from the revision they had got to, so no event is lost to a broken connection. That
//! part is [`ResumableWatch`]. What a response means, what to do when etcd ends the watch (after
//! a compaction the missed events are gone, and each user reads what it follows in its own way)
//! and when the backoff starts over stay with each user.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, WatchOptions, WatchResponse, WatchStream};

use super::rpc::backoff;
use super::stats::count_request;

/// What [`ResumableWatch::next`] saw.
pub(crate) enum Watched {
    /// A response on the open watch. Its events may be none: the first response only confirms
    /// that the watch was created.
    Events(WatchResponse),
    /// etcd ended the watch: with `compact_revision() > 0` when the revisions it was to start
    /// from were compacted away (the events since are gone: read what the watch follows again
    /// and [`resume_at`](ResumableWatch::resume_at) the revision after that read), otherwise
    /// cancelled. The next call opens a new watch.
    Ended(WatchResponse),
    /// The watch could not be opened, or its stream failed or ended; the next backoff delay has
    /// been waited (or cut short by `stop`). The next call opens it again from the same revision.
    Broken,
    /// `stop` resolved.
    Stopped,
}

/// A watch on one key or prefix, opened lazily from a start revision that its user moves
/// forward as it sees events, and opened again from there after a failure.
///
/// Invariant: every event before `from` has been seen or read by the user; a watch is only
/// ever opened at `from`.
pub(crate) struct ResumableWatch {
    client: Client,
    key: Vec<u8>,
    /// The watch's options, but for the start revision.
    options: WatchOptions,
    /// How long opening a watch may take; `None` for as long as it takes (until `stop`).
    open_within: Option<Duration>,
    /// The revision the next watch starts from.
    from: i64,
    /// Waited after each failure; starts over when the user calls `reset_backoff`.
    delays: backon::ExponentialBackoff,
    /// The open watch: `None` until opened, and again once it broke or etcd ended it.
    stream: Option<WatchStream>,
}

impl ResumableWatch {
    /// A watch on `key` with `options` (a prefix, previous values…), to be opened at `from`.
    pub(crate) fn new(
        client: Client,
        key: impl Into<Vec<u8>>,
        options: WatchOptions,
        open_within: Option<Duration>,
        from: i64,
    ) -> Self {
        ResumableWatch {
            client,
            key: key.into(),
            options,
            open_within,
            from,
            delays: backoff(),
            stream: None,
        }
    }

    /// Moves the start revision forward to `rev` (never back): the events before it were seen.
    pub(crate) fn advance(&mut self, rev: i64) {
        self.from = self.from.max(rev);
    }

    /// Starts over at `rev` (the revision after a read of what the watch follows): the open
    /// watch, if any, is dropped and the next call opens one there.
    pub(crate) fn resume_at(&mut self, rev: i64) {
        self.from = rev;
        self.stream = None;
    }

    /// The watch works: the next failure waits the shortest delay again.
    pub(crate) fn reset_backoff(&mut self) {
        self.delays = backoff();
    }

    /// Waits the next backoff delay, or until `stop` resolves.
    pub(crate) async fn pause(&mut self, stop: impl Future<Output = ()>) {
        let delay = self.delays.next().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop => {}
        }
    }

    /// The next response, opening the watch first if none is open. `stop` is checked before
    /// anything else, so a watch nobody needs any more is not opened.
    pub(crate) async fn next(&mut self, stop: impl Future<Output = ()>) -> Watched {
        tokio::pin!(stop);
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => {
                let opened = tokio::select! {
                    biased;
                    () = stop.as_mut() => return Watched::Stopped,
                    opened = self.open() => opened,
                };
                match opened {
                    Some(stream) => stream,
                    None => return self.broke(stop).await,
                }
            }
        };
        let message = tokio::select! {
            biased;
            () = stop.as_mut() => None,
            message = stream.message() => Some(message),
        };
        let Some(message) = message else {
            self.stream = Some(stream);
            return Watched::Stopped;
        };
        match message {
            Ok(Some(resp)) if resp.compact_revision() > 0 || resp.canceled() => {
                Watched::Ended(resp)
            }
            Ok(Some(resp)) => {
                self.stream = Some(stream);
                Watched::Events(resp)
            }
            Ok(None) | Err(_) => self.broke(stop).await,
        }
    }

    /// Opens a watch at `from`, within `open_within`; `None` when it failed or took too long.
    async fn open(&self) -> Option<WatchStream> {
        let mut client = self.client.clone();
        let options = self.options.clone().with_start_revision(self.from);
        count_request();
        let opening = client.watch(self.key.clone(), Some(options));
        match self.open_within {
            Some(bound) => tokio::time::timeout(bound, opening).await.ok()?.ok(),
            None => opening.await.ok(),
        }
    }

    async fn broke(&mut self, stop: impl Future<Output = ()>) -> Watched {
        tracing::debug!(
            key = %String::from_utf8_lossy(&self.key),
            from = self.from,
            "watch broke; opening it again after a backoff delay"
        );
        self.pause(stop).await;
        Watched::Broken
    }
}
