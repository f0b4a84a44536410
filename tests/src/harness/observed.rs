//! What tests watch pools say: the grow and shrink hooks (`HookLog`) and
//! the pool events published on NATS (`EventLog`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{round_trip, TestEnv};
use flame::{PoolBuilder, PoolChange};

/// Records what a pool's hooks are told.
#[derive(Debug, Clone, Default)]
pub struct HookLog(Arc<Mutex<Vec<PoolChange>>>);

impl HookLog {
    /// Installs itself as all three hooks of a pool.
    pub fn attach(&self, pool: PoolBuilder) -> PoolBuilder {
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        pool.on_grow_start(move |e| a.0.lock().unwrap().push(e.clone()))
            .on_grow_end(move |e| b.0.lock().unwrap().push(e.clone()))
            .on_shrink(move |e| c.0.lock().unwrap().push(e.clone()))
    }

    /// Everything so far.
    pub fn events(&self) -> Vec<PoolChange> {
        self.0.lock().unwrap().clone()
    }

    /// How many grow starts so far.
    pub fn grow_starts(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, PoolChange::GrowStart { .. }))
            .count()
    }
}

/// Every pool event published on `flame.<pool>.events.>` (`*` for every
/// pool) since it was made, read by a plain NATS subscription.
pub struct EventLog {
    events: Arc<Mutex<Vec<(String, flame::ops::PoolEventMessage)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventLog {
    /// Subscribes (and flushes, so nothing published after this returns
    /// is missed).
    pub async fn subscribe(env: &TestEnv, pool: &str) -> EventLog {
        use futures::StreamExt;
        let client = env.client().await;
        let mut sub = client
            .subscribe(flame::ops::events_wildcard(pool))
            .await
            .expect("subscribe to pool events");
        round_trip(&client).await;
        let events: Arc<Mutex<Vec<_>>> = Arc::default();
        let log = events.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                let event: flame::ops::PoolEventMessage = serde_json::from_slice(&msg.payload)
                    .unwrap_or_else(|e| {
                        panic!(
                            "not a pool event on {}: {e}: {}",
                            msg.subject,
                            String::from_utf8_lossy(&msg.payload)
                        )
                    });
                log.lock().unwrap().push((msg.subject.to_string(), event));
            }
        });
        EventLog { events, task }
    }

    /// Everything so far, in order of arrival.
    pub fn all(&self) -> Vec<flame::ops::PoolEventMessage> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Events of `kind` so far, checking each came on its kind's subject.
    pub fn of(&self, kind: flame::ops::EventKind) -> Vec<flame::ops::PoolEventMessage> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.kind() == Some(kind))
            .inspect(|(subject, e)| {
                assert_eq!(*subject, flame::ops::event_subject(&e.pool, kind));
            })
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Waits (at most `limit`) for an event of `kind` that `matches`.
    pub async fn wait(
        &self,
        kind: flame::ops::EventKind,
        limit: Duration,
        matches: impl Fn(&flame::ops::PoolEventMessage) -> bool,
    ) -> flame::ops::PoolEventMessage {
        let found = tokio::time::timeout(limit, async {
            loop {
                if let Some(e) = self.of(kind).into_iter().find(|e| matches(e)) {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "timed out after {limit:?} waiting for a {} event; seen: {:?}",
                kind.as_str(),
                self.kinds()
            )
        })
    }

    /// The kinds seen so far, with their runner and reason, for messages.
    pub fn kinds(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|e| {
                let kind = e.event_type.rsplit('.').next().unwrap_or("?");
                let runner = e.runner.as_deref().map_or("", |r| &r[..8.min(r.len())]);
                match e.reason {
                    Some(reason) => format!("{kind} {runner} {}", reason.as_str()),
                    None => format!("{kind} {runner}"),
                }
            })
            .collect()
    }
}
