//! This parent's mirror of the pool's bucket: a watch that applies every
//! change, resumed from the last revision after a reconnect.
//!
//! [`FleetState`] is the mirror itself (the bucket as last seen, and this
//! parent's part in it), behind the fleet's one lock so that the scaler's
//! round judges one consistent view; it owns its queries. Following the
//! watch needs the whole [`Fleet`] (its bucket, its pool, its events): the
//! functions [`first_read`] and [`watch`] take it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Entry, Operation, Watch};
use flame_core::Error;
use futures::StreamExt;
use tokio::time::Instant;
use tracing::debug;

use super::{Fleet, Owned, PoolPort};
use crate::boot::RetryGate;
use crate::ops::{Counts, Outgoing};
use crate::protocol::lease::{LeaseState, ParentLease, RunnerLease, ScalerLease, Slots};
use crate::protocol::pool_events::{EventKind, Reason};
use crate::protocol::subjects;

/// What this parent knows of the pool: the bucket as last seen, and its
/// own part in it.
#[derive(Default)]
pub(super) struct FleetState {
    pub(super) runners: HashMap<String, Seen<RunnerLease>>,
    pub(super) parents: HashMap<String, Seen<ParentLease>>,
    /// The scaler of this parent's build (other builds' scalers are not
    /// this parent's concern).
    pub(super) scaler: Option<Seen<ScalerLease>>,
    pub(super) slots: Option<Slots>,
    /// Last revision applied, to resume the watch after a reconnect.
    pub(super) last_revision: u64,
    /// This parent's scaler term: the revision of the `scaler` key it wrote.
    pub(super) leading: Option<u64>,
    /// Boots this parent's scaler started whose lease it has not seen yet.
    pub(super) pending: HashSet<String>,
    /// Runners this scaler booted and can stop directly.
    pub(super) owned: Owned,
    /// Runners told to retire, when, and why.
    pub(super) retiring: HashMap<String, (Instant, Reason)>,
    /// Why this scaler removed a runner's lease (reaped, failed boot), for
    /// the event its removal brings: the reason and its words.
    pub(super) gone_causes: HashMap<String, (Reason, String)>,
    /// Slot ids without a lease, and since when.
    pub(super) orphan_slots: HashMap<String, Instant>,
    /// Runners that removed their own lease while draining: they have
    /// finished and are exiting, so their slots are freed at the next
    /// round rather than after the lease-less wait of an unknown runner
    /// (which kept a new build's callers waiting after a rolling deploy).
    pub(super) exited_clean: HashSet<String>,
    pub(super) retry: RetryGate,
    pub(super) my_beat: u64,
    pub(super) my_waiting_sent: Option<usize>,
    /// This parent's last lease renewal failed: the bucket cannot be
    /// written (e.g. its stream elects a new leader after a server of the
    /// cluster died), so nobody's lease can change and none is judged.
    pub(super) bucket_unwritable: bool,
    /// Since when this parent's lease could not be written, and how many
    /// renewals failed since.
    pub(super) unwritable_since: Option<(Instant, u32)>,
    /// When this parent's lease was last written.
    pub(super) last_written: Option<Instant>,
    /// The oldest write of this parent's own lease not yet seen coming back
    /// through the watch: its revision, and when it was written.
    pub(super) echo: Option<(u64, Instant)>,
    /// The watch of the bucket is being recreated: this parent sees no
    /// change meanwhile, so it judges no lease.
    pub(super) watch_down: bool,
    /// When this scaler last looked for runners without a lease.
    pub(super) last_scan: Option<Instant>,
    /// The revision of the scaler key whose parent was found gone (its
    /// presence subject had no responders): taken over without waiting.
    pub(super) scaler_gone: Option<u64>,
    /// Quiet runners being asked whether their connection lives.
    pub(super) probing: HashSet<String>,
    /// Probe every runner at the next scaling round (just elected).
    pub(super) probe_all: bool,
    /// Runners found without a connection: reaped at the next round.
    pub(super) runners_gone: HashSet<String>,
}

impl FleetState {
    /// Leases of the other parents that are still renewed.
    pub(super) fn other_live_parents<'a>(
        &'a self,
        me: &'a str,
        stale_after: Duration,
    ) -> impl Iterator<Item = &'a ParentLease> + 'a {
        self.parents
            .iter()
            .filter(move |(id, s)| *id != me && s.changed.elapsed() <= stale_after)
            .map(|(_, s)| &s.value)
    }

    /// Builds with a live parent (other than `me`, whose build the caller
    /// adds itself).
    pub(super) fn live_builds(&self, me: &str, stale_after: Duration) -> HashSet<String> {
        self.other_live_parents(me, stale_after)
            .map(|p| p.build.clone())
            .collect()
    }

    /// Whether the watch is being recreated, or has fallen behind: this
    /// parent's own write has not come back through it within `limit`. A
    /// watch can stall without an error (its consumer lived on a server of
    /// the cluster that died), and a stalled mirror makes every lease look
    /// silent.
    pub(super) fn mirror_stalled(&self, limit: Duration) -> bool {
        self.watch_down || self.echo.is_some_and(|(_, at)| at.elapsed() > limit)
    }

    /// The pool's numbers for events and `flame.pools.info`: every lease
    /// (all builds) and boot under way, and the callers every live parent
    /// and runner has waiting.
    pub(super) fn counts(&self, stale_after: Duration) -> Counts {
        let leases = || self.runners.values().map(|s| &s.value);
        let booting = self
            .pending
            .iter()
            .filter(|id| !self.runners.contains_key(*id))
            .count();
        let waiting: usize = self
            .parents
            .values()
            .filter(|p| p.changed.elapsed() <= stale_after)
            .map(|p| p.value.waiting)
            .sum();
        Counts {
            runners: self.runners.len() + booting,
            ready: leases().filter(|l| l.state == LeaseState::Ready).count(),
            load: leases().map(|l| l.load).sum(),
            waiting: waiting + leases().map(|l| l.queued).sum::<usize>(),
        }
    }

    /// Counts every lease and the scaler as just seen.
    pub(super) fn forget_silence(&mut self) {
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
pub(super) struct Seen<T> {
    pub(super) value: T,
    pub(super) revision: u64,
    pub(super) changed: Instant,
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

/// How long a pool's start waits for its watch of the bucket.
const WATCH_START_LIMIT: Duration = Duration::from_secs(10);

/// Reads the bucket once, so the first calls see the runners that are
/// already up; returns the watch to follow it with.
pub(super) async fn first_read(fleet: &Fleet, port: &Arc<dyn PoolPort>) -> Result<Watch, Error> {
    // (Bounded: creating the watch's consumer can hang while the
    // bucket's stream has no leader.)
    let mut watch = tokio::time::timeout(WATCH_START_LIMIT, fleet.store.watch_with_history(">"))
        .await
        .map_err(|_| {
            Error::nats(
                "cannot watch the pool's bucket",
                format!("no answer within {WATCH_START_LIMIT:?}"),
            )
        })?
        .map_err(|e| Error::nats("cannot watch the pool's bucket", e))?;
    let initial = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(entry)) = watch.next().await {
            let current = entry.delta == 0;
            apply(fleet, port, entry);
            if current {
                break;
            }
        }
    });
    // An empty bucket delivers nothing: do not wait for it.
    let empty = fleet
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
    Ok(watch)
}

/// Applies bucket changes until the pool closes, recreating the watch
/// from the last revision whenever it ends or the connection comes back
/// (a watch may stop delivering after a server restart).
pub(super) async fn watch(fleet: Arc<Fleet>, port: Arc<dyn PoolPort>, mut watch: Watch) {
    let connected = fleet.parent.events.connected.clone();
    loop {
        let reconnected = connected.notified();
        tokio::pin!(reconnected);
        let mut check = tokio::time::interval(fleet.config.heartbeat);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                _ = fleet.closed.cancelled() => return,
                _ = &mut reconnected => break,
                _ = check.tick() => {
                    let heartbeat = fleet.config.heartbeat;
                    if fleet.state.lock().unwrap().mirror_stalled(heartbeat * 2) {
                        debug!("the bucket's watch stalled; recreating it");
                        break;
                    }
                }
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => apply(&fleet, &port, entry),
                    Some(Err(e)) => {
                        debug!("KV watch error: {e}");
                        break;
                    }
                    None => break,
                },
            }
        }
        fleet.state.lock().unwrap().watch_down = true;
        // Recreate from where we were. Creating the consumer can hang
        // while the bucket's stream has no leader (a node of the cluster
        // died): give each attempt a bound and try again.
        loop {
            if fleet.closed.is_cancelled() {
                return;
            }
            let from = fleet.state.lock().unwrap().last_revision + 1;
            let attempt = tokio::time::timeout(
                fleet.config.heartbeat * 2,
                fleet.store.watch_all_from_revision(from),
            );
            match attempt.await {
                Ok(Ok(w)) => {
                    debug!(from, "KV watch resumed");
                    watch = w;
                    break;
                }
                Ok(Err(e)) => {
                    debug!("cannot resume KV watch yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => debug!("cannot resume KV watch yet: no answer in time"),
            }
        }
        // Nothing was seen (or judged) while we were away: restart the
        // clocks so that no lease or scaler looks dead just for that.
        let mut st = fleet.state.lock().unwrap();
        st.watch_down = false;
        st.forget_silence();
    }
}

/// Publishes what a runner's new lease says changed: booted, ready,
/// busy, idle, or draining on its own.
fn announce_change(
    fleet: &Fleet,
    st: &FleetState,
    before: Option<(LeaseState, usize)>,
    lease: &RunnerLease,
) {
    let id = lease.runner.as_str();
    let load = lease.load + lease.queued;
    let runner_event = |kind: EventKind| move |c: Counts| Outgoing::new(kind, c).runner(id);
    let with_load =
        |kind: EventKind| move |c: Counts| Outgoing::new(kind, c).runner(id).runner_load(load);
    match (before, lease.state) {
        (None, LeaseState::Booting) => {
            fleet.announce(st, runner_event(EventKind::RunnerBooting));
        }
        (None | Some((LeaseState::Booting, _)), LeaseState::Ready) => {
            fleet.announce(st, runner_event(EventKind::RunnerReady));
            if load > 0 {
                fleet.announce(st, with_load(EventKind::RunnerBusy));
            }
        }
        // Busy again when the load changes: leases are renewed once a
        // heartbeat, so at most that often.
        (Some((LeaseState::Ready, was)), LeaseState::Ready) if was != load => {
            let kind = if load > 0 {
                EventKind::RunnerBusy
            } else {
                EventKind::RunnerIdle
            };
            fleet.announce(st, with_load(kind));
        }
        // Retired by this scaler: announced when it sent `retire`.
        (Some((state, _)), LeaseState::Draining)
            if state != LeaseState::Draining && !st.retiring.contains_key(id) =>
        {
            let reason = own_stop_reason(fleet);
            fleet.announce(st, |c| {
                Outgoing::new(EventKind::RunnerRetiring, c)
                    .runner(id)
                    .reason(reason)
            });
        }
        _ => {}
    }
}

/// Publishes a runner's end, when its lease is removed: `runner_gone`,
/// or `runner_boot_failed` for a runner that never became ready.
/// `retired`: why this scaler told it to stop; `cause`: why this
/// scaler removed the lease. Otherwise the runner removed it itself.
fn announce_end(
    fleet: &Fleet,
    st: &FleetState,
    id: &str,
    last: &RunnerLease,
    retired: Option<Reason>,
    cause: Option<(Reason, String)>,
) {
    let (reason, detail) = cause.unwrap_or_else(|| {
        let reason = match (retired, last.state) {
            (Some(why), _) => why,
            (None, LeaseState::Draining) => own_stop_reason(fleet),
            (None, _) => Reason::LeaseLost,
        };
        (reason, "its lease was removed".to_string())
    });
    let kind = if last.state == LeaseState::Booting {
        EventKind::RunnerBootFailed
    } else {
        EventKind::RunnerGone
    };
    fleet.announce(st, |c| {
        Outgoing::new(kind, c)
            .runner(id)
            .reason(reason)
            .detail(detail)
    });
}

/// Why a runner that stops on its own stops.
pub(super) fn own_stop_reason(fleet: &Fleet) -> Reason {
    if fleet.config.single_use {
        Reason::SingleUse
    } else {
        Reason::Stopped
    }
}

fn apply(fleet: &Fleet, port: &Arc<dyn PoolPort>, entry: Entry) {
    let deleted = entry.operation != Operation::Put;
    let age = write_age(entry.created.unix_timestamp_nanos());
    let mut st = fleet.state.lock().unwrap();
    st.last_revision = st.last_revision.max(entry.revision);
    if let Some((written, _)) = st.echo {
        // Revisions come in order: this parent's write has come back.
        if entry.revision >= written {
            if st.mirror_stalled(fleet.config.heartbeat) {
                debug!("the bucket's watch caught up");
                st.forget_silence();
            }
            st.echo = None;
        }
    }
    if let Some(id) = entry.key.strip_prefix("runners.") {
        // Only the scaler of a build announces its runners, so that
        // each change is published once, not by every parent.
        let announce = st.leading.is_some();
        let build = &*fleet.parent.build_id;
        if deleted {
            let last = st.runners.remove(id);
            st.runners_gone.remove(id);
            st.pending.remove(id);
            let retired = st.retiring.remove(id).map(|(_, why)| why);
            let cause = st.gone_causes.remove(id);
            // Removed by the runner itself as it finished draining (the
            // scaler's own removals, reaps and failed boots, have a
            // cause and free the slot once the runner is stopped).
            let finished = announce
                && cause.is_none()
                && last
                    .as_ref()
                    .is_some_and(|l| l.value.state == LeaseState::Draining);
            // (Runners of a build nobody uses any more are announced by
            // the scaler that retired them.)
            let ours = |l: &Seen<RunnerLease>| {
                l.value.build == build || retired == Some(Reason::BuildGone)
            };
            if let Some(last) = last.filter(|l| announce && ours(l)) {
                announce_end(fleet, &st, id, &last.value, retired, cause);
            }
            let owned = st.owned.remove(id);
            if finished {
                st.exited_clean.insert(id.to_string());
            }
            drop(st);
            port.clone().lease_gone(id, "its lease was removed");
            drop(owned);
            if finished {
                // Its slot may be what waiting callers need.
                fleet.demand_changed.notify_one();
            }
            return;
        }
        let Ok(lease) = serde_json::from_slice::<RunnerLease>(&entry.value) else {
            return;
        };
        st.pending.remove(id);
        let before = st
            .runners
            .get(id)
            .map(|s| (s.value.state, s.value.load + s.value.queued));
        let became_ready = lease.state == LeaseState::Ready
            && st
                .runners
                .get(id)
                .is_none_or(|s| s.value.state != LeaseState::Ready);
        let mine = lease.booted_by == fleet.parent.parent_id;
        st.runners
            .insert(id.to_string(), Seen::new(lease.clone(), entry.revision));
        if announce && lease.build == build {
            announce_change(fleet, &st, before, &lease);
        }
        let count = st.runners.len();
        drop(st);
        port.clone().lease_seen(&lease, age);
        if became_ready && mine && fleet.is_leading() {
            fleet.booter.grow_end(count, Ok(()));
        }
    } else if let Some(id) = entry.key.strip_prefix("parents.") {
        if deleted {
            st.parents.remove(id);
        } else if let Ok(lease) = serde_json::from_slice::<ParentLease>(&entry.value) {
            st.parents
                .insert(id.to_string(), Seen::new(lease, entry.revision));
        }
    } else if entry.key == fleet.scaler_key {
        st.scaler = if deleted {
            None
        } else {
            serde_json::from_slice::<ScalerLease>(&entry.value)
                .ok()
                .map(|l| Seen::new(l, entry.revision))
        };
    } else if entry.key == subjects::SLOTS_KEY {
        st.slots = if deleted {
            None
        } else {
            serde_json::from_slice::<Slots>(&entry.value).ok()
        };
    }
}

/// How long ago a write the bucket stamped `created_ns` (nanoseconds since
/// the Unix epoch, the server's clock) was made, by this host's clock; zero
/// when the stamp is ahead of it.
fn write_age(created_ns: i128) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    Duration::from_nanos((now - created_ns).clamp(0, u64::MAX as i128) as u64)
}
