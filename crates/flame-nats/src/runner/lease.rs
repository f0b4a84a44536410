//! A shared pool runner's lease in the pool's KV bucket: state, load,
//! queue and idle time, renewed every heartbeat. [`Lease`] is the
//! runner's part that holds it; what goes into a renewal is the
//! heartbeat's business (`lifecycle::renew_lease`).

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use flame_core::Error;
use tokio::sync::Notify;
use tracing::debug;

use crate::connect::Outages;
use crate::fleet::kv::{self, Cas};
use crate::protocol::bootstrap::ParentInfo;
use crate::protocol::lease::{LeaseState, RunnerLease};
use crate::protocol::subjects;

/// A shared pool runner's lease in the KV bucket, renewed with
/// compare-and-set so that a lease the scaler removed is never brought back.
pub(super) struct LeaseKeeper {
    store: Store,
    key: String,
    revision: u64,
    lease: RunnerLease,
}

impl LeaseKeeper {
    /// Finds the lease the scaler wrote before booting this runner.
    pub(super) async fn open(
        client: &async_nats::Client,
        info: &ParentInfo,
    ) -> Result<LeaseKeeper, Error> {
        // The scaler created the bucket before booting this runner.
        let failsafe = Duration::from_millis(info.failsafe_timeout_ms);
        let store = kv::open_bucket(client, &info.pool, 1, failsafe).await?;
        let key = subjects::runner_key(&info.runner_id);
        let (lease, revision) = kv::read::<RunnerLease>(&store, &key)
            .await?
            .ok_or_else(|| {
                Error::RunnerStart(format!(
                    "no lease {key} in the pool's bucket: the scaler gave up on this runner"
                ))
            })?;
        Ok(LeaseKeeper {
            store,
            key,
            revision,
            lease,
        })
    }

    /// Writes a change. `Ok(false)` when the lease is gone (the scaler
    /// removed it): the runner must stop.
    pub(super) async fn write(&mut self, change: impl Fn(&mut RunnerLease)) -> Result<bool, Error> {
        for _ in 0..5 {
            change(&mut self.lease);
            self.lease.beat += 1;
            match kv::compare_and_set(&self.store, &self.key, &self.lease, Some(self.revision))
                .await?
            {
                Cas::Written(revision) => {
                    self.revision = revision;
                    return Ok(true);
                }
                Cas::Conflict => {
                    // The scaler wrote the handle meanwhile, or removed the lease.
                    match kv::read::<RunnerLease>(&self.store, &self.key).await? {
                        Some((stored, revision)) => {
                            self.lease.handle = stored.handle;
                            self.lease.booted_by = stored.booted_by;
                            self.revision = revision;
                        }
                        None => return Ok(false),
                    }
                }
            }
        }
        Err(Error::nats("cannot renew lease", "too many conflicts"))
    }

    /// Removes the lease. The runner's slot stays taken until the scaler
    /// sees the process gone: a runner about to exit still counts.
    pub(super) async fn remove(&self) {
        if let Err(e) = self.store.delete(&self.key).await {
            debug!("cannot delete lease: {e}");
        }
    }
}

/// A runner's lease, in a shared pool (nothing in a private one): the
/// keeper, and what the runner's other tasks learn or ask of it.
pub(super) struct Lease {
    keeper: tokio::sync::Mutex<Option<LeaseKeeper>>,
    /// The scaler removed this runner's lease (shared pools).
    pub(super) lost: AtomicBool,
    /// Woken when calls start queueing, so the lease shows it soon.
    pub(super) dirty: Notify,
}

impl Lease {
    /// The lease `keeper` keeps (`None` in a private pool).
    pub(super) fn new(keeper: Option<LeaseKeeper>) -> Lease {
        Lease {
            keeper: tokio::sync::Mutex::new(keeper),
            lost: AtomicBool::new(false),
            dirty: Notify::new(),
        }
    }

    /// Shared pools: marks the lease ready (of `build`), which every
    /// parent's KV watch sees.
    pub(super) async fn mark_ready(&self, build: &str) -> Result<(), Error> {
        let build = build.to_string();
        let mut lease = self.keeper.lock().await;
        let keeper = lease.as_mut().expect("shared runners have a lease");
        let ok = keeper
            .write(|l| {
                l.state = LeaseState::Ready;
                l.build = build.clone();
            })
            .await?;
        if ok {
            Ok(())
        } else {
            Err(Error::RunnerStart(
                "the scaler removed this runner's lease before it was ready".into(),
            ))
        }
    }

    /// Shared pools: writes load, queue and idle time (and the connection's
    /// `outages`) into the lease, within two heartbeats. False once the
    /// lease is gone.
    pub(super) async fn renew(
        &self,
        load: usize,
        queued: usize,
        idle_for: Duration,
        outages: &std::sync::Mutex<Outages>,
        heartbeat: Duration,
        runner: &str,
    ) -> bool {
        // One renewal at a time; a renewal still under way (NATS slow or
        // away) makes this one moot.
        let Ok(mut lease) = self.keeper.try_lock() else {
            return true;
        };
        let Some(keeper) = lease.as_mut() else {
            return true;
        };
        let outages = *outages.lock().unwrap();
        let write = keeper.write(|l| {
            l.load = load;
            l.queued = queued;
            l.idle_ms = idle_for.as_millis() as u64;
            if let Some((from, to)) = outages.last {
                l.outages = outages.count;
                l.outage_ms = (to - from).as_millis() as u64;
                // Measured when the write is made, so the parents can place
                // the outage on their own clocks.
                l.since_outage_ms = to.elapsed().as_millis() as u64;
            }
        });
        match tokio::time::timeout(heartbeat * 2, write).await {
            Ok(Ok(alive)) => alive,
            Ok(Err(e)) => {
                debug!(runner = %runner, "lease not renewed: {e}");
                true
            }
            Err(_) => {
                debug!(runner = %runner, "lease not renewed in time");
                true
            }
        }
    }

    /// Marks the lease draining, so the parents place nothing new here.
    pub(super) async fn mark_draining(&self) {
        let mut lease = self.keeper.lock().await;
        if let Some(keeper) = lease.as_mut() {
            let _ = keeper.write(|l| l.state = LeaseState::Draining).await;
        }
    }

    /// Removes the lease (see [`LeaseKeeper::remove`]).
    pub(super) async fn remove(&self) {
        if let Some(keeper) = self.keeper.lock().await.as_ref() {
            keeper.remove().await;
        }
    }
}
