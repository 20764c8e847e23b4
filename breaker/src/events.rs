//! Events a breaker publishes to its subscribers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::State;

pub use tokio::sync::broadcast::error::{RecvError, TryRecvError};

/// Something that happened in a breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The breaker moved from one state to another.
    StateTransition {
        /// The state it left.
        from: State,
        /// The state it entered.
        to: State,
    },
    /// A call was not permitted.
    Rejected {
        /// The state that rejected it.
        state: State,
    },
    /// A call succeeded.
    Success {
        /// How long it took (zero if the call was not timed).
        elapsed: Duration,
    },
    /// A call failed and was counted as a failure.
    Error {
        /// How long it took (zero if the call was not timed).
        elapsed: Duration,
    },
    /// A call's result was classified as ignored: counted as neither success nor failure.
    IgnoredError,
    /// A call took at least `slow_call_duration` (emitted besides its `Success` or `Error`).
    SlowCall {
        /// How long it took.
        elapsed: Duration,
        /// Whether the slow call also failed.
        failed: bool,
    },
    /// The breaker was reset to closed with an empty window.
    Reset,
}

/// The sending side, held by the breaker. Sending is skipped entirely while nobody subscribes,
/// so events cost the hot path one relaxed load.
#[derive(Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<Event>,
    subscribers: Arc<AtomicUsize>,
}

impl Events {
    pub(crate) fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Events {
            tx,
            subscribers: Arc::new(AtomicUsize::new(0)),
        }
    }

    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn emit(&self, event: Event) {
        if self.active() {
            // An error only means every receiver was dropped meanwhile.
            let _ = self.tx.send(event);
        }
    }

    pub(crate) fn subscribe(&self) -> EventReceiver {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        EventReceiver {
            rx: self.tx.subscribe(),
            subscribers: Arc::clone(&self.subscribers),
        }
    }
}

/// A subscription to a breaker's events (from [`CircuitBreaker::subscribe`](crate::CircuitBreaker::subscribe)).
///
/// It receives the events published after it was created, in order. A receiver that falls more
/// than `event_capacity` events behind misses the oldest ones and is told so by
/// [`RecvError::Lagged`]. Dropping it unsubscribes.
#[derive(Debug)]
pub struct EventReceiver {
    rx: broadcast::Receiver<Event>,
    subscribers: Arc<AtomicUsize>,
}

impl EventReceiver {
    /// Waits for the next event. Cancel-safe. `Err(RecvError::Closed)` when the breaker and all
    /// its clones are gone.
    pub async fn recv(&mut self) -> Result<Event, RecvError> {
        self.rx.recv().await
    }

    /// The next event if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        self.rx.try_recv()
    }

    /// Every event waiting now (skipping over any gap left by lagging).
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(e) => out.push(e),
                Err(TryRecvError::Lagged(_)) => continue,
                Err(_) => return out,
            }
        }
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}
