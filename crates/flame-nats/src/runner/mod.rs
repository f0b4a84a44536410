//! The runner side: a copy of the app that serves calls for one pool.
//!
//! Life of a runner: connect to NATS, start a micro service with one
//! endpoint on its own subject, make sure the server took every
//! subscription (a missing permission fails the start, saying which: the
//! runner's last line on stderr tells its parent), tell the parent it is
//! ready (a private pool) or mark its lease ready (a shared pool), serve.
//! It stops when it has been idle long enough and the parent agrees (and
//! the pool's idle check, if any, agrees too), after its one call if the
//! pool is single-use, when retired, or on SIGTERM; stopping unsubscribes
//! first (new calls go elsewhere) and then drains in-flight work up to the
//! shutdown timeout, still beating its heart. When it has not heard from
//! its parent (or NATS) for the grace period it exits at once: nobody is
//! left to receive the results.
//!
//! `impl Runner` is in this file only (cancelling a call, draining). The
//! runner's parts each own their state and methods in their own file; the
//! work done with the whole runner is functions of the file it is in,
//! taking the runner (`dispatch::dispatch(runner, ..)`,
//! `lifecycle::heartbeat(runner)`), so a call names its file:
//!
//! - [`dispatch`]: one request, from checks to reply;
//! - [`check`]: checking a request (signature, envelope, build, function);
//! - [`execute`]: running one call, the [`Executor`] part (the app's state,
//!   its stream transport, how each function's polls went);
//! - [`inline`]: when a call may run on the serve loop rather than a task
//!   or a thread of its own;
//! - [`work`]: the [`Work`] part (calls in flight, their permits, calls
//!   waiting, the idle clock), and the calls a caller may cancel;
//! - [`counters`]: the [`Counters`] part, as `nats micro stats` shows them;
//! - [`request`]: a call alone or in a batch, and how it is answered;
//! - [`unconfirmed`]: replies kept until the server has them for sure;
//! - [`lifecycle`]: the heartbeat, and the watch that decides to stop;
//! - [`lease`]: the [`Lease`] part, a shared pool runner's lease in the KV
//!   bucket;
//! - [`logs`]: forwarding its log lines to the parent, when asked.

mod check;
mod counters;
mod dispatch;
mod execute;
mod inline;
mod lease;
mod lifecycle;
pub(crate) mod logs;
mod request;
mod unconfirmed;
mod work;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::ServiceExt;
use flame_core::registry::Registry;
use flame_core::state::States;
use flame_core::{Error, RUNNER_FAILURE_PREFIX};
use futures::StreamExt;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::connect::{connect_watched, Mark, Outages, UrlCredentials};
use crate::parent::build_id;
use crate::protocol::bootstrap::ParentInfo;
use crate::protocol::call::WireErrorKind;
use crate::protocol::reports::{ReportKey, ReportKind};
use crate::protocol::sign::{read_cancel, read_retire, CallKey, ReplayGuard};
use crate::protocol::subjects;
use crate::stream_hub::StreamHub;
use counters::Counters;
use execute::Executor;
use lease::{Lease, LeaseKeeper};
use work::{Cancellable, Work};

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
pub(crate) async fn serve(
    info: ParentInfo,
    states: States,
    options: async_nats::ConnectOptions,
    url_credentials: Option<UrlCredentials>,
) -> i32 {
    let runner = info.runner_id.clone();
    // Every line the runner logs names its pool and runner.
    let span = tracing::info_span!("flame.runner", pool = %info.pool, runner = %info.runner_id);
    match run(info, states, options, url_credentials)
        .instrument(span)
        .await
    {
        Ok(reason) => {
            info!(%runner, "runner stopping: {reason}");
            0
        }
        Err(e) => {
            tracing::error!(%runner, "runner failed: {e}");
            report_start_failure(&e);
            1
        }
    }
}

/// Writes the one line that tells the backend (and whoever reads the
/// runner's logs) why this runner could not start: [`RUNNER_FAILURE_PREFIX`]
/// and the error, on stderr. Errors name no secret (URLs are shown without
/// credentials).
pub(crate) fn report_start_failure(error: &Error) {
    use std::io::Write;
    let reason = error.to_string().replace(['\r', '\n'], " ");
    // Nobody may be reading any more (the parent died): nothing to do then.
    let _ = writeln!(std::io::stderr().lock(), "{RUNNER_FAILURE_PREFIX}{reason}");
}

struct Runner {
    info: ParentInfo,
    client: async_nats::Client,
    registry: &'static Registry,
    build: &'static str,
    /// The runner's counters, as `nats micro stats` shows them.
    counters: Arc<Counters>,
    /// Its work under way, and its idle clock.
    work: Arc<Work>,
    /// Runs the app's functions.
    executor: Executor,
    /// Signs events to the parent (private pools).
    event_key: Option<ReportKey>,
    /// Checks the signatures of calls and cancellations: derived from the
    /// event key (a shared pool's runners get theirs from the pool's
    /// secret). Without one (a shared pool without a secret) calls are
    /// taken unsigned.
    call_key: Option<CallKey>,
    /// The signed calls accepted lately, to refuse replays.
    replays: std::sync::Mutex<ReplayGuard>,
    /// This runner's call and cancel subjects, which signatures cover.
    call_subject: String,
    cancel_subject: String,
    control_subject: String,
    /// Numbers the events sent to the parent.
    event_seq: AtomicU64,
    /// Milliseconds since `started` when a parent last answered a ping.
    parent_heard_ms: AtomicU64,
    /// The parent answered that it no longer knows this runner.
    parent_refused: AtomicBool,
    /// The outages of this runner's NATS connection, which its lease
    /// reports: calls sent to it during one are lost.
    outages: Arc<std::sync::Mutex<Outages>>,
    /// Replies the server may not have yet, sent again after an outage.
    unconfirmed: unconfirmed::Unconfirmed,
    /// The runner's lease, in a shared pool.
    lease: Lease,
}

async fn run(
    info: ParentInfo,
    states: States,
    options: async_nats::ConnectOptions,
    url_credentials: Option<UrlCredentials>,
) -> Result<String, Error> {
    let registry = Registry::global()?;
    // Taken over from the default action before any call can arrive: a
    // SIGTERM that comes right after the first call began drains it, rather
    // than killing the runner before its watch task first ran.
    let sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let failsafe = Duration::from_millis(info.failsafe_timeout_ms);
    let failsafe_deadline = Instant::now() + failsafe;
    // Hash the executable while we connect.
    let build = tokio::task::spawn_blocking(build_id);
    let (client, connection) = connect_watched(
        &info.nats_url,
        format!("flame runner {} ({})", info.runner_id, info.pool),
        failsafe,
        options,
        url_credentials.as_ref(),
    )
    .await?;
    let permissions = connection.permissions.clone();
    let build = build.await.unwrap_or("unknown");
    let event_key = info.event_key();
    if !info.shared && event_key.is_none() {
        return Err(Error::RunnerStart(format!(
            "{} has no valid event_key; parent and runner must be the same build",
            crate::env::PARENT
        )));
    }

    // From here on, the app's log lines go to the parent too, if it asked.
    let forwarder = match (&event_key, info.forward_logs && !info.shared) {
        (Some(key), true) => logs::Forwarder::start(
            client.clone(),
            subjects::parent_logs(&info.pool, &info.parent_id),
            info.runner_id.clone(),
            key.clone(),
        ),
        _ => None,
    };

    let counters = Arc::new(Counters::default());
    let stats_counters = counters.clone();
    let max_concurrency = info.max_concurrency;
    // Every subscription and request of the start, raced against the
    // server's permission violations: a missing permission fails the start
    // at once, saying which, instead of a request timing out (or a refused
    // subscription leaving a runner nobody can reach).
    let setup = async {
        let streams = StreamHub::start(&client).await?;
        let mut metadata = HashMap::new();
        metadata.insert("pool".to_string(), info.pool.clone());
        metadata.insert("runner".to_string(), info.runner_id.clone());
        metadata.insert("parent".to_string(), info.parent_id.clone());
        metadata.insert("build".to_string(), build.to_string());
        let service = client
            .service_builder()
            .description(format!("flame runner of pool {}", info.pool))
            .metadata(metadata)
            .stats_handler(move |_endpoint, _stats| stats_counters.stats(max_concurrency))
            .start(format!("flame-{}", info.pool), env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| Error::nats("cannot start the micro service", e))?;
        let endpoint = service
            .endpoint_builder()
            .name("call")
            .add(subjects::runner(&info.pool, &info.runner_id))
            .await
            .map_err(|e| Error::nats("cannot subscribe to the runner's subjects", e))?;
        let cancels = client
            .subscribe(subjects::runner_cancel(&info.pool, &info.runner_id))
            .await
            .map_err(|e| Error::nats("cannot subscribe to the runner's subjects", e))?;
        let control = client
            .subscribe(subjects::runner_control(&info.pool, &info.runner_id))
            .await
            .map_err(|e| Error::nats("cannot subscribe to the runner's subjects", e))?;
        let lease = if info.shared {
            let keeper =
                tokio::time::timeout_at(failsafe_deadline, LeaseKeeper::open(&client, &info))
                    .await
                    .map_err(|_| {
                        Error::RunnerStart("failsafe: cannot read this runner's lease".into())
                    })??;
            Some(keeper)
        } else {
            None
        };
        // Subscribed, and the server took every subscription (no call can
        // miss us), before announcing. Settling drops the connection on
        // purpose: not worth a warning. The parent's private server refuses
        // nothing, and takes the subscriptions before the `ready` sent after
        // them on the same connection: no need to make sure.
        if !info.open_server {
            connection.closing.store(true, Ordering::SeqCst);
            let settled = permissions.settle(&client, failsafe_deadline).await;
            connection.closing.store(false, Ordering::SeqCst);
            settled?;
        }
        Ok::<_, Error>((streams, service, endpoint, cancels, control, lease))
    };
    let (streams, service, mut endpoint, mut cancels, mut control, lease) =
        permissions.guard(&Mark::default(), setup).await?;
    flame_core::stream::set_default_transport(streams.clone());

    let call_key = event_key.as_ref().map(CallKey::of_runner);
    if call_key.is_none() {
        warn!(
            "calls to this runner are not signed: the parent of shared pool `{}` has no FLAME_SECRET, \
             so any client of the NATS account that may publish to its subject can run its functions",
            info.pool
        );
    }
    let runner = Arc::new(Runner {
        call_subject: subjects::runner(&info.pool, &info.runner_id),
        cancel_subject: subjects::runner_cancel(&info.pool, &info.runner_id),
        control_subject: subjects::runner_control(&info.pool, &info.runner_id),
        info,
        client,
        registry,
        build,
        work: Arc::new(Work::new(
            counters.clone(),
            streams.clone(),
            max_concurrency,
        )),
        counters,
        executor: Executor::new(registry, states, streams),
        event_key,
        call_key,
        replays: Default::default(),
        event_seq: AtomicU64::new(0),
        parent_heard_ms: AtomicU64::new(0),
        parent_refused: AtomicBool::new(false),
        lease: Lease::new(lease),
        outages: connection.outages.clone(),
        unconfirmed: Default::default(),
    });
    let announce = async {
        if runner.info.shared {
            runner.lease.mark_ready(runner.build).await
        } else {
            lifecycle::announce_ready(&runner, failsafe_deadline).await
        }
    };
    permissions.guard(&Mark::default(), announce).await?;
    debug!(runner = %runner.info.runner_id, "runner ready");

    let heartbeat = tokio::spawn(lifecycle::heartbeat(runner.clone()).in_current_span());
    let confirming = tokio::spawn(lifecycle::confirm_replies(runner.clone()).in_current_span());
    let resubscribed = tokio::spawn(
        lifecycle::confirm_resubscriptions(runner.clone(), connection.connected.clone())
            .in_current_span(),
    );
    let mut watch = tokio::spawn(lifecycle::watch(runner.clone(), sigterm).in_current_span());

    let mut cancellable = Cancellable::default();
    let stop_reason;
    loop {
        tokio::select! {
            biased;
            why = &mut watch => {
                stop_reason = why.ok();
                break;
            }
            Some(msg) = cancels.next() => {
                if runner.cancel(&mut cancellable, &msg.payload) {
                    debug!(runner = %runner.info.runner_id, "call cancelled by its caller");
                }
            }
            Some(msg) = control.next() => {
                match read_retire(runner.call_key.as_ref(), &runner.control_subject, &msg.payload) {
                    Ok(true) => {
                        stop_reason = Some(Stop::Drain("retired by the scaler".into()));
                        break;
                    }
                    Ok(false) => {}
                    Err(why) => {
                        runner.counters.unauthenticated.fetch_add(1, Ordering::Relaxed);
                        warn!(runner = %runner.info.runner_id, "refused a retire: {why}");
                    }
                }
            }
            request = endpoint.next() => match request {
                Some(request) => {
                    let done = dispatch::dispatch(runner.clone(), request);
                    for (reply, task) in done.cancellable {
                        cancellable.insert(reply, task);
                    }
                    if done.accepted && runner.info.single_use {
                        stop_reason = Some(Stop::Drain("single-use runner took its call".into()));
                        break;
                    }
                }
                None => {
                    stop_reason = Some(Stop::Abandoned("subscription closed".into()));
                    break;
                }
            },
        }
    }
    watch.abort();
    let stop = stop_reason.unwrap_or(Stop::Drain("stopped".into()));

    // Unsubscribe first so new calls find no responder and go elsewhere,
    // then let in-flight work finish (callers may still cancel theirs).
    let _ = endpoint.stop().await;
    // Calls that reached us but were not read yet: nothing ran, so the
    // caller may place them elsewhere at once (rather than wait for this
    // runner to exit).
    while let Ok(Some(request)) =
        tokio::time::timeout(Duration::from_millis(100), endpoint.next()).await
    {
        dispatch::refuse(
            &runner,
            request,
            WireErrorKind::Draining,
            dispatch::NOTHING_RAN,
        )
        .await;
    }
    let _ = service.stop().await;
    let reason = match stop {
        Stop::Drain(reason) => {
            // Tell the parents first, so they place nothing new here.
            let heartbeat = Duration::from_millis(runner.info.heartbeat_ms);
            if runner.info.shared {
                let _ = tokio::time::timeout(heartbeat, runner.lease.mark_draining()).await;
            } else {
                lifecycle::ask_parent(&runner, ReportKind::Stopping, 0, heartbeat).await;
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
        let _ = tokio::time::timeout(Duration::from_secs(1), runner.lease.remove()).await;
    }
    heartbeat.abort();
    confirming.abort();
    resubscribed.abort();
    if let Some(forwarder) = forwarder {
        forwarder.finish().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), runner.client.flush()).await;
    Ok(reason)
}

impl Runner {
    /// Cancels the call a cancellation names, if it is signed with this
    /// runner's key (or the runner has none); true if a call was running.
    fn cancel(&self, cancellable: &mut Cancellable, body: &[u8]) -> bool {
        match read_cancel(self.call_key.as_ref(), &self.cancel_subject, body) {
            Ok(reply) => cancellable.cancel(reply.as_bytes()),
            Err(why) => {
                self.counters
                    .unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
                warn!(runner = %self.info.runner_id, "refused a cancellation: {why}");
                false
            }
        }
    }

    /// Waits for in-flight work, up to the shutdown timeout, still taking
    /// cancellations from callers that stop waiting.
    async fn drain(&self, cancels: &mut async_nats::Subscriber, cancellable: &mut Cancellable) {
        self.work.start_draining();
        let deadline = Instant::now() + Duration::from_millis(self.info.shutdown_timeout_ms);
        loop {
            let done = self.work.done();
            let left = self.counters.in_flight.load(Ordering::SeqCst);
            if left == 0 {
                return;
            }
            tokio::select! {
                _ = done => {}
                Some(msg) = cancels.next() => {
                    self.cancel(cancellable, &msg.payload);
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
