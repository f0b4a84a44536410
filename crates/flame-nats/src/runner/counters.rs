//! The runner's counters ([`Counters`]), and how `nats micro stats` shows
//! them (the endpoint's data).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counters kept on the runner, shown by `nats micro stats` as endpoint data.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) in_flight: AtomicUsize,
    pub(super) max_in_flight: AtomicUsize,
    pub(super) casts_failed: AtomicU64,
    /// Calls answered (alone or in batches), and those answered with an
    /// error: the micro service's own counts miss batched calls.
    pub(super) calls: AtomicU64,
    pub(super) errors: AtomicU64,
    /// Calls and cancellations refused as not signed with the pool's key
    /// (or replayed).
    pub(super) unauthenticated: AtomicU64,
}

impl Counters {
    /// The endpoint data of the runner's micro service.
    pub(super) fn stats(&self, max_concurrency: usize) -> serde_json::Value {
        serde_json::json!({
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "max_in_flight": self.max_in_flight.load(Ordering::Relaxed),
            "max_concurrency": max_concurrency,
            "casts_failed": self.casts_failed.load(Ordering::Relaxed),
            "calls": self.calls.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "unauthenticated": self.unauthenticated.load(Ordering::Relaxed),
        })
    }
}
