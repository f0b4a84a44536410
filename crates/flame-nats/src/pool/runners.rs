//! The runners of a pool as the parent sees them: booting, ready, gone,
//! heartbeats, limits, and closing the pool.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flame_core::backend::StopRunner;
use flame_core::Error;
use futures::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::call::{deliver, Handoff};
use super::info::boot_failure_reason;
use super::model::{RunnerId, RunnerState};
use super::{PoolInner, State};
use crate::announce::{Counts, Outgoing};
use crate::boot::{BootFailure, BOOT_RETRY_DEBOUNCE};
use crate::fleet::PoolPort;
use crate::protocol::events::{EventKey, ReplayWindow};
use crate::protocol::lease::{LeaseState, RunnerLease};
use crate::protocol::pool_events::{classify_gone, gone_reason, EventKind, Reason};
use crate::protocol::sign::CallKey;
use crate::protocol::subjects;
use crate::replies::Replies;
use crate::streams::RunnerStreams;

/// How long a call on a runner that stopped on purpose still waits for its
/// reply after the runner's exit is seen.
const TRAILING_REPLY_GRACE: Duration = Duration::from_millis(500);

type Stopper = Box<dyn StopRunner>;

/// What the parent keeps about one runner.
pub(super) struct RunnerEntry {
    pub(super) link: Arc<RunnerLink>,
    /// Told when the runner reports ready (private pools).
    ready: Option<oneshot::Sender<()>>,
    stopper: Option<Stopper>,
    /// The backend's handle, once it started the runner.
    pub(super) handle: Option<String>,
    /// When the runner last pinged (or reported ready); later than now
    /// while it is given time to reconnect.
    last_heard: Instant,
    /// The key the runner signs its events with (private pools).
    pub(super) key: Option<EventKey>,
    /// Sequence numbers of its events accepted so far.
    pub(super) replays: ReplayWindow,
    /// Sequence number of its last batch of log lines.
    pub(super) log_seq: u64,
    /// Outages of its NATS connection its lease reported last (shared
    /// pools).
    outages_seen: Option<u64>,
    /// Why it drains, when this parent decided it (private pools): its
    /// `runner_retiring` was published then, and its `runner_gone` says it.
    pub(super) drain_cause: Option<Reason>,
    /// The load the last of its events told, while they say busy
    /// (private pools); `None` while idle.
    pub(super) announced_load: Option<usize>,
    /// Since when it has had no call, while announced busy.
    pub(super) idle_since: Option<Instant>,
}

impl RunnerEntry {
    /// A runner being booted; `ready` is told when it reports ready.
    fn new(
        pool: &str,
        id: &RunnerId,
        ready: Option<oneshot::Sender<()>>,
        key: Option<EventKey>,
        call_key: Option<CallKey>,
    ) -> RunnerEntry {
        RunnerEntry {
            link: Arc::new(RunnerLink::new(pool, id, call_key)),
            ready,
            stopper: None,
            handle: None,
            last_heard: Instant::now(),
            key,
            replays: ReplayWindow::default(),
            log_seq: 0,
            outages_seen: None,
            drain_cause: None,
            announced_load: None,
            idle_since: None,
        }
    }

    /// The runner was heard from.
    pub(super) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// The runner reported ready: wakes its boot.
    pub(super) fn ready(&mut self) {
        self.heard();
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(());
        }
    }

    /// Gives up waiting for it to be ready (its boot then fails).
    pub(super) fn refuse_ready(&mut self) {
        self.ready.take();
    }
}

impl std::fmt::Debug for RunnerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerEntry")
            .field("link", &self.link)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

/// What a call holds on to while it runs on a runner.
#[derive(Debug)]
pub(crate) struct RunnerLink {
    pub(super) id: RunnerId,
    /// Built once: cloning a `Subject` is a reference count, not a copy.
    pub(super) subject: async_nats::Subject,
    pub(super) cancel_subject: String,
    /// Signs the calls to it and their cancellations: a private pool's
    /// runner has its own, a shared pool's runners share the pool's (none
    /// without a secret).
    pub(super) key: Option<CallKey>,
    /// Set when the runner said it is stopping (drains, then exits).
    stopping: AtomicBool,
    /// Why it went down, once it did.
    down_reason: OnceLock<String>,
    /// Calls waiting to go to it together (call coalescing).
    pub(super) outbox: super::outbox::Outbox,
    /// The streams and channels of its calls, ended when it goes down.
    pub(super) streams: RunnerStreams,
}

impl RunnerLink {
    fn new(pool: &str, id: &RunnerId, key: Option<CallKey>) -> RunnerLink {
        RunnerLink {
            id: id.clone(),
            subject: subjects::runner(pool, id).into(),
            cancel_subject: subjects::runner_cancel(pool, id),
            key,
            stopping: AtomicBool::new(false),
            down_reason: OnceLock::new(),
            outbox: Default::default(),
            streams: RunnerStreams::default(),
        }
    }

    /// Records why the runner is gone and fails the calls waiting on it,
    /// and ends the streams and channels of its calls: at once, or, if it
    /// stopped cleanly (it drained and sent its last
    /// replies before exiting, which may be read after its exit is seen),
    /// after a short grace. A clean stop is one it said it was making, or
    /// an exit with code 0 or the removal of its lease: the runner's own
    /// last steps, which the news of its draining may not have preceded
    /// (a shared pool's runner says so in the KV bucket, read apart from
    /// its process's exit and from its replies).
    pub(super) fn fail(&self, replies: &Arc<Replies>, reason: String) {
        let _ = self.down_reason.set(reason.clone());
        let clean = matches!(classify_gone(&reason), Reason::Stopped | Reason::LeaseLost);
        let grace = if clean || self.stopping.load(Ordering::SeqCst) {
            TRAILING_REPLY_GRACE
        } else {
            Duration::ZERO
        };
        self.end_streams(&reason, grace);
        replies.fail_runner(&self.id, reason, grace);
    }

    /// Ends the streams of its calls with `RunnerDown`, after `grace`.
    fn end_streams(&self, reason: &str, grace: Duration) {
        let rt = tokio::runtime::Handle::try_current();
        match rt {
            Ok(rt) if !grace.is_zero() => {
                let (id, reason) = (self.id.clone(), reason.to_string());
                let streams = self.streams.clone();
                rt.spawn(async move {
                    tokio::time::sleep(grace).await;
                    streams.down(&id, &reason);
                });
            }
            _ => self.streams.down(&self.id, reason),
        }
    }

    fn reason(&self) -> String {
        self.down_reason
            .get()
            .cloned()
            .unwrap_or_else(|| "runner went down".to_string())
    }
}

impl State {
    /// True when no runner is ready or booting: nobody could serve a
    /// caller waiting for a runner.
    pub(super) fn no_runner_coming(&self) -> bool {
        self.model.count(RunnerState::Ready) == 0 && self.model.count(RunnerState::Booting) == 0
    }

    /// Takes every caller waiting for a runner off the queue. Dropping what
    /// this returns (after the lock is released) wakes them; they find the
    /// reason in `last_boot_error`.
    pub(super) fn fail_waiters(&mut self) -> Vec<oneshot::Sender<super::call::Slot>> {
        let ids: Vec<_> = self.waiters.keys().copied().collect();
        for id in ids {
            self.model.cancel(id);
        }
        self.waiters.drain().map(|(_, tx)| tx).collect()
    }

    /// The runner said it is stopping: place nothing new on it, and give
    /// its last replies a moment when its exit is seen.
    pub(super) fn stopping(&mut self, id: &RunnerId) {
        self.model.drain(id);
        if let Some(entry) = self.runners.get(id) {
            entry.link.stopping.store(true, Ordering::SeqCst);
        }
    }
}

impl PoolInner {
    /// Boots what the model asks for (now, or after the retry debounce).
    pub(super) fn boot_needed(self: &Arc<Self>) {
        let mut st = self.state.lock().unwrap();
        self.boot_locked(&mut st);
    }

    pub(super) fn boot_locked(self: &Arc<Self>, st: &mut State) {
        if st.closed {
            return;
        }
        if let Some(fleet) = &self.fleet {
            // The scaler boots for everyone; tell it about our callers.
            fleet.demand_changed();
            return;
        }
        let n = st.model.boots_needed();
        if n == 0 || !st.retry.is_open() {
            return;
        }
        for _ in 0..n {
            let id: RunnerId = Arc::from(uuid::Uuid::new_v4().simple().to_string());
            let (ready_tx, ready_rx) = oneshot::channel();
            let key = EventKey::random();
            st.model.add_booting(id.clone());
            st.runners.insert(
                id.clone(),
                RunnerEntry::new(
                    &self.config.name,
                    &id,
                    Some(ready_tx),
                    Some(key.clone()),
                    Some(CallKey::of_runner(&key)),
                ),
            );
            let runners = st.model.len();
            self.announce(st, |c| {
                Outgoing::new(EventKind::RunnerBooting, c).runner(id.clone())
            });
            self.boots
                .spawn(self.clone().boot(id, key, ready_rx, runners));
        }
    }

    /// Boots one runner of a private pool and waits until it reports ready,
    /// all within the boot timeout.
    async fn boot(
        self: Arc<Self>,
        id: RunnerId,
        key: EventKey,
        ready: oneshot::Receiver<()>,
        runners: usize,
    ) {
        let started = Instant::now();
        let pool = self.config.name.clone();
        // Kept: it tells why the runner went down after its entry is gone.
        let link = self
            .state
            .lock()
            .unwrap()
            .runners
            .get(&id)
            .map(|e| e.link.clone());
        let deadline = started + self.config.boot_timeout;
        // The backend's part is bounded by the booter (the boot timeout,
        // plus time to clean up); waiting for ready, by the deadline.
        let outcome = async {
            let booted = self.booter.start(&id, Some(&key), runners).await?;
            let unwanted = {
                let mut st = self.state.lock().unwrap();
                match st.runners.get_mut(&id) {
                    Some(entry) => {
                        entry.stopper = Some(booted.stopper);
                        entry.handle = Some(booted.handle.clone());
                        None
                    }
                    // Given up on meanwhile (pool closed): stop it.
                    None => Some(booted.stopper),
                }
            };
            if let Some(stopper) = unwanted {
                stopper.stop(Duration::ZERO).await;
                return Err(BootFailure::transient(Error::PoolClosed(pool.clone())));
            }
            if let Some(exited) = booted.exited {
                let me = self.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let reason = exited.await;
                    me.runner_gone(&id, reason);
                });
            }
            // A runner that exits, or is refused (another build), before it
            // is ready would do the same again: same binary, configuration
            // and environment.
            match tokio::time::timeout_at(deadline, ready).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => {
                    let reason = link
                        .as_ref()
                        .map(|link| link.reason())
                        .unwrap_or_else(|| "runner stopped before it was ready".into());
                    Err(BootFailure::permanent(Error::BootFailed {
                        pool: pool.clone(),
                        reason,
                        source: None,
                    }))
                }
                Err(_) => Err(BootFailure::transient(Error::BootTimeout {
                    pool: pool.clone(),
                    timeout: self.config.boot_timeout,
                })),
            }
        }
        .await;

        match outcome {
            Ok(()) => {
                info!(%pool, runner = %id, elapsed = ?started.elapsed(), "runner ready");
                let runners = {
                    let mut st = self.state.lock().unwrap();
                    st.retry.booted();
                    st.model.len()
                };
                self.booter.grow_end(runners, Ok(()));
            }
            Err(BootFailure {
                error: Error::PoolClosed(_),
                ..
            }) => {}
            Err(BootFailure {
                error: e,
                permanent,
            }) => {
                // A runner that started but never became ready is stopped
                // before the failure is told: once `start()` fails, nothing
                // of it may be left (the app may exit at once, and a
                // container or machine takes an API call to stop, which an
                // exiting process never makes).
                let started = {
                    let mut st = self.state.lock().unwrap();
                    st.runners.get_mut(&id).and_then(|e| e.stopper.take())
                };
                if let Some(stopper) = started {
                    stopper.stop(Duration::ZERO).await;
                }
                let (stopper, runners, pause, failed) = {
                    let mut st = self.state.lock().unwrap();
                    st.last_boot_error = Some(e.clone());
                    let pause = st.retry.failed(permanent, self.config.boot_cooldown);
                    st.model.remove(&id);
                    let stopper = st.runners.remove(&id).and_then(|entry| {
                        entry.link.fail(&self.parent.replies, e.to_string());
                        entry.stopper
                    });
                    self.announce(&st, |c| {
                        Outgoing::new(EventKind::RunnerBootFailed, c)
                            .runner(id.clone())
                            .reason(boot_failure_reason(&e))
                            .detail(e.to_string())
                    });
                    // Nobody left who could serve them: callers waiting for
                    // a runner learn now, not at their deadline.
                    let failed = if permanent && st.no_runner_coming() {
                        st.fail_waiters()
                    } else {
                        Vec::new()
                    };
                    (stopper, st.model.len(), pause, failed)
                };
                if !failed.is_empty() {
                    warn!(%pool, callers = failed.len(), "boot failed for good; failing the callers waiting for a runner: {e}");
                }
                drop(failed);
                self.changed.notify_waiters();
                self.booter.grow_end(runners, Err(e));
                if let Some(stopper) = stopper {
                    stopper.stop(Duration::ZERO).await;
                }
                if !permanent {
                    // Try again after the backoff while demand remains.
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(pause).await;
                        me.boot_needed();
                    });
                }
            }
        }
    }

    /// A runner is gone (its process exited): calls on it fail now, and the
    /// model may boot a replacement.
    pub(super) fn runner_gone(self: &Arc<Self>, id: &RunnerId, reason: String) {
        let (entry, state, runners) = {
            let mut st = self.state.lock().unwrap();
            let served = st.served(id);
            if served {
                self.settle_idle(&mut st, id);
            }
            let state = st.model.remove(id);
            let entry = st.runners.remove(id);
            if state == Some(RunnerState::Ready) {
                info!(pool = %self.config.name, runner = %id, "runner gone: {reason}");
            }
            if served {
                let cause = entry.as_ref().and_then(|e| e.drain_cause);
                let why = gone_reason(&reason, cause.or(Some(self.own_stop_reason())));
                self.announce(&st, |c| {
                    Outgoing::new(EventKind::RunnerGone, c)
                        .runner(id.clone())
                        .reason(why)
                        .detail(reason.clone())
                });
            }
            let runners = st.model.len();
            // A private pool's runner that ends while booting is a failed
            // boot, which its boot task reports and paces (booting again
            // here would boot twice for one slot).
            if state != Some(RunnerState::Booting) || self.fleet.is_some() {
                self.boot_locked(&mut st);
            }
            (entry, state, runners)
        };
        if let Some(entry) = entry {
            entry.link.fail(&self.parent.replies, reason.clone());
        }
        if matches!(state, Some(RunnerState::Ready | RunnerState::Draining)) {
            self.booter.shrink(runners, reason);
        }
    }

    /// Current `min` and `max`.
    pub(super) fn limits(&self) -> (usize, usize) {
        self.state.lock().unwrap().model.limits()
    }

    /// Counts a runner as down when it has not pinged for two heartbeat
    /// intervals: the fallback for backends that cannot see a runner exit
    /// (a remote machine). Such a runner is also stopped, in case it is only
    /// cut off. Silence counts only while this parent is connected: pings
    /// cannot reach a parent that is not, and after a reconnect every
    /// runner's clock starts again.
    pub(super) async fn watch_heartbeats(self: Arc<Self>) {
        let heartbeat = self.config.heartbeat;
        let limit = heartbeat * 2;
        let mut tick = tokio::time::interval(heartbeat / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut disconnects = self.parent.events.disconnects.clone();
        loop {
            tokio::select! {
                _ = self.closed.cancelled() => return,
                _ = tick.tick() => {}
            }
            let reconnected = disconnects.has_changed().unwrap_or(false);
            self.announce_idle(&mut self.state.lock().unwrap());
            if !self.parent.connected() {
                continue;
            }
            if reconnected {
                disconnects.borrow_and_update();
                // Runners reconnect on their own schedule: give each as long
                // as it gives us (parent_grace) before counting it down.
                let allowance = self.config.parent_grace.saturating_sub(limit);
                let mut st = self.state.lock().unwrap();
                for entry in st.runners.values_mut() {
                    entry.last_heard = Instant::now() + allowance;
                }
                debug!(pool = %self.config.name, "reconnected to NATS; heartbeat clocks restarted");
                continue;
            }
            let silent: Vec<(RunnerId, Duration, Option<Stopper>)> = {
                let mut st = self.state.lock().unwrap();
                let ids: Vec<_> = st
                    .runners
                    .iter()
                    .filter(|(id, e)| {
                        e.ready.is_none()
                            && e.last_heard.elapsed() > limit
                            && st
                                .model
                                .runner(id)
                                .is_some_and(|(s, _)| s != RunnerState::Booting)
                    })
                    .map(|(id, e)| (id.clone(), e.last_heard.elapsed()))
                    .collect();
                ids.into_iter()
                    .map(|(id, silent_for)| {
                        let stopper = st.runners.get_mut(&id).and_then(|e| e.stopper.take());
                        (id, silent_for, stopper)
                    })
                    .collect()
            };
            for (id, silent_for, stopper) in silent {
                warn!(pool = %self.config.name, runner = %id, "no heartbeat for {silent_for:?}; counting the runner as down");
                self.runner_gone(&id, format!("no heartbeat for {silent_for:?}"));
                if let Some(stopper) = stopper {
                    tokio::spawn(stopper.stop(Duration::ZERO));
                }
            }
        }
    }

    /// See [`super::Pool::set_limits`].
    pub(super) fn set_limits(self: Arc<Self>, min: usize, max: usize) {
        let retired: Vec<(RunnerId, Option<Stopper>)> = {
            let mut st = self.state.lock().unwrap();
            st.model.set_limits(min, max);
            // A shared pool's scaler retires runners for the whole fleet.
            let retire = if self.fleet.is_some() {
                Vec::new()
            } else {
                st.model.retire_surplus()
            };
            self.boot_locked(&mut st);
            retire
                .into_iter()
                .map(|id| {
                    let stopper = st.runners.get_mut(&id).and_then(|e| {
                        e.drain_cause = Some(Reason::Retired);
                        e.stopper.take()
                    });
                    self.settle_idle(&mut st, &id);
                    self.announce(&st, |c| {
                        Outgoing::new(EventKind::RunnerRetiring, c)
                            .runner(id.clone())
                            .reason(Reason::Retired)
                    });
                    (id, stopper)
                })
                .collect()
        };
        info!(pool = %self.config.name, min, max, retired = retired.len(), "limits changed");
        self.events
            .send(Outgoing::new(EventKind::LimitsChanged, self.counts_now()).limits(min, max));
        let grace = self.config.shutdown_timeout;
        for (id, stopper) in retired {
            debug!(pool = %self.config.name, runner = %id, "retiring runner");
            if let Some(stopper) = stopper {
                tokio::spawn(stopper.stop(grace));
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits until `min` runners are ready, or the first boot fails.
    pub(super) async fn wait_min_ready(self: &Arc<Self>) -> Result<(), Error> {
        let deadline = Instant::now() + self.config.boot_timeout + BOOT_RETRY_DEBOUNCE;
        loop {
            let changed = self.changed.notified();
            {
                let st = self.state.lock().unwrap();
                if st.model.count(RunnerState::Ready) >= self.config.min {
                    return Ok(());
                }
                // Starting fails on the first failed boot rather than
                // retrying behind the caller's back.
                if let Some(e) = &st.last_boot_error {
                    return Err(e.clone());
                }
                if Instant::now() >= deadline {
                    return Err(st.last_boot_error.clone().unwrap_or(Error::BootTimeout {
                        pool: self.config.name.clone(),
                        timeout: self.config.boot_timeout,
                    }));
                }
            }
            let _ = tokio::time::timeout_at(deadline, changed).await;
        }
    }

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
                    st.last_boot_error = Some(Error::BootFailed {
                        pool: self.config.name.clone(),
                        reason: words.clone(),
                        source: None,
                    });
                    if lease.boot_failure_permanent {
                        st.retry.failed(true, self.config.boot_cooldown);
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
                        self.booter.shared_call_key().cloned(),
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
                    st.last_boot_error = None;
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
