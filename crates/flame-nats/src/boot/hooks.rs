//! Callbacks a pool runs when it grows or shrinks, e.g. to log or to count
//! boots in metrics.

use std::fmt;
use std::sync::Arc;

use flame_core::Error;

/// What a pool hook is told: the pool started growing (a boot), a boot
/// ended, or a runner left. (Not the pool events published on NATS for
/// operators: those are `flame::ops::PoolEventMessage`.)
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PoolChange {
    /// The pool asked its backend for a new runner.
    GrowStart {
        /// The pool.
        pool: String,
        /// Runners booted or booting, the new one included.
        runners: usize,
    },
    /// A boot finished: the runner is ready, or it failed (the pool retries
    /// after a short pause while callers still wait).
    GrowEnd {
        /// The pool.
        pool: String,
        /// Runners booted or booting afterwards.
        runners: usize,
        /// `Ok` when the runner is ready, else why the boot failed.
        result: Result<(), Error>,
    },
    /// A ready runner left the pool: it idled down, was retired, or died.
    Shrink {
        /// The pool.
        pool: String,
        /// Runners booted or booting afterwards.
        runners: usize,
        /// Why it left, in words.
        reason: String,
    },
}

impl PoolChange {
    /// The pool the event is about.
    pub fn pool(&self) -> &str {
        match self {
            PoolChange::GrowStart { pool, .. }
            | PoolChange::GrowEnd { pool, .. }
            | PoolChange::Shrink { pool, .. } => pool,
        }
    }

    /// Runners booted or booting after the event.
    pub fn runners(&self) -> usize {
        match self {
            PoolChange::GrowStart { runners, .. }
            | PoolChange::GrowEnd { runners, .. }
            | PoolChange::Shrink { runners, .. } => *runners,
        }
    }
}

/// A hook. It runs on the pool's own tasks, so it should return quickly
/// (spawn a task for slow work).
pub(crate) type Hook = Arc<dyn Fn(&PoolChange) + Send + Sync>;

/// The hooks of one pool.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    /// Runs on [`PoolChange::GrowStart`].
    pub(crate) on_grow_start: Option<Hook>,
    /// Runs on [`PoolChange::GrowEnd`].
    pub(crate) on_grow_end: Option<Hook>,
    /// Runs on [`PoolChange::Shrink`].
    pub(crate) on_shrink: Option<Hook>,
}

impl Hooks {
    /// Runs the hook for this event, if one is set.
    pub(crate) fn fire(&self, event: PoolChange) {
        let hook = match &event {
            PoolChange::GrowStart { .. } => &self.on_grow_start,
            PoolChange::GrowEnd { .. } => &self.on_grow_end,
            PoolChange::Shrink { .. } => &self.on_shrink,
        };
        if let Some(hook) = hook {
            hook(&event);
        }
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("on_grow_start", &self.on_grow_start.is_some())
            .field("on_grow_end", &self.on_grow_end.is_some())
            .field("on_shrink", &self.on_shrink.is_some())
            .finish()
    }
}
