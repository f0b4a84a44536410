//! The runner side: a copy of the app that serves calls for one pool.
//!
//! Life of a runner: connect to NATS, start a micro service with one
//! endpoint on its own subject, flush, tell the parent it is ready, serve.
//! It stops when it has been idle long enough and the parent agrees (and the
//! pool's idle check, if any, agrees too), after its one call if the pool is
//! single-use, or on SIGTERM; stopping unsubscribes first (new calls go
//! elsewhere) and then drains in-flight work up to the shutdown timeout. When
//! it has not heard from its parent (or NATS) for the grace period it exits
//! at once: nobody is left to receive the results.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use flame_core::pool::lease::{LeaseState, RunnerLease};
use flame_core::registry::{Handler, Invocation, InvokeError, Registry};
use flame_core::subject::{self, ParentEvent};
use flame_core::wire::{self, ErrorKind, ParentInfo};
use flame_core::{build_id, Error};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect::connect;
use crate::kv;
use crate::protocol::{error_headers, ParentAnswer, RunnerEvent};

/// Why a runner stops; decides whether in-flight work may finish.
#[derive(Debug)]
enum Stop {
    /// Asked to (idle, single-use done, SIGTERM): finish in-flight work up to
    /// the shutdown timeout.
    Drain(String),
    /// The parent (or NATS) is gone: nobody can receive results, exit now.
    Abandoned(String),
}

/// Serves as a runner until it is time to stop. Returns the process exit code.
pub(crate) async fn serve(info: ParentInfo) -> i32 {
    let runner = info.runner_id.clone();
    match run(info).await {
        Ok(reason) => {
            info!(%runner, "runner stopping: {reason}");
            0
        }
        Err(e) => {
            tracing::error!(%runner, "runner failed: {e}");
            1
        }
    }
}

/// A first poll longer than this marks a function as doing CPU work before
/// its first await; its calls are then always spawned.
const SLOW_FIRST_POLL: Duration = Duration::from_millis(1);

/// Slow first polls in a row after which a function's calls are always
/// spawned.
const SLOW_STRIKES: u8 = 3;

/// Counters kept on the runner, shown by `nats micro stats` as endpoint data.
#[derive(Debug, Default)]
struct Counters {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    casts_failed: AtomicU64,
}

struct Runner {
    info: ParentInfo,
    client: async_nats::Client,
    registry: &'static Registry,
    build: &'static str,
    counters: Arc<Counters>,
    started: Instant,
    /// When the runner last started or finished work, in milliseconds since
    /// `started` (an atomic: this is touched twice per call).
    last_active_ms: AtomicU64,
    /// Per function, how many of its latest first polls in a row were slow
    /// (see [`Runner::dispatch`]).
    slow_polls: HashMap<&'static str, AtomicU8>,
    /// Set while stopping; only then do finished calls wake the drain.
    draining: AtomicBool,
    /// Woken when in-flight work finishes during the drain.
    work_done: Notify,
    /// Milliseconds since `started` when a parent last answered a ping.
    parent_heard_ms: AtomicU64,
    /// The parent answered that it no longer knows this runner.
    parent_refused: AtomicBool,
    /// The scaler removed this runner's lease (shared pools).
    lease_lost: AtomicBool,
    /// One permit per concurrent call: the runner itself never runs more
    /// than `max_concurrency` calls, whatever its parents believe (in a
    /// shared pool, parents place calls without seeing each other's).
    permits: Arc<Semaphore>,
    /// Calls waiting for a permit.
    queued: AtomicUsize,
    /// Woken when calls start queueing, so the lease shows it soon.
    lease_dirty: Notify,
    /// The runner's lease, in a shared pool.
    lease: tokio::sync::Mutex<Option<LeaseKeeper>>,
}

/// Counts a call as in flight while alive, holding its permit; both are
/// given back when the call's task is aborted (cancelled by its caller).
struct InFlight {
    runner: Arc<Runner>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.runner.end();
    }
}

/// Counts a call waiting for a permit.
struct Queued<'a>(&'a Runner);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A shared pool runner's lease in the KV bucket, renewed with
/// compare-and-set so that a lease the scaler removed is never brought back.
struct LeaseKeeper {
    store: async_nats::jetstream::kv::Store,
    key: String,
    revision: u64,
    lease: RunnerLease,
}

impl LeaseKeeper {
    /// Finds the lease the scaler wrote before booting this runner.
    async fn open(client: &async_nats::Client, info: &ParentInfo) -> Result<LeaseKeeper, Error> {
        let store = kv::open_bucket(client, &info.pool).await?;
        let key = subject::runner_key(&info.runner_id);
        let (lease, revision) = kv::read::<RunnerLease>(&store, &key)
            .await?
            .ok_or_else(|| {
                Error::Config(format!(
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
    async fn write(&mut self, change: impl Fn(&mut RunnerLease)) -> Result<bool, Error> {
        use async_nats::jetstream::kv::UpdateErrorKind;
        for _ in 0..5 {
            change(&mut self.lease);
            self.lease.beat += 1;
            match self
                .store
                .update(&self.key, kv::to_json(&self.lease), self.revision)
                .await
            {
                Ok(revision) => {
                    self.revision = revision;
                    return Ok(true);
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
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
                Err(e) => return Err(Error::Nats(format!("cannot renew lease: {e}"))),
            }
        }
        Err(Error::Nats("cannot renew lease: too many conflicts".into()))
    }

    /// Removes the lease. The runner's slot stays taken until the scaler
    /// sees the process gone: a runner about to exit still counts.
    async fn remove(&self) {
        if let Err(e) = self.store.delete(&self.key).await {
            debug!("cannot delete lease: {e}");
        }
    }
}

/// Calls running in their own tasks, by reply subject, so that a caller
/// that stops waiting can cancel its call. Only the serve loop touches it.
#[derive(Default)]
struct Cancellable {
    tasks: HashMap<String, AbortHandle>,
    /// Finished tasks are swept out when the map reaches this size.
    sweep_at: usize,
}

impl Cancellable {
    fn insert(&mut self, reply: String, task: AbortHandle) {
        if self.tasks.len() >= self.sweep_at {
            self.tasks.retain(|_, t| !t.is_finished());
            self.sweep_at = (self.tasks.len() * 2).max(64);
        }
        self.tasks.insert(reply, task);
    }

    fn cancel(&mut self, reply: &[u8]) -> bool {
        let Ok(reply) = std::str::from_utf8(reply) else {
            return false;
        };
        match self.tasks.remove(reply) {
            Some(task) if !task.is_finished() => {
                task.abort();
                true
            }
            _ => false,
        }
    }
}

/// What became of one request.
struct Dispatched {
    /// It was valid work (not refused).
    accepted: bool,
    /// A call still running in its own task, by its reply subject.
    cancellable: Option<(String, AbortHandle)>,
}

async fn run(info: ParentInfo) -> Result<String, Error> {
    let registry = Registry::global()?;
    let failsafe = Duration::from_millis(info.failsafe_timeout_ms);
    let failsafe_deadline = Instant::now() + failsafe;
    // Hash the executable while we connect.
    let build = tokio::task::spawn_blocking(build_id);
    let client = connect(
        &info.nats_url,
        format!("flame runner {} ({})", info.runner_id, info.pool),
        failsafe,
    )
    .await?;
    let build = build.await.map_err(|e| Error::Config(e.to_string()))?;

    let counters = Arc::new(Counters::default());
    let stats_counters = counters.clone();
    let mut metadata = HashMap::new();
    metadata.insert("pool".to_string(), info.pool.clone());
    metadata.insert("runner".to_string(), info.runner_id.clone());
    metadata.insert("parent".to_string(), info.parent_id.clone());
    metadata.insert("build".to_string(), build.to_string());
    let max_concurrency = info.max_concurrency;
    let service = client
        .service_builder()
        .description(format!("flame runner of pool {}", info.pool))
        .metadata(metadata)
        .stats_handler(move |_endpoint, _stats| {
            serde_json::json!({
                "in_flight": stats_counters.in_flight.load(Ordering::Relaxed),
                "max_in_flight": stats_counters.max_in_flight.load(Ordering::Relaxed),
                "max_concurrency": max_concurrency,
                "casts_failed": stats_counters.casts_failed.load(Ordering::Relaxed),
            })
        })
        .start(format!("flame-{}", info.pool), env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| Error::Nats(format!("cannot start micro service: {e}")))?;
    let mut endpoint = service
        .endpoint_builder()
        .name("call")
        .add(subject::runner(&info.pool, &info.runner_id))
        .await
        .map_err(|e| Error::Nats(format!("cannot subscribe: {e}")))?;
    let mut cancels = client
        .subscribe(subject::runner_cancel(&info.pool, &info.runner_id))
        .await
        .map_err(|e| Error::Nats(format!("cannot subscribe: {e}")))?;
    let mut control = client
        .subscribe(subject::runner_control(&info.pool, &info.runner_id))
        .await
        .map_err(|e| Error::Nats(format!("cannot subscribe: {e}")))?;
    let lease = if info.shared {
        let keeper = tokio::time::timeout_at(failsafe_deadline, LeaseKeeper::open(&client, &info))
            .await
            .map_err(|_| Error::Config("failsafe: cannot read this runner's lease".into()))??;
        Some(keeper)
    } else {
        None
    };
    // Subscribed and flushed before announcing: no call can miss us.
    client
        .flush()
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;

    let runner = Arc::new(Runner {
        info,
        client,
        registry,
        build,
        counters,
        slow_polls: registry
            .names()
            .into_iter()
            .map(|name| (name, AtomicU8::new(0)))
            .collect(),
        started: Instant::now(),
        last_active_ms: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        work_done: Notify::new(),
        parent_heard_ms: AtomicU64::new(0),
        parent_refused: AtomicBool::new(false),
        lease_lost: AtomicBool::new(false),
        permits: Arc::new(Semaphore::new(max_concurrency.max(1))),
        queued: AtomicUsize::new(0),
        lease_dirty: Notify::new(),
        lease: tokio::sync::Mutex::new(lease),
    });
    if runner.info.shared {
        runner.announce_ready_in_lease().await?;
    } else {
        runner.announce_ready(failsafe_deadline).await?;
    }
    debug!(runner = %runner.info.runner_id, "runner ready");

    let stop_token = CancellationToken::new();
    let stop_reason = Arc::new(Mutex::new(None));
    let lifecycle = tokio::spawn(lifecycle(
        runner.clone(),
        stop_token.clone(),
        stop_reason.clone(),
    ));

    let mut cancellable = Cancellable::default();
    // Created once: a cancellation future registers itself when first
    // polled, which is not free on every request.
    let stopped = stop_token.cancelled();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            Some(msg) = cancels.next() => {
                if cancellable.cancel(&msg.payload) {
                    debug!(runner = %runner.info.runner_id, "call cancelled by its caller");
                }
            }
            Some(msg) = control.next() => {
                if &msg.payload[..] == subject::CONTROL_RETIRE.as_bytes() {
                    *stop_reason.lock().unwrap() =
                        Some(Stop::Drain("retired by the scaler".into()));
                    break;
                }
            }
            request = endpoint.next() => match request {
                Some(request) => {
                    let done = runner.clone().dispatch(request);
                    if let Some((reply, task)) = done.cancellable {
                        cancellable.insert(reply, task);
                    }
                    if done.accepted && runner.info.single_use {
                        *stop_reason.lock().unwrap() =
                            Some(Stop::Drain("single-use runner took its call".into()));
                        break;
                    }
                }
                None => {
                    *stop_reason.lock().unwrap() =
                        Some(Stop::Abandoned("subscription closed".into()));
                    break;
                }
            },
        }
    }
    lifecycle.abort();
    let stop = stop_reason
        .lock()
        .unwrap()
        .take()
        .unwrap_or(Stop::Drain("stopped".into()));

    // Unsubscribe first so new calls find no responder and go elsewhere,
    // then let in-flight work finish (callers may still cancel theirs).
    let _ = endpoint.stop().await;
    let _ = service.stop().await;
    let reason = match stop {
        Stop::Drain(reason) => {
            // Tell the parents first, so they place nothing new here.
            let heartbeat = Duration::from_millis(runner.info.heartbeat_ms);
            if runner.info.shared {
                let _ = tokio::time::timeout(heartbeat, async {
                    let mut lease = runner.lease.lock().await;
                    if let Some(keeper) = lease.as_mut() {
                        let _ = keeper.write(|l| l.state = LeaseState::Draining).await;
                    }
                })
                .await;
            } else {
                runner.ask_parent(ParentEvent::Stopping, 0, heartbeat).await;
            }
            runner.drain(&mut cancels, &mut cancellable).await;
            reason
        }
        Stop::Abandoned(reason) => {
            let left = runner.counters.in_flight.load(Ordering::SeqCst);
            if left > 0 {
                warn!(runner = %runner.info.runner_id, "abandoning {left} calls: {reason}");
            }
            reason
        }
    };
    if runner.info.shared {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if let Some(keeper) = runner.lease.lock().await.as_ref() {
                keeper.remove().await;
            }
        })
        .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), runner.client.flush()).await;
    Ok(reason)
}

/// Watches idleness, the parent and signals; cancels `stop` with a reason.
async fn lifecycle(runner: Arc<Runner>, stop: CancellationToken, reason: Arc<Mutex<Option<Stop>>>) {
    let info = &runner.info;
    let heartbeat = Duration::from_millis(info.heartbeat_ms);
    let grace = Duration::from_millis(info.parent_grace_ms);
    let idle_after = info.idle_shutdown_after();
    let idle_check = (idle_after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut ping = tokio::time::interval(heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = tokio::time::interval(idle_check);
    runner.heard_parent();

    let why = loop {
        tokio::select! {
            _ = async { sigterm.as_mut().unwrap().recv().await }, if sigterm.is_some() => {
                break Stop::Drain("SIGTERM".to_string());
            }
            _ = ping.tick() => {
                // Pings go out on their own task so that a slow answer never
                // delays the next one: the parent counts silent runners as
                // down after two intervals.
                let r = runner.clone();
                tokio::spawn(async move {
                    let answer = if r.info.shared {
                        // Any parent of the pool will do.
                        r.ask_any_parent(heartbeat).await
                    } else {
                        r.ask_parent(ParentEvent::Ping, 0, heartbeat).await
                    };
                    match answer {
                        Some(true) => r.heard_parent(),
                        Some(false) => r.parent_refused.store(true, Ordering::SeqCst),
                        None => {}
                    }
                });
                if runner.info.shared {
                    // Renewed on its own task too: a slow ping must not make
                    // the lease look dead.
                    let r = runner.clone();
                    tokio::spawn(async move {
                        if !r.renew_lease().await {
                            r.lease_lost.store(true, Ordering::SeqCst);
                        }
                    });
                }
                if runner.lease_lost.load(Ordering::SeqCst) {
                    break Stop::Abandoned("the scaler removed this runner's lease".to_string());
                }
                if runner.parent_refused.load(Ordering::SeqCst) {
                    break Stop::Abandoned("the parent no longer knows this runner".to_string());
                }
                let heard = runner.parent_heard_ms.load(Ordering::SeqCst);
                let silent = runner.started.elapsed().saturating_sub(Duration::from_millis(heard));
                if silent >= grace {
                    break Stop::Abandoned(format!("no word from the parent for {silent:?}"));
                }
            }
            _ = runner.lease_dirty.notified(), if runner.info.shared => {
                // Callers started queueing here: show the scaler soon. The
                // short wait here gathers a burst of them into one write.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let r = runner.clone();
                tokio::spawn(async move { r.renew_lease().await });
            }
            _ = idle.tick(), if !runner.info.shared => {
                if runner.counters.in_flight.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                let idle_for = runner.idle_for();
                if idle_for < idle_after {
                    continue;
                }
                if !runner.idle_check_allows().await {
                    continue;
                }
                let idle_ms = idle_for.as_millis() as u64;
                if runner.ask_parent(ParentEvent::Leave, idle_ms, heartbeat).await == Some(true) {
                    break Stop::Drain(format!("idle for {idle_for:?}"));
                }
            }
        }
    };
    *reason.lock().unwrap() = Some(why);
    stop.cancel();
}

impl Runner {
    /// Shared pools: marks the lease ready, which every parent's KV watch
    /// sees.
    async fn announce_ready_in_lease(&self) -> Result<(), Error> {
        let build = self.build.to_string();
        let mut lease = self.lease.lock().await;
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
            Err(Error::Config(
                "the scaler removed this runner's lease before it was ready".into(),
            ))
        }
    }

    /// Shared pools: writes load, queue and idle time into the lease. False
    /// once the lease is gone.
    async fn renew_lease(&self) -> bool {
        let idle_for = if self.counters.in_flight.load(Ordering::SeqCst) == 0
            && self.queued.load(Ordering::SeqCst) == 0
        {
            let idle_for = self.idle_for();
            if idle_for >= self.info.idle_shutdown_after() && !self.idle_check_allows().await {
                Duration::ZERO
            } else {
                idle_for
            }
        } else {
            Duration::ZERO
        };
        let load = self.counters.in_flight.load(Ordering::SeqCst);
        let queued = self.queued.load(Ordering::SeqCst);
        // One renewal at a time; a renewal still under way (NATS slow or
        // away) makes this one moot.
        let Ok(mut lease) = self.lease.try_lock() else {
            return true;
        };
        let Some(keeper) = lease.as_mut() else {
            return true;
        };
        let heartbeat = Duration::from_millis(self.info.heartbeat_ms);
        let write = keeper.write(|l| {
            l.load = load;
            l.queued = queued;
            l.idle_ms = idle_for.as_millis() as u64;
        });
        match tokio::time::timeout(heartbeat * 2, write).await {
            Ok(Ok(alive)) => alive,
            Ok(Err(e)) => {
                debug!(runner = %self.info.runner_id, "lease not renewed: {e}");
                true
            }
            Err(_) => {
                debug!(runner = %self.info.runner_id, "lease not renewed in time");
                true
            }
        }
    }

    /// Shared pools: asks whether any parent of the pool is alive.
    async fn ask_any_parent(&self, timeout: Duration) -> Option<bool> {
        let request = async_nats::Request::new()
            .payload(Bytes::from(self.info.runner_id.clone()))
            .timeout(Some(timeout));
        match self
            .client
            .send_request(subject::alive(&self.info.pool), request)
            .await
        {
            Ok(_) => Some(true),
            Err(e) => {
                debug!("no parent answered: {e}");
                None
            }
        }
    }

    fn heard_parent(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.parent_heard_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// Runs the pool's idle check, if any. A check that fails to run counts
    /// as yes (logged): a runner with no work must not stay up forever.
    async fn idle_check_allows(&self) -> bool {
        let Some(name) = self.info.idle_shutdown_check.as_deref() else {
            return true;
        };
        let Some((name, handler)) = self.registry.lookup(name) else {
            warn!(runner = %self.info.runner_id, "idle check `{name}` is not registered in this build; stopping anyway");
            return true;
        };
        let args = Bytes::from(wire::encode(&()).expect("() encodes"));
        let timeout = Duration::from_millis(self.info.heartbeat_ms.max(1_000));
        match self.execute(handler, args, timeout).await {
            Ok(bytes) => match wire::decode::<bool>(&bytes) {
                Ok(allowed) => {
                    if !allowed {
                        debug!(runner = %self.info.runner_id, "idle check `{name}` says stay up");
                    }
                    allowed
                }
                Err(e) => {
                    warn!(runner = %self.info.runner_id, "idle check `{name}` returned no bool ({e}); stopping anyway");
                    true
                }
            },
            Err((_, message)) => {
                warn!(runner = %self.info.runner_id, "idle check `{name}` failed ({message}); stopping anyway");
                true
            }
        }
    }

    /// Tells the parent we are ready; retried until the failsafe deadline.
    async fn announce_ready(&self, deadline: Instant) -> Result<(), Error> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Config(format!(
                    "failsafe: parent {} did not acknowledge this runner within {:?}",
                    self.info.parent_id, self.info.failsafe_timeout_ms
                )));
            }
            match self
                .ask_parent(ParentEvent::Ready, 0, left.min(Duration::from_secs(2)))
                .await
            {
                Some(true) => return Ok(()),
                Some(false) => {
                    return Err(Error::Config(
                        "the parent refused this runner (it gave up on it)".into(),
                    ))
                }
                None => tokio::time::sleep(Duration::from_millis(50).min(left)).await,
            }
        }
    }

    /// Sends an event to the parent. `None` when there was no answer.
    async fn ask_parent(
        &self,
        event: ParentEvent,
        idle_ms: u64,
        timeout: Duration,
    ) -> Option<bool> {
        let subject = subject::parent_event(&self.info.pool, &self.info.parent_id, event);
        let body = serde_json::to_vec(&RunnerEvent {
            runner: self.info.runner_id.clone(),
            build: self.build.to_string(),
            idle_ms,
        })
        .ok()?;
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(timeout));
        match self.client.send_request(subject, request).await {
            Ok(msg) => serde_json::from_slice::<ParentAnswer>(&msg.payload)
                .ok()
                .map(|a| a.ok),
            Err(e) => {
                debug!(event = event.as_str(), "parent did not answer: {e}");
                None
            }
        }
    }

    /// Checks a request and starts its work.
    ///
    /// Most calls finish without ever waiting (an echo, a lookup in memory),
    /// and handing each to a new task costs a cross-thread wake-up, which on
    /// small machines is most of a call's cost. So the call is polled once
    /// right here and only spawned if it has to wait. A function whose first
    /// poll takes more than [`SLOW_FIRST_POLL`] of CPU time
    /// [`SLOW_STRIKES`] times in a row (CPU work before its first await) is
    /// always spawned from then on, so it can hold up the serve loop only a
    /// few times; a one-off slow poll (first-use costs) does not count.
    fn dispatch(self: Arc<Self>, request: service::Request) -> Dispatched {
        let checked = self.check(&request);
        let inline_name = checked.as_ref().ok().map(|call| call.function);
        // A caller that stops waiting names its call by the reply subject.
        let reply = request.message.reply.clone();
        let accepted = checked.is_ok();
        let runner = self.clone();
        let inline = inline_name
            .and_then(|name| runner.slow_polls.get(name))
            .filter(|strikes| strikes.load(Ordering::Relaxed) < SLOW_STRIKES);
        let mut work = Box::pin(async move {
            let Checked {
                function,
                handler,
                timeout,
                cast,
                ..
            } = match checked {
                Ok(ok) => ok,
                Err((kind, message, extra)) => {
                    warn!(runner = %self.info.runner_id, "refused request: {message}");
                    self.respond_error(&request, kind, message, &extra).await;
                    return;
                }
            };
            let deadline = Instant::now() + timeout;
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    // Full (other parents' calls): wait for a slot, within
                    // the call's deadline.
                    self.queued.fetch_add(1, Ordering::SeqCst);
                    let _queued = Queued(&self);
                    self.lease_dirty.notify_one();
                    let permit =
                        tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
                            .await;
                    match permit {
                        Ok(Ok(permit)) => permit,
                        _ => {
                            let message = format!(
                                "deadline of {timeout:?} passed while waiting for a free slot on the runner"
                            );
                            self.failed(function, cast, &message);
                            self.respond_error(&request, ErrorKind::Timeout, message, &[])
                                .await;
                            return;
                        }
                    }
                }
            };
            // Held until the reply is out, so a draining runner does not exit
            // before answering.
            let in_flight = Arc::new(self.begin(permit));
            let outcome = self
                .execute_holding(
                    handler,
                    request.message.payload.clone(),
                    deadline.saturating_duration_since(Instant::now()),
                    Some(in_flight.clone()),
                )
                .await;
            match outcome {
                Ok(bytes) => {
                    let max = self.client.max_payload();
                    if bytes.len() > max {
                        let message = format!(
                            "the result of `{function}` is {} bytes, more than the NATS server's max_payload of {max} bytes",
                            bytes.len()
                        );
                        let extra = [
                            (wire::HEADER_SIZE, bytes.len().to_string()),
                            (wire::HEADER_MAX, max.to_string()),
                        ];
                        self.failed(function, cast, &message);
                        self.respond_error(&request, ErrorKind::ResultTooLarge, message, &extra)
                            .await;
                    } else if request.message.reply.is_some() {
                        if let Err(e) = request.respond(Ok(Bytes::from(bytes))).await {
                            debug!("cannot send reply: {e}");
                        }
                    }
                }
                Err((kind, message)) => {
                    self.failed(function, cast, &message);
                    self.respond_error(&request, kind, message, &[]).await;
                }
            }
        });
        if let Some(strikes) = inline {
            // CPU time, not wall time: being preempted on a busy machine
            // must not mark a quick function as slow.
            let started = thread_cpu_time();
            let done = (&mut work).now_or_never().is_some();
            let took = thread_cpu_time().saturating_sub(started);
            if took <= SLOW_FIRST_POLL {
                strikes.store(0, Ordering::Relaxed);
            } else if strikes.fetch_add(1, Ordering::Relaxed) + 1 == SLOW_STRIKES {
                debug!(function = ?inline_name, ?took, "CPU work before the first await; spawning its calls from now on");
            }
            if done {
                return Dispatched {
                    accepted,
                    cancellable: None,
                };
            }
        }
        let task = tokio::spawn(work).abort_handle();
        Dispatched {
            accepted,
            cancellable: reply.map(|r| (r.to_string(), task)),
        }
    }

    fn check(&self, request: &service::Request) -> Result<Checked, Refusal> {
        let malformed = |m: &str| (ErrorKind::Malformed, m.to_string(), Vec::new());
        let headers = request
            .message
            .headers
            .as_ref()
            .ok_or_else(|| malformed("request has no flame headers"))?;
        let get = |name: &str| headers.get(name).map(|v| v.as_str());
        let function = get(wire::HEADER_FUNCTION)
            .ok_or_else(|| malformed("request has no Flame-Fn header"))?;
        let build = get(wire::HEADER_BUILD)
            .ok_or_else(|| malformed("request has no Flame-Build header"))?;
        let timeout_ms: u64 = get(wire::HEADER_TIMEOUT_MS)
            .ok_or_else(|| malformed("request has no Flame-Timeout-Ms header"))?
            .parse()
            .map_err(|_| malformed("Flame-Timeout-Ms is not a number of milliseconds"))?;
        if build != self.build {
            return Err((
                ErrorKind::BuildMismatch,
                format!(
                    "caller is build {build}, this runner is build {}",
                    self.build
                ),
                vec![(wire::HEADER_RUNNER_BUILD, self.build.to_string())],
            ));
        }
        let (function, handler) = self.registry.lookup(function).ok_or_else(|| {
            (
                ErrorKind::UnknownFunction,
                format!("no function named `{function}` is registered"),
                Vec::new(),
            )
        })?;
        Ok(Checked {
            function,
            handler,
            timeout: Duration::from_millis(timeout_ms),
            cast: get(wire::HEADER_CAST).is_some(),
        })
    }

    /// Runs a call, enforcing its deadline. Async functions are polled
    /// right here (no thread hop); plain functions go to the blocking pool so
    /// CPU-heavy code cannot stall the runner's NATS connection.
    async fn execute(
        &self,
        handler: Handler,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Vec<u8>, (ErrorKind, String)> {
        self.execute_holding(handler, payload, timeout, None).await
    }

    /// [`Runner::execute`], keeping `hold` alive as long as the work runs: a
    /// plain function keeps its thread (and its in-flight count) even when
    /// the caller is gone, since a thread cannot be stopped from outside.
    async fn execute_holding(
        &self,
        handler: Handler,
        payload: Bytes,
        timeout: Duration,
        hold: Option<Arc<InFlight>>,
    ) -> Result<Vec<u8>, (ErrorKind, String)> {
        let deadline = Instant::now() + timeout;
        let timed_out = || {
            (
                ErrorKind::Timeout,
                format!("deadline of {timeout:?} passed; the work was cancelled"),
            )
        };
        let result = match handler(payload) {
            Invocation::Refused(e) => Err(e),
            Invocation::Async(fut) => {
                let guarded = std::panic::AssertUnwindSafe(fut).catch_unwind();
                match tokio::time::timeout_at(deadline, guarded).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(panic)) => return Err((ErrorKind::Panicked, panic_message(panic))),
                    // Dropping the future cancelled the work.
                    Err(_) => return Err(timed_out()),
                }
            }
            Invocation::Blocking(f) => {
                let mut work = tokio::task::spawn_blocking(move || {
                    let _hold = hold;
                    f()
                });
                match tokio::time::timeout_at(deadline, &mut work).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(join)) => {
                        return Err((ErrorKind::Panicked, panic_message(join.into_panic())))
                    }
                    Err(_) => {
                        // A thread cannot be stopped from outside; the slot
                        // stays counted until the function returns.
                        let _ = work.await;
                        return Err(timed_out());
                    }
                }
            }
        };
        result.map_err(|e| match e {
            InvokeError::DecodeArgs(m) => (ErrorKind::DecodeArgs, m),
            InvokeError::EncodeResult(m) => (ErrorKind::EncodeResult, m),
        })
    }

    fn failed(&self, function: &str, cast: bool, message: &str) {
        if cast {
            self.counters.casts_failed.fetch_add(1, Ordering::Relaxed);
            warn!(runner = %self.info.runner_id, function, "cast failed: {message}");
        } else {
            debug!(runner = %self.info.runner_id, function, "call failed: {message}");
        }
    }

    async fn respond_error(
        &self,
        request: &service::Request,
        kind: ErrorKind,
        message: String,
        extra: &[(&str, String)],
    ) {
        if request.message.reply.is_none() {
            return;
        }
        let err = service::error::Error {
            status: wire::header_safe(&message),
            code: kind.code(),
        };
        if let Err(e) = request
            .respond_with_headers(Err(err), error_headers(kind, extra))
            .await
        {
            debug!("cannot send error reply: {e}");
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn begin(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> InFlight {
        let now = self.counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.touch();
        InFlight {
            runner: self.clone(),
            _permit: permit,
        }
    }

    fn end(&self) {
        self.touch();
        self.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            self.work_done.notify_waiters();
        }
    }

    /// Waits for in-flight work, up to the shutdown timeout, still taking
    /// cancellations from callers that stop waiting.
    async fn drain(&self, cancels: &mut async_nats::Subscriber, cancellable: &mut Cancellable) {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_millis(self.info.shutdown_timeout_ms);
        loop {
            let done = self.work_done.notified();
            let left = self.counters.in_flight.load(Ordering::SeqCst);
            if left == 0 {
                return;
            }
            tokio::select! {
                _ = done => {}
                Some(msg) = cancels.next() => {
                    cancellable.cancel(&msg.payload);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(
                        runner = %self.info.runner_id,
                        "shutdown timeout passed with {left} calls still running"
                    );
                    return;
                }
            }
        }
    }
}

/// A request that passed the checks.
struct Checked {
    function: &'static str,
    handler: Handler,
    timeout: Duration,
    cast: bool,
}

/// Why a request was refused: kind, message, extra reply headers.
type Refusal = (ErrorKind, String, Vec<(&'static str, String)>);

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}
