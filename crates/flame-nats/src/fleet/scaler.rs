//! The scaler's work, done by the elected parent only: reap dead runners,
//! then boot or retire per the plan of [`super::scaling`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::scaling::{self, ScalingRules};
use super::{Fleet, PoolPort};
use crate::kv;
use crate::protocol::lease::{LeaseState, RunnerLease};
use crate::protocol::subjects;

impl Fleet {
    /// The scaler's round: reap dead leases, then boot or retire per the
    /// plan.
    pub(super) async fn scale(self: &Arc<Self>, port: &Arc<dyn PoolPort>) {
        let pool = &self.config.name;
        let stale_after = self.stale_after();
        let (min, max) = port.limits();
        let rules = ScalingRules {
            min,
            max,
            max_concurrency: self.config.max_concurrency,
            idle_shutdown_after: self.config.idle_shutdown_after,
            min_idle_shutdown_after: self.config.min_idle_shutdown_after,
        };
        let mut reap: Vec<(String, String, String)> = Vec::new();
        let mut dead_parents = Vec::new();
        let mut free_slots = Vec::new();
        let (leases, slots, waiting, retry_blocked) = {
            let mut st = self.state.lock().unwrap();
            for (id, seen) in &st.runners {
                let silent = seen.changed.elapsed();
                let dead = match seen.value.state {
                    LeaseState::Booting => silent > self.config.boot_timeout,
                    _ => silent > stale_after,
                };
                let retire_overdue = st
                    .retiring
                    .get(id)
                    .is_some_and(|at| at.elapsed() > self.config.shutdown_timeout + stale_after);
                if dead || retire_overdue {
                    let why = if seen.value.state == LeaseState::Booting {
                        format!("did not become ready within {:?}", self.config.boot_timeout)
                    } else if dead {
                        format!("its lease has not changed for {silent:?}")
                    } else {
                        "did not stop after being retired".to_string()
                    };
                    reap.push((id.clone(), seen.value.handle.clone(), why));
                }
            }
            let me = &self.parent.parent_id;
            for (id, seen) in &st.parents {
                if id != me && seen.changed.elapsed() > stale_after {
                    dead_parents.push(id.clone());
                }
            }
            let waiting: usize = st
                .other_live_parents(me, stale_after)
                .map(|p| p.waiting)
                .sum::<usize>()
                + port.waiting();
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
                    leases.push(self.booting_lease(id));
                }
            }
            let blocked = !st.retry.is_open();
            (leases, slots.len(), waiting, blocked)
        };
        for (id, handle, why) in reap {
            warn!(%pool, runner = %id, "reaping runner: {why}");
            self.reap(port, &id, &handle, &why, false).await;
        }
        for id in dead_parents {
            debug!(%pool, parent = %id, "removing the lease of a silent parent");
            let _ = self.store.delete(subjects::parent_key(&id)).await;
        }
        for id in free_slots {
            debug!(%pool, runner = %id, "freeing the slot of a runner without a lease");
            let _ = kv::free_slot(&self.store, &id).await;
            self.state.lock().unwrap().orphan_slots.remove(&id);
        }

        let plan = scaling::plan(&rules, &leases, slots, waiting);
        if plan.boot > 0 && !retry_blocked {
            for _ in 0..plan.boot {
                let id = uuid::Uuid::new_v4().simple().to_string();
                self.state.lock().unwrap().pending.insert(id.clone());
                tokio::spawn(self.clone().boot(port.clone(), id, max));
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
                debug!(%pool, runner = %id, "retiring idle runner");
                self.send_retire(&id).await;
            }
        }
    }

    /// Boots one runner: slot first (compare-and-set against `max`), then
    /// the lease, then the backend.
    async fn boot(self: Arc<Self>, port: Arc<dyn PoolPort>, id: String, max: usize) {
        let pool = &self.config.name;
        let fail = |e: Error| {
            let mut st = self.state.lock().unwrap();
            st.pending.remove(&id);
            st.retry.failed();
            let runners = st.runners.len();
            drop(st);
            self.booter.grow_end(runners, Err(e));
        };
        match kv::take_slot(&self.store, &id, max).await {
            Ok(true) => {}
            Ok(false) => {
                // Full: another boot won the race.
                self.state.lock().unwrap().pending.remove(&id);
                return;
            }
            Err(e) => {
                warn!(%pool, "cannot take a slot: {e}");
                fail(e);
                return;
            }
        }
        let key = subjects::runner_key(&id);
        let lease = self.booting_lease(&id);
        if let Err(e) = kv::compare_and_set(&self.store, &key, &lease, None).await {
            warn!(%pool, "cannot write the lease of a new runner: {e}");
            let _ = kv::free_slot(&self.store, &id).await;
            fail(e);
            return;
        }
        let runners = self.state.lock().unwrap().runners.len() + 1;
        match self.booter.start(&id, None, runners).await {
            Ok(booted) => {
                let handle = booted.handle.clone();
                self.state
                    .lock()
                    .unwrap()
                    .owned
                    .insert(id.clone(), booted.stopper);
                if let Some(exited) = booted.exited {
                    let me = self.clone();
                    let id = id.clone();
                    tokio::spawn(async move {
                        let reason = exited.await;
                        me.exited_booting(&id, &reason);
                        me.reap(&port, &id, "", &reason, true).await;
                    });
                }
                // Record the handle so any later scaler can terminate it.
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
                    warn!(%pool, runner = %id, "cannot record the runner's handle: {e}");
                }
            }
            Err(e) => {
                let _ = self.store.delete(&key).await;
                let _ = kv::free_slot(&self.store, &id).await;
                fail(e);
            }
        }
    }

    /// A runner this scaler booted exited before it was ready: its boot
    /// failed, for the reason the backend gives (a local runner's last
    /// words, say a refused NATS permission).
    fn exited_booting(&self, id: &str, reason: &str) {
        let mut st = self.state.lock().unwrap();
        let booting = st
            .runners
            .get(id)
            .is_none_or(|s| s.value.state == LeaseState::Booting);
        if !booting {
            return;
        }
        st.retry.failed();
        let runners = st.runners.len();
        drop(st);
        let pool = self.config.name.clone();
        self.booter.grow_end(
            runners,
            Err(Error::BootFailed {
                pool,
                reason: reason.to_string(),
                source: None,
            }),
        );
    }

    /// Removes a runner for good: its lease (which fails calls on it in
    /// every parent), its slot, and what is left of it.
    /// `exited`: the backend saw the runner's process end.
    async fn reap(
        &self,
        port: &Arc<dyn PoolPort>,
        id: &str,
        handle: &str,
        why: &str,
        exited: bool,
    ) {
        let pool = &self.config.name;
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
        let _ = self.store.delete(subjects::runner_key(id)).await;
        port.clone().lease_gone(id, why);
        // The slot is freed only once the runner is known to be gone, so a
        // replacement never runs beside it.
        let gone = match owned {
            Some(stopper) => {
                stopper.stop(Duration::ZERO).await;
                true
            }
            None if !handle.is_empty() => {
                match self.booter.backend().terminate(&handle, id).await {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(%pool, runner = %id, "cannot terminate runner: {e}");
                        false
                    }
                }
            }
            // Nothing to stop it with: its slot is freed once it has been
            // without a lease for a while (see `scale`).
            None => exited,
        };
        if gone {
            let _ = kv::free_slot(&self.store, id).await;
        }
    }
}
