//! What a shared pool's fleet tells the pool ([`PoolPort`]): the runners'
//! leases as they change (a new runner, one ready, draining, gone, or back
//! from an outage of its NATS connection), and what the pool tells the
//! scaler back (its waiting callers and limits).

use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use tracing::{debug, info};

use super::model::{RunnerId, RunnerState};
use super::runners::RunnerEntry;
use super::slot::{deliver, Handoff};
use super::PoolInner;
use crate::fleet::PoolPort;
use crate::protocol::lease::{LeaseState, RunnerLease};

/// Calls sent this long before a runner's outage began may have been on
/// their way to it when it lost its connection.
const OUTAGE_LEAD: Duration = Duration::from_millis(250);

/// ... and this long after it ended. The runner ends an outage when its
/// own server has its subscriptions again; in a cluster, the other servers
/// learn of them a little later, and calls they route before then are lost
/// too.
const OUTAGE_TRAIL: Duration = Duration::from_millis(100);

/// When, on this parent's clock, the runner's last outage was, as its
/// lease written `age` ago reports it, widened by [`OUTAGE_LEAD`] and
/// [`OUTAGE_TRAIL`].
///
/// The write's age comes from the bucket's timestamp, so that a lease read
/// late (a watch resumed after a server restart) still places the outage
/// right: read-time alone would move the window later by the delay.
fn outage_window(
    lease: &RunnerLease,
    age: Duration,
) -> Option<(std::time::Instant, std::time::Instant)> {
    // The reply table's clock.
    let now = std::time::Instant::now();
    let ended = now.checked_sub(age + Duration::from_millis(lease.since_outage_ms))?;
    let began = ended.checked_sub(Duration::from_millis(lease.outage_ms) + OUTAGE_LEAD)?;
    Some((began, ended + OUTAGE_TRAIL))
}

/// What a shared pool's fleet tells the pool.
impl PoolPort for PoolInner {
    fn lease_seen(self: Arc<Self>, lease: &RunnerLease, age: Duration) {
        let id: RunnerId = Arc::from(lease.runner.as_str());
        let mut lost = None;
        let handoffs: Vec<Handoff> = {
            let mut st = self.state.lock().unwrap();
            if st.closed {
                return;
            }
            if lease.build != *self.parent.build_id {
                // Another build (a rolling deploy): never place calls there.
                // Its own parents and scaler look after it.
                return;
            }
            if let Some(words) = &lease.boot_failure {
                // Its boot failed (the scaler says why just before it removes
                // the lease): callers still waiting for a runner end with
                // this reason, as in a private pool: at once when it would
                // fail again and nobody else can serve them, else when
                // their deadline comes.
                let mut failed = Vec::new();
                if st.model.count(RunnerState::Ready) == 0 {
                    let e = Error::BootFailed {
                        pool: self.config.name.clone(),
                        reason: words.clone(),
                        source: None,
                    };
                    let permanent = lease.boot_failure_permanent;
                    st.boot
                        .failed_in_fleet(e, permanent, self.config.boot_cooldown);
                    if permanent {
                        // (Its own entry, still booting, goes with the lease.)
                        let others_coming = st.model.count(RunnerState::Booting)
                            > usize::from(st.runners.contains_key(&id));
                        if !others_coming {
                            failed = st.fail_waiters();
                        }
                    }
                }
                drop(st);
                drop(failed);
                return;
            }
            if !st.runners.contains_key(&id) {
                if lease.state == LeaseState::Draining {
                    return;
                }
                st.model.add_booting(id.clone());
                st.runners.insert(
                    id.clone(),
                    RunnerEntry::new(
                        &self.config.name,
                        &id,
                        None,
                        None,
                        self.boots.booter.shared_call_key().cloned(),
                    ),
                );
            }
            if let Some(entry) = st.runners.get_mut(&id) {
                entry.handle = Some(lease.handle.clone()).filter(|h| !h.is_empty());
                // A write older than a few heartbeats (an old value a watch
                // delivers late, or clocks far apart) cannot place the
                // outage: the runner's next write will.
                if age <= self.config.heartbeat * 3 {
                    let seen = entry.outages_seen.replace(lease.outages);
                    if seen.is_some_and(|n| lease.outages > n) {
                        lost = outage_window(lease, age);
                    }
                } else {
                    debug!(pool = %self.config.name, runner = %id, ?age, outages = lease.outages, "a lease read late cannot place outages");
                }
            }
            st.model.set_reported_load(&id, lease.load + lease.queued);
            match lease.state {
                LeaseState::Booting => Vec::new(),
                LeaseState::Ready => {
                    st.boot.last_error = None;
                    st.model
                        .runner_ready(&id)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|(w, r)| st.slot_for(&self, w, &r))
                        .collect()
                }
                LeaseState::Draining => {
                    st.stopping(&id);
                    Vec::new()
                }
            }
        };
        if let Some((from, to)) = lost {
            let failed = self.parent.replies.fail_sent_between(&id, from, to, || {
                Error::NatsUnreachable {
                    url: self.parent.nats_url.clone(),
                    reason: format!(
                        "runner {id} lost its connection to NATS while the call ran; the call is lost"
                    ),
                    source: None,
                }
            });
            if failed > 0 {
                info!(pool = %self.config.name, runner = %id, failed, "calls sent while the runner was away from NATS failed");
            } else {
                debug!(pool = %self.config.name, runner = %id, ?age, began_ago = ?from.elapsed(), ended_ago = ?to.elapsed(), "the runner was away from NATS; no call was sent to it meanwhile");
            }
        }
        if !handoffs.is_empty() {
            deliver(handoffs);
        }
        self.changed.notify_waiters();
    }

    fn lease_gone(self: Arc<Self>, id: &str, why: &str) {
        let id: RunnerId = Arc::from(id);
        if self.state.lock().unwrap().runners.contains_key(&id) {
            self.runner_gone(&id, format!("runner stopped: {why}"));
        }
    }

    fn waiting(&self) -> usize {
        self.state.lock().unwrap().model.waiting()
    }

    fn limits(&self) -> (usize, usize) {
        PoolInner::limits(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(outage_ms: u64, since_outage_ms: u64) -> RunnerLease {
        serde_json::from_value(serde_json::json!({
            "runner": "r1", "pool": "p", "state": "ready", "build": "b",
            "capacity": 1, "load": 0, "queued": 0, "idle_ms": 0, "handle": "",
            "booted_by": "x", "beat": 1, "outages": 1,
            "outage_ms": outage_ms, "since_outage_ms": since_outage_ms,
        }))
        .unwrap()
    }

    #[test]
    fn an_outage_read_late_is_placed_by_the_age_of_its_write() {
        let now = std::time::Instant::now();
        let ms = |d: Duration| d.as_millis() as i64;
        let ago = |t: std::time::Instant| {
            ms(now.saturating_duration_since(t)) - ms(t.saturating_duration_since(now))
        };
        // Ended 1 s before the write, lasted 100 ms; read promptly.
        let (from, to) = outage_window(&lease(100, 1000), Duration::ZERO).unwrap();
        assert!((1340..1360).contains(&ago(from)), "{}", ago(from));
        assert!((890..910).contains(&ago(to)), "{}", ago(to));
        // The same write read 2 s after it was made: 2 s further back.
        let (from, to) = outage_window(&lease(100, 1000), Duration::from_secs(2)).unwrap();
        assert!((3340..3360).contains(&ago(from)), "{}", ago(from));
        assert!((2890..2910).contains(&ago(to)), "{}", ago(to));
    }
}
