//! What a pool tells operators: the events of its runners (private pools;
//! a shared pool's runner events come from its scaler, see
//! `fleet::mirror`), its limits, and its answer to `flame.pools.info`.
//! The pool's part for this is [`Announcer`]; the answer, which needs the
//! whole pool, is [`answer`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tracing::debug;

use super::model::{PoolModel, RunnerId};
use super::runners::RunnerEntry;
use super::{PoolInner, State};
use crate::ops::{Counts, Outgoing, PoolAnnouncer};
use crate::protocol::pool_events::{format_time, EventKind, PoolInfo};

/// How long a runner stays idle before `runner_idle` says so: a runner
/// between two calls of a steady caller is not announced idle and busy
/// again for every call (that would cost a published event per call).
pub(super) const IDLE_QUIET: Duration = Duration::from_millis(200);

/// The part of a pool that tells operators about it: publishes its events
/// and says, in `flame.pools.info`, since when it runs.
#[derive(Debug)]
pub(super) struct Announcer {
    events: PoolAnnouncer,
    /// Whether this parent publishes its runners' events: a private
    /// pool's does; a shared pool's scaler publishes them from the bucket.
    runner_events: bool,
    /// When the pool started (RFC 3339), for `flame.pools.info`.
    started: String,
}

/// This parent's calls on `id` now.
fn load_on(model: &PoolModel, id: &RunnerId) -> usize {
    model.runner(id).map_or(0, |(_, load)| load)
}

impl Announcer {
    /// Publishing through `events`; `runner_events` for a private pool.
    pub(super) fn new(events: PoolAnnouncer, runner_events: bool) -> Announcer {
        Announcer {
            events,
            runner_events,
            started: format_time(std::time::SystemTime::now()),
        }
    }

    /// Publishes an event of the pool (not of one of its runners).
    pub(super) fn send(&self, event: Outgoing) {
        self.events.send(event);
    }

    /// Where this parent publishes its runners' events: a private pool's;
    /// `None` for a shared pool's (see [`Announcer::announce`]).
    pub(super) fn runner_events(&self) -> Option<PoolAnnouncer> {
        self.runner_events.then(|| self.events.clone())
    }

    /// Publishes a runner event of a private pool, with the pool's numbers
    /// after the change. Shared pools publish nothing here: their scaler
    /// does, from the bucket, so that parents do not each publish the same.
    pub(super) fn announce(&self, st: &State, event: impl FnOnce(Counts) -> Outgoing) {
        if self.runner_events {
            self.events.send(event(st.model.counts()));
        }
    }

    /// A call was placed on `id`: `runner_busy`, unless the runner is
    /// busy as far as the last events said (it was idle for less than
    /// [`IDLE_QUIET`]: events follow the pool's state, not every call; a
    /// changed load is told by [`Announcer::announce_idle`]).
    pub(super) fn busy_if_first(&self, st: &mut State, id: &RunnerId) {
        if !self.runner_events {
            return;
        }
        let Some(entry) = st.runners.get_mut(id) else {
            return;
        };
        entry.idle_since = None;
        if entry.announced_load.is_none() {
            // (Counted only when announcing: this runs on every call.)
            let load = load_on(&st.model, id);
            self.busy_now(entry, id, load, st.model.counts());
        }
    }

    /// A call on `id` ended: if it was the last, the runner's idleness
    /// starts, which `runner_idle` announces once it lasted [`IDLE_QUIET`]
    /// (see [`Announcer::announce_idle`]).
    pub(super) fn idle_if_last(&self, st: &mut State, id: &RunnerId) {
        if !self.runner_events || st.model.runner(id).is_none_or(|(_, load)| load != 0) {
            return;
        }
        if let Some(entry) = st
            .runners
            .get_mut(id)
            .filter(|e| e.announced_load.is_some())
        {
            entry.idle_since.get_or_insert_with(Instant::now);
        }
    }

    /// A runner announced busy, now idle, is retiring: its `runner_idle`
    /// now, so that its events read busy, idle, retiring, gone.
    pub(super) fn settle_idle(&self, st: &mut State, id: &RunnerId) {
        let counts = st.model.counts();
        if let Some(entry) = st.runners.get_mut(id) {
            if entry.announced_load.is_some() && entry.idle_since.is_some() {
                self.idle_now(entry, id, counts);
            }
        }
    }

    /// `runner_idle` for the runners idle for [`IDLE_QUIET`] since they
    /// were announced busy, and `runner_busy` again for the busy ones whose
    /// load changed since their last event. Called every quarter
    /// heartbeat, so a busy runner's load is told at most that often.
    pub(super) fn announce_idle(&self, st: &mut State) {
        let counts = st.model.counts();
        for (id, entry) in st.runners.iter_mut() {
            if entry
                .idle_since
                .is_some_and(|at| at.elapsed() >= IDLE_QUIET)
            {
                self.idle_now(entry, id, counts);
                continue;
            }
            let load = load_on(&st.model, id);
            if load > 0 && entry.announced_load.is_some_and(|told| told != load) {
                self.busy_now(entry, id, load, counts);
            }
        }
    }

    /// Announces `id` busy with `load` calls.
    fn busy_now(&self, entry: &mut RunnerEntry, id: &RunnerId, load: usize, counts: Counts) {
        entry.announced_load = Some(load);
        self.events.send(
            Outgoing::new(EventKind::RunnerBusy, counts)
                .runner(id.clone())
                .runner_load(load),
        );
    }

    /// Announces `id` idle: its next call announces it busy again.
    fn idle_now(&self, entry: &mut RunnerEntry, id: &RunnerId, counts: Counts) {
        entry.idle_since = None;
        entry.announced_load = None;
        self.events.send(
            Outgoing::new(EventKind::RunnerIdle, counts)
                .runner(id.clone())
                .runner_load(0),
        );
    }
}

/// The pool as this parent sees it, for `flame.pools.info`.
fn info(pool: &PoolInner) -> PoolInfo {
    let (counts, (min, max)) = {
        let st = pool.state.lock().unwrap();
        (st.model.counts(), st.model.limits())
    };
    // (The fleet's lock is never taken under the pool's.)
    let (counts, scaler) = match &pool.fleet {
        Some(fleet) => {
            let fleet_counts = fleet.counts();
            (
                Counts {
                    waiting: counts.waiting,
                    ..fleet_counts
                },
                fleet.is_scaler(),
            )
        }
        None => (counts, false),
    };
    PoolInfo {
        pool: pool.config.name.clone(),
        parent: pool.parent.parent_id.clone(),
        build: pool.parent.build_id.to_string(),
        shared: pool.config.shared,
        min,
        max,
        max_concurrency: pool.config.max_concurrency,
        runners: counts.runners,
        ready: counts.ready,
        load: counts.load,
        waiting: counts.waiting,
        scaler,
        started: pool.announcer.started.clone(),
    }
}

/// Answers `flame.pools.info` until the pool closes.
pub(super) async fn answer(pool: Arc<PoolInner>, mut requests: async_nats::Subscriber) {
    while let Some(Some(msg)) = pool.closed.run_until_cancelled(requests.next()).await {
        let Some(reply) = msg.reply else {
            continue;
        };
        let body = serde_json::to_vec(&info(&pool)).unwrap_or_default();
        if let Err(e) = pool.parent.client.publish(reply, body.into()).await {
            debug!("cannot answer a pools info request: {e}");
        }
    }
    let _ = requests.unsubscribe().await;
}
