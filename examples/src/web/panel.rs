//! The runners panel: what the page is told about the pool's runners.
//!
//! The page only ever sees [`RunnerEvent`]s, named like the pool events
//! flame may publish later on `flame.<pool>.events.<kind>`
//! (`runner_booting`, `runner_ready`, `runner_busy`, `runner_idle`,
//! `runner_draining`, `runner_gone`). Today they are derived from what the
//! library offers: the pool's grow and shrink hooks (which wake the
//! watcher at once) and [`flame::Pool::runners`] (state and load of each
//! runner), read on every hook and a few times a second for load changes.
//! Switching to the event subject means replacing [`runner_events`] alone:
//! subscribe to `flame.<pool>.events.>` and map each JSON message to a
//! [`RunnerEvent`]. The pool's counts (uploads waiting for a runner among
//! them) come from [`flame::Pool::status`] ([`status_changes`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use flame::{PoolEvent, RunnerState};
use futures::Stream;
use serde::Serialize;
use tokio::sync::mpsc;

/// How often the watcher reads the runners' loads between hooks.
const POLL: Duration = Duration::from_millis(200);

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
    /// A boot failed (no runner id: the hook does not say which).
    BootFailed,
}

/// One change of one runner, as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RunnerEvent {
    /// What happened.
    pub(crate) kind: Kind,
    /// The runner's id (empty for [`Kind::BootFailed`]).
    pub(crate) runner: String,
    /// Calls running there now (this parent's in a private pool; every
    /// parent's in a shared one).
    pub(crate) load: usize,
    /// Why it left, or why a boot failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// What a pool hook tells the watcher.
#[derive(Debug)]
pub(crate) enum Signal {
    /// Something changed: read the runners now.
    Changed,
    /// A runner left, for this reason.
    Shrunk(String),
    /// A boot failed, for this reason.
    BootFailed(String),
}

/// Installs the hooks that wake the watcher; `signals` goes to
/// [`runner_events`].
pub(crate) fn with_hooks(
    builder: flame::PoolBuilder,
    signals: mpsc::UnboundedSender<Signal>,
) -> flame::PoolBuilder {
    let (start, end, shrink) = (signals.clone(), signals.clone(), signals);
    builder
        .on_grow_start(move |_| {
            let _ = start.send(Signal::Changed);
        })
        .on_grow_end(move |e| {
            let signal = match e {
                PoolEvent::GrowEnd { result: Err(e), .. } => Signal::BootFailed(e.to_string()),
                _ => Signal::Changed,
            };
            let _ = end.send(signal);
        })
        .on_shrink(move |e| {
            let reason = match e {
                PoolEvent::Shrink { reason, .. } => reason.clone(),
                _ => String::new(),
            };
            let _ = shrink.send(Signal::Shrunk(reason));
        })
}

/// The pool's runner events, as they happen: the one source of the panel.
/// Ends when the hooks are gone (the pool was dropped).
pub(crate) fn runner_events(
    pool: flame::Pool,
    signals: mpsc::UnboundedReceiver<Signal>,
) -> impl Stream<Item = RunnerEvent> + Send + 'static {
    let state = (pool, signals, Diff::default(), Vec::<RunnerEvent>::new());
    futures::stream::unfold(
        state,
        |(pool, mut signals, mut diff, mut queue)| async move {
            loop {
                if !queue.is_empty() {
                    let event = queue.remove(0);
                    return Some((event, (pool, signals, diff, queue)));
                }
                match tokio::time::timeout(POLL, signals.recv()).await {
                    Ok(None) => return None,
                    Ok(Some(Signal::Shrunk(reason))) => diff.reason = Some(reason),
                    Ok(Some(Signal::BootFailed(reason))) => queue.push(RunnerEvent {
                        kind: Kind::BootFailed,
                        runner: String::new(),
                        load: 0,
                        reason: Some(reason),
                    }),
                    Ok(Some(Signal::Changed)) | Err(_) => {}
                }
                let now: Vec<(String, RunnerState, usize)> = pool
                    .runners()
                    .into_iter()
                    .map(|r| (r.id, r.state, r.load))
                    .collect();
                queue.extend(diff.update(now));
            }
        },
    )
}

/// The pool's counts, as [`flame::Pool::status`] gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct StatusView {
    /// Runners booting.
    pub(crate) booting: usize,
    /// Runners taking calls.
    pub(crate) ready: usize,
    /// Runners stopping.
    pub(crate) draining: usize,
    /// Uploads waiting for a runner (the pool is at its max, all busy).
    pub(crate) waiting: usize,
}

/// The pool's counts each time they change (read a few times a second).
pub(crate) fn status_changes(pool: flame::Pool) -> impl Stream<Item = StatusView> + Send + 'static {
    futures::stream::unfold((pool, None), |(pool, last)| async move {
        loop {
            let s = pool.status();
            let now = StatusView {
                booting: s.booting,
                ready: s.ready,
                draining: s.draining,
                waiting: s.waiting,
            };
            if last != Some(now) {
                return Some((now, (pool, Some(now))));
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// The runners as last seen, to turn snapshots into changes.
#[derive(Debug, Default)]
struct Diff {
    seen: BTreeMap<String, (RunnerState, usize)>,
    /// The reason of the last shrink, for the next runner seen gone.
    reason: Option<String>,
}

impl Diff {
    fn update(&mut self, now: Vec<(String, RunnerState, usize)>) -> Vec<RunnerEvent> {
        let mut events = Vec::new();
        let event = |kind, runner: &str, load| RunnerEvent {
            kind,
            runner: runner.to_string(),
            load,
            reason: None,
        };
        for (id, state, load) in &now {
            let before = self.seen.get(id).copied();
            let kind = match (before, state) {
                (Some((RunnerState::Draining, _)), _) => None,
                (_, RunnerState::Draining) => Some(Kind::RunnerDraining),
                (None, RunnerState::Booting) => Some(Kind::RunnerBooting),
                (Some((RunnerState::Booting, _)), RunnerState::Booting) => None,
                (Some((RunnerState::Ready, before)), RunnerState::Ready) if before == *load => None,
                (Some((RunnerState::Ready, _)), RunnerState::Ready) if *load == 0 => {
                    Some(Kind::RunnerIdle)
                }
                (_, RunnerState::Ready) if *load > 0 => {
                    if !matches!(before, Some((RunnerState::Ready, _))) {
                        events.push(event(Kind::RunnerReady, id, 0));
                    }
                    Some(Kind::RunnerBusy)
                }
                (_, RunnerState::Ready) => Some(Kind::RunnerReady),
                // A state this demo does not know (the enum may grow).
                _ => None,
            };
            if let Some(kind) = kind {
                events.push(event(kind, id, *load));
            }
        }
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|id| !now.iter().any(|(n, _, _)| n == *id))
            .cloned()
            .collect();
        for id in gone {
            self.seen.remove(&id);
            events.push(RunnerEvent {
                reason: Some(self.reason.take().unwrap_or_else(|| "left the pool".into())),
                ..event(Kind::RunnerGone, &id, 0)
            });
        }
        for (id, state, load) in now {
            self.seen.insert(id, (state, load));
        }
        events
    }
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
            Kind::BootFailed => {}
            Kind::RunnerGone => {
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

    fn kinds(events: &[RunnerEvent]) -> Vec<(Kind, usize)> {
        events.iter().map(|e| (e.kind, e.load)).collect()
    }

    #[test]
    fn a_runner_boots_works_idles_and_leaves() {
        let mut d = Diff::default();
        let r = |s, l| vec![("a".to_string(), s, l)];
        assert_eq!(
            kinds(&d.update(r(RunnerState::Booting, 0))),
            [(Kind::RunnerBooting, 0)]
        );
        assert_eq!(
            kinds(&d.update(r(RunnerState::Ready, 1))),
            [(Kind::RunnerReady, 0), (Kind::RunnerBusy, 1)]
        );
        assert!(d.update(r(RunnerState::Ready, 1)).is_empty());
        assert_eq!(
            kinds(&d.update(r(RunnerState::Ready, 2))),
            [(Kind::RunnerBusy, 2)]
        );
        assert_eq!(
            kinds(&d.update(r(RunnerState::Ready, 0))),
            [(Kind::RunnerIdle, 0)]
        );
        assert_eq!(
            kinds(&d.update(r(RunnerState::Draining, 0))),
            [(Kind::RunnerDraining, 0)]
        );
        assert!(d.update(r(RunnerState::Draining, 0)).is_empty());
        d.reason = Some("idle".into());
        let gone = d.update(vec![]);
        assert_eq!(kinds(&gone), [(Kind::RunnerGone, 0)]);
        assert_eq!(gone[0].reason.as_deref(), Some("idle"));
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
