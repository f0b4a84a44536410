//! Shared pools: one pool for every parent that uses the same name on a NATS
//! server.
//!
//! All coordination goes through the pool's JetStream KV bucket
//! (`flame-<pool>`):
//!
//! - every parent watches the bucket and mirrors the runner leases into its
//!   own placement model, so any parent's calls run on any runner, and a
//!   removed lease fails the calls on that runner at once;
//! - every parent keeps a lease with the number of its callers waiting;
//! - one parent, elected through the `scaler` key (created if absent, renewed
//!   by compare-and-set, taken over by compare-and-set once it stops
//!   changing), boots and retires runners for the whole fleet. A boot first
//!   takes a slot in `slots` by compare-and-set, so racing scalers can never
//!   boot past `max`;
//! - runners renew their own leases and cap their own concurrency, and ask
//!   `flame.<pool>.alive`, answered by any parent, whether to keep going.
//!
//! A lease counts as dead when it has not changed for three heartbeats, as
//! seen by the watching parent's own clock (no clock is compared across
//! machines).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use flame_core::backend::{BootSpec, StopRunner};
use flame_core::pool::lease::{LeaseState, ParentLease, RunnerLease, ScalerLease, Slots};
use flame_core::pool::scaling::{self, ScalingRules};
use flame_core::pool::PoolEvent;
use flame_core::{subject, Error};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::kv;
use crate::pool::PoolInner;

/// Heartbeats without change after which a lease counts as dead.
const STALE_BEATS: u32 = 3;

/// Pause before booting again after a failed boot.
const BOOT_RETRY_DEBOUNCE: Duration = Duration::from_secs(1);

/// A parent's part in a shared pool.
pub(crate) struct Fleet {
    pub(crate) store: Store,
    state: Mutex<FleetState>,
    /// Woken when this parent's number of waiting callers changes.
    pub(crate) demand_changed: Notify,
    /// Set once this parent has left the pool.
    left: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("bucket", &self.store.name)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct FleetState {
    runners: HashMap<String, Seen<RunnerLease>>,
    parents: HashMap<String, Seen<ParentLease>>,
    scaler: Option<Seen<ScalerLease>>,
    slots: Option<Slots>,
    /// Last revision applied, to resume the watch after a reconnect.
    last_revision: u64,
    /// This parent's scaler term: the revision of the `scaler` key it wrote.
    leading: Option<u64>,
    /// Boots this parent's scaler started whose lease it has not seen yet.
    pending: HashSet<String>,
    /// Runners this scaler booted and can stop directly.
    owned: HashMap<String, Box<dyn StopRunner>>,
    /// Runners told to retire, and when.
    retiring: HashMap<String, Instant>,
    /// Slot ids without a lease, and since when.
    orphan_slots: HashMap<String, Instant>,
    boot_retry_at: Option<Instant>,
    my_beat: u64,
    my_waiting_sent: Option<usize>,
}

impl FleetState {
    /// Leases of the other parents that are still renewed.
    fn other_live_parents<'a>(
        &'a self,
        me: &'a str,
        stale_after: Duration,
    ) -> impl Iterator<Item = &'a ParentLease> + 'a {
        self.parents
            .iter()
            .filter(move |(id, s)| *id != me && s.changed.elapsed() <= stale_after)
            .map(|(_, s)| &s.value)
    }

    /// Counts every lease and the scaler as just seen.
    fn forget_silence(&mut self) {
        let now = Instant::now();
        for s in self.runners.values_mut() {
            s.changed = now;
        }
        for s in self.parents.values_mut() {
            s.changed = now;
        }
        if let Some(s) = &mut self.scaler {
            s.changed = now;
        }
    }
}

/// A value from the bucket and when this parent last saw it change.
#[derive(Debug, Clone)]
struct Seen<T> {
    value: T,
    revision: u64,
    changed: Instant,
}

impl<T> Seen<T> {
    fn new(value: T, revision: u64) -> Seen<T> {
        Seen {
            value,
            revision,
            changed: Instant::now(),
        }
    }
}

impl Fleet {
    /// Opens the pool's bucket.
    pub(crate) async fn open(client: &async_nats::Client, pool: &str) -> Result<Fleet, Error> {
        Ok(Fleet {
            store: kv::open_bucket(client, pool).await?,
            state: Mutex::new(FleetState::default()),
            demand_changed: Notify::new(),
            left: Default::default(),
        })
    }

    /// Starts the watch, the parent loop and the `alive` responder.
    pub(crate) async fn start(self: &Arc<Self>, pool: Arc<PoolInner>) -> Result<(), Error> {
        let client = pool.shared.client.clone();
        let alive = client
            .queue_subscribe(
                subject::alive(&pool.config.name),
                subject::ALIVE_QUEUE.to_string(),
            )
            .await
            .map_err(|e| Error::Nats(format!("cannot subscribe: {e}")))?;
        tokio::spawn(answer_alive(pool.clone(), alive));
        // Read the bucket once before returning, so the first calls see the
        // runners that are already up.
        let mut watch = self
            .store
            .watch_with_history(">")
            .await
            .map_err(|e| Error::Nats(format!("cannot watch the pool's bucket: {e}")))?;
        let initial = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(entry)) = watch.next().await {
                let current = entry.delta == 0;
                self.apply(&pool, entry);
                if current {
                    break;
                }
            }
        });
        // An empty bucket delivers nothing: do not wait for it.
        let empty = self
            .store
            .status()
            .await
            .map(|s| s.values() == 0)
            .unwrap_or(false);
        if !empty {
            let _ = initial.await;
        } else {
            drop(initial);
        }
        tokio::spawn(self.clone().watch(pool.clone(), watch));
        tokio::spawn(self.clone().parent_loop(pool));
        Ok(())
    }

    /// Applies bucket changes until the pool closes, recreating the watch
    /// from the last revision whenever it ends or the connection comes back
    /// (a watch may stop delivering after a server restart).
    async fn watch(
        self: Arc<Self>,
        pool: Arc<PoolInner>,
        mut watch: async_nats::jetstream::kv::Watch,
    ) {
        let connected = pool.shared.events.connected.clone();
        loop {
            let reconnected = connected.notified();
            tokio::pin!(reconnected);
            loop {
                tokio::select! {
                    _ = pool.closed.cancelled() => return,
                    _ = &mut reconnected => break,
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => self.apply(&pool, entry),
                        Some(Err(e)) => {
                            debug!("KV watch error: {e}");
                            break;
                        }
                        None => break,
                    },
                }
            }
            // Nothing could change while we were away; restart the clocks so
            // that no lease or scaler looks dead just for that.
            self.state.lock().unwrap().forget_silence();
            // Recreate from where we were.
            loop {
                if pool.closed.is_cancelled() {
                    return;
                }
                let from = self.state.lock().unwrap().last_revision + 1;
                match self.store.watch_all_from_revision(from).await {
                    Ok(w) => {
                        debug!(from, "KV watch resumed");
                        watch = w;
                        break;
                    }
                    Err(e) => {
                        debug!("cannot resume KV watch yet: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }

    fn apply(&self, pool: &Arc<PoolInner>, entry: async_nats::jetstream::kv::Entry) {
        let deleted = entry.operation != Operation::Put;
        let mut st = self.state.lock().unwrap();
        st.last_revision = st.last_revision.max(entry.revision);
        if let Some(id) = entry.key.strip_prefix("runners.") {
            if deleted {
                st.runners.remove(id);
                st.pending.remove(id);
                st.retiring.remove(id);
                let owned = st.owned.remove(id);
                drop(st);
                pool.lease_gone(id, "its lease was removed");
                drop(owned);
                return;
            }
            let Ok(lease) = serde_json::from_slice::<RunnerLease>(&entry.value) else {
                return;
            };
            st.pending.remove(id);
            let became_ready = lease.state == LeaseState::Ready
                && st
                    .runners
                    .get(id)
                    .is_none_or(|s| s.value.state != LeaseState::Ready);
            let mine = lease.booted_by == pool.shared.parent_id;
            st.runners
                .insert(id.to_string(), Seen::new(lease.clone(), entry.revision));
            let count = st.runners.len();
            drop(st);
            pool.lease_seen(&lease);
            if became_ready && mine && self.is_leading() {
                pool.hooks.fire(PoolEvent::GrowEnd {
                    pool: pool.config.name.clone(),
                    runners: count,
                    result: Ok(()),
                });
            }
        } else if let Some(id) = entry.key.strip_prefix("parents.") {
            if deleted {
                st.parents.remove(id);
            } else if let Ok(lease) = serde_json::from_slice::<ParentLease>(&entry.value) {
                st.parents
                    .insert(id.to_string(), Seen::new(lease, entry.revision));
            }
        } else if entry.key == subject::SCALER_KEY {
            st.scaler = if deleted {
                None
            } else {
                serde_json::from_slice::<ScalerLease>(&entry.value)
                    .ok()
                    .map(|l| Seen::new(l, entry.revision))
            };
        } else if entry.key == subject::SLOTS_KEY {
            st.slots = if deleted {
                None
            } else {
                serde_json::from_slice::<Slots>(&entry.value).ok()
            };
        }
    }

    fn is_leading(&self) -> bool {
        self.state.lock().unwrap().leading.is_some()
    }

    /// Renews this parent's lease, takes part in the scaler election, and
    /// scales when elected.
    async fn parent_loop(self: Arc<Self>, pool: Arc<PoolInner>) {
        let heartbeat = pool.config.heartbeat;
        let mut tick = tokio::time::interval(heartbeat / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_renewal = Instant::now() - heartbeat;
        loop {
            let demand = tokio::select! {
                _ = pool.closed.cancelled() => break,
                _ = tick.tick() => false,
                _ = self.demand_changed.notified() => true,
            };
            if pool.shared.client.connection_state() != async_nats::connection::State::Connected {
                // Leases cannot be read or written; judging them now would
                // reap live runners.
                continue;
            }
            let waiting = pool.waiting();
            let renew_due = last_renewal.elapsed() >= heartbeat;
            let changed = self.state.lock().unwrap().my_waiting_sent != Some(waiting);
            if (renew_due || changed) && self.renew_parent(&pool, waiting).await {
                last_renewal = Instant::now();
            }
            if renew_due || !demand {
                self.elect(&pool).await;
            }
            if self.is_leading() {
                self.scale(&pool).await;
            }
        }
        self.leave(&pool).await;
    }

    async fn renew_parent(&self, pool: &PoolInner, waiting: usize) -> bool {
        let beat = {
            let mut st = self.state.lock().unwrap();
            st.my_beat += 1;
            st.my_beat
        };
        let lease = ParentLease {
            parent: pool.shared.parent_id.clone(),
            waiting,
            beat,
        };
        match self
            .store
            .put(
                subject::parent_key(&pool.shared.parent_id),
                kv::to_json(&lease),
            )
            .await
        {
            Ok(_) => {
                self.state.lock().unwrap().my_waiting_sent = Some(waiting);
                true
            }
            Err(e) => {
                debug!("cannot renew parent lease: {e}");
                false
            }
        }
    }

    /// One round of the election: renew the term if leading, else take over
    /// a missing or dead scaler by compare-and-set.
    async fn elect(&self, pool: &PoolInner) {
        let me = pool.shared.parent_id.clone();
        let stale_after = pool.config.heartbeat * STALE_BEATS;
        let (leading, scaler) = {
            let st = self.state.lock().unwrap();
            (st.leading, st.scaler.clone())
        };
        let next = |beat: u64| {
            kv::to_json(&ScalerLease {
                parent: me.clone(),
                beat,
            })
        };
        let result = match (leading, scaler) {
            (Some(term), _) => self
                .store
                .update(subject::SCALER_KEY, next(term + 1), term)
                .await
                .map_err(|e| e.to_string()),
            (None, None) => self
                .store
                .create(subject::SCALER_KEY, next(0))
                .await
                .map_err(|e| e.to_string()),
            (None, Some(s)) if s.changed.elapsed() > stale_after => {
                info!(pool = %pool.config.name, old = %s.value.parent, "scaler silent for {:?}; taking over", s.changed.elapsed());
                self.store
                    .update(subject::SCALER_KEY, next(0), s.revision)
                    .await
                    .map_err(|e| e.to_string())
            }
            (None, Some(_)) => return,
        };
        let mut st = self.state.lock().unwrap();
        match result {
            Ok(revision) => {
                if st.leading.is_none() {
                    info!(pool = %pool.config.name, "this parent is now the pool's scaler");
                }
                st.leading = Some(revision);
            }
            Err(e) => {
                if st.leading.is_some() {
                    warn!(pool = %pool.config.name, "no longer the scaler: {e}");
                }
                st.leading = None;
            }
        }
    }

    /// The scaler's round: reap dead leases, then boot or retire per the
    /// plan.
    async fn scale(self: &Arc<Self>, pool: &Arc<PoolInner>) {
        let heartbeat = pool.config.heartbeat;
        let stale_after = heartbeat * STALE_BEATS;
        let (min, max) = pool.limits();
        let rules = ScalingRules {
            min,
            max,
            max_concurrency: pool.config.max_concurrency,
            idle_shutdown_after: pool.config.idle_shutdown_after,
            min_idle_shutdown_after: pool.config.min_idle_shutdown_after,
        };
        let mut reap: Vec<(String, String, String)> = Vec::new();
        let mut dead_parents = Vec::new();
        let mut free_slots = Vec::new();
        let (leases, slots, waiting, retry_blocked) = {
            let mut st = self.state.lock().unwrap();
            for (id, seen) in &st.runners {
                let silent = seen.changed.elapsed();
                let dead = match seen.value.state {
                    LeaseState::Booting => silent > pool.config.boot_timeout,
                    _ => silent > stale_after,
                };
                let retire_overdue = st
                    .retiring
                    .get(id)
                    .is_some_and(|at| at.elapsed() > pool.config.shutdown_timeout + stale_after);
                if dead || retire_overdue {
                    let why = if seen.value.state == LeaseState::Booting {
                        format!("did not become ready within {:?}", pool.config.boot_timeout)
                    } else if dead {
                        format!("its lease has not changed for {silent:?}")
                    } else {
                        "did not stop after being retired".to_string()
                    };
                    reap.push((id.clone(), seen.value.handle.clone(), why));
                }
            }
            let me = &pool.shared.parent_id;
            for (id, seen) in &st.parents {
                if id != me && seen.changed.elapsed() > stale_after {
                    dead_parents.push(id.clone());
                }
            }
            let waiting: usize = st
                .other_live_parents(me, stale_after)
                .map(|p| p.waiting)
                .sum::<usize>()
                + pool.waiting();
            let slots = st
                .slots
                .as_ref()
                .map(|s| s.runners.clone())
                .unwrap_or_default();
            let now = Instant::now();
            let live_ids: HashSet<String> = st
                .runners
                .keys()
                .chain(st.pending.iter())
                .cloned()
                .collect();
            st.orphan_slots
                .retain(|id, _| slots.contains(id) && !live_ids.contains(id));
            for id in &slots {
                if !live_ids.contains(id) {
                    let since = *st.orphan_slots.entry(id.clone()).or_insert(now);
                    if since.elapsed() > stale_after {
                        free_slots.push(id.clone());
                    }
                }
            }
            let mut leases: Vec<RunnerLease> = st
                .runners
                .values()
                .filter(|s| !reap.iter().any(|(id, ..)| *id == s.value.runner))
                .map(|s| {
                    let mut lease = s.value.clone();
                    // Told to retire already: as good as draining, so the
                    // plan does not pick yet another runner to retire.
                    if st.retiring.contains_key(&lease.runner) {
                        lease.state = LeaseState::Draining;
                    }
                    lease
                })
                .collect();
            for id in &st.pending {
                if !st.runners.contains_key(id) {
                    leases.push(booting_lease(pool, id));
                }
            }
            let blocked = st.boot_retry_at.is_some_and(|at| Instant::now() < at);
            (leases, slots.len(), waiting, blocked)
        };
        for (id, handle, why) in reap {
            warn!(pool = %pool.config.name, runner = %id, "reaping runner: {why}");
            self.reap(pool, &id, &handle, &why, false).await;
        }
        for id in dead_parents {
            debug!(pool = %pool.config.name, parent = %id, "removing the lease of a silent parent");
            let _ = self.store.delete(subject::parent_key(&id)).await;
        }
        for id in free_slots {
            debug!(pool = %pool.config.name, runner = %id, "freeing the slot of a runner without a lease");
            let _ = kv::free_slot(&self.store, &id).await;
            self.state.lock().unwrap().orphan_slots.remove(&id);
        }

        let plan = scaling::plan(&rules, &leases, slots, waiting);
        if plan.boot > 0 && !retry_blocked {
            for _ in 0..plan.boot {
                let id = uuid::Uuid::new_v4().simple().to_string();
                self.state.lock().unwrap().pending.insert(id.clone());
                tokio::spawn(self.clone().boot(pool.clone(), id, max));
            }
        }
        for id in plan.retire {
            let first = self
                .state
                .lock()
                .unwrap()
                .retiring
                .insert(id.clone(), Instant::now())
                .is_none();
            if first {
                debug!(pool = %pool.config.name, runner = %id, "retiring idle runner");
                send_retire(pool, &id).await;
            }
        }
    }

    /// Boots one runner: slot first (compare-and-set against `max`), then
    /// the lease, then the backend.
    async fn boot(self: Arc<Self>, pool: Arc<PoolInner>, id: String, max: usize) {
        let name = pool.config.name.clone();
        let fail = |this: &Arc<Self>, e: Error| {
            let mut st = this.state.lock().unwrap();
            st.pending.remove(&id);
            st.boot_retry_at = Some(Instant::now() + BOOT_RETRY_DEBOUNCE);
            e
        };
        match kv::take_slot(&self.store, &id, max).await {
            Ok(true) => {}
            Ok(false) => {
                // Full: another boot won the race.
                self.state.lock().unwrap().pending.remove(&id);
                return;
            }
            Err(e) => {
                warn!(pool = %name, "cannot take a slot: {e}");
                fail(&self, e);
                return;
            }
        }
        let lease = booting_lease(&pool, &id);
        if let Err(e) = self
            .store
            .create(subject::runner_key(&id), kv::to_json(&lease))
            .await
        {
            warn!(pool = %name, "cannot write the lease of a new runner: {e}");
            let _ = kv::free_slot(&self.store, &id).await;
            fail(&self, Error::Nats(e.to_string()));
            return;
        }
        let runners = self.state.lock().unwrap().runners.len() + 1;
        pool.hooks.fire(PoolEvent::GrowStart {
            pool: name.clone(),
            runners,
        });
        let spec = BootSpec::new(name.clone(), id.clone(), pool.runner_env(&id));
        let booted = tokio::time::timeout(pool.config.boot_timeout, pool.backend.boot(spec))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the backend did not start the runner within {:?}",
                    pool.config.boot_timeout
                ))
            });
        match booted {
            Ok(booted) => {
                let handle = booted.handle.clone();
                self.state
                    .lock()
                    .unwrap()
                    .owned
                    .insert(id.clone(), booted.stopper);
                if let Some(exited) = booted.exited {
                    let me = self.clone();
                    let (pool, id) = (pool.clone(), id.clone());
                    tokio::spawn(async move {
                        let reason = exited.await;
                        me.reap(&pool, &id, "", &reason, true).await;
                    });
                }
                // Record the handle so any later scaler can terminate it.
                let key = subject::runner_key(&id);
                let recorded = kv::update(
                    &self.store,
                    &key,
                    || None,
                    |l: &mut RunnerLease| {
                        l.handle = handle.clone();
                        true
                    },
                );
                if let Err(e) = recorded.await {
                    warn!(pool = %name, runner = %id, "cannot record the runner's handle: {e}");
                }
            }
            Err(reason) => {
                let e = Error::BootFailed {
                    pool: name.clone(),
                    reason,
                };
                warn!(pool = %name, runner = %id, "boot failed: {e}");
                let _ = self.store.delete(subject::runner_key(&id)).await;
                let _ = kv::free_slot(&self.store, &id).await;
                let e = fail(&self, e);
                let runners = self.state.lock().unwrap().runners.len();
                pool.hooks.fire(PoolEvent::GrowEnd {
                    pool: name,
                    runners,
                    result: Err(e),
                });
            }
        }
    }

    /// Removes a runner for good: its lease (which fails calls on it in
    /// every parent), its slot, and what is left of it.
    /// `exited`: the backend saw the runner's process end.
    async fn reap(&self, pool: &Arc<PoolInner>, id: &str, handle: &str, why: &str, exited: bool) {
        let (owned, handle) = {
            let mut st = self.state.lock().unwrap();
            st.retiring.remove(id);
            let handle = st
                .runners
                .get(id)
                .map(|s| s.value.handle.clone())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| handle.to_string());
            (st.owned.remove(id), handle)
        };
        let _ = self.store.delete(subject::runner_key(id)).await;
        pool.lease_gone(id, why);
        // The slot is freed only once the runner is known to be gone, so a
        // replacement never runs beside it.
        let gone = match owned {
            Some(stopper) => {
                stopper.stop(Duration::ZERO).await;
                true
            }
            None if !handle.is_empty() => match pool.backend.terminate(&handle, id).await {
                Ok(()) => true,
                Err(e) => {
                    warn!(pool = %pool.config.name, runner = %id, "cannot terminate runner: {e}");
                    false
                }
            },
            // Nothing to stop it with: its slot is freed once it has been
            // without a lease for a while (see `scale`).
            None => exited,
        };
        if gone {
            let _ = kv::free_slot(&self.store, id).await;
        }
    }

    /// Leaves the pool: removes this parent's lease and hands the scaler role
    /// on. Runners this parent booted are stopped (draining) when no other
    /// parent is left to use them.
    pub(crate) async fn leave(&self, pool: &Arc<PoolInner>) {
        if self.left.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let me = pool.shared.parent_id.clone();
        let _ = self.store.delete(subject::parent_key(&me)).await;
        let (leading, others, owned) = {
            let mut st = self.state.lock().unwrap();
            let stale_after = pool.config.heartbeat * STALE_BEATS;
            let others = st.other_live_parents(&me, stale_after).next().is_some();
            let owned: Vec<(String, Box<dyn StopRunner>)> = st.owned.drain().collect();
            (st.leading.take(), others, owned)
        };
        if let Some(term) = leading {
            let _ = self
                .store
                .delete_expect_revision(subject::SCALER_KEY, Some(term))
                .await;
        }
        if others {
            // The other parents go on using these runners; their scaler
            // stops them when they are no longer wanted.
            for (_, stopper) in &owned {
                stopper.detach();
            }
            return;
        }
        // The last parent out: retire every runner of the pool.
        let ids: Vec<String> = self.state.lock().unwrap().runners.keys().cloned().collect();
        for id in &ids {
            send_retire(pool, id).await;
        }
        let _ = pool.shared.client.flush().await;
        let grace = pool.config.shutdown_timeout;
        let stops: Vec<_> = owned.iter().map(|(_, s)| s.stop(grace)).collect();
        futures::future::join_all(stops).await;
    }
}

fn booting_lease(pool: &PoolInner, id: &str) -> RunnerLease {
    RunnerLease {
        runner: id.to_string(),
        pool: pool.config.name.clone(),
        state: LeaseState::Booting,
        build: String::new(),
        capacity: pool.config.max_concurrency,
        load: 0,
        queued: 0,
        idle_ms: 0,
        handle: String::new(),
        booted_by: pool.shared.parent_id.clone(),
        beat: 0,
    }
}

/// Tells a runner to drain and exit.
async fn send_retire(pool: &PoolInner, runner: &str) {
    let to = subject::runner_control(&pool.config.name, runner);
    if let Err(e) = pool
        .shared
        .client
        .publish(to, subject::CONTROL_RETIRE.into())
        .await
    {
        debug!(runner, "cannot send retire: {e}");
    }
}

/// Answers runners asking whether any parent of the pool is alive.
async fn answer_alive(pool: Arc<PoolInner>, mut requests: async_nats::Subscriber) {
    loop {
        let msg = tokio::select! {
            _ = pool.closed.cancelled() => break,
            msg = requests.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        if let Some(reply) = msg.reply {
            let _ = pool.shared.client.publish(reply, "yes".into()).await;
        }
    }
    let _ = requests.unsubscribe().await;
}
