//! The parent side of a pool: places calls on runners, boots runners
//! through the backend, and listens to what runners report.
//!
//! - [`builder`]: `PoolBuilder`, the settings and `start`;
//! - [`model`]: the placement rules, pure state without I/O;
//! - [`call`]: one call or cast, from encoding to reply;
//! - [`slot`]: a slot on a runner, checked out by a call (at once, or
//!   queued) and back in when it ends;
//! - [`link`]: the parent's line to one runner (subjects, keys, streams)
//!   and its outbox, which coalesces calls;
//! - [`child`]: long-lived children placed on runners;
//! - `map`: many calls of one function, with bounded work in flight;
//! - [`booting`]: booting a private pool's runners, and its limits;
//! - [`runners`]: the runners as the parent sees them (ready, gone,
//!   heartbeats);
//! - [`fleet_port`]: what a shared pool's fleet tells the pool;
//! - [`reports`]: answering the reports runners of a private pool send;
//! - [`orphans`]: terminating runners that dead parents left behind;
//! - [`info`]: pool events for operators, and `flame.pools.info`.
//!
//! The lock is never held across an await, and slots handed to waiting
//! callers are delivered after it is released (a dropped slot checks itself
//! back in, which takes the lock).

mod booting;
pub(crate) mod builder;
pub(crate) mod call;
pub(crate) mod child;
mod fleet_port;
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

use flame_core::Error;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use futures::future::BoxFuture;

use crate::announce::{Counts, Outgoing};
use crate::boot::{Booter, RetryGate};
use crate::config::{validate_limits, PoolConfig};
use crate::fleet::Fleet;
use crate::parent::ParentContext;
use crate::protocol::pool_events::{EventKind, Reason};
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
                    inner.listening.cancel();
                });
            }
            Err(_) => inner.listening.cancel(),
        }
    }
}

/// The state of one pool, shared by its handles and its tasks.
#[derive(Debug)]
pub(crate) struct PoolInner {
    config: PoolConfig,
    parent: Arc<ParentContext>,
    booter: Arc<Booter>,
    /// Set for shared pools: the KV-coordinated part.
    fleet: Option<Arc<Fleet>>,
    state: Mutex<State>,
    /// Cancelled when the pool closes: no new calls or boots.
    closed: CancellationToken,
    /// Cancelled once the runners are stopped: the event listener keeps
    /// answering until then, so that no runner waits on an unanswered
    /// `stopping`.
    listening: CancellationToken,
    /// Woken when a runner becomes ready or fails to boot.
    changed: Notify,
    /// Publishes the pool's events.
    events: crate::announce::PoolAnnouncer,
    /// When the pool started (RFC 3339), for `flame.pools.info`.
    started: String,
    /// Boots under way (private pools): closing waits for them, since a
    /// boot the pool no longer wants still has a runner to stop when the
    /// backend's part returns.
    boots: tokio_util::task::TaskTracker,
}

#[derive(Debug)]
struct State {
    model: PoolModel,
    runners: HashMap<RunnerId, RunnerEntry>,
    waiters: HashMap<WaiterId, oneshot::Sender<slot::Slot>>,
    next_waiter: WaiterId,
    last_boot_error: Option<Error>,
    retry: RetryGate,
    closed: bool,
}

impl PoolInner {
    /// Closes the pool, stops every runner (each drains up to `grace`) and
    /// waits for boots under way, whose runners are stopped as their boot
    /// returns.
    pub(super) async fn shut_down(&self, grace: Duration) {
        let stopping = self.close(grace);
        if let Some(fleet) = &self.fleet {
            fleet.left().await;
        }
        futures::future::join_all(stopping).await;
        self.boots.close();
        let bound = self.config.boot_timeout + crate::boot::BOOT_CLEANUP_MARGIN;
        if tokio::time::timeout(bound, self.boots.wait())
            .await
            .is_err()
        {
            warn!(pool = %self.config.name, "boots still under way after {bound:?}; not waiting any longer");
        }
        self.listening.cancel();
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
        // parent out does (see `Fleet::leave`).
        let events = self.fleet.is_none().then(|| self.events.clone());
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
}

/// How many runners a pool has, by state, and how many callers wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Being booted.
    pub booting: usize,
    /// Taking calls.
    pub ready: usize,
    /// Stopping.
    pub draining: usize,
    /// Callers waiting for a slot.
    pub waiting: usize,
}

/// One runner of a pool, as [`Pool::runners`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerInfo {
    /// The runner's id (the last token of its subject).
    pub id: String,
    /// Booting, ready or draining.
    pub state: RunnerState,
    /// This parent's calls running there now.
    pub load: usize,
    /// How the backend knows it (`pid 4242`, a Fly Machine id); `None`
    /// until the backend has started it, and for runners another parent of
    /// a shared pool booted.
    pub handle: Option<String>,
}

impl Pool {
    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Changes `min` and `max` of the live pool. Raising `min` boots runners
    /// now; lowering `max` below the runners up retires the surplus, idle
    /// ones first (each finishes its in-flight work first). In a shared pool
    /// the scaler's limits count, and it retires idle runners only.
    pub fn set_limits(&self, min: usize, max: usize) -> Result<(), Error> {
        validate_limits(&self.inner.config.name, min, max)?;
        self.inner.clone().set_limits(min, max);
        Ok(())
    }

    /// The current `min` and `max`.
    pub fn limits(&self) -> (usize, usize) {
        self.inner.limits()
    }

    /// A snapshot of the pool as this parent sees it.
    pub fn status(&self) -> PoolStatus {
        let st = self.inner.state.lock().unwrap();
        PoolStatus {
            booting: st.model.count(RunnerState::Booting),
            ready: st.model.count(RunnerState::Ready),
            draining: st.model.count(RunnerState::Draining),
            waiting: st.model.waiting(),
        }
    }

    /// The pool's runners as this parent sees them, sorted by id.
    pub fn runners(&self) -> Vec<RunnerInfo> {
        let st = self.inner.state.lock().unwrap();
        let mut runners: Vec<RunnerInfo> = st
            .runners
            .iter()
            .filter_map(|(id, entry)| {
                let (state, load) = st.model.runner(id)?;
                Some(RunnerInfo {
                    id: id.to_string(),
                    state,
                    load,
                    handle: entry.handle.clone(),
                })
            })
            .collect();
        runners.sort_by(|a, b| a.id.cmp(&b.id));
        runners
    }

    /// Stops every runner (each drains up to the shutdown timeout) and fails
    /// queued callers. Later calls fail with [`Error::PoolClosed`].
    ///
    /// In a shared pool this parent leaves it: the runners it booted go on
    /// serving the other parents, or are retired if it was the last.
    ///
    /// Boots still under way are waited for (each is bounded by the boot
    /// timeout), and what they started is stopped too: nothing this parent
    /// booted runs on after `shutdown` returns.
    pub async fn shutdown(&self) {
        self.inner
            .shut_down(self.inner.config.shutdown_timeout)
            .await;
    }
}
