//! The scaler's work, done by the elected parent of each build only: reap
//! dead runners, retire the runners of builds no parent uses any more, then
//! boot or retire the runners of its own build per the plan of
//! [`super::scaling`] (booting one runner is [`super::booting`], removing
//! one for good [`super::reap`]). Functions of the whole [`Fleet`], called
//! as `scaler::scale(&fleet, ..)` by the parent loop.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::scaling::{self, ScalingRules};
use super::{booting, reap};
use super::{Fleet, PoolPort};
use crate::fleet::kv;
use crate::ops::Outgoing;
use crate::protocol::lease::{LeaseState, RunnerLease};
use crate::protocol::pool_events::{EventKind, Reason};
use crate::protocol::subjects;

/// How often a scaler asks the backend for the pool's runners that have no
/// lease (a Machine whose booting parent died before it recorded the
/// handle, say).
const SCAN_EVERY: Duration = Duration::from_secs(30);

/// The second ask of a probe comes a heartbeat divided by this after the
/// first got no responders (see `probe_runner`).
const RECONNECT_ALLOWANCE: u32 = 4;

/// The scaler's round: reap dead leases, retire runners of abandoned
/// builds, then boot or retire runners of this build per the plan.
pub(super) async fn scale(fleet: &Arc<Fleet>, port: &Arc<dyn PoolPort>) {
    {
        let st = fleet.state.lock().unwrap();
        if st.bucket_unwritable || st.mirror_stalled(fleet.config.heartbeat) {
            // Leases cannot change now, or this parent cannot see them
            // change: judging them would reap live runners.
            return;
        }
    }
    let pool = &fleet.config.name;
    let scan_due = {
        let mut st = fleet.state.lock().unwrap();
        let due = st.last_scan.is_none_or(|at| at.elapsed() >= SCAN_EVERY);
        if due {
            st.last_scan = Some(Instant::now());
        }
        due
    };
    if scan_due {
        tokio::spawn(reap::reap_unleased(fleet.clone()));
    }
    let stale_after = fleet.stale_after();
    let (min, max) = port.limits();
    let rules = ScalingRules {
        min,
        max,
        max_concurrency: fleet.config.max_concurrency,
        idle_shutdown_after: fleet.config.idle_shutdown_after,
        min_idle_shutdown_after: fleet.config.min_idle_shutdown_after,
        hot_start_percent: fleet.config.hot_start_percent,
    };
    let mut reap: Vec<(String, String, String)> = Vec::new();
    let mut dead_parents = Vec::new();
    let mut free_slots = Vec::new();
    let build = &*fleet.parent.build_id;
    let mut abandoned = Vec::new();
    let mut suspects = Vec::new();
    let (leases, slots, waiting, retry_blocked) = {
        let mut st = fleet.state.lock().unwrap();
        let probe_all = std::mem::take(&mut st.probe_all);
        for (id, seen) in &st.runners {
            let silent = seen.changed.elapsed();
            let gone = st.runners_gone.contains(id);
            let dead = match seen.value.state {
                LeaseState::Booting => silent > fleet.config.boot_timeout,
                _ => gone || silent > stale_after,
            };
            if !dead
                && seen.value.state != LeaseState::Booting
                && (probe_all || silent > fleet.config.heartbeat)
                && !st.probing.contains(id)
            {
                suspects.push(id.clone());
            }
            let retire_overdue = st
                .retiring
                .get(id)
                .is_some_and(|(at, _)| at.elapsed() > fleet.config.shutdown_timeout + stale_after);
            if dead || retire_overdue {
                let why = if seen.value.state == LeaseState::Booting {
                    format!(
                        "did not become ready within {:?}",
                        fleet.config.boot_timeout
                    )
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
        let me = &fleet.parent.parent_id;
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
                leases.push(booting::booting_lease(fleet, id));
            }
        }
        let blocked = !st.retry.is_open();
        (leases, slots.len(), waiting, blocked)
    };
    for id in suspects {
        tokio::spawn(probe_runner(fleet.clone(), id));
    }
    for (id, handle, why) in reap {
        warn!(%pool, runner = %id, "reaping runner: {why}");
        reap::reap(fleet, port, &id, &handle, &why, false).await;
    }
    for id in dead_parents {
        debug!(%pool, parent = %id, "removing the lease of a silent parent");
        let _ = fleet.store.delete(subjects::parent_key(&id)).await;
    }
    for id in free_slots {
        debug!(%pool, runner = %id, "freeing the slot of a runner without a lease");
        let _ = kv::free_slot(&fleet.store, &id).await;
        let mut st = fleet.state.lock().unwrap();
        st.orphan_slots.remove(&id);
        st.exited_clean.remove(&id);
    }

    for (id, old) in abandoned {
        retiring(fleet, &id, Reason::BuildGone);
        info!(%pool, runner = %id, build = %old, "retiring a runner of a build no parent uses any more");
        fleet.send_retire(&id).await;
    }

    let plan = scaling::plan(&rules, &leases, slots, waiting);
    if plan.boot > 0 && !retry_blocked {
        for _ in 0..plan.boot {
            let id = uuid::Uuid::new_v4().simple().to_string();
            fleet.state.lock().unwrap().pending.insert(id.clone());
            tokio::spawn(booting::boot(fleet.clone(), port.clone(), id, max));
        }
    }
    for id in plan.retire {
        if retiring(fleet, &id, Reason::Idle) {
            debug!(%pool, runner = %id, "retiring idle runner");
            fleet.send_retire(&id).await;
        }
    }
}

/// Notes that `id` is told to retire, and why, and announces it the
/// first time. False when it was told already.
fn retiring(fleet: &Fleet, id: &str, why: Reason) -> bool {
    let mut st = fleet.state.lock().unwrap();
    if st.retiring.contains_key(id) {
        return false;
    }
    st.retiring.insert(id.to_string(), (Instant::now(), why));
    fleet.announce(&st, |c| {
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
async fn probe_runner(fleet: Arc<Fleet>, id: String) {
    let subject = subjects::runner_control(&fleet.config.name, &id);
    let wait = fleet.config.heartbeat / 2;
    let mut gone = !fleet.parent.anyone_answers(subject.clone(), wait).await;
    if gone {
        tokio::time::sleep(fleet.config.heartbeat / RECONNECT_ALLOWANCE).await;
        gone = !fleet.parent.anyone_answers(subject, wait).await;
    }
    let mut st = fleet.state.lock().unwrap();
    st.probing.remove(&id);
    if gone && st.runners.contains_key(&id) {
        debug!(pool = %fleet.config.name, runner = %id, "a quiet runner's connection is gone");
        st.runners_gone.insert(id);
        drop(st);
        // Reap it (and boot a replacement) now, not at the next round.
        fleet.demand_changed.notify_one();
    }
}
