//! The work a runner has under way: calls in flight (each holding a
//! concurrency permit), calls waiting for one, calls a caller may still
//! cancel, and the idle clock they keep.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::task::AbortHandle;

use super::Runner;

/// Counts a call as in flight while alive, holding its permit; both are
/// given back when the call's task is aborted (cancelled by its caller).
pub(super) struct InFlight {
    runner: Arc<Runner>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.runner.end();
    }
}

/// Counts a call waiting for a permit.
pub(super) struct Queued<'a>(pub(super) &'a Runner);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Calls running in their own tasks, by reply subject, so that a caller
/// that stops waiting can cancel its call. Only the serve loop touches it.
#[derive(Default)]
pub(super) struct Cancellable {
    tasks: HashMap<String, AbortHandle>,
    /// Finished tasks are swept out when the map reaches this size.
    sweep_at: usize,
}

impl Cancellable {
    pub(super) fn insert(&mut self, reply: String, task: AbortHandle) {
        if self.tasks.len() >= self.sweep_at {
            self.tasks.retain(|_, t| !t.is_finished());
            self.sweep_at = (self.tasks.len() * 2).max(64);
        }
        self.tasks.insert(reply, task);
    }

    pub(super) fn cancel(&mut self, reply: &[u8]) -> bool {
        let Ok(reply) = std::str::from_utf8(reply) else {
            return false;
        };
        match self.tasks.remove(reply) {
            Some(task) if !task.is_finished() => {
                task.abort();
                true
            }
            _ => false,
        }
    }
}

impl Runner {
    pub(super) fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    pub(super) fn idle_for(&self) -> Duration {
        // Work in flight, or an open stream (a result still being read,
        // say), is not idleness.
        if self.counters.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        if self.streams.active() > 0 {
            self.touch();
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub(super) fn begin(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> InFlight {
        let now = self.counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // (No touch: a runner with work in flight is not idle, see
        // `idle_for`; the end of the work touches.)
        InFlight {
            runner: self.clone(),
            _permit: permit,
        }
    }

    pub(super) fn end(&self) {
        self.touch();
        self.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            self.work_done.notify_waiters();
        }
    }
}
