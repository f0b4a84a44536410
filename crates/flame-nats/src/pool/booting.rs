//! Booting a private pool's runners, and the limits that say how many:
//! what the placement model asks for is booted here (and retried with
//! backoff when a boot fails), `start` waits here for `min` runners, and
//! `set_limits` boots or retires to the new bounds. (A shared pool's
//! scaler boots for the whole fleet instead: `crate::fleet`.)
//!
//! The pool's part for this is [`Boots`] (the booter and the boots under
//! way); its [`BootGate`] (whether a boot may start, and why the last one
//! failed) is under the pool's lock, with the runners it paces.

use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::model::{RunnerId, RunnerState};
use super::runners::{RunnerEntry, Stopper};
use super::{PoolInner, State};
use crate::boot::{boot_failure_reason, BootFailure, Booter, RetryGate, BOOT_RETRY_DEBOUNCE};
use crate::ops::Outgoing;
use crate::protocol::pool_events::{EventKind, Reason};
use crate::protocol::reports::ReportKey;
use crate::protocol::sign::CallKey;

/// The part of a pool that boots its runners.
#[derive(Debug)]
pub(super) struct Boots {
    /// Boots through the backend, and runs the pool's hooks.
    pub(super) booter: Arc<Booter>,
    /// Boots under way (private pools): closing waits for them, since a
    /// boot the pool no longer wants still has a runner to stop when the
    /// backend's part returns.
    tasks: tokio_util::task::TaskTracker,
}

impl Boots {
    /// Booting through `booter`, nothing under way yet.
    pub(super) fn new(booter: Arc<Booter>) -> Boots {
        Boots {
            booter,
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Takes no more boots, and waits up to `bound` for those under way.
    /// False if some are still going then.
    pub(super) async fn finish(&self, bound: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(bound, self.tasks.wait()).await.is_ok()
    }
}

/// Whether a boot may start now, and why the last one failed. Kept under
/// the pool's lock: callers and boots read it with the runners.
#[derive(Debug, Default)]
pub(super) struct BootGate {
    /// Why the last boot failed, until a runner is ready: `start` and the
    /// callers waiting for a runner fail with it.
    pub(super) last_error: Option<Error>,
    /// Holds boots back after a failure.
    retry: RetryGate,
}

impl BootGate {
    /// A boot failed with `e`: remembered, and the next boot is held back.
    /// Returns for how long.
    fn failed(&mut self, e: Error, permanent: bool, cooldown: Duration) -> Duration {
        self.last_error = Some(e);
        self.retry.failed(permanent, cooldown)
    }

    /// A shared pool's boot failed (the scaler's, told by its lease): its
    /// error is the last here, and a permanent one holds boots back for the
    /// cooldown (backing off after a transient one is the scaler's).
    pub(super) fn failed_in_fleet(&mut self, e: Error, permanent: bool, cooldown: Duration) {
        self.last_error = Some(e);
        if permanent {
            self.retry.failed(true, cooldown);
        }
    }

    /// True while a permanent failure's cooldown runs: a caller that needs
    /// a new runner then fails at once with `last_error`.
    pub(super) fn cooling_down(&self) -> bool {
        self.retry.cooling_down()
    }
}

/// Boots what the model asks for (now, or after the retry debounce).
pub(super) fn grow(pool: &Arc<PoolInner>) {
    let mut st = pool.state.lock().unwrap();
    grow_locked(pool, &mut st);
}

/// [`grow`], under the pool's lock.
pub(super) fn grow_locked(pool: &Arc<PoolInner>, st: &mut State) {
    if st.closed {
        return;
    }
    if let Some(fleet) = &pool.fleet {
        // The scaler boots for everyone; tell it about our callers.
        fleet.demand_changed();
        return;
    }
    let n = st.model.boots_needed();
    if n == 0 || !st.boot.retry.is_open() {
        return;
    }
    for _ in 0..n {
        let id: RunnerId = Arc::from(uuid::Uuid::new_v4().simple().to_string());
        let (ready_tx, ready_rx) = oneshot::channel();
        let key = ReportKey::random();
        st.model.add_booting(id.clone());
        st.runners.insert(
            id.clone(),
            RunnerEntry::new(
                &pool.config.name,
                &id,
                Some(ready_tx),
                Some(key.clone()),
                Some(CallKey::of_runner(&key)),
            ),
        );
        let runners = st.model.len();
        pool.announcer.announce(st, |c| {
            Outgoing::new(EventKind::RunnerBooting, c).runner(id.clone())
        });
        pool.boots
            .tasks
            .spawn(boot(pool.clone(), id, key, ready_rx, runners));
    }
}

/// Boots one runner of a private pool and waits until it reports ready,
/// all within the boot timeout.
async fn boot(
    pool: Arc<PoolInner>,
    id: RunnerId,
    key: ReportKey,
    ready: oneshot::Receiver<()>,
    runners: usize,
) {
    let started = Instant::now();
    let name = pool.config.name.clone();
    // Kept: it tells why the runner went down after its entry is gone.
    let link = pool
        .state
        .lock()
        .unwrap()
        .runners
        .get(&id)
        .map(|e| e.link.clone());
    let deadline = started + pool.config.boot_timeout;
    // The backend's part is bounded by the booter (the boot timeout,
    // plus time to clean up); waiting for ready, by the deadline.
    let outcome = async {
        let booted = pool.boots.booter.start(&id, Some(&key), runners).await?;
        let unwanted = {
            let mut st = pool.state.lock().unwrap();
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
            return Err(BootFailure::transient(Error::PoolClosed(name.clone())));
        }
        if let Some(exited) = booted.exited {
            let me = pool.clone();
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
                    pool: name.clone(),
                    reason,
                    source: None,
                }))
            }
            Err(_) => Err(BootFailure::transient(Error::BootTimeout {
                pool: name.clone(),
                timeout: pool.config.boot_timeout,
            })),
        }
    }
    .await;

    match outcome {
        Ok(()) => {
            info!(pool = %name, runner = %id, elapsed = ?started.elapsed(), "runner ready");
            let runners = {
                let mut st = pool.state.lock().unwrap();
                st.boot.retry.booted();
                st.model.len()
            };
            pool.boots.booter.grow_end(runners, Ok(()));
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
                let mut st = pool.state.lock().unwrap();
                st.runners.get_mut(&id).and_then(|e| e.stopper.take())
            };
            if let Some(stopper) = started {
                stopper.stop(Duration::ZERO).await;
            }
            let (stopper, runners, pause, failed) = {
                let mut st = pool.state.lock().unwrap();
                let pause = st
                    .boot
                    .failed(e.clone(), permanent, pool.config.boot_cooldown);
                st.model.remove(&id);
                let stopper = st.runners.remove(&id).and_then(|entry| {
                    entry.link.fail(&pool.parent.replies, e.to_string());
                    entry.stopper
                });
                pool.announcer.announce(&st, |c| {
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
                warn!(pool = %name, callers = failed.len(), "boot failed for good; failing the callers waiting for a runner: {e}");
            }
            drop(failed);
            pool.changed.notify_waiters();
            pool.boots.booter.grow_end(runners, Err(e));
            if let Some(stopper) = stopper {
                stopper.stop(Duration::ZERO).await;
            }
            if !permanent {
                // Try again after the backoff while demand remains.
                let me = pool.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(pause).await;
                    grow(&me);
                });
            }
        }
    }
}

/// See [`super::Pool::set_limits`].
pub(super) fn set_limits(pool: &Arc<PoolInner>, min: usize, max: usize) {
    let retired: Vec<(RunnerId, Option<Stopper>)> = {
        let mut st = pool.state.lock().unwrap();
        st.model.set_limits(min, max);
        // A shared pool's scaler retires runners for the whole fleet.
        let retire = if pool.fleet.is_some() {
            Vec::new()
        } else {
            st.model.retire_surplus()
        };
        grow_locked(pool, &mut st);
        retire
            .into_iter()
            .map(|id| {
                let stopper = st.runners.get_mut(&id).and_then(|e| {
                    e.drain_cause = Some(Reason::Retired);
                    e.stopper.take()
                });
                pool.announcer.settle_idle(&mut st, &id);
                pool.announcer.announce(&st, |c| {
                    Outgoing::new(EventKind::RunnerRetiring, c)
                        .runner(id.clone())
                        .reason(Reason::Retired)
                });
                (id, stopper)
            })
            .collect()
    };
    info!(pool = %pool.config.name, min, max, retired = retired.len(), "limits changed");
    pool.announcer
        .send(Outgoing::new(EventKind::LimitsChanged, pool.counts_now()).limits(min, max));
    let grace = pool.config.shutdown_timeout;
    for (id, stopper) in retired {
        debug!(pool = %pool.config.name, runner = %id, "retiring runner");
        if let Some(stopper) = stopper {
            tokio::spawn(stopper.stop(grace));
        }
    }
    pool.changed.notify_waiters();
}

/// Waits until `min` runners are ready, or the first boot fails.
pub(super) async fn wait_min_ready(pool: &PoolInner) -> Result<(), Error> {
    let deadline = Instant::now() + pool.config.boot_timeout + BOOT_RETRY_DEBOUNCE;
    loop {
        let changed = pool.changed.notified();
        {
            let st = pool.state.lock().unwrap();
            if st.model.count(RunnerState::Ready) >= pool.config.min {
                return Ok(());
            }
            // Starting fails on the first failed boot rather than
            // retrying behind the caller's back.
            if let Some(e) = &st.boot.last_error {
                return Err(e.clone());
            }
            if Instant::now() >= deadline {
                return Err(st.boot.last_error.clone().unwrap_or(Error::BootTimeout {
                    pool: pool.config.name.clone(),
                    timeout: pool.config.boot_timeout,
                }));
            }
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}
