//! The runners panel: what the page is told about the pool's runners.
//!
//! It follows the pool's events on NATS (`flame.<pool>.events.>`, the
//! subject `flame watch` reads): a private pool's parent publishes them, a
//! shared pool's scaler does for every parent, so each parent's page shows
//! the whole pool. Nothing here polls. Each event becomes a
//! [`RunnerEvent`] for the page (`runner_booting`, `runner_ready`,
//! `runner_busy`, `runner_idle`, `runner_draining`, `runner_gone`,
//! `boot_failed`).
//!
//! A runner's load comes with its events (`runner_load`): `runner_busy`
//! again whenever a busy runner's load changes, counting every parent's
//! uploads in a shared pool.

use std::collections::BTreeMap;
use std::sync::Mutex;

use flame::ops::{events_wildcard, EventKind, PoolEventMessage};
use futures::{Stream, StreamExt};
use serde::Serialize;

/// What happened to one runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// Asked of the backend, not ready yet.
    RunnerBooting,
    /// Ready and idle.
    RunnerReady,
    /// Running calls (`load` of them).
    RunnerBusy,
    /// Ready, no calls: it idles down after the pool's idle time.
    RunnerIdle,
    /// Stopping: takes no new calls.
    RunnerDraining,
    /// Left the pool.
    RunnerGone,
    /// A boot failed.
    BootFailed,
}

/// One change of one runner, as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RunnerEvent {
    /// What happened.
    pub(crate) kind: Kind,
    /// The runner's id.
    pub(crate) runner: String,
    /// Uploads running or waiting there now (every parent's in a shared
    /// pool).
    pub(crate) load: usize,
    /// Why it left, or why a boot failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// The pool event `message` as the page shows it; `None` for events that
/// are not about one runner (`scaler_elected`, `limits_changed`) and kinds
/// this demo does not know.
pub(crate) fn runner_event(message: &PoolEventMessage) -> Option<RunnerEvent> {
    let kind = match message.kind()? {
        EventKind::RunnerBooting => Kind::RunnerBooting,
        EventKind::RunnerReady => Kind::RunnerReady,
        EventKind::RunnerBusy => Kind::RunnerBusy,
        EventKind::RunnerIdle => Kind::RunnerIdle,
        EventKind::RunnerRetiring => Kind::RunnerDraining,
        EventKind::RunnerGone => Kind::RunnerGone,
        EventKind::RunnerBootFailed => Kind::BootFailed,
        _ => return None,
    };
    // The words when there are some ("runner process exited with code
    // 0"), else the reason's name ("idle").
    let reason = message
        .detail
        .clone()
        .or_else(|| message.reason.map(|r| r.as_str().to_string()));
    Some(RunnerEvent {
        kind,
        runner: message.runner.clone().unwrap_or_default(),
        // At least 1 when busy, should a publisher not say how busy.
        load: match kind {
            Kind::RunnerBusy => message.runner_load.unwrap_or(1).max(1),
            _ => 0,
        },
        reason,
    })
}

/// The pool's events, as they happen: the one source of the panel. The
/// subscription is made (and the server has it) when this returns, so
/// that no event of a later upload is missed.
pub(crate) async fn pool_events(
    client: &async_nats::Client,
    pool: &str,
) -> anyhow::Result<impl Stream<Item = PoolEventMessage> + Send + 'static> {
    let subscription = client.subscribe(events_wildcard(pool)).await?;
    client.flush().await?;
    Ok(subscription.filter_map(|message| async move {
        match serde_json::from_slice::<PoolEventMessage>(&message.payload) {
            Ok(event) => Some(event),
            Err(e) => {
                tracing::warn!(subject = %message.subject, "not a pool event: {e}");
                None
            }
        }
    }))
}

/// The runners already in the pool when the page's source starts (a
/// parent joining a shared pool late), as events. Their load is this
/// parent's until their next event says every parent's.
pub(crate) fn present(pool: &flame::Pool) -> Vec<RunnerEvent> {
    pool.runners()
        .into_iter()
        .map(|r| RunnerEvent {
            kind: match r.state {
                flame::RunnerState::Booting => Kind::RunnerBooting,
                flame::RunnerState::Draining => Kind::RunnerDraining,
                _ if r.load > 0 => Kind::RunnerBusy,
                _ => Kind::RunnerIdle,
            },
            runner: r.id,
            load: r.load,
            reason: None,
        })
        .collect()
}

/// The pool's counts the page shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct StatusView {
    /// This parent's uploads waiting for a runner (booting, or the pool at
    /// its max with every runner busy).
    pub(crate) waiting: usize,
}

/// The runners as the page should see them now: the last event of each
/// runner still in the pool, and the pool's counts, replayed to a page
/// that connects.
#[derive(Debug, Default)]
pub(crate) struct Panel {
    runners: Mutex<BTreeMap<String, RunnerEvent>>,
    status: Mutex<Option<StatusView>>,
}

impl Panel {
    /// Records the pool's counts.
    pub(crate) fn set_status(&self, status: StatusView) {
        *self.status.lock().unwrap() = Some(status);
    }

    /// The pool's counts, as last recorded.
    pub(crate) fn status(&self) -> Option<StatusView> {
        *self.status.lock().unwrap()
    }

    /// Records an event.
    pub(crate) fn apply(&self, event: &RunnerEvent) {
        let mut runners = self.runners.lock().unwrap();
        match event.kind {
            Kind::BootFailed | Kind::RunnerGone => {
                runners.remove(&event.runner);
            }
            _ => {
                runners.insert(event.runner.clone(), event.clone());
            }
        }
    }

    /// The last event of each runner in the pool.
    pub(crate) fn snapshot(&self) -> Vec<RunnerEvent> {
        self.runners.lock().unwrap().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: serde_json::Value) -> PoolEventMessage {
        let mut event = serde_json::json!({
            "id": "e1", "time": "2026-11-22T08:00:00.000Z", "pool": "thumbs",
            "parent": "p", "build": "b", "runners": 1, "ready": 1, "load": 0, "waiting": 0,
        });
        event
            .as_object_mut()
            .unwrap()
            .extend(json.as_object().unwrap().clone());
        serde_json::from_value(event).unwrap()
    }

    #[test]
    fn pool_events_become_the_panels_runner_events() {
        let kind = |t: &str| {
            runner_event(&message(serde_json::json!({
                "type": format!("io.flame.pool.v1.{t}"), "runner": "r1",
            })))
            .map(|e| (e.kind, e.load))
        };
        assert_eq!(kind("runner_booting"), Some((Kind::RunnerBooting, 0)));
        assert_eq!(kind("runner_ready"), Some((Kind::RunnerReady, 0)));
        assert_eq!(kind("runner_busy"), Some((Kind::RunnerBusy, 1)));
        let busy = runner_event(&message(serde_json::json!({
            "type": "io.flame.pool.v1.runner_busy", "runner": "r1", "runner_load": 3,
        })))
        .unwrap();
        assert_eq!((busy.kind, busy.load), (Kind::RunnerBusy, 3));
        assert_eq!(kind("runner_idle"), Some((Kind::RunnerIdle, 0)));
        assert_eq!(kind("runner_retiring"), Some((Kind::RunnerDraining, 0)));
        assert_eq!(kind("scaler_elected"), None);
        assert_eq!(kind("runner_from_the_future"), None);
        let gone = runner_event(&message(serde_json::json!({
            "type": "io.flame.pool.v1.runner_gone", "runner": "r1",
            "reason": "idle", "detail": "runner process exited with code 0",
        })))
        .unwrap();
        assert_eq!(gone.kind, Kind::RunnerGone);
        assert_eq!(gone.runner, "r1");
        assert_eq!(
            gone.reason.as_deref(),
            Some("runner process exited with code 0")
        );
        let retiring = runner_event(&message(serde_json::json!({
            "type": "io.flame.pool.v1.runner_retiring", "runner": "r1", "reason": "idle",
        })))
        .unwrap();
        assert_eq!(retiring.reason.as_deref(), Some("idle"));
    }

    #[test]
    fn the_panel_keeps_the_last_event_of_runners_still_there() {
        let panel = Panel::default();
        let ev = |kind, runner: &str| RunnerEvent {
            kind,
            runner: runner.into(),
            load: 0,
            reason: None,
        };
        panel.apply(&ev(Kind::RunnerBooting, "a"));
        panel.apply(&ev(Kind::RunnerBooting, "b"));
        panel.apply(&ev(Kind::RunnerReady, "a"));
        panel.apply(&ev(Kind::RunnerGone, "b"));
        assert_eq!(panel.snapshot(), [ev(Kind::RunnerReady, "a")]);
    }
}
