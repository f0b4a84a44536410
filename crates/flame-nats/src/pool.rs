//! The parent side of a pool: places calls on runners, boots runners through
//! the backend, and listens to what runners report.
//!
//! Placement rules live in [`flame_core::pool::PoolModel`]; this module does
//! the I/O around them. The lock is never held across an await, and leases
//! and hand-offs are delivered after it is released (a dropped lease checks
//! itself back in, which takes the lock).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use flame_core::backend::{Backend, BootSpec, StopRunner};
use flame_core::pool::{
    validate_limits, Checkout, Hooks, PoolEvent, PoolModel, RunnerId, RunnerState, WaiterId,
};
use flame_core::subject::{self, ParentEvent};
use flame_core::wire::{self, ParentInfo};
use flame_core::{Error, LocalBackend, PoolConfig, RemoteFn};
use futures::StreamExt;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::flame::Shared;
use crate::fleet::Fleet;
use crate::protocol::{self, ParentAnswer, Reply, RunnerEvent};
use crate::replies::Replies;

/// How long a call on a runner that stopped on purpose still waits for its
/// reply after the runner's exit is seen.
const TRAILING_REPLY_GRACE: Duration = Duration::from_millis(500);

/// Pause before booting again after a failed boot, while demand remains.
const BOOT_RETRY_DEBOUNCE: Duration = Duration::from_secs(1);

/// Options of one call.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CallOptions {
    /// Overrides the pool's timeout for this call.
    pub timeout: Option<Duration>,
    /// When true (the default), a caller that stops waiting (its future is
    /// dropped, its task aborted) cancels the remote work. When false, the
    /// work runs on to its end and its result is discarded.
    pub link: bool,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: None,
            link: true,
        }
    }
}

impl CallOptions {
    /// Default options: the pool's timeout, linked.
    pub fn new() -> CallOptions {
        CallOptions::default()
    }

    /// Sets the whole time the call may take, waiting for a runner included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether dropping the call cancels the remote work (default true).
    pub fn link(mut self, link: bool) -> Self {
        self.link = link;
        self
    }
}

/// Builds and starts a [`Pool`]. Get one from [`crate::Flame::pool`].
#[derive(Debug)]
#[must_use = "a pool builder does nothing until .start().await"]
pub struct PoolBuilder {
    shared: Arc<Shared>,
    config: PoolConfig,
    backend: Option<Arc<dyn Backend>>,
    hooks: Hooks,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$name = value;
            self
        }
    )*};
}

impl PoolBuilder {
    pub(crate) fn new(shared: Arc<Shared>, name: String) -> PoolBuilder {
        PoolBuilder {
            shared,
            config: PoolConfig::new(name),
            backend: None,
            hooks: Hooks::default(),
        }
    }

    setters! {
        /// Runners kept up at all times (default 0).
        min: usize,
        /// Most runners booted or booting (default 1).
        max: usize,
        /// Concurrent calls per runner (default 100).
        max_concurrency: usize,
        /// Default timeout of a call, waiting for a runner included (default 30 s).
        timeout: Duration,
        /// Limit for a runner to boot and report ready (default 30 s).
        boot_timeout: Duration,
        /// A runner with no work for this long stops (default 30 s).
        idle_shutdown_after: Duration,
        /// Drain time for in-flight work when a runner stops (default 30 s).
        shutdown_timeout: Duration,
        /// A runner that cannot reach NATS and its parent this soon after
        /// starting exits (default 20 s).
        failsafe_timeout: Duration,
        /// A runner keeps serving this long after it last heard from its
        /// parent (default 5 s).
        parent_grace: Duration,
        /// Interval of runner liveness pings; a runner silent for two
        /// intervals counts as down (default 1.5 s).
        heartbeat: Duration,
        /// Each runner takes one call or cast, then stops (default false).
        single_use: bool,
        /// Share the pool with every parent on the NATS server that uses
        /// this name, coordinated through the KV bucket `flame-<name>`
        /// (default false).
        shared: bool,
    }

    /// Runs `F` on an idle runner before it stops; it stops only if `F`
    /// returns true, and asks again later otherwise. `F` is a registered
    /// function without arguments, e.g. `#[flame::remote] async fn
    /// may_stop() -> bool`.
    pub fn idle_shutdown_when<F>(mut self) -> Self
    where
        F: RemoteFn<Args = (), Output = bool>,
    {
        self.config.idle_shutdown_check = Some(F::NAME);
        self
    }

    /// Runs `hook` each time the pool starts booting a runner.
    pub fn on_grow_start(mut self, hook: impl Fn(&PoolEvent) + Send + Sync + 'static) -> Self {
        self.hooks.on_grow_start = Some(Arc::new(hook));
        self
    }

    /// Runs `hook` each time a boot ends, with its outcome.
    pub fn on_grow_end(mut self, hook: impl Fn(&PoolEvent) + Send + Sync + 'static) -> Self {
        self.hooks.on_grow_end = Some(Arc::new(hook));
        self
    }

    /// Runs `hook` each time a ready runner leaves the pool.
    pub fn on_shrink(mut self, hook: impl Fn(&PoolEvent) + Send + Sync + 'static) -> Self {
        self.hooks.on_shrink = Some(Arc::new(hook));
        self
    }

    /// Lets the `min` runners stop too after this much idle time (default:
    /// they stay up).
    pub fn min_idle_shutdown_after(mut self, value: Duration) -> Self {
        self.config.min_idle_shutdown_after = Some(value);
        self
    }

    /// Copies an environment variable of the parent into every runner.
    pub fn forward_env(mut self, var: impl Into<String>) -> Self {
        self.config.forward_env.push(var.into());
        self
    }

    /// Boots runners with this backend (default: [`LocalBackend`]).
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// The settings so far.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Starts the pool and waits until its `min` runners are ready.
    pub async fn start(self) -> Result<Pool, Error> {
        self.config.validate()?;
        let config = self.config;
        let mut forwarded = Vec::new();
        for var in &config.forward_env {
            match std::env::var(var) {
                Ok(v) => forwarded.push((var.clone(), v)),
                Err(_) => {
                    return Err(Error::Config(format!(
                        "pool `{}` forwards {var}, which is not set in the parent",
                        config.name
                    )))
                }
            }
        }
        let client = self.shared.client.clone();
        let events = client
            .subscribe(subject::parent_events(&config.name, &self.shared.parent_id))
            .await
            .map_err(|e| Error::Nats(format!("cannot subscribe to runner events: {e}")))?;
        client
            .flush()
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        let fleet = if config.shared {
            Some(Arc::new(
                Fleet::open(&self.shared.client, &config.name).await?,
            ))
        } else {
            None
        };
        let mut model = PoolModel::new(config.min, config.max, config.max_concurrency);
        if config.single_use {
            model = model.single_use();
        }
        let inner = Arc::new(PoolInner {
            model: Mutex::new(State {
                model,
                runners: HashMap::new(),
                waiters: HashMap::new(),
                next_waiter: 0,
                last_boot_error: None,
                boot_retry_at: None,
                closed: false,
            }),
            backend: self
                .backend
                .unwrap_or_else(|| Arc::new(LocalBackend::new())),
            forwarded,
            hooks: self.hooks,
            fleet: fleet.clone(),
            closed: CancellationToken::new(),
            changed: Notify::new(),
            shared: self.shared,
            config,
        });
        tokio::spawn(inner.clone().listen(events));
        match &fleet {
            Some(fleet) => fleet.start(inner.clone()).await?,
            None => {
                tokio::spawn(inner.clone().watch_heartbeats());
            }
        }
        let pool = Pool {
            inner: inner.clone(),
            _owner: Arc::new(Owner(inner.clone())),
        };
        inner.boot_needed();
        if inner.config.min > 0 {
            inner.wait_min_ready().await?;
        }
        info!(pool = %inner.config.name, min = inner.config.min, max = inner.config.max, "pool started");
        Ok(pool)
    }
}

/// A pool of runners. Cheap to clone; runners are stopped when the last
/// clone is dropped or on [`Pool::shutdown`].
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
    _owner: Arc<Owner>,
}

/// Shuts the pool down when the last user handle goes (background tasks
/// hold `PoolInner` too, so its own drop would never run).
#[derive(Debug)]
struct Owner(Arc<PoolInner>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.close(Duration::ZERO);
    }
}

#[derive(Debug)]
pub(crate) struct PoolInner {
    pub(crate) config: PoolConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) backend: Arc<dyn Backend>,
    forwarded: Vec<(String, String)>,
    pub(crate) hooks: Hooks,
    /// Set for shared pools: the KV-coordinated part.
    fleet: Option<Arc<Fleet>>,
    model: Mutex<State>,
    pub(crate) closed: CancellationToken,
    /// Woken when a runner becomes ready or fails to boot.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    model: PoolModel,
    runners: HashMap<RunnerId, RunnerEntry>,
    waiters: HashMap<WaiterId, oneshot::Sender<Lease>>,
    next_waiter: WaiterId,
    last_boot_error: Option<Error>,
    boot_retry_at: Option<Instant>,
    closed: bool,
}

struct RunnerEntry {
    link: Arc<RunnerLink>,
    ready: Option<oneshot::Sender<()>>,
    stopper: Option<Box<dyn StopRunner>>,
    /// When the runner last pinged (or reported ready).
    last_heard: Instant,
}

impl RunnerEntry {
    /// A runner being booted; `ready` is told when it reports ready.
    fn new(pool: &str, id: &RunnerId, ready: Option<oneshot::Sender<()>>) -> RunnerEntry {
        RunnerEntry {
            link: Arc::new(RunnerLink::new(pool, id)),
            ready,
            stopper: None,
            last_heard: Instant::now(),
        }
    }
}

impl std::fmt::Debug for RunnerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerEntry")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

/// What a call holds on to while it runs on a runner.
#[derive(Debug)]
struct RunnerLink {
    id: RunnerId,
    /// Built once: cloning a `Subject` is a reference count, not a copy.
    subject: async_nats::Subject,
    cancel_subject: String,
    /// Set when the runner said it is stopping (drains, then exits).
    stopping: std::sync::atomic::AtomicBool,
    /// Why it went down, once it did.
    down_reason: OnceLock<String>,
}

impl RunnerLink {
    fn new(pool: &str, id: &RunnerId) -> RunnerLink {
        RunnerLink {
            id: id.clone(),
            subject: subject::runner(pool, id).into(),
            cancel_subject: subject::runner_cancel(pool, id),
            stopping: Default::default(),
            down_reason: OnceLock::new(),
        }
    }

    /// Records why the runner is gone and fails the calls waiting on it:
    /// at once, or, if it said it was stopping (it drained and sent its last
    /// replies before exiting, which may be read after its exit is seen),
    /// after a short grace.
    fn fail(&self, replies: &Arc<Replies>, reason: String) {
        let _ = self.down_reason.set(reason.clone());
        let grace = if self.stopping.load(Ordering::SeqCst) {
            TRAILING_REPLY_GRACE
        } else {
            Duration::ZERO
        };
        replies.fail_runner(&self.id, reason, grace);
    }

    fn reason(&self) -> String {
        self.down_reason
            .get()
            .cloned()
            .unwrap_or_else(|| "runner went down".to_string())
    }
}

type Stopper = Box<dyn StopRunner>;

/// A slot on a runner. Dropping it gives the slot back.
#[derive(Debug)]
struct Lease {
    pool: Arc<PoolInner>,
    runner: Arc<RunnerLink>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let handoff = {
            let mut st = self.pool.model.lock().unwrap();
            st.model
                .checkin(&self.runner.id)
                .and_then(|(w, r)| st.lease_for(&self.pool, w, &r))
        };
        deliver(handoff);
    }
}

/// A lease on its way to a queued caller. Sent after the lock is released;
/// if the caller is gone, the lease drops and returns the slot.
type Handoff = (oneshot::Sender<Lease>, Lease);

fn deliver(handoffs: impl IntoIterator<Item = Handoff>) {
    for (tx, lease) in handoffs {
        let _ = tx.send(lease);
    }
}

impl State {
    /// The runner said it is stopping: place nothing new on it, and give
    /// its last replies a moment when its exit is seen.
    fn stopping(&mut self, id: &RunnerId) {
        self.model.drain(id);
        if let Some(entry) = self.runners.get(id) {
            entry.link.stopping.store(true, Ordering::SeqCst);
        }
    }

    fn lease_for(
        &mut self,
        pool: &Arc<PoolInner>,
        waiter: WaiterId,
        runner: &RunnerId,
    ) -> Option<Handoff> {
        let tx = self.waiters.remove(&waiter)?;
        let link = self.runners.get(runner)?.link.clone();
        Some((
            tx,
            Lease {
                pool: pool.clone(),
                runner: link,
            },
        ))
    }
}

impl Pool {
    /// Calls a remote function and waits for its result.
    ///
    /// Usually written `flame::call!(pool, function(args..))`.
    pub async fn call<F: RemoteFn>(&self, args: F::Args) -> Result<F::Output, Error> {
        self.call_with::<F>(args, CallOptions::default()).await
    }

    /// [`Pool::call`] with options.
    pub async fn call_with<F: RemoteFn>(
        &self,
        args: F::Args,
        options: CallOptions,
    ) -> Result<F::Output, Error> {
        let timeout = options.timeout.unwrap_or(self.inner.config.timeout);
        let payload = encode_args::<F>(&args)?;
        let bytes = self
            .inner
            .clone()
            .run(F::NAME, payload, timeout, Kind::Call { link: options.link })
            .await?;
        wire::decode(&bytes).map_err(|e| Error::Decode {
            function: F::NAME.to_string(),
            what: "result",
            reason: e.to_string(),
        })
    }

    /// Runs a remote function without waiting for it. Returns once the work
    /// is handed to the pool; it then finds or boots a runner on its own.
    /// Failures are logged and counted on the runner (`nats micro stats`).
    ///
    /// Usually written `flame::cast!(pool, function(args..))`.
    pub fn cast<F: RemoteFn>(&self, args: F::Args) -> Result<(), Error> {
        self.cast_with::<F>(args, CallOptions::default())
    }

    /// [`Pool::cast`] with options.
    pub fn cast_with<F: RemoteFn>(&self, args: F::Args, options: CallOptions) -> Result<(), Error> {
        if self.inner.closed.is_cancelled() {
            return Err(Error::PoolClosed(self.inner.config.name.clone()));
        }
        let timeout = options.timeout.unwrap_or(self.inner.config.timeout);
        let payload = encode_args::<F>(&args)?;
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Err(e) = inner
                .clone()
                .run(F::NAME, payload, timeout, Kind::Cast)
                .await
            {
                warn!(pool = %inner.config.name, function = F::NAME, "cast failed: {e}");
            }
        });
        Ok(())
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Changes `min` and `max` of the live pool. Raising `min` boots runners
    /// now; lowering `max` below the runners up retires the surplus, idle
    /// ones first (each finishes its in-flight work first). In a shared pool
    /// the scaler's limits count, and it retires idle runners only.
    pub fn set_limits(&self, min: usize, max: usize) -> Result<(), Error> {
        validate_limits(&self.inner.config.name, min, max)?;
        self.inner.clone().set_limits(min, max);
        Ok(())
    }

    /// The current `min` and `max`.
    pub fn limits(&self) -> (usize, usize) {
        self.inner.limits()
    }

    /// A snapshot of the pool as this parent sees it.
    pub fn status(&self) -> PoolStatus {
        let st = self.inner.model.lock().unwrap();
        PoolStatus {
            booting: st.model.count(RunnerState::Booting),
            ready: st.model.count(RunnerState::Ready),
            draining: st.model.count(RunnerState::Draining),
            waiting: st.model.waiting(),
        }
    }

    /// Stops every runner (each drains up to the shutdown timeout) and fails
    /// queued callers. Later calls fail with [`Error::PoolClosed`].
    ///
    /// In a shared pool this parent leaves it: the runners it booted go on
    /// serving the other parents, or are retired if it was the last.
    pub async fn shutdown(&self) {
        let stopping = self.inner.close(self.inner.config.shutdown_timeout);
        if let Some(fleet) = &self.inner.fleet {
            fleet.leave(&self.inner).await;
        }
        futures::future::join_all(stopping).await;
    }
}

/// How many runners a pool has, by state, and how many callers wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Being booted.
    pub booting: usize,
    /// Taking calls.
    pub ready: usize,
    /// Stopping.
    pub draining: usize,
    /// Callers waiting for a slot.
    pub waiting: usize,
}

/// A call (someone waits for the result) or a cast (nobody does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Call { link: bool },
    Cast,
}

/// A call on its way: forgets it when dropped, and if the caller stopped
/// waiting while the runner had it (and the call is linked), tells the
/// runner to cancel it, naming it by its reply subject.
struct InFlightCall<'a> {
    client: &'a async_nats::Client,
    replies: &'a Replies,
    runner: &'a RunnerLink,
    token: u64,
    reply: async_nats::Subject,
    /// Cancel on drop: linked, sent, and not yet answered.
    cancel: bool,
}

impl Drop for InFlightCall<'_> {
    fn drop(&mut self) {
        let waiting = self.replies.forget(self.token);
        if !(waiting && self.cancel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        debug!(runner = %self.runner.id, "caller stopped waiting; cancelling");
        let client = self.client.clone();
        let subject = self.runner.cancel_subject.clone();
        let reply = bytes::Bytes::copy_from_slice(self.reply.as_bytes());
        rt.spawn(async move {
            if let Err(e) = client.publish(subject, reply).await {
                debug!("cannot send cancellation: {e}");
            }
        });
    }
}

fn encode_args<F: RemoteFn>(args: &F::Args) -> Result<Bytes, Error> {
    wire::encode(args)
        .map(Bytes::from)
        .map_err(|e| Error::Encode {
            function: F::NAME.to_string(),
            what: "arguments",
            reason: e.to_string(),
        })
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
            let mut st = self.pool.model.lock().unwrap();
            if st.model.cancel(self.waiter) {
                st.waiters.remove(&self.waiter);
            }
        }
    }
}

impl PoolInner {
    /// Places and runs one call, retrying elsewhere if the runner turns out
    /// to be gone before it received the call.
    async fn run(
        self: Arc<Self>,
        function: &'static str,
        payload: Bytes,
        timeout: Duration,
        kind: Kind,
    ) -> Result<Bytes, Error> {
        let deadline = Instant::now() + timeout;
        let cast = kind == Kind::Cast;
        let linked = kind == Kind::Call { link: true };
        let size = payload.len()
            + protocol::request_headers_max_len(function, &self.shared.build_id, cast);
        let max = self.shared.client.max_payload();
        if size > max {
            return Err(Error::PayloadTooLarge {
                function: function.to_string(),
                what: "arguments",
                size,
                max,
            });
        }
        loop {
            let lease = self.checkout(deadline, function, timeout).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout {
                    function: function.to_string(),
                    timeout,
                });
            }
            let headers =
                protocol::request_headers(function, &self.shared.build_id, remaining, cast);
            let runner = lease.runner.clone();
            let replies = &self.shared.replies;
            let (token, reply, answer) = replies.register(function, runner.id.clone());
            let mut call = InFlightCall {
                client: &self.shared.client,
                replies,
                runner: &runner,
                token,
                reply,
                cancel: false,
            };
            self.shared
                .client
                .publish_with_reply_and_headers(
                    runner.subject.clone(),
                    call.reply.clone(),
                    headers,
                    payload.clone(),
                )
                .await
                .map_err(|e| {
                    Error::Nats(format!("cannot send the call to runner {}: {e}", runner.id))
                })?;
            call.cancel = linked;
            let outcome = tokio::time::timeout_at(deadline, answer).await;
            call.cancel = false;
            drop(call);
            let msg = match outcome {
                Err(_) => {
                    return Err(Error::Timeout {
                        function: function.to_string(),
                        timeout,
                    })
                }
                Ok(Err(_)) => {
                    return Err(Error::Nats("the reply multiplexer stopped".into()));
                }
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Ok(Ok(msg))) => msg,
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                // Nobody got the call: the runner left. Try another.
                debug!(runner = %runner.id, "no responders; placing the call elsewhere");
                if self.fleet.is_some() {
                    // Its lease says what it is; it may just be
                    // resubscribing after a reconnect. Try again shortly.
                    drop(lease);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                self.set_draining(&runner.id);
            } else {
                let reply =
                    protocol::read_reply(msg, function, &runner.id, &self.shared.build_id, timeout);
                match reply {
                    Reply::Value(bytes) => return Ok(bytes),
                    Reply::Failed(e) => return Err(e),
                    Reply::Draining => self.set_draining(&runner.id),
                }
            }
            drop(lease);
        }
    }

    fn set_draining(&self, runner: &RunnerId) {
        self.model.lock().unwrap().model.drain(runner);
    }

    /// Waits for a slot until the deadline.
    async fn checkout(
        self: &Arc<Self>,
        deadline: Instant,
        function: &str,
        timeout: Duration,
    ) -> Result<Lease, Error> {
        let (mut rx, waiter) = {
            let mut st = self.model.lock().unwrap();
            if st.closed {
                return Err(Error::PoolClosed(self.config.name.clone()));
            }
            let waiter = st.next_waiter;
            st.next_waiter += 1;
            match st.model.checkout(waiter) {
                Checkout::Placed(id) => {
                    let link = st.runners[&id].link.clone();
                    return Ok(Lease {
                        pool: self.clone(),
                        runner: link,
                    });
                }
                Checkout::Queued => {
                    let (tx, rx) = oneshot::channel();
                    st.waiters.insert(waiter, tx);
                    self.boot_locked(&mut st);
                    (rx, waiter)
                }
            }
        };
        let mut guard = WaitGuard {
            pool: self,
            waiter,
            armed: true,
        };
        match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(Ok(lease)) => {
                guard.armed = false;
                Ok(lease)
            }
            Ok(Err(_)) => {
                guard.armed = false;
                Err(Error::PoolClosed(self.config.name.clone()))
            }
            Err(_) => {
                drop(guard);
                // A slot may have been handed over just as time ran out.
                drop(rx.try_recv());
                let st = self.model.lock().unwrap();
                let no_runner = st.model.count(RunnerState::Ready) == 0;
                match (&st.last_boot_error, no_runner) {
                    (Some(e), true) => Err(e.clone()),
                    _ => Err(Error::Timeout {
                        function: function.to_string(),
                        timeout,
                    }),
                }
            }
        }
    }

    /// Boots what the model asks for (now, or after the retry debounce).
    fn boot_needed(self: &Arc<Self>) {
        let mut st = self.model.lock().unwrap();
        self.boot_locked(&mut st);
    }

    fn boot_locked(self: &Arc<Self>, st: &mut State) {
        if st.closed {
            return;
        }
        if let Some(fleet) = &self.fleet {
            // The scaler boots for everyone; tell it about our callers.
            fleet.demand_changed.notify_one();
            return;
        }
        let n = st.model.boots_needed();
        if n == 0 {
            return;
        }
        if let Some(at) = st.boot_retry_at {
            if Instant::now() < at {
                return;
            }
            st.boot_retry_at = None;
        }
        for _ in 0..n {
            let id: RunnerId = Arc::from(uuid::Uuid::new_v4().simple().to_string());
            let (ready_tx, ready_rx) = oneshot::channel();
            st.model.add_booting(id.clone());
            st.runners.insert(
                id.clone(),
                RunnerEntry::new(&self.config.name, &id, Some(ready_tx)),
            );
            let runners = st.model.len();
            tokio::spawn(self.clone().boot(id, ready_rx, runners));
        }
    }

    /// The environment of a new runner: `FLAME_PARENT` and the forwarded
    /// variables.
    pub(crate) fn runner_env(&self, id: &str) -> Vec<(String, String)> {
        let info = ParentInfo {
            parent_id: self.shared.parent_id.clone(),
            pool: self.config.name.clone(),
            runner_id: id.to_string(),
            nats_url: self.shared.nats_url.clone(),
            max_concurrency: self.config.max_concurrency,
            idle_shutdown_after_ms: self.config.idle_shutdown_after.as_millis() as u64,
            shutdown_timeout_ms: self.config.shutdown_timeout.as_millis() as u64,
            failsafe_timeout_ms: self.config.failsafe_timeout.as_millis() as u64,
            parent_grace_ms: self.config.parent_grace.as_millis() as u64,
            heartbeat_ms: self.config.heartbeat.as_millis() as u64,
            single_use: self.config.single_use,
            idle_shutdown_check: self.config.idle_shutdown_check.map(str::to_string),
            shared: self.config.shared,
        };
        let mut env = vec![(wire::PARENT_ENV.to_string(), info.to_env_value())];
        env.extend(self.forwarded.iter().cloned());
        env
    }

    async fn boot(self: Arc<Self>, id: RunnerId, ready: oneshot::Receiver<()>, runners: usize) {
        let started = Instant::now();
        self.hooks.fire(PoolEvent::GrowStart {
            pool: self.config.name.clone(),
            runners,
        });
        let spec = BootSpec::new(
            self.config.name.clone(),
            id.to_string(),
            self.runner_env(&id),
        );
        let pool = self.config.name.clone();
        debug!(%pool, runner = %id, "booting runner");

        let outcome = tokio::time::timeout(self.config.boot_timeout, async {
            let booted = self
                .backend
                .boot(spec)
                .await
                .map_err(|reason| Error::BootFailed {
                    pool: pool.clone(),
                    reason,
                })?;
            let unwanted = {
                let mut st = self.model.lock().unwrap();
                match st.runners.get_mut(&id) {
                    Some(entry) => {
                        entry.stopper = Some(booted.stopper);
                        None
                    }
                    // Given up on meanwhile (pool closed): stop it.
                    None => Some(booted.stopper),
                }
            };
            if let Some(stopper) = unwanted {
                stopper.stop(Duration::ZERO).await;
                return Err(Error::PoolClosed(pool.clone()));
            }
            if let Some(exited) = booted.exited {
                let me = self.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let reason = exited.await;
                    me.runner_gone(&id, reason);
                });
            }
            ready.await.map_err(|_| {
                let reason = self
                    .model
                    .lock()
                    .unwrap()
                    .runners
                    .get(&id)
                    .map(|e| e.link.reason())
                    .unwrap_or_else(|| "runner stopped before it was ready".into());
                Error::BootFailed {
                    pool: pool.clone(),
                    reason,
                }
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(Error::BootTimeout {
                pool: pool.clone(),
                timeout: self.config.boot_timeout,
            })
        });

        match outcome {
            Ok(()) => {
                info!(%pool, runner = %id, elapsed = ?started.elapsed(), "runner ready");
                let runners = self.model.lock().unwrap().model.len();
                self.hooks.fire(PoolEvent::GrowEnd {
                    pool,
                    runners,
                    result: Ok(()),
                });
            }
            Err(Error::PoolClosed(_)) => {}
            Err(e) => {
                warn!(%pool, runner = %id, "boot failed: {e}");
                let (stopper, runners) = {
                    let mut st = self.model.lock().unwrap();
                    st.last_boot_error = Some(e.clone());
                    st.boot_retry_at = Some(Instant::now() + BOOT_RETRY_DEBOUNCE);
                    st.model.remove(&id);
                    let stopper = st.runners.remove(&id).and_then(|entry| {
                        entry.link.fail(&self.shared.replies, e.to_string());
                        entry.stopper
                    });
                    (stopper, st.model.len())
                };
                self.changed.notify_waiters();
                self.hooks.fire(PoolEvent::GrowEnd {
                    pool,
                    runners,
                    result: Err(e),
                });
                if let Some(stopper) = stopper {
                    stopper.stop(Duration::ZERO).await;
                }
                // Retry after the debounce while demand remains.
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(BOOT_RETRY_DEBOUNCE).await;
                    me.boot_needed();
                });
            }
        }
    }

    /// A runner is gone (its process exited): calls on it fail now, and the
    /// model may boot a replacement.
    fn runner_gone(self: &Arc<Self>, id: &RunnerId, reason: String) {
        let (entry, state, runners) = {
            let mut st = self.model.lock().unwrap();
            let state = st.model.remove(id);
            let entry = st.runners.remove(id);
            if state == Some(RunnerState::Ready) {
                info!(pool = %self.config.name, runner = %id, "runner gone: {reason}");
            }
            let runners = st.model.len();
            self.boot_locked(&mut st);
            (entry, state, runners)
        };
        if let Some(entry) = entry {
            entry.link.fail(&self.shared.replies, reason.clone());
        }
        if matches!(state, Some(RunnerState::Ready | RunnerState::Draining)) {
            self.hooks.fire(PoolEvent::Shrink {
                pool: self.config.name.clone(),
                runners,
                reason,
            });
        }
    }

    /// Shared pools: a runner lease appeared or changed.
    pub(crate) fn lease_seen(self: &Arc<Self>, lease: &flame_core::pool::lease::RunnerLease) {
        use flame_core::pool::lease::LeaseState;
        let id: RunnerId = Arc::from(lease.runner.as_str());
        let handoffs: Vec<Handoff> = {
            let mut st = self.model.lock().unwrap();
            if st.closed {
                return;
            }
            if !st.runners.contains_key(&id) {
                if lease.state == LeaseState::Draining {
                    return;
                }
                st.model.add_booting(id.clone());
                st.runners
                    .insert(id.clone(), RunnerEntry::new(&self.config.name, &id, None));
            }
            st.model.set_reported_load(&id, lease.load + lease.queued);
            match lease.state {
                LeaseState::Booting => Vec::new(),
                LeaseState::Ready if lease.build != *self.shared.build_id => {
                    // Another build: never place calls there.
                    debug!(pool = %self.config.name, runner = %id, build = %lease.build, "runner of another build in the shared pool; not using it");
                    st.model.drain(&id);
                    Vec::new()
                }
                LeaseState::Ready => st
                    .model
                    .runner_ready(&id)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(w, r)| st.lease_for(self, w, &r))
                    .collect(),
                LeaseState::Draining => {
                    st.stopping(&id);
                    Vec::new()
                }
            }
        };
        if !handoffs.is_empty() {
            deliver(handoffs);
        }
        self.changed.notify_waiters();
    }

    /// Shared pools: a runner is gone (its lease removed), for this reason.
    pub(crate) fn lease_gone(self: &Arc<Self>, id: &str, why: &str) {
        let id: RunnerId = Arc::from(id);
        if self.model.lock().unwrap().runners.contains_key(&id) {
            self.runner_gone(&id, format!("runner stopped: {why}"));
        }
    }

    /// Callers of this parent waiting for a slot.
    pub(crate) fn waiting(&self) -> usize {
        self.model.lock().unwrap().model.waiting()
    }

    /// Current `min` and `max`.
    pub(crate) fn limits(&self) -> (usize, usize) {
        self.model.lock().unwrap().model.limits()
    }

    /// Counts a runner as down when it has not pinged for two heartbeat
    /// intervals: the fallback for backends that cannot see a runner exit
    /// (a remote machine). Such a runner is also stopped, in case it is only
    /// cut off.
    async fn watch_heartbeats(self: Arc<Self>) {
        let heartbeat = self.config.heartbeat;
        let limit = heartbeat * 2;
        let mut tick = tokio::time::interval(heartbeat / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.closed.cancelled() => return,
                _ = tick.tick() => {}
            }
            let silent: Vec<(RunnerId, Duration, Option<Stopper>)> = {
                let mut st = self.model.lock().unwrap();
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

    /// See [`Pool::set_limits`].
    fn set_limits(self: Arc<Self>, min: usize, max: usize) {
        let retired: Vec<(RunnerId, Option<Stopper>)> = {
            let mut st = self.model.lock().unwrap();
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
                    let stopper = st.runners.get_mut(&id).and_then(|e| e.stopper.take());
                    (id, stopper)
                })
                .collect()
        };
        info!(pool = %self.config.name, min, max, retired = retired.len(), "limits changed");
        let grace = self.config.shutdown_timeout;
        for (id, stopper) in retired {
            debug!(pool = %self.config.name, runner = %id, "retiring runner");
            if let Some(stopper) = stopper {
                tokio::spawn(stopper.stop(grace));
            }
        }
        self.changed.notify_waiters();
    }

    /// Answers runner events until the pool closes.
    async fn listen(self: Arc<Self>, mut events: async_nats::Subscriber) {
        loop {
            let msg = tokio::select! {
                _ = self.closed.cancelled() => break,
                msg = events.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let answer = match (
                ParentEvent::from_subject(&msg.subject),
                serde_json::from_slice::<RunnerEvent>(&msg.payload),
            ) {
                (Some(event), Ok(ev)) => self.on_event(event, ev),
                _ => ParentAnswer {
                    ok: false,
                    reason: Some("not a flame runner event".into()),
                },
            };
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = self.shared.client.publish(reply, body.into()).await {
                debug!("cannot answer runner: {e}");
            }
        }
    }

    fn on_event(self: &Arc<Self>, event: ParentEvent, ev: RunnerEvent) -> ParentAnswer {
        let id: RunnerId = Arc::from(ev.runner.as_str());
        let refuse = |reason: &str| ParentAnswer {
            ok: false,
            reason: Some(reason.to_string()),
        };
        let mut st = self.model.lock().unwrap();
        if st.closed {
            return refuse("pool is shut down");
        }
        match event {
            ParentEvent::Ready => {
                if *ev.build != *self.shared.build_id {
                    let e = Error::BuildMismatch {
                        parent: self.shared.build_id.to_string(),
                        runner_build: ev.build.clone(),
                        runner: ev.runner.clone(),
                    };
                    if let Some(entry) = st.runners.get_mut(&id) {
                        entry.link.fail(&self.shared.replies, e.to_string());
                        entry.ready.take();
                    }
                    return refuse(&e.to_string());
                }
                let Some(handed) = st.model.runner_ready(&id) else {
                    return refuse("unknown runner");
                };
                if let Some(entry) = st.runners.get_mut(&id) {
                    entry.last_heard = Instant::now();
                    if let Some(tx) = entry.ready.take() {
                        let _ = tx.send(());
                    }
                }
                st.last_boot_error = None;
                let handoffs: Vec<Handoff> = handed
                    .into_iter()
                    .filter_map(|(w, r)| st.lease_for(self, w, &r))
                    .collect();
                drop(st);
                deliver(handoffs);
                self.changed.notify_waiters();
                ParentAnswer {
                    ok: true,
                    reason: None,
                }
            }
            ParentEvent::Leave => {
                let ok = st.model.may_leave(
                    &id,
                    Duration::from_millis(ev.idle_ms),
                    self.config.min_idle_shutdown_after,
                );
                if ok {
                    debug!(pool = %self.config.name, runner = %id, "runner may leave");
                }
                ParentAnswer { ok, reason: None }
            }
            ParentEvent::Stopping => {
                st.stopping(&id);
                debug!(pool = %self.config.name, runner = %id, "runner is stopping");
                ParentAnswer {
                    ok: true,
                    reason: None,
                }
            }
            ParentEvent::Ping => {
                let entry = st.runners.get_mut(&id);
                let ok = entry.is_some();
                if let Some(entry) = entry {
                    entry.last_heard = Instant::now();
                }
                ParentAnswer { ok, reason: None }
            }
        }
    }

    async fn wait_min_ready(self: &Arc<Self>) -> Result<(), Error> {
        let deadline = Instant::now() + self.config.boot_timeout + BOOT_RETRY_DEBOUNCE;
        loop {
            let changed = self.changed.notified();
            {
                let st = self.model.lock().unwrap();
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

    /// Closes the pool: fails queued callers and stops every runner.
    fn close(&self, grace: Duration) -> Vec<futures::future::BoxFuture<'static, ()>> {
        self.closed.cancel();
        let (entries, waiters) = {
            let mut st = self.model.lock().unwrap();
            st.closed = true;
            let waiters: Vec<_> = st.waiters.drain().collect();
            let entries: Vec<_> = st.runners.drain().collect();
            for (id, _) in &entries {
                st.model.remove(id);
            }
            (entries, waiters)
        };
        drop(waiters);
        entries
            .into_iter()
            .filter_map(|(_, entry)| {
                entry
                    .link
                    .fail(&self.shared.replies, "the pool was shut down".into());
                entry.stopper.map(|s| s.stop(grace))
            })
            .collect()
    }
}
