//! Removing runners for good: one runner whose lease is dead or whose
//! process exited (its lease, its slot and what is left of it), and the
//! backend's runners that have no lease at all. The scaler's round
//! ([`super::scaler`]) and a boot whose runner exited ([`super::booting`])
//! both come here.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::{Fleet, PoolPort};
use crate::fleet::kv;
use crate::protocol::lease::RunnerLease;
use crate::protocol::pool_events::gone_reason;
use crate::protocol::reports::ReportKind;
use crate::protocol::subjects;

/// Terminates the pool's runners that the backend lists but that have
/// no lease in the bucket: nobody can call them, and a lease is always
/// written before a runner is booted, so they were given up on. Runners
/// of a live private pool of the same name (their parent answers on
/// its event subject) are left alone.
pub(super) async fn reap_unleased(fleet: Arc<Fleet>) {
    let pool = &fleet.config.name;
    let backend = fleet.booter.backend().clone();
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
            let st = fleet.state.lock().unwrap();
            st.runners.contains_key(id) || st.pending.contains(id)
        };
        if known {
            continue;
        }
        // The mirror may lag behind a boot: ask the bucket itself.
        match kv::read::<RunnerLease>(&fleet.store, &subjects::runner_key(id)).await {
            Ok(None) => {}
            _ => continue,
        }
        let theirs = &runner.parent_id;
        let events = subjects::parent_event(pool, theirs, ReportKind::Ping);
        if !theirs.is_empty()
            && fleet
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

/// Removes a runner for good: its lease (which fails calls on it in
/// every parent), its slot, and what is left of it.
/// `exited`: the backend saw the runner's process end.
pub(super) async fn reap(
    fleet: &Fleet,
    port: &Arc<dyn PoolPort>,
    id: &str,
    handle: &str,
    why: &str,
    exited: bool,
) {
    let pool = &fleet.config.name;
    let (owned, handle) = {
        let mut st = fleet.state.lock().unwrap();
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
    let _ = fleet.store.delete(subjects::runner_key(id)).await;
    port.clone().lease_gone(id, why);
    // The slot is freed only once the runner is known to be gone, so a
    // replacement never runs beside it.
    let gone = match owned {
        Some(stopper) => {
            stopper.stop(Duration::ZERO).await;
            true
        }
        None if !handle.is_empty() => match fleet.booter.backend().terminate(&handle, id).await {
            Ok(()) => true,
            Err(e) => {
                warn!(%pool, runner = %id, "cannot terminate runner: {e}");
                false
            }
        },
        // Nothing to stop it with: its slot is freed once it has been
        // without a lease for a while (see `scaler::scale`).
        None => exited,
    };
    if gone {
        let _ = kv::free_slot(&fleet.store, id).await;
    }
}
