//! The scaler booting one runner: a slot taken by compare-and-set against
//! `max`, then the runner's lease, then the backend; and a failed boot's
//! reason written into the lease, so that every parent of the build sees
//! it. Functions of the whole [`Fleet`] (a boot takes its bucket, its
//! backend and its mirror), called as `booting::boot(fleet, ..)` by the
//! scaler's round.

use std::sync::Arc;

use flame_core::Error;
use tracing::{debug, warn};

use super::{reap, Fleet, PoolPort};
use crate::boot::boot_failure_reason;
use crate::boot::BootFailure;
use crate::fleet::kv;
use crate::ops::Outgoing;
use crate::protocol::lease::{LeaseState, RunnerLease};
use crate::protocol::pool_events::EventKind;
use crate::protocol::subjects;

/// The lease of a runner this parent's scaler is about to boot.
pub(super) fn booting_lease(fleet: &Fleet, id: &str) -> RunnerLease {
    RunnerLease {
        runner: id.to_string(),
        pool: fleet.config.name.clone(),
        state: LeaseState::Booting,
        build: fleet.parent.build_id.to_string(),
        capacity: fleet.config.max_concurrency,
        load: 0,
        queued: 0,
        idle_ms: 0,
        handle: String::new(),
        booted_by: fleet.parent.parent_id.clone(),
        beat: 0,
        outages: 0,
        outage_ms: 0,
        since_outage_ms: 0,
        boot_failure: None,
        boot_failure_permanent: false,
    }
}

/// Boots one runner: slot first (compare-and-set against `max`), then
/// the lease, then the backend.
pub(super) async fn boot(fleet: Arc<Fleet>, port: Arc<dyn PoolPort>, id: String, max: usize) {
    let pool = &fleet.config.name;
    // `leased`: the lease was written, so its removal announces the
    // failure; else it is announced here.
    let fail = |e: Error, leased: bool, permanent: bool| {
        let mut st = fleet.state.lock().unwrap();
        st.pending.remove(&id);
        st.retry.failed(permanent, fleet.config.boot_cooldown);
        let (reason, detail) = (boot_failure_reason(&e), e.to_string());
        if leased {
            st.gone_causes.insert(id.clone(), (reason, detail));
        } else {
            fleet.announce(&st, |c| {
                Outgoing::new(EventKind::RunnerBootFailed, c)
                    .runner(id.as_str())
                    .reason(reason)
                    .detail(detail)
            });
        }
        let runners = st.runners.len();
        drop(st);
        fleet.booter.grow_end(runners, Err(e));
    };
    match kv::take_slot(&fleet.store, &id, max).await {
        Ok(true) => {}
        Ok(false) => {
            // Full: another boot won the race.
            fleet.state.lock().unwrap().pending.remove(&id);
            return;
        }
        Err(e) => {
            warn!(%pool, "cannot take a slot: {e}");
            fail(e, false, false);
            return;
        }
    }
    let key = subjects::runner_key(&id);
    let lease = booting_lease(&fleet, &id);
    if let Err(e) = kv::compare_and_set(&fleet.store, &key, &lease, None).await {
        warn!(%pool, "cannot write the lease of a new runner: {e}");
        let _ = kv::free_slot(&fleet.store, &id).await;
        fail(e, false, false);
        return;
    }
    let runners = fleet.state.lock().unwrap().runners.len() + 1;
    match fleet.booter.start(&id, None, runners).await {
        Ok(booted) => {
            let handle = booted.handle.clone();
            fleet
                .state
                .lock()
                .unwrap()
                .owned
                .insert(id.clone(), booted.stopper);
            if let Some(exited) = booted.exited {
                let me = fleet.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let reason = exited.await;
                    if exited_booting(&me, &id, &reason) {
                        // (It would exit the same way again.)
                        record_boot_failure(&me, &id, reason.clone(), true).await;
                    }
                    reap::reap(&me, &port, &id, "", &reason, true).await;
                });
            }
            // Record the handle so any later scaler can terminate it.
            let recorded = kv::update(
                &fleet.store,
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
            record_boot_failure(&fleet, &id, words, permanent).await;
            let _ = fleet.store.delete(&key).await;
            let _ = kv::free_slot(&fleet.store, &id).await;
        }
    }
}

/// A runner this scaler booted exited before it was ready: its boot
/// failed, for the reason the backend gives (a local runner's last
/// words, say a refused NATS permission).
/// Returns whether it was still booting.
fn exited_booting(fleet: &Fleet, id: &str, reason: &str) -> bool {
    let mut st = fleet.state.lock().unwrap();
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
    st.retry.failed(true, fleet.config.boot_cooldown);
    let runners = st.runners.len();
    drop(st);
    let pool = fleet.config.name.clone();
    fleet.booter.grow_end(
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
async fn record_boot_failure(fleet: &Fleet, id: &str, words: String, permanent: bool) {
    // Everyone who may read the bucket reads this: the words, not
    // whatever else a backend's error may have quoted.
    let words: String = words.chars().take(BOOT_FAILURE_MAX).collect();
    let key = subjects::runner_key(id);
    let recorded = kv::update(
        &fleet.store,
        &key,
        || None,
        |l: &mut RunnerLease| {
            l.boot_failure = Some(words.clone());
            l.boot_failure_permanent = permanent;
            true
        },
    );
    if let Err(e) = recorded.await {
        debug!(pool = %fleet.config.name, runner = %id, "cannot record why the boot failed: {e}");
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
