//! Publishing pool events (`flame.<pool>.events.<kind>`) for operators.
//!
//! A change of pool state is handed to one task per parent through an
//! unbounded channel: the code that notices it (often with the pool's lock
//! held, sometimes on a call's path) only takes the time and sends a small
//! value. The task stamps an id, encodes the JSON and publishes it
//! fire-and-forget, one message per event, in the order they were sent.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;

use crate::protocol::pool_events::{
    event_subject, format_time, EventKind, PoolEventMessage, Reason,
};

/// The pool's numbers after a change, as the publishing parent sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Booting, ready or draining.
    pub(crate) runners: usize,
    /// Ready.
    pub(crate) ready: usize,
    /// Calls running.
    pub(crate) load: usize,
    /// Callers waiting for a slot.
    pub(crate) waiting: usize,
}

/// One event on its way to the publishing task.
#[derive(Debug)]
pub(crate) struct Outgoing {
    kind: EventKind,
    at: SystemTime,
    counts: Counts,
    runner: Option<Arc<str>>,
    runner_load: Option<usize>,
    reason: Option<Reason>,
    detail: Option<String>,
    limits: Option<(usize, usize)>,
}

impl Outgoing {
    /// An event of `kind`, happening now.
    pub(crate) fn new(kind: EventKind, counts: Counts) -> Outgoing {
        Outgoing {
            kind,
            at: SystemTime::now(),
            counts,
            runner: None,
            runner_load: None,
            reason: None,
            detail: None,
            limits: None,
        }
    }

    /// About this runner.
    pub(crate) fn runner(mut self, id: impl Into<Arc<str>>) -> Outgoing {
        self.runner = Some(id.into());
        self
    }

    /// With this runner's load (`runner_busy`, `runner_idle`).
    pub(crate) fn runner_load(mut self, load: usize) -> Outgoing {
        self.runner_load = Some(load);
        self
    }

    /// For this reason.
    pub(crate) fn reason(mut self, reason: Reason) -> Outgoing {
        self.reason = Some(reason);
        self
    }

    /// In these words.
    pub(crate) fn detail(mut self, detail: impl Into<String>) -> Outgoing {
        self.detail = Some(detail.into());
        self
    }

    /// New limits.
    pub(crate) fn limits(mut self, min: usize, max: usize) -> Outgoing {
        self.limits = Some((min, max));
        self
    }
}

/// A parent's event publisher: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub(crate) struct Announcer {
    tx: mpsc::UnboundedSender<(Arc<str>, Outgoing)>,
}

impl Announcer {
    /// Starts the publishing task of a parent (it ends once every
    /// announcer is dropped).
    pub(crate) fn start(
        client: async_nats::Client,
        parent: Arc<str>,
        build: Arc<str>,
    ) -> Announcer {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Arc<str>, Outgoing)>();
        tokio::spawn(async move {
            while let Some((pool, out)) = rx.recv().await {
                let message = PoolEventMessage {
                    event_type: out.kind.event_type(),
                    id: uuid::Uuid::new_v4().simple().to_string(),
                    time: format_time(out.at),
                    pool: pool.to_string(),
                    runner: out.runner.map(|r| r.to_string()),
                    parent: parent.to_string(),
                    build: build.to_string(),
                    runners: out.counts.runners,
                    ready: out.counts.ready,
                    load: out.counts.load,
                    waiting: out.counts.waiting,
                    runner_load: out.runner_load,
                    reason: out.reason,
                    detail: out.detail,
                    min: out.limits.map(|l| l.0),
                    max: out.limits.map(|l| l.1),
                };
                let Ok(body) = serde_json::to_vec(&message) else {
                    continue;
                };
                let subject = event_subject(&pool, out.kind);
                if let Err(e) = client.publish(subject, body.into()).await {
                    tracing::debug!("cannot publish a pool event: {e}");
                }
            }
        });
        Announcer { tx }
    }

    /// The publisher of one pool.
    pub(crate) fn for_pool(&self, pool: &str) -> PoolAnnouncer {
        PoolAnnouncer {
            pool: Arc::from(pool),
            tx: self.tx.clone(),
        }
    }
}

/// Publishes the events of one pool.
#[derive(Debug, Clone)]
pub(crate) struct PoolAnnouncer {
    pool: Arc<str>,
    tx: mpsc::UnboundedSender<(Arc<str>, Outgoing)>,
}

impl PoolAnnouncer {
    /// Publishes `event`, without waiting.
    pub(crate) fn send(&self, event: Outgoing) {
        // Closed only when the parent is gone: nobody to tell then.
        let _ = self.tx.send((self.pool.clone(), event));
    }
}
