//! Shared pools: one pool for every parent that uses the same name on a NATS
//! server.
//!
//! All coordination goes through the pool's JetStream KV bucket
//! (`flame-<pool>`):
//!
//! - every parent watches the bucket and mirrors the runner leases into its
//!   own placement model, so any parent's calls run on any runner, and a
//!   removed lease fails the calls on that runner at once ([`mirror`]);
//! - every parent keeps a lease with its build and the number of its callers
//!   waiting, and for each build one parent, elected through the
//!   `scalers.<build>` key (created if absent, renewed by compare-and-set,
//!   taken over by compare-and-set once it stops changing), scales the
//!   runners of that build ([`election`]);
//! - builds share the pool's `max` (one `slots` record) but never each
//!   other's runners: a parent calls only runners of its own build, a scaler
//!   boots runners for the demand of its own build, and the runners of a
//!   build with no live parent left are retired, so a rolling deploy moves
//!   the pool from the old build to the new one;
//! - the scaler boots and retires runners; a boot first takes a slot in
//!   `slots` by compare-and-set, so racing scalers can never boot past
//!   `max` ([`scaler`], one boot in [`booting`], a runner removed for good
//!   in [`reap`], with the pure rules in [`scaling`]);
//! - a parent leaving removes its lease and hands the scaler role on; the
//!   last parent of a build retires the build's runners ([`leave`]);
//! - runners renew their own leases and cap their own concurrency, and ask
//!   `flame.<pool>.alive`, answered by any parent, whether to keep going.
//!
//! A lease counts as dead when it has not changed for three heartbeats, as
//! seen by the watching parent's own clock (no clock is compared across
//! machines).
//!
//! The fleet talks to its pool only through [`PoolPort`].
//!
//! `impl Fleet` is in this file only: the other files hold functions that
//! take the fleet (`election::parent_loop(fleet, ..)`, `scaler::scale`,
//! `mirror::watch`, ...), so a call names the file it is in. The state
//! they share is the mirror ([`mirror::FleetState`], one lock); the KV
//! bucket's operations are [`kv`].

mod booting;
mod election;
pub(crate) mod kv;
mod leave;
mod mirror;
mod reap;
mod scaler;
mod scaling;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use flame_core::backend::StopRunner;
use flame_core::Error;
use futures::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::boot::Booter;
use crate::config::PoolConfig;
use crate::ops::{Counts, Outgoing, PoolAnnouncer};
use crate::parent::ParentContext;
use crate::protocol::call as wire;
use crate::protocol::lease::{RunnerLease, Slots};
use crate::protocol::subjects;
use mirror::FleetState;

/// Heartbeats without change after which a lease counts as dead.
const STALE_BEATS: u32 = 3;

/// What the fleet tells its pool, and asks of it.
pub(crate) trait PoolPort: Send + Sync + 'static {
    /// A runner lease appeared or changed; `age`: how long ago it was
    /// written, by the bucket's timestamp of the write (zero if that is
    /// ahead of this host's clock).
    fn lease_seen(self: Arc<Self>, lease: &RunnerLease, age: Duration);
    /// A runner is gone (its lease removed), for this reason.
    fn lease_gone(self: Arc<Self>, runner: &str, why: &str);
    /// Callers of this parent waiting for a slot.
    fn waiting(&self) -> usize;
    /// The pool's current `min` and `max`.
    fn limits(&self) -> (usize, usize);
}

/// A parent's part in a shared pool.
pub(crate) struct Fleet {
    store: Store,
    parent: Arc<ParentContext>,
    config: PoolConfig,
    booter: Arc<Booter>,
    /// The pool's: cancelled when it closes.
    closed: CancellationToken,
    /// `scalers.<build>` of this parent's build.
    scaler_key: String,
    state: Mutex<FleetState>,
    /// Woken when this parent's number of waiting callers changes.
    demand_changed: Notify,
    /// Becomes true once this parent has left the pool (at the end of its
    /// parent loop, so that no renewal of its lease can follow the leave).
    left: watch::Sender<bool>,
    /// Publishes the pool's events: runner events while this parent is
    /// the scaler of its build, from the mirror.
    events: PoolAnnouncer,
    /// Why the bucket cannot be used now (a refused permission, or a
    /// JetStream not ready for longer than the boot timeout), and when
    /// that was last seen: callers waiting for a runner fail with it.
    trouble: watch::Sender<Option<(Error, Instant)>>,
    /// When the pool's start must be done with the bucket by.
    ready_by: Instant,
}

/// Parts of the subjects of a pool's bucket, as the NATS server names them
/// in a permission violation.
pub(crate) fn bucket_subjects(pool: &str) -> Vec<String> {
    vec![
        format!("KV_flame-{pool}\""),
        format!("KV_flame-{pool}."),
        format!("$KV.flame-{pool}."),
        "\"$JS.API.INFO\"".to_string(),
    ]
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("bucket", &self.store.name)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Opens the pool's bucket.
    pub(crate) async fn open(
        parent: Arc<ParentContext>,
        config: PoolConfig,
        booter: Arc<Booter>,
        closed: CancellationToken,
    ) -> Result<Fleet, Error> {
        let ready_by = Instant::now() + config.boot_timeout;
        Ok(Fleet {
            events: parent.announcer.for_pool(&config.name),
            store: kv::open_bucket(
                &parent.client,
                &config.name,
                config.kv_replicas,
                config.boot_timeout,
            )
            .await?,
            trouble: watch::Sender::new(None),
            ready_by,
            scaler_key: subjects::scaler_key(&parent.build_id),
            parent,
            config,
            booter,
            closed,
            state: Mutex::new(FleetState::default()),
            demand_changed: Notify::new(),
            left: watch::Sender::new(false),
        })
    }

    /// Tells the scaler loop that this parent's demand changed.
    pub(crate) fn demand_changed(&self) {
        self.demand_changed.notify_one();
    }

    /// Starts the watch, the parent loop and the `alive` responder.
    pub(crate) async fn start(self: &Arc<Self>, port: Arc<dyn PoolPort>) -> Result<(), Error> {
        let alive = self
            .parent
            .client
            .queue_subscribe(
                subjects::alive(&self.config.name),
                subjects::ALIVE_QUEUE.to_string(),
            )
            .await
            .map_err(|e| Error::nats("cannot subscribe to the pool's alive subject", e))?;
        let present = self
            .parent
            .client
            .subscribe(subjects::parent_present(
                &self.config.name,
                &self.parent.parent_id,
            ))
            .await
            .map_err(|e| Error::nats("cannot subscribe to the parent's presence subject", e))?;
        tokio::spawn(self.clone().answer_present(present));
        // A refusal of the bucket's subjects from now on, whatever asked,
        // fails the callers waiting for a runner.
        let me = Arc::downgrade(self);
        let about = bucket_subjects(&self.config.name);
        self.parent.events.permissions.on_violation(move |text| {
            if let Some(fleet) = me.upgrade() {
                if !fleet.closed.is_cancelled() && about.iter().any(|a| text.contains(a)) {
                    fleet.report_trouble(Error::PermissionDenied {
                        reason: text.to_string(),
                    });
                }
            }
        });
        // Write and read the bucket once before answering, so that a
        // refused permission fails the start (the caller's guard turns the
        // server's report into the error), and a bucket just created on a
        // cluster is retried until its stream has a leader.
        let left = || self.ready_by.saturating_duration_since(Instant::now());
        let pool = &self.config.name;
        let bucket = subjects::bucket(pool);
        kv::when_ready(
            pool,
            &format!("write this parent's lease in the KV bucket {bucket}"),
            left(),
            || election::write_parent_lease(self, 0),
        )
        .await?;
        kv::when_ready(
            pool,
            &format!("read the KV bucket {bucket}"),
            left(),
            || kv::read::<Slots>(&self.store, subjects::SLOTS_KEY),
        )
        .await?;
        // Read the bucket before answering: the answer depends on the
        // parents seen in it.
        let watch = mirror::first_read(self, &port).await?;
        tokio::spawn(self.clone().answer_alive(alive));
        tokio::spawn(mirror::watch(self.clone(), port.clone(), watch));
        tokio::spawn(election::parent_loop(self.clone(), port));
        Ok(())
    }

    fn stale_after(&self) -> Duration {
        self.config.heartbeat * STALE_BEATS
    }

    fn is_leading(&self) -> bool {
        self.state.lock().unwrap().leading.is_some()
    }

    /// Records why the bucket cannot be used now.
    fn report_trouble(&self, error: Error) {
        self.trouble.send_replace(Some((error, Instant::now())));
    }

    /// The bucket can be written again: a JetStream that was not ready is
    /// (a refusal stays until it is no longer reported).
    fn bucket_ready_again(&self) {
        self.trouble.send_if_modified(|trouble| {
            let not_ready = matches!(trouble, Some((Error::JetStreamNotReady { .. }, _)));
            if not_ready {
                *trouble = None;
            }
            not_ready
        });
    }

    /// Why the bucket cannot be used, if that was seen lately (within
    /// three heartbeats: every round of the parent loop uses the bucket,
    /// so a lasting refusal is reported again and again).
    pub(crate) fn trouble(&self) -> Option<Error> {
        match &*self.trouble.borrow() {
            Some((e, seen)) if seen.elapsed() <= self.stale_after() => Some(e.clone()),
            _ => None,
        }
    }

    /// Resolves with the next trouble reported (or one reported lately):
    /// callers waiting for a runner fail with it rather than wait for their
    /// deadline.
    pub(crate) async fn troubled(&self) -> Error {
        let mut trouble = self.trouble.subscribe();
        loop {
            if let Some((e, seen)) = &*trouble.borrow_and_update() {
                if seen.elapsed() <= self.stale_after() {
                    return e.clone();
                }
            }
            if trouble.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Whether this parent is the scaler of its build now.
    pub(crate) fn is_scaler(&self) -> bool {
        self.is_leading()
    }

    /// The pool's numbers as the bucket says (every build's runners; the
    /// waiting callers of every live parent).
    pub(crate) fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts(self.stale_after())
    }

    /// Publishes a runner event with the pool's numbers now.
    fn announce(&self, st: &FleetState, event: impl FnOnce(Counts) -> Outgoing) {
        self.events.send(event(st.counts(self.stale_after())));
    }

    /// Waits until this parent has left the pool, which its parent loop
    /// does once the pool closes.
    pub(crate) async fn left(&self) {
        let mut left = self.left.subscribe();
        let _ = left.wait_for(|done| *done).await;
    }

    /// Whether a parent of `build` is alive, as far as this parent knows.
    fn build_has_parent(&self, build: &str) -> bool {
        if build == &*self.parent.build_id {
            return true;
        }
        let st = self.state.lock().unwrap();
        let stale_after = self.stale_after();
        st.parents
            .values()
            .any(|p| p.value.build == build && p.changed.elapsed() <= stale_after)
    }

    /// Tells a runner to drain and exit.
    async fn send_retire(&self, runner: &str) {
        let to = subjects::runner_control(&self.config.name, runner);
        let body = match self.booter.shared_call_key() {
            Some(key) => key.retire_body(&to),
            None => subjects::CONTROL_RETIRE.to_string(),
        };
        if let Err(e) = self.parent.client.publish(to, body.into()).await {
            debug!(runner, "cannot send retire: {e}");
        }
    }

    /// Answers runners asking whether a parent of the pool is alive: `yes`,
    /// or `no` when the runner's build (its `Flame-Build` header) has no
    /// live parent left.
    async fn answer_alive(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(Some(msg)) = self.closed.run_until_cancelled(requests.next()).await {
            let build = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(wire::HEADER_BUILD))
                .map(|b| b.as_str().to_string());
            let answer = match build {
                Some(build) if !self.build_has_parent(&build) => subjects::ALIVE_NO,
                _ => subjects::ALIVE_YES,
            };
            if let Some(reply) = msg.reply {
                let _ = self.parent.client.publish(reply, answer.into()).await;
            }
        }
        let _ = requests.unsubscribe().await;
    }

    /// Answers `present` requests while the pool is open.
    async fn answer_present(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(Some(msg)) = self.closed.run_until_cancelled(requests.next()).await {
            if let Some(reply) = msg.reply {
                let _ = self.parent.client.publish(reply, "yes".into()).await;
            }
        }
        let _ = requests.unsubscribe().await;
    }
}

/// Runners this parent's scaler booted, by id.
type Owned = HashMap<String, Box<dyn StopRunner>>;
