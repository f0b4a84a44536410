//! This parent's own lease, and the scaler election: renew the term while
//! leading, take over a silent scaler by compare-and-set.
//!
//! The election's state (this parent's term, the scaler last seen) lives
//! in the fleet's mirror ([`super::mirror::FleetState`]), which the watch
//! updates and the scaler's round reads under the same lock; so these are
//! functions of the whole [`Fleet`], [`parent_loop`] first.

use std::sync::Arc;

use flame_core::Error;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{leave, scaler, Fleet, PoolPort};
use crate::fleet::kv::{self, Cas};
use crate::ops::Outgoing;
use crate::protocol::lease::{ParentLease, ScalerLease};
use crate::protocol::pool_events::EventKind;
use crate::protocol::subjects;

/// How long the parent loop's round under way may go on once the pool
/// closes: enough for a round's own work (a reap's stop, say), not for a
/// JetStream that does not answer (each request may take 5 s).
const CLOSING_ROUND_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Renews this parent's lease, takes part in the scaler election, and
/// scales when elected; leaves the pool when it closes.
pub(super) async fn parent_loop(fleet: Arc<Fleet>, port: Arc<dyn PoolPort>) {
    let heartbeat = fleet.config.heartbeat;
    let mut tick = tokio::time::interval(heartbeat / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renewal = Instant::now() - heartbeat;
    let permissions = fleet.parent.events.permissions.clone();
    loop {
        let demand = tokio::select! {
            _ = fleet.closed.cancelled() => break,
            _ = tick.tick() => false,
            _ = fleet.demand_changed.notified() => true,
        };
        if !fleet.parent.connected() {
            // Leases cannot be read or written; judging them now would
            // reap live runners.
            continue;
        }
        // A refusal of any of the bucket's subjects ends the round at
        // once (its operation would only wait for an answer that never
        // comes); the waiting callers learn of it from the refusal
        // listener (see `Fleet::start`).
        let mark = permissions.mark_about(super::bucket_subjects(&fleet.config.name));
        let round = async {
            let waiting = port.waiting();
            let renew_due = last_renewal.elapsed() >= heartbeat;
            let changed = fleet.state.lock().unwrap().my_waiting_sent != Some(waiting);
            if (renew_due || changed) && renew_parent(&fleet, waiting).await {
                last_renewal = Instant::now();
            }
            if !fleet.is_leading() {
                // Every round: a dead scaler is found within a third of a
                // heartbeat (a cheap request, answered at once either way).
                check_scaler_present(&fleet).await;
            }
            if renew_due || !demand {
                elect(&fleet).await;
            }
            if fleet.is_leading() {
                scaler::scale(&fleet, &port).await;
            }
            Ok(())
        };
        tokio::pin!(round);
        let ended = tokio::select! {
            ended = permissions.guard(&mark, round.as_mut()) => Some(ended),
            _ = fleet.closed.cancelled() => None,
        };
        let ended = match ended {
            Some(ended) => ended,
            // Closing: let the round finish what it does, but not for
            // long, so that shutdown stays bounded whatever the server
            // answers (or does not).
            None => match tokio::time::timeout(
                CLOSING_ROUND_LIMIT,
                permissions.guard(&mark, round.as_mut()),
            )
            .await
            {
                Ok(ended) => ended,
                Err(_) => {
                    debug!(pool = %fleet.config.name, "the last round did not end within {CLOSING_ROUND_LIMIT:?} of the close; leaving");
                    break;
                }
            },
        };
        if let Err(e) = ended {
            debug!(pool = %fleet.config.name, "a round of the parent loop ended: {e}");
        }
    }
    leave::leave(&fleet).await;
}

async fn renew_parent(fleet: &Fleet, waiting: usize) -> bool {
    let attempt_started = Instant::now();
    match write_parent_lease(fleet, waiting).await {
        Ok(()) => true,
        Err(e) => {
            let not_ready = {
                let mut st = fleet.state.lock().unwrap();
                if !st.bucket_unwritable {
                    warn!(pool = %fleet.config.name, "cannot renew this parent's lease; judging no lease until the bucket can be written: {e}");
                }
                st.bucket_unwritable = true;
                // Unwritable since the last write that succeeded (a
                // heartbeat before this attempt, at most).
                let since = st.last_written.unwrap_or(attempt_started);
                let (since, attempts) = st.unwritable_since.get_or_insert((since, 0));
                *attempts += 1;
                // Past the bound, the callers waiting for a runner
                // learn why none comes (renewals go on being tried).
                (since.elapsed() >= fleet.config.boot_timeout).then(|| Error::JetStreamNotReady {
                    pool: fleet.config.name.clone(),
                    tried: format!(
                        "write this parent's lease in the KV bucket {}",
                        subjects::bucket(&fleet.config.name)
                    ),
                    attempts: *attempts,
                    waited: since.elapsed(),
                    last: e.to_string(),
                })
            };
            if let Some(e) = not_ready {
                fleet.report_trouble(e);
            }
            false
        }
    }
}

/// Writes this parent's lease (with `waiting` callers).
pub(super) async fn write_parent_lease(fleet: &Fleet, waiting: usize) -> Result<(), Error> {
    let beat = {
        let mut st = fleet.state.lock().unwrap();
        st.my_beat += 1;
        st.my_beat
    };
    let lease = ParentLease {
        parent: fleet.parent.parent_id.clone(),
        build: fleet.parent.build_id.to_string(),
        waiting,
        beat,
    };
    let key = subjects::parent_key(&fleet.parent.parent_id);
    match fleet.store.put(key, kv::to_json(&lease)).await {
        Ok(revision) => {
            let mut st = fleet.state.lock().unwrap();
            st.my_waiting_sent = Some(waiting);
            if st.echo.is_none() && st.last_revision < revision {
                st.echo = Some((revision, Instant::now()));
            }
            st.unwritable_since = None;
            st.last_written = Some(Instant::now());
            fleet.bucket_ready_again();
            if st.bucket_unwritable {
                // Nobody could renew meanwhile: restart the clocks so
                // that no lease looks dead just for that.
                st.bucket_unwritable = false;
                st.forget_silence();
                info!(pool = %fleet.config.name, "the pool's bucket can be written again");
            }
            Ok(())
        }
        Err(e) => Err(Error::nats("cannot write this parent's lease", e)),
    }
}

/// Asks the scaler of this build whether it is still there. A
/// no-responders answer means its connection is gone (the process died,
/// or lost NATS): the next election round takes over at once. A slow or
/// missing answer proves nothing; the lease's staleness decides then.
async fn check_scaler_present(fleet: &Fleet) {
    let scaler = fleet.state.lock().unwrap().scaler.clone();
    let Some(scaler) = scaler else {
        return;
    };
    if scaler.value.parent == fleet.parent.parent_id {
        return;
    }
    let subject = subjects::parent_present(&fleet.config.name, &scaler.value.parent);
    let heartbeat = fleet.config.heartbeat;
    if !fleet.parent.anyone_answers(subject, heartbeat / 2).await {
        info!(pool = %fleet.config.name, scaler = %scaler.value.parent, "the scaler's connection is gone; taking over");
        fleet.state.lock().unwrap().scaler_gone = Some(scaler.revision);
    }
}

/// One round of the election of this build's scaler: renew the term if
/// leading, else take over a missing or dead scaler by compare-and-set.
async fn elect(fleet: &Fleet) {
    let pool = &fleet.config.name;
    let (leading, scaler, stalled, gone) = {
        let st = fleet.state.lock().unwrap();
        let stalled = st.mirror_stalled(fleet.config.heartbeat);
        (st.leading, st.scaler.clone(), stalled, st.scaler_gone)
    };
    let lease = |beat: u64| ScalerLease {
        parent: fleet.parent.parent_id.clone(),
        build: fleet.parent.build_id.to_string(),
        beat,
    };
    let (value, revision) = match (leading, scaler) {
        (Some(term), _) => (lease(term + 1), Some(term)),
        (None, None) => (lease(0), None),
        (None, Some(s)) if gone == Some(s.revision) => (lease(0), Some(s.revision)),
        // A stalled watch makes the scaler look silent: wait for it.
        (None, Some(s)) if s.changed.elapsed() > fleet.stale_after() && !stalled => {
            info!(%pool, old = %s.value.parent, "scaler silent for {:?}; taking over", s.changed.elapsed());
            (lease(0), Some(s.revision))
        }
        (None, Some(_)) => return,
    };
    let result = kv::compare_and_set(&fleet.store, &fleet.scaler_key, &value, revision).await;
    let mut st = fleet.state.lock().unwrap();
    match result {
        Ok(Cas::Written(revision)) => {
            if st.leading.is_none() {
                info!(%pool, build = %fleet.parent.build_id, "this parent is now the pool's scaler for its build");
                fleet.announce(&st, |c| Outgoing::new(EventKind::ScalerElected, c));
                // The old scaler may have died with runners (a machine
                // lost): ask every runner at once rather than wait for
                // their leases to go quiet.
                st.probe_all = true;
            }
            st.leading = Some(revision);
        }
        Ok(Cas::Conflict) => {
            if st.leading.is_some() {
                warn!(%pool, "no longer the scaler: another parent took over");
            }
            st.leading = None;
        }
        Err(e) => {
            // Unsure whether the term was renewed: step down rather than
            // risk two scalers.
            if st.leading.is_some() {
                warn!(%pool, "no longer the scaler: {e}");
            }
            st.leading = None;
        }
    }
}
