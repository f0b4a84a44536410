//! The work a runner has under way: calls in flight (each holding a
//! concurrency permit), calls waiting for one, calls a caller may still
//! cancel, and the idle clock they keep. [`Work`] is the runner's part
//! that counts them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::counters::Counters;
use crate::stream_hub::StreamHub;

/// Counts a call as in flight while alive, holding its permit; both are
/// given back when the call's task is aborted (cancelled by its caller).
pub(super) struct InFlight {
    work: Arc<Work>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.work.end();
    }
}

/// Counts a call waiting for a permit.
pub(super) struct Queued<'a>(&'a Work);

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

/// The runner's work under way and its idle clock: calls in flight (each
/// holding one of its permits), calls waiting for one, and when it last
/// started or finished work.
pub(super) struct Work {
    /// The runner's counters (in flight, most in flight).
    counters: Arc<Counters>,
    /// When the runner started: the clock its idle time (and its parent's
    /// last word) is measured on.
    pub(super) started: Instant,
    /// When the runner last started or finished work, in milliseconds since
    /// `started` (an atomic: this is touched twice per call).
    last_active_ms: AtomicU64,
    /// Set while stopping; only then do finished calls wake the drain.
    draining: AtomicBool,
    /// Woken when in-flight work finishes during the drain.
    work_done: Notify,
    /// One permit per concurrent call: the runner itself never runs more
    /// than `max_concurrency` calls, whatever its parents believe (in a
    /// shared pool, parents place calls without seeing each other's).
    pub(super) permits: Arc<Semaphore>,
    /// Calls waiting for a permit.
    pub(super) queued: AtomicUsize,
    /// The runner's streams: an open one is not idleness.
    streams: Arc<StreamHub>,
}

impl Work {
    /// No work yet; `max_concurrency` permits.
    pub(super) fn new(
        counters: Arc<Counters>,
        streams: Arc<StreamHub>,
        max_concurrency: usize,
    ) -> Work {
        Work {
            counters,
            started: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            work_done: Notify::new(),
            permits: Arc::new(Semaphore::new(max_concurrency.max(1))),
            queued: AtomicUsize::new(0),
            streams,
        }
    }

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

    /// Counts a call waiting for a permit, until the guard is dropped.
    pub(super) fn queue(&self) -> Queued<'_> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        Queued(self)
    }

    pub(super) fn begin(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> InFlight {
        let now = self.counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // (No touch: a runner with work in flight is not idle, see
        // `idle_for`; the end of the work touches.)
        InFlight {
            work: self.clone(),
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

    /// From now on, finished calls wake [`Work::done`].
    pub(super) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Resolves when in-flight work finishes during the drain.
    pub(super) fn done(&self) -> Notified<'_> {
        self.work_done.notified()
    }
}
