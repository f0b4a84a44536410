//! What a shared pool keeps in its JetStream KV bucket (JSON values, so that
//! `nats kv get` shows them legibly).

use serde::{Deserialize, Serialize};

/// Where a runner is in its life, as its lease says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Asked of the backend; not yet serving.
    Booting,
    /// Serving calls.
    Ready,
    /// Finishing its work before it exits; takes no new calls.
    Draining,
}

/// A runner's lease (`runners.<id>`). Written by the scaler when it boots the
/// runner, then renewed by the runner every heartbeat. A lease that stops
/// changing belongs to a dead runner; the scaler removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerLease {
    /// The runner's id.
    pub runner: String,
    /// The pool.
    pub pool: String,
    /// Lifecycle state.
    pub state: LeaseState,
    /// Build id of the runner (empty until it runs).
    pub build: String,
    /// Calls it runs at once (`max_concurrency`).
    pub capacity: usize,
    /// Calls running now.
    pub load: usize,
    /// Calls waiting on the runner for a free slot.
    pub queued: usize,
    /// How long it has had no work, in milliseconds (0 while busy, or while
    /// the pool's idle check says to stay up).
    pub idle_ms: u64,
    /// The backend's handle (e.g. `pid 4242`, a machine id); empty until the
    /// backend started it.
    pub handle: String,
    /// Parent whose scaler booted it.
    pub booted_by: String,
    /// Counts renewals; changes every heartbeat while the runner lives.
    pub beat: u64,
}

/// A parent's lease (`parents.<id>`), renewed every heartbeat and whenever its
/// number of waiting callers changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLease {
    /// The parent's id.
    pub parent: String,
    /// Its callers waiting for a slot.
    pub waiting: usize,
    /// Counts renewals.
    pub beat: u64,
}

/// Who the scaler is (`scaler`), renewed by it every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalerLease {
    /// The scaler's parent id.
    pub parent: String,
    /// Counts renewals.
    pub beat: u64,
}

/// Runner ids counted against `max` (`slots`). Changed only by
/// compare-and-set, so racing scalers can never boot past `max`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    /// The ids.
    pub runners: Vec<String>,
}
