//! The scaler's work, done by the elected parent of each build only: reap
//! dead runners, retire the runners of builds no parent uses any more, then
//! boot or retire the runners of its own build per the plan of
//! [`super::scaling`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::scaling::{self, ScalingRules};
use super::{Fleet, PoolPort};
use crate::announce::Outgoing;
use crate::boot::BootFailure;
use crate::kv;
use crate::pool::info::boot_failure_reason;
use crate::protocol::events::ParentEvent;
use crate::protocol::lease::{LeaseState, RunnerLease};
use crate::protocol::pool_events::{gone_reason, EventKind, Reason};
use crate::protocol::subjects;

/// How often a scaler asks the backend for the pool's runners that have no
/// lease (a Machine whose booting parent died before it recorded the
/// handle, say).
const SCAN_EVERY: Duration = Duration::from_secs(30);

/// The second ask of a probe comes a heartbeat divided by this after the
/// first got no responders (see `probe_runner`).
const RECONNECT_ALLOWANCE: u32 = 4;

impl Fleet {
    /// Terminates the pool's runners that the backend lists but that have
    /// no lease in the bucket: nobody can call them, and a lease is always
    /// written before a runner is booted, so they were given up on. Runners
    /// of a live private pool of the same name (their parent answers on
    /// its event subject) are left alone.
    async fn reap_unleased(self: Arc<Self>) {
        let pool = &self.config.name;
        let backend = self.booter.backend().clone();
        let listed = match backend.list(pool).await {
            Ok(listed) => listed,
            Err(e) => {
                debug!(%pool, "cannot list the pool's runners: {e}");
                return;
            }
        };
        for runner in listed {
            let id = &runner.runner_id;
            let known = {
                let st = self.state.lock().unwrap();
                st.runners.contains_key(id) || st.pending.contains(id)
            };
            if known {
                continue;
            }
            // The mirror may lag behind a boot: ask the bucket itself.
            match kv::read::<RunnerLease>(&self.store, &subjects::runner_key(id)).await {
                Ok(None) => {}
                _ => continue,
            }
            let theirs = &runner.parent_id;
            let events = subjects::parent_event(pool, theirs, ParentEvent::Ping);
            if !theirs.is_empty()
                && self
                    .parent
                    .anyone_answers(events, Duration::from_secs(2))
                    .await
            {
                continue;
            }
            warn!(%pool, runner = %id, handle = %runner.handle, "terminating a runner without a lease");
            if let Err(e) = backend.terminate(&runner.handle, id).await {
                warn!(%pool, runner = %id, "cannot terminate a runner without a lease: {e}");
            }
        }
    }

    /// The scaler's round: reap dead leases, retire runners of abandoned
    /// builds, then boot or retire runners of this build per the plan.
    pub(super) async fn scale(self: &Arc<Self>, port: &Arc<dyn PoolPort>) {
        {
            let st = self.state.lock().unwrap();
            if st.bucket_unwritable || st.mirror_stalled(self.config.heartbeat) {
                // Leases cannot change now, or this parent cannot see them
                // change: judging them would reap live runners.
                return;
            }
        }
        let pool = &self.config.name;
        let scan_due = {
            let mut st = self.state.lock().unwrap();
            let due = st.last_scan.is_none_or(|at| at.elapsed() >= SCAN_EVERY);
            if due {
                st.last_scan = Some(Instant::now());
            }
            due
        };
        if scan_due {
            tokio::spawn(self.clone().reap_unleased());
        }
        let stale_after = self.stale_after();
        let (min, max) = port.limits();
        let rules = ScalingRules {
            min,
            max,
            max_concurrency: self.config.max_concurrency,
            idle_shutdown_after: self.config.idle_shutdown_after,
            min_idle_shutdown_after: self.config.min_idle_shutdown_after,
            hot_start_percent: self.config.hot_start_percent,
        };
        let mut reap: Vec<(String, String, String)> = Vec::new();
        let mut dead_parents = Vec::new();
        let mut free_slots = Vec::new();
        let build = &*self.parent.build_id;
        let mut abandoned = Vec::new();
        let mut suspects = Vec::new();
        let (leases, slots, waiting, retry_blocked) = {
            let mut st = self.state.lock().unwrap();
            let probe_all = std::mem::take(&mut st.probe_all);
            for (id, seen) in &st.runners {
                let silent = seen.changed.elapsed();
                let gone = st.runners_gone.contains(id);
                let dead = match seen.value.state {
                    LeaseState::Booting => silent > self.config.boot_timeout,
                    _ => gone || silent > stale_after,
                };
                if !dead
                    && seen.value.state != LeaseState::Booting
                    && (probe_all || silent > self.config.heartbeat)
                    && !st.probing.contains(id)
                {
                    suspects.push(id.clone());
                }
                let retire_overdue = st.retiring.get(id).is_some_and(|(at, _)| {
                    at.elapsed() > self.config.shutdown_timeout + stale_after
                });
                if dead || retire_overdue {
                    let why = if seen.value.state == LeaseState::Booting {
                        format!("did not become ready within {:?}", self.config.boot_timeout)
                    } else if gone {
                        "its lease went quiet and its connection to NATS is gone (no responders)"
                            .to_string()
                    } else if dead {
                        format!("its lease has not changed for {silent:?}")
                    } else {
                        "did not stop after being retired".to_string()
                    };
                    reap.push((id.clone(), seen.value.handle.clone(), why));
                }
            }
            for id in &suspects {
                st.probing.insert(id.clone());
            }
            let me = &self.parent.parent_id;
            for (id, seen) in &st.parents {
                if id != me && seen.changed.elapsed() > stale_after {
                    dead_parents.push(id.clone());
                }
            }
            // Demand of this build only: other builds' scalers boot theirs.
            let waiting: usize = st
                .other_live_parents(me, stale_after)
                .filter(|p| p.build == build)
                .map(|p| p.waiting)
                .sum::<usize>()
                + port.waiting();
            // Runners of a build without a live parent: nobody can call
            // them any more (a rolling deploy left them behind).
            let mut live_builds = st.live_builds(me, stale_after);
            live_builds.insert(build.to_string());
            for (id, seen) in &st.runners {
                let lease = &seen.value;
                if !live_builds.contains(&lease.build)
                    && lease.state == LeaseState::Ready
                    && !st.retiring.contains_key(id)
                    && !reap.iter().any(|(r, ..)| r == id)
                {
                    abandoned.push((id.clone(), lease.build.clone()));
                }
            }
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
            st.exited_clean.retain(|id| slots.contains(id));
            for id in &slots {
                if !live_ids.contains(id) {
                    let since = *st.orphan_slots.entry(id.clone()).or_insert(now);
                    if since.elapsed() > stale_after || st.exited_clean.contains(id) {
                        free_slots.push(id.clone());
                    }
                }
            }
            let mut leases: Vec<RunnerLease> = st
                .runners
                .values()
                .filter(|s| s.value.build == build)
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
        for id in suspects {
            tokio::spawn(self.clone().probe_runner(id));
        }
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
            let mut st = self.state.lock().unwrap();
            st.orphan_slots.remove(&id);
            st.exited_clean.remove(&id);
        }

        for (id, old) in abandoned {
            self.retiring(&id, Reason::BuildGone);
            info!(%pool, runner = %id, build = %old, "retiring a runner of a build no parent uses any more");
            self.send_retire(&id).await;
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
            if self.retiring(&id, Reason::Idle) {
                debug!(%pool, runner = %id, "retiring idle runner");
                self.send_retire(&id).await;
            }
        }
    }

    /// Notes that `id` is told to retire, and why, and announces it the
    /// first time. False when it was told already.
    fn retiring(&self, id: &str, why: Reason) -> bool {
        let mut st = self.state.lock().unwrap();
        if st.retiring.contains_key(id) {
            return false;
        }
        st.retiring.insert(id.to_string(), (Instant::now(), why));
        self.announce(&st, |c| {
            Outgoing::new(EventKind::RunnerRetiring, c)
                .runner(id)
                .reason(why)
        });
        true
    }

    /// Asks a runner whose lease went quiet for a heartbeat whether its
    /// connection lives: a request on its control subject, which a live
    /// runner ignores (no answer) and NATS answers with no responders for a
    /// dead one. A dead one is reaped at the next round instead of after
    /// three heartbeats.
    ///
    /// On no responders it asks once more, a quarter of a heartbeat later
    /// ([`RECONNECT_ALLOWANCE`]): a runner whose server just died (often
    /// with the old scaler's, which is what prompts a probe of every
    /// runner) has no subscription anywhere until it has reconnected to
    /// another server.
    async fn probe_runner(self: Arc<Self>, id: String) {
        let subject = subjects::runner_control(&self.config.name, &id);
        let wait = self.config.heartbeat / 2;
        let mut gone = !self.parent.anyone_answers(subject.clone(), wait).await;
        if gone {
            tokio::time::sleep(self.config.heartbeat / RECONNECT_ALLOWANCE).await;
            gone = !self.parent.anyone_answers(subject, wait).await;
        }
        let mut st = self.state.lock().unwrap();
        st.probing.remove(&id);
        if gone && st.runners.contains_key(&id) {
            debug!(pool = %self.config.name, runner = %id, "a quiet runner's connection is gone");
            st.runners_gone.insert(id);
            drop(st);
            // Reap it (and boot a replacement) now, not at the next round.
            self.demand_changed.notify_one();
        }
    }

    /// Boots one runner: slot first (compare-and-set against `max`), then
    /// the lease, then the backend.
    async fn boot(self: Arc<Self>, port: Arc<dyn PoolPort>, id: String, max: usize) {
        let pool = &self.config.name;
        // `leased`: the lease was written, so its removal announces the
        // failure; else it is announced here.
        let fail = |e: Error, leased: bool, permanent: bool| {
            let mut st = self.state.lock().unwrap();
            st.pending.remove(&id);
            st.retry.failed(permanent, self.config.boot_cooldown);
            let (reason, detail) = (boot_failure_reason(&e), e.to_string());
            if leased {
                st.gone_causes.insert(id.clone(), (reason, detail));
            } else {
                self.announce(&st, |c| {
                    Outgoing::new(EventKind::RunnerBootFailed, c)
                        .runner(id.as_str())
                        .reason(reason)
                        .detail(detail)
                });
            }
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
                fail(e, false, false);
                return;
            }
        }
        let key = subjects::runner_key(&id);
        let lease = self.booting_lease(&id);
        if let Err(e) = kv::compare_and_set(&self.store, &key, &lease, None).await {
            warn!(%pool, "cannot write the lease of a new runner: {e}");
            let _ = kv::free_slot(&self.store, &id).await;
            fail(e, false, false);
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
                        if me.exited_booting(&id, &reason) {
                            // (It would exit the same way again.)
                            me.record_boot_failure(&id, reason.clone(), true).await;
                        }
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
            Err(BootFailure { error, permanent }) => {
                let words = failure_words(&error);
                // (The cause first: the lease's removal announces it.)
                fail(error, true, permanent);
                self.record_boot_failure(&id, words, permanent).await;
                let _ = self.store.delete(&key).await;
                let _ = kv::free_slot(&self.store, &id).await;
            }
        }
    }

    /// A runner this scaler booted exited before it was ready: its boot
    /// failed, for the reason the backend gives (a local runner's last
    /// words, say a refused NATS permission).
    /// Returns whether it was still booting.
    fn exited_booting(&self, id: &str, reason: &str) -> bool {
        let mut st = self.state.lock().unwrap();
        let booting = match st.runners.get(id) {
            Some(s) => s.value.state == LeaseState::Booting,
            // Not in the bucket: still booting if its lease was never
            // seen; else it is gone already (a runner that drained
            // removes its own lease before it exits, and a backend may
            // tell the exit later than the bucket tells the removal).
            None => st.pending.contains(id),
        };
        if !booting {
            return false;
        }
        st.retry.failed(true, self.config.boot_cooldown);
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
        true
    }

    /// Writes why a runner's boot failed into its lease, which is about to
    /// be removed: every parent of the build sees it through its watch, so
    /// its callers waiting for a runner end with this reason.
    async fn record_boot_failure(&self, id: &str, words: String, permanent: bool) {
        // Everyone who may read the bucket reads this: the words, not
        // whatever else a backend's error may have quoted.
        let words: String = words.chars().take(BOOT_FAILURE_MAX).collect();
        let key = subjects::runner_key(id);
        let recorded = kv::update(
            &self.store,
            &key,
            || None,
            |l: &mut RunnerLease| {
                l.boot_failure = Some(words.clone());
                l.boot_failure_permanent = permanent;
                true
            },
        );
        if let Err(e) = recorded.await {
            debug!(pool = %self.config.name, runner = %id, "cannot record why the boot failed: {e}");
        }
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
            // Why, for the event the lease's removal brings.
            let told = st.retiring.remove(id).map(|(_, why)| why);
            // (Its lease already gone from the mirror: it was announced.)
            if st.runners.contains_key(id) {
                let reason = gone_reason(why, told);
                st.gone_causes
                    .insert(id.to_string(), (reason, why.to_string()));
            }
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

/// Most characters of a failed boot's reason a lease carries.
const BOOT_FAILURE_MAX: usize = 500;

/// A boot error in the words a caller's `Error::BootFailed` carries (not
/// wrapped twice in "could not boot a runner").
fn failure_words(e: &Error) -> String {
    match e {
        Error::BootFailed { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
