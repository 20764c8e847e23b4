//! The closed state's sliding windows, lock-free: a call records its outcome with a few atomic
//! operations and no lock.
//!
//! Both windows belong to one *generation* (the breaker's epoch when it last entered the closed
//! or metrics-only state). Resetting the window is publishing a new generation; a writer that
//! still holds an older generation finds out and drops its outcome instead of polluting the new
//! window.

mod count;
mod time;

#[doc(hidden)]
pub use count::CountWindow;
#[doc(hidden)]
pub use time::TimeWindow;

use std::time::Duration;

use crate::config::Window;
use crate::machine::Mark;
#[doc(hidden)]
pub use crate::machine::WindowStats;

/// The window of one breaker.
#[derive(Debug)]
pub(crate) enum SlidingWindow {
    Count(CountWindow),
    Time(TimeWindow),
}

impl SlidingWindow {
    pub(crate) fn new(window: Window, generation: u64) -> Self {
        match window {
            Window::Count(n) => SlidingWindow::Count(CountWindow::new(n, generation)),
            Window::Time(d) => {
                let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                SlidingWindow::Time(TimeWindow::new(secs, generation))
            }
        }
    }

    pub(crate) fn needs_time(&self) -> bool {
        matches!(self, SlidingWindow::Time(_))
    }

    /// Records `mark` in `generation`. Returns the window's counts when the caller must evaluate
    /// the rates, or `None` when nothing could have changed the verdict (a success into a window
    /// without failures or slow calls) or the generation is stale.
    #[inline]
    pub(crate) fn record(&self, generation: u64, mark: Mark, now: Duration) -> Option<WindowStats> {
        match self {
            SlidingWindow::Count(w) => w.record(generation, mark.0),
            SlidingWindow::Time(w) => w.record(generation, mark.0, now),
        }
    }

    pub(crate) fn reset(&self, generation: u64) {
        match self {
            SlidingWindow::Count(w) => w.reset(generation),
            SlidingWindow::Time(w) => w.reset(generation),
        }
    }

    pub(crate) fn snapshot(&self, now: Duration) -> WindowStats {
        match self {
            SlidingWindow::Count(w) => w.snapshot(),
            SlidingWindow::Time(w) => w.snapshot(now),
        }
    }
}
