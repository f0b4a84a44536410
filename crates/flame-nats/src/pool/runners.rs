//! The runners of a pool as the parent sees them: booting, ready, gone,
//! heartbeats, limits, and closing the pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flame_core::backend::StopRunner;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::link::RunnerLink;
use super::model::{RunnerId, RunnerState};
use super::{PoolInner, State};
use crate::announce::Outgoing;
use crate::protocol::pool_events::{gone_reason, EventKind, Reason};
use crate::protocol::reports::{ReplayWindow, ReportKey};
use crate::protocol::sign::CallKey;

pub(super) type Stopper = Box<dyn StopRunner>;

/// What the parent keeps about one runner.
pub(super) struct RunnerEntry {
    pub(super) link: Arc<RunnerLink>,
    /// Told when the runner reports ready (private pools).
    ready: Option<oneshot::Sender<()>>,
    pub(super) stopper: Option<Stopper>,
    /// The backend's handle, once it started the runner.
    pub(super) handle: Option<String>,
    /// When the runner last pinged (or reported ready); later than now
    /// while it is given time to reconnect.
    last_heard: Instant,
    /// The key the runner signs its events with (private pools).
    pub(super) key: Option<ReportKey>,
    /// Sequence numbers of its events accepted so far.
    pub(super) replays: ReplayWindow,
    /// Sequence number of its last batch of log lines.
    pub(super) log_seq: u64,
    /// Outages of its NATS connection its lease reported last (shared
    /// pools).
    pub(super) outages_seen: Option<u64>,
    /// Why it drains, when this parent decided it (private pools): its
    /// `runner_retiring` was published then, and its `runner_gone` says it.
    pub(super) drain_cause: Option<Reason>,
    /// The load the last of its events told, while they say busy
    /// (private pools); `None` while idle.
    pub(super) announced_load: Option<usize>,
    /// Since when it has had no call, while announced busy.
    pub(super) idle_since: Option<Instant>,
}

impl RunnerEntry {
    /// A runner being booted; `ready` is told when it reports ready.
    pub(super) fn new(
        pool: &str,
        id: &RunnerId,
        ready: Option<oneshot::Sender<()>>,
        key: Option<ReportKey>,
        call_key: Option<CallKey>,
    ) -> RunnerEntry {
        RunnerEntry {
            link: Arc::new(RunnerLink::new(pool, id, call_key)),
            ready,
            stopper: None,
            handle: None,
            last_heard: Instant::now(),
            key,
            replays: ReplayWindow::default(),
            log_seq: 0,
            outages_seen: None,
            drain_cause: None,
            announced_load: None,
            idle_since: None,
        }
    }

    /// The runner was heard from.
    pub(super) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// The runner reported ready: wakes its boot.
    pub(super) fn ready(&mut self) {
        self.heard();
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(());
        }
    }

    /// Gives up waiting for it to be ready (its boot then fails).
    pub(super) fn refuse_ready(&mut self) {
        self.ready.take();
    }
}

impl std::fmt::Debug for RunnerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerEntry")
            .field("link", &self.link)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl State {
    /// True when no runner is ready or booting: nobody could serve a
    /// caller waiting for a runner.
    pub(super) fn no_runner_coming(&self) -> bool {
        self.model.count(RunnerState::Ready) == 0 && self.model.count(RunnerState::Booting) == 0
    }

    /// Takes every caller waiting for a runner off the queue. Dropping what
    /// this returns (after the lock is released) wakes them; they find the
    /// reason in `last_boot_error`.
    pub(super) fn fail_waiters(&mut self) -> Vec<oneshot::Sender<super::slot::Slot>> {
        let ids: Vec<_> = self.waiters.keys().copied().collect();
        for id in ids {
            self.model.cancel(id);
        }
        self.waiters.drain().map(|(_, tx)| tx).collect()
    }

    /// The runner said it is stopping: place nothing new on it, and give
    /// its last replies a moment when its exit is seen.
    pub(super) fn stopping(&mut self, id: &RunnerId) {
        self.model.drain(id);
        if let Some(entry) = self.runners.get(id) {
            entry.link.stopping.store(true, Ordering::SeqCst);
        }
    }
}

impl PoolInner {
    /// A runner is gone (its process exited): calls on it fail now, and the
    /// model may boot a replacement.
    pub(super) fn runner_gone(self: &Arc<Self>, id: &RunnerId, reason: String) {
        let (entry, state, runners) = {
            let mut st = self.state.lock().unwrap();
            let served = st.served(id);
            if served {
                self.settle_idle(&mut st, id);
            }
            let state = st.model.remove(id);
            let entry = st.runners.remove(id);
            if state == Some(RunnerState::Ready) {
                info!(pool = %self.config.name, runner = %id, "runner gone: {reason}");
            }
            if served {
                let cause = entry.as_ref().and_then(|e| e.drain_cause);
                let why = gone_reason(&reason, cause.or(Some(self.own_stop_reason())));
                self.announce(&st, |c| {
                    Outgoing::new(EventKind::RunnerGone, c)
                        .runner(id.clone())
                        .reason(why)
                        .detail(reason.clone())
                });
            }
            let runners = st.model.len();
            // A private pool's runner that ends while booting is a failed
            // boot, which its boot task reports and paces (booting again
            // here would boot twice for one slot).
            if state != Some(RunnerState::Booting) || self.fleet.is_some() {
                self.boot_locked(&mut st);
            }
            (entry, state, runners)
        };
        if let Some(entry) = entry {
            entry.link.fail(&self.parent.replies, reason.clone());
        }
        if matches!(state, Some(RunnerState::Ready | RunnerState::Draining)) {
            self.booter.shrink(runners, reason);
        }
    }

    /// Counts a runner as down when it has not pinged for two heartbeat
    /// intervals: the fallback for backends that cannot see a runner exit
    /// (a remote machine). Such a runner is also stopped, in case it is only
    /// cut off. Silence counts only while this parent is connected: pings
    /// cannot reach a parent that is not, and after a reconnect every
    /// runner's clock starts again.
    pub(super) async fn watch_heartbeats(self: Arc<Self>) {
        let heartbeat = self.config.heartbeat;
        let limit = heartbeat * 2;
        let mut tick = tokio::time::interval(heartbeat / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut disconnects = self.parent.events.disconnects.clone();
        loop {
            tokio::select! {
                _ = self.closed.cancelled() => return,
                _ = tick.tick() => {}
            }
            let reconnected = disconnects.has_changed().unwrap_or(false);
            self.announce_idle(&mut self.state.lock().unwrap());
            if !self.parent.connected() {
                continue;
            }
            if reconnected {
                disconnects.borrow_and_update();
                // Runners reconnect on their own schedule: give each as long
                // as it gives us (parent_grace) before counting it down.
                let allowance = self.config.parent_grace.saturating_sub(limit);
                let mut st = self.state.lock().unwrap();
                for entry in st.runners.values_mut() {
                    entry.last_heard = Instant::now() + allowance;
                }
                debug!(pool = %self.config.name, "reconnected to NATS; heartbeat clocks restarted");
                continue;
            }
            let silent: Vec<(RunnerId, Duration, Option<Stopper>)> = {
                let mut st = self.state.lock().unwrap();
                let ids: Vec<_> = st
                    .runners
                    .iter()
                    .filter(|(id, e)| {
                        e.ready.is_none()
                            && e.last_heard.elapsed() > limit
                            && st
                                .model
                                .runner(id)
                                .is_some_and(|(s, _)| s != RunnerState::Booting)
                    })
                    .map(|(id, e)| (id.clone(), e.last_heard.elapsed()))
                    .collect();
                ids.into_iter()
                    .map(|(id, silent_for)| {
                        let stopper = st.runners.get_mut(&id).and_then(|e| e.stopper.take());
                        (id, silent_for, stopper)
                    })
                    .collect()
            };
            for (id, silent_for, stopper) in silent {
                warn!(pool = %self.config.name, runner = %id, "no heartbeat for {silent_for:?}; counting the runner as down");
                self.runner_gone(&id, format!("no heartbeat for {silent_for:?}"));
                if let Some(stopper) = stopper {
                    tokio::spawn(stopper.stop(Duration::ZERO));
                }
            }
        }
    }
}
