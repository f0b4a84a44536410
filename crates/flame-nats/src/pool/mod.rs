//! The parent side of a pool: places calls on runners, boots runners
//! through the backend, and listens to what runners report.
//!
//! [`Pool`] is the handle apps hold; its methods are all in [`handle`],
//! each handing the work to the module that does it. [`PoolInner`] is the
//! state of one pool, shared by its handles and tasks: its settings, what
//! is under its lock ([`State`]: the placement model, the runners, the
//! queued callers, the boot gate), and parts that own their state and
//! methods: `booting::Boots`, `info::Announcer` and `reports::Listener`.
//! What needs the whole pool is a function of the module that does it,
//! taking the pool (`booting::grow(&pool)`, `slot::checkout(&pool, ..)`);
//! the few transitions every module needs (closing, a runner gone) are
//! here.
//!
//! - [`handle`]: `Pool`'s methods, the public API, and what `status` and
//!   `runners` return;
//! - [`builder`]: `PoolBuilder`, the settings and `start`;
//! - [`model`]: the placement rules, pure state without I/O;
//! - [`call`]: one call or cast, from encoding to reply;
//! - [`slot`]: a slot on a runner, checked out by a call (at once, or
//!   queued) and back in when it ends;
//! - [`link`]: the parent's line to one runner (subjects, keys, streams)
//!   and its outbox, which coalesces calls;
//! - [`child`]: long-lived children placed on runners;
//! - [`map`]: many calls of one function, with bounded work in flight;
//! - [`booting`]: booting a private pool's runners (`Boots`, the
//!   `BootGate`), and its limits;
//! - [`runners`]: the runners as the parent sees them (`RunnerEntry`,
//!   heartbeats);
//! - [`fleet_port`]: what a shared pool's fleet tells the pool;
//! - [`reports`]: answering the reports runners of a private pool send
//!   (`Listener`);
//! - [`logs`]: logging the lines runners forward;
//! - [`orphans`]: terminating runners that dead parents left behind;
//! - [`info`]: pool events for operators (`Announcer`), and
//!   `flame.pools.info`.
//!
//! The lock is never held across an await, and slots handed to waiting
//! callers are delivered after it is released (a dropped slot checks itself
//! back in, which takes the lock).

mod booting;
pub(crate) mod builder;
pub(crate) mod call;
pub(crate) mod child;
mod fleet_port;
mod handle;
pub(crate) mod info;
mod link;
mod logs;
mod map;
pub(crate) mod model;
mod orphans;
mod reports;
mod runners;
mod slot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use futures::future::BoxFuture;

use crate::boot::Booter;
use crate::config::PoolConfig;
use crate::fleet::Fleet;
use crate::ops::{Counts, Outgoing};
use crate::parent::ParentContext;
use crate::protocol::pool_events::{gone_reason, EventKind, Reason};
pub use handle::{PoolStatus, RunnerInfo};
use model::{PoolModel, RunnerId, RunnerState, WaiterId};
use runners::RunnerEntry;

/// A pool of runners. Cheap to clone; runners are stopped when the last
/// clone is dropped or on [`Pool::shutdown`].
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
    _owner: Arc<Owner>,
}

/// Shuts the pool down when the last user handle goes (background tasks
/// hold `PoolInner` too, so its own drop would never run).
#[derive(Debug)]
struct Owner(Arc<PoolInner>);

impl Drop for Owner {
    fn drop(&mut self) {
        // Each stop has started already (the backend's contract); what is
        // left is waiting for them, which needs a runtime.
        let stopping = self.0.close(Duration::ZERO);
        let inner = self.0.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    futures::future::join_all(stopping).await;
                    inner.listener.stop();
                });
            }
            Err(_) => inner.listener.stop(),
        }
    }
}

/// The state of one pool, shared by its handles and its tasks.
#[derive(Debug)]
pub(crate) struct PoolInner {
    config: PoolConfig,
    parent: Arc<ParentContext>,
    /// Set for shared pools: the KV-coordinated part.
    fleet: Option<Arc<Fleet>>,
    state: Mutex<State>,
    /// Cancelled when the pool closes: no new calls or boots.
    closed: CancellationToken,
    /// Woken when a runner becomes ready or fails to boot.
    changed: Notify,
    /// Boots runners through the backend, and keeps the boots under way.
    boots: booting::Boots,
    /// Publishes the pool's events, and says when it started.
    announcer: info::Announcer,
    /// Answers the runners' reports until they are stopped.
    listener: reports::Listener,
}

/// What the pool's lock guards.
#[derive(Debug)]
struct State {
    model: PoolModel,
    runners: HashMap<RunnerId, RunnerEntry>,
    waiters: HashMap<WaiterId, oneshot::Sender<slot::Slot>>,
    next_waiter: WaiterId,
    /// Whether a boot may start now, and why the last one failed.
    boot: booting::BootGate,
    closed: bool,
}

impl PoolInner {
    /// A pool not yet started: no runner, nobody waiting.
    fn new(
        config: PoolConfig,
        parent: Arc<ParentContext>,
        booter: Arc<Booter>,
        fleet: Option<Arc<Fleet>>,
        closed: CancellationToken,
    ) -> PoolInner {
        let mut model = PoolModel::new(config.min, config.max, config.max_concurrency)
            .hot_start(config.hot_start_percent);
        if config.single_use {
            model = model.single_use();
        }
        PoolInner {
            state: Mutex::new(State {
                model,
                runners: HashMap::new(),
                waiters: HashMap::new(),
                next_waiter: 0,
                boot: booting::BootGate::default(),
                closed: false,
            }),
            boots: booting::Boots::new(booter),
            // A shared pool's runner events come from its scaler.
            announcer: info::Announcer::new(
                parent.announcer.for_pool(&config.name),
                fleet.is_none(),
            ),
            listener: reports::Listener::default(),
            fleet,
            closed,
            changed: Notify::new(),
            parent,
            config,
        }
    }

    /// Closes the pool, stops every runner (each drains up to `grace`) and
    /// waits for boots under way, whose runners are stopped as their boot
    /// returns.
    pub(super) async fn shut_down(&self, grace: Duration) {
        let stopping = self.close(grace);
        if let Some(fleet) = &self.fleet {
            fleet.left().await;
        }
        futures::future::join_all(stopping).await;
        let bound = self.config.boot_timeout + crate::boot::BOOT_CLEANUP_MARGIN;
        if !self.boots.finish(bound).await {
            warn!(pool = %self.config.name, "boots still under way after {bound:?}; not waiting any longer");
        }
        self.listener.stop();
    }

    /// Closes the pool: fails queued callers and asks every runner to stop.
    /// Each stop has started when this returns; the futures resolve once
    /// the runners are gone.
    pub(super) fn close(&self, grace: Duration) -> Vec<BoxFuture<'static, ()>> {
        self.closed.cancel();
        let (entries, waiters) = {
            let mut st = self.state.lock().unwrap();
            st.closed = true;
            let waiters: Vec<_> = st.waiters.drain().collect();
            let entries: Vec<_> = st.runners.drain().collect();
            for (id, _) in &entries {
                st.model.remove(id);
            }
            (entries, waiters)
        };
        drop(waiters);
        // Private pools announce their runners' end; a shared pool's last
        // parent out does (see `fleet::leave::leave`).
        let events = self.announcer.runner_events();
        entries
            .into_iter()
            .map(|(id, entry)| {
                const SHUT_DOWN: &str = "the pool was shut down";
                entry.link.fail(&self.parent.replies, SHUT_DOWN.into());
                if let Some(events) = &events {
                    events.send(
                        Outgoing::new(EventKind::RunnerRetiring, Counts::default())
                            .runner(id.clone())
                            .reason(Reason::Shutdown),
                    );
                }
                let events = events.clone();
                let stop = entry.stopper.map(|s| s.stop(grace));
                let announced = async move {
                    if let Some(stop) = stop {
                        stop.await;
                    }
                    if let Some(events) = events {
                        events.send(
                            Outgoing::new(EventKind::RunnerGone, Counts::default())
                                .runner(id)
                                .reason(Reason::Shutdown)
                                .detail(SHUT_DOWN),
                        );
                    }
                };
                Box::pin(announced) as BoxFuture<'static, ()>
            })
            .collect()
    }

    /// A runner is gone (its process exited): calls on it fail now, and the
    /// model may boot a replacement.
    pub(super) fn runner_gone(self: &Arc<Self>, id: &RunnerId, reason: String) {
        let (entry, state, runners) = {
            let mut st = self.state.lock().unwrap();
            let served = st.served(id);
            if served {
                self.announcer.settle_idle(&mut st, id);
            }
            let state = st.model.remove(id);
            let entry = st.runners.remove(id);
            if state == Some(RunnerState::Ready) {
                info!(pool = %self.config.name, runner = %id, "runner gone: {reason}");
            }
            if served {
                let cause = entry.as_ref().and_then(|e| e.drain_cause);
                let why = gone_reason(&reason, cause.or(Some(self.own_stop_reason())));
                self.announcer.announce(&st, |c| {
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
                booting::grow_locked(self, &mut st);
            }
            (entry, state, runners)
        };
        if let Some(entry) = entry {
            entry.link.fail(&self.parent.replies, reason.clone());
        }
        if matches!(state, Some(RunnerState::Ready | RunnerState::Draining)) {
            self.boots.booter.shrink(runners, reason);
        }
    }

    /// Current `min` and `max`.
    pub(super) fn limits(&self) -> (usize, usize) {
        self.state.lock().unwrap().model.limits()
    }

    /// The numbers of the pool after a change, for events published
    /// outside the pool's lock (a shared pool's come from its bucket).
    pub(super) fn counts_now(&self) -> Counts {
        match &self.fleet {
            Some(fleet) => fleet.counts(),
            None => self.state.lock().unwrap().model.counts(),
        }
    }

    /// Why a runner that stops on its own stops, when the parent did not
    /// decide it.
    pub(super) fn own_stop_reason(&self) -> Reason {
        if self.config.single_use {
            Reason::SingleUse
        } else {
            Reason::Stopped
        }
    }
}

impl State {
    /// True for runners that served (ready or draining): their end is a
    /// `runner_gone`; a booting runner's is a failed boot.
    fn served(&self, id: &RunnerId) -> bool {
        matches!(
            self.model.runner(id),
            Some((RunnerState::Ready | RunnerState::Draining, _))
        )
    }

    /// True when no runner is ready or booting: nobody could serve a
    /// caller waiting for a runner.
    fn no_runner_coming(&self) -> bool {
        self.model.count(RunnerState::Ready) == 0 && self.model.count(RunnerState::Booting) == 0
    }

    /// Takes every caller waiting for a runner off the queue. Dropping what
    /// this returns (after the lock is released) wakes them; they find the
    /// reason in the boot gate's `last_error`.
    fn fail_waiters(&mut self) -> Vec<oneshot::Sender<slot::Slot>> {
        let ids: Vec<_> = self.waiters.keys().copied().collect();
        for id in ids {
            self.model.cancel(id);
        }
        self.waiters.drain().map(|(_, tx)| tx).collect()
    }

    /// The runner said it is stopping: place nothing new on it, and give
    /// its last replies a moment when its exit is seen.
    fn stopping(&mut self, id: &RunnerId) {
        self.model.drain(id);
        if let Some(entry) = self.runners.get(id) {
            entry
                .link
                .stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The slot a queued caller was handed, with where to send it.
    fn slot_for(
        &mut self,
        pool: &Arc<PoolInner>,
        waiter: WaiterId,
        runner: &RunnerId,
    ) -> Option<slot::Handoff> {
        let tx = self.waiters.remove(&waiter)?;
        let link = self.runners.get(runner)?.link.clone();
        Some((tx, slot::Slot::new(pool.clone(), link)))
    }
}
