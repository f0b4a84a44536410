//! The runners of a pool as the parent sees them: what it keeps about
//! each ([`RunnerEntry`]), and their heartbeats, which tell it when one is
//! gone without a word.

use std::sync::Arc;
use std::time::Duration;

use flame_core::backend::StopRunner;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::link::RunnerLink;
use super::model::{RunnerId, RunnerState};
use super::PoolInner;
use crate::protocol::pool_events::Reason;
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

/// Counts a runner as down when it has not pinged for two heartbeat
/// intervals: the fallback for backends that cannot see a runner exit
/// (a remote machine). Such a runner is also stopped, in case it is only
/// cut off. Silence counts only while this parent is connected: pings
/// cannot reach a parent that is not, and after a reconnect every
/// runner's clock starts again.
pub(super) async fn watch_heartbeats(pool: Arc<PoolInner>) {
    let heartbeat = pool.config.heartbeat;
    let limit = heartbeat * 2;
    let mut tick = tokio::time::interval(heartbeat / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut disconnects = pool.parent.events.disconnects.clone();
    loop {
        tokio::select! {
            _ = pool.closed.cancelled() => return,
            _ = tick.tick() => {}
        }
        let reconnected = disconnects.has_changed().unwrap_or(false);
        pool.announcer
            .announce_idle(&mut pool.state.lock().unwrap());
        if !pool.parent.connected() {
            continue;
        }
        if reconnected {
            disconnects.borrow_and_update();
            // Runners reconnect on their own schedule: give each as long
            // as it gives us (parent_grace) before counting it down.
            let allowance = pool.config.parent_grace.saturating_sub(limit);
            let mut st = pool.state.lock().unwrap();
            for entry in st.runners.values_mut() {
                entry.last_heard = Instant::now() + allowance;
            }
            debug!(pool = %pool.config.name, "reconnected to NATS; heartbeat clocks restarted");
            continue;
        }
        let silent: Vec<(RunnerId, Duration, Option<Stopper>)> = {
            let mut st = pool.state.lock().unwrap();
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
            warn!(pool = %pool.config.name, runner = %id, "no heartbeat for {silent_for:?}; counting the runner as down");
            pool.runner_gone(&id, format!("no heartbeat for {silent_for:?}"));
            if let Some(stopper) = stopper {
                tokio::spawn(stopper.stop(Duration::ZERO));
            }
        }
    }
}
