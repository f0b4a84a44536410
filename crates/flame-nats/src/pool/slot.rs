//! A slot on a runner: what a call holds while it runs there. Callers
//! check one out (placed at once, or queued until a runner has room or
//! boots), and dropping it checks it back in, handing it to the next
//! queued caller.

use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use super::link::RunnerLink;
use super::model::{Checkout, RunnerState, WaiterId};
use super::{booting, PoolInner};

/// A slot on a runner. Dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct Slot {
    pool: Arc<PoolInner>,
    pub(super) runner: Arc<RunnerLink>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let handoff = {
            let mut st = self.pool.state.lock().unwrap();
            let handoff = st
                .model
                .checkin(&self.runner.id)
                .and_then(|(w, r)| st.slot_for(&self.pool, w, &r));
            self.pool.announcer.idle_if_last(&mut st, &self.runner.id);
            handoff
        };
        deliver(handoff);
    }
}

impl Slot {
    /// A slot on `runner`, checked out of `pool`.
    pub(super) fn new(pool: Arc<PoolInner>, runner: Arc<RunnerLink>) -> Slot {
        Slot { pool, runner }
    }
}

/// A slot on its way to a queued caller. Sent after the lock is released;
/// if the caller is gone, the slot drops and goes back.
pub(super) type Handoff = (oneshot::Sender<Slot>, Slot);

pub(super) fn deliver(handoffs: impl IntoIterator<Item = Handoff>) {
    for (tx, slot) in handoffs {
        let _ = tx.send(slot);
    }
}

/// Removes a queued caller that stopped waiting (timed out or dropped).
struct WaitGuard<'a> {
    pool: &'a Arc<PoolInner>,
    waiter: WaiterId,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.pool.state.lock().unwrap();
            if st.model.cancel(self.waiter) {
                st.waiters.remove(&self.waiter);
            }
        }
    }
}

/// Waits for a slot until the deadline.
pub(super) async fn checkout(
    pool: &Arc<PoolInner>,
    deadline: Instant,
    function: &str,
    timeout: Duration,
) -> Result<Slot, Error> {
    let (mut rx, waiter) = {
        let mut st = pool.state.lock().unwrap();
        if st.closed {
            return Err(Error::PoolClosed(pool.config.name.clone()));
        }
        let waiter = st.next_waiter;
        st.next_waiter += 1;
        match st.model.checkout(waiter) {
            Checkout::Placed(id) => {
                if pool.fleet.is_none() && st.model.boots_ahead() {
                    // Hot start: this call may have made the pool
                    // busy enough to boot ahead of demand.
                    booting::grow_locked(pool, &mut st);
                }
                let link = st.runners[&id].link.clone();
                pool.announcer.busy_if_first(&mut st, &id);
                return Ok(Slot {
                    pool: pool.clone(),
                    runner: link,
                });
            }
            Checkout::Queued => {
                if st.boot.cooling_down() && st.no_runner_coming() {
                    // A boot failed for good moments ago: booting again
                    // now would fail the same way.
                    if let Some(e) = st.boot.last_error.clone() {
                        st.model.cancel(waiter);
                        return Err(e);
                    }
                }
                let (tx, rx) = oneshot::channel();
                st.waiters.insert(waiter, tx);
                booting::grow_locked(pool, &mut st);
                (rx, waiter)
            }
        }
    };
    let mut guard = WaitGuard {
        pool,
        waiter,
        armed: true,
    };
    // A shared pool whose bucket cannot be used (a refused permission,
    // a JetStream not ready past the bound) boots no runner: its
    // callers fail with the reason at once.
    let troubled = async {
        match &pool.fleet {
            Some(fleet) => fleet.troubled().await,
            None => std::future::pending().await,
        }
    };
    let waited = tokio::select! {
        biased;
        waited = tokio::time::timeout_at(deadline, &mut rx) => waited,
        e = troubled => {
            drop(guard);
            // A slot handed over just now goes back.
            drop(rx.try_recv());
            debug!(pool = %pool.config.name, "a waiting caller fails: {e}");
            return Err(e);
        }
    };
    match waited {
        Ok(Ok(slot)) => {
            guard.armed = false;
            Ok(slot)
        }
        Ok(Err(_)) => {
            guard.armed = false;
            // Taken off the queue: the pool closed, or a boot failed for
            // good with nobody left to serve this caller.
            let st = pool.state.lock().unwrap();
            match &st.boot.last_error {
                Some(e) if !st.closed => Err(e.clone()),
                _ => Err(Error::PoolClosed(pool.config.name.clone())),
            }
        }
        Err(_) => {
            drop(guard);
            // A slot may have been handed over just as time ran out.
            drop(rx.try_recv());
            let st = pool.state.lock().unwrap();
            let no_runner = st.model.count(RunnerState::Ready) == 0;
            let trouble = pool.fleet.as_ref().and_then(|f| f.trouble());
            match (trouble.as_ref().or(st.boot.last_error.as_ref()), no_runner) {
                (Some(e), true) => Err(e.clone()),
                _ => {
                    debug!(pool = %pool.config.name, "no runner had room before the deadline");
                    Err(Error::Timeout {
                        function: function.to_string(),
                        timeout,
                    })
                }
            }
        }
    }
}
