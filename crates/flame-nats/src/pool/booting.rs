//! Booting a private pool's runners, and the limits that say how many:
//! what the placement model asks for is booted here (and retried with
//! backoff when a boot fails), `start` waits here for `min` runners, and
//! `set_limits` boots or retires to the new bounds. (A shared pool's
//! scaler boots for the whole fleet instead: `crate::fleet`.)

use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::model::{RunnerId, RunnerState};
use super::runners::{RunnerEntry, Stopper};
use super::{PoolInner, State};
use crate::announce::Outgoing;
use crate::boot::{boot_failure_reason, BootFailure, BOOT_RETRY_DEBOUNCE};
use crate::protocol::pool_events::{EventKind, Reason};
use crate::protocol::reports::ReportKey;
use crate::protocol::sign::CallKey;

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
            let key = ReportKey::random();
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
        key: ReportKey,
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

    /// Current `min` and `max`.
    pub(super) fn limits(&self) -> (usize, usize) {
        self.state.lock().unwrap().model.limits()
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
}
