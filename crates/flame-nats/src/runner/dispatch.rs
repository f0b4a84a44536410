//! Serving one request: check it, take a concurrency permit, run the
//! function within its deadline (panics caught), and answer.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::service;
use bytes::Bytes;
use flame_core::registry::{Handler, Invocation, InvokeError};
use flame_core::stream::{with_transport, StreamTransport};

use crate::streams::holding;
use futures::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{debug, warn, Instrument, Span};

use super::request::{CallRequest, Replier, ReplyBatch};
use super::Runner;
use crate::protocol::batch::{read_batch, BATCH_V1};
use crate::protocol::call::{self as wire, WireErrorKind};
use crate::protocol::sign::{now_ms, Refused, Signed, SIGNED_HEAD, SIGNED_V1};
use crate::trace::{self, TraceContext};

/// A first poll longer than this marks a function as doing CPU work before
/// its first await; its calls are then always spawned.
const SLOW_FIRST_POLL: Duration = Duration::from_millis(1);

/// Slow first polls in a row after which a function's calls are always
/// spawned.
const SLOW_STRIKES: u8 = 3;

/// Fast first polls in a row after which a function's first polls are
/// timed only now and then: timing takes two syscalls per call.
const TRUST_AFTER: u32 = 32;

/// A trusted function's first polls are timed once in this many calls.
const SAMPLE_EVERY: u32 = 16;

/// A plain function whose runs on the blocking pool all took less than
/// this ...
const FAST_PLAIN: Duration = Duration::from_micros(200);

/// ... this many times in a row runs inline from then on: handing a short
/// call to the blocking pool and back costs more than the call.
const TRUST_PLAIN_AFTER: u32 = 32;

/// A plain function that ran longer than this inline [`SLOW_STRIKES`]
/// times in a row goes back to the blocking pool for good (it held up the
/// runner's serve loop; one slow run may be a preemption on a busy machine).
const SLOW_INLINE_PLAIN: Duration = Duration::from_millis(1);

/// What a caller of a stopping runner is told: it may place the call
/// elsewhere at once.
pub(super) const NOTHING_RAN: &str = "the runner is stopping; nothing ran";

/// How a function's first polls went: its slow ones in a row, its fast
/// ones in a row, and its calls.
#[derive(Debug, Default)]
pub(super) struct PollWatch {
    strikes: AtomicU8,
    fast_in_row: AtomicU32,
    calls: AtomicU32,
    /// Plain functions: fast runs on the blocking pool in a row.
    plain_fast_in_row: AtomicU32,
    /// Plain functions: slow inline runs in a row.
    plain_strikes: AtomicU8,
    /// Plain functions: ran long inline too often; never inline again.
    plain_banned: AtomicBool,
}

impl PollWatch {
    /// Whether this call's first poll may run inline.
    fn inline(&self) -> bool {
        self.strikes.load(Ordering::Relaxed) < SLOW_STRIKES
    }

    /// Whether to time this call's first poll: always until the function
    /// is trusted, then once in [`SAMPLE_EVERY`] calls.
    fn time_this_one(&self) -> bool {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        self.fast_in_row.load(Ordering::Relaxed) < TRUST_AFTER || n.is_multiple_of(SAMPLE_EVERY)
    }

    /// Whether a call of this plain function may run inline (see
    /// [`TRUST_PLAIN_AFTER`]).
    fn plain_inline(&self) -> bool {
        !self.plain_banned.load(Ordering::Relaxed)
            && self.plain_fast_in_row.load(Ordering::Relaxed) >= TRUST_PLAIN_AFTER
    }

    /// Notes how long a run of this plain function took, inline or on the
    /// blocking pool; true when it sent the function back to the pool.
    fn plain_ran(&self, took: Duration, inline: bool) -> bool {
        if inline {
            if took <= SLOW_INLINE_PLAIN {
                self.plain_strikes.store(0, Ordering::Relaxed);
            } else if self.plain_strikes.fetch_add(1, Ordering::Relaxed) + 1 >= SLOW_STRIKES {
                self.plain_banned.store(true, Ordering::Relaxed);
                return true;
            }
        } else if took <= FAST_PLAIN {
            self.plain_fast_in_row.fetch_add(1, Ordering::Relaxed);
        } else {
            self.plain_fast_in_row.store(0, Ordering::Relaxed);
        }
        false
    }

    /// Notes a timed first poll; true when it made the function's calls
    /// spawned from now on.
    fn timed(&self, took: Duration) -> bool {
        if took <= SLOW_FIRST_POLL {
            self.strikes.store(0, Ordering::Relaxed);
            self.fast_in_row.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            self.fast_in_row.store(0, Ordering::Relaxed);
            self.strikes.fetch_add(1, Ordering::Relaxed) + 1 == SLOW_STRIKES
        }
    }
}

/// Counts a call as in flight while alive, holding its permit; both are
/// given back when the call's task is aborted (cancelled by its caller).
pub(super) struct InFlight {
    runner: Arc<Runner>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.runner.end();
    }
}

/// Counts a call waiting for a permit.
pub(super) struct Queued<'a>(&'a Runner);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Calls running in their own tasks, by reply subject, so that a caller
/// that stops waiting can cancel its call. Only the serve loop touches it.
#[derive(Default)]
pub(super) struct Cancellable {
    tasks: HashMap<String, AbortHandle>,
    /// Finished tasks are swept out when the map reaches this size.
    sweep_at: usize,
}

impl Cancellable {
    pub(super) fn insert(&mut self, reply: String, task: AbortHandle) {
        if self.tasks.len() >= self.sweep_at {
            self.tasks.retain(|_, t| !t.is_finished());
            self.sweep_at = (self.tasks.len() * 2).max(64);
        }
        self.tasks.insert(reply, task);
    }

    pub(super) fn cancel(&mut self, reply: &[u8]) -> bool {
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

/// What became of one request (a call, or a batch of them).
#[derive(Default)]
pub(super) struct Dispatched {
    /// It was valid work (not refused).
    pub(super) accepted: bool,
    /// Calls still running in their own tasks, by their reply subjects.
    pub(super) cancellable: Vec<(String, AbortHandle)>,
}

impl Runner {
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
    /// Once a function's first polls were fast [`TRUST_AFTER`] times in a
    /// row, only one call in [`SAMPLE_EVERY`] is timed.
    pub(super) fn dispatch(self: Arc<Self>, request: service::Request) -> Dispatched {
        if request.message.payload.first() == Some(&BATCH_V1) {
            return self.dispatch_batch(request);
        }
        self.dispatch_call(CallRequest::single(request))
    }

    /// The calls of a batch, each as if it came alone; the replies of those
    /// that finish right away go back together.
    fn dispatch_batch(self: Arc<Self>, request: service::Request) -> Dispatched {
        let calls = match read_batch(&request.message.payload) {
            Ok(calls) => calls,
            Err(message) => {
                warn!(runner = %self.info.runner_id, "refused request: {message}");
                // (Answered on the batch's reply subject: its first call's.)
                let call = CallRequest::single(request);
                let me = self.clone();
                tokio::spawn(async move {
                    me.respond_error(&call, WireErrorKind::Malformed, message.to_string(), &[])
                        .await;
                });
                return Dispatched::default();
            }
        };
        let batch = ReplyBatch::open();
        let mut out = Dispatched::default();
        for call in calls {
            let call = CallRequest::batched(call, &batch);
            if out.accepted && self.info.single_use {
                // A single-use runner takes one call; the others go elsewhere.
                let me = self.clone();
                tokio::spawn(async move {
                    me.respond_error(&call, WireErrorKind::Draining, NOTHING_RAN.into(), &[])
                        .await;
                });
                continue;
            }
            let done = self.clone().dispatch_call(call);
            out.accepted |= done.accepted;
            out.cancellable.extend(done.cancellable);
        }
        batch.close(self.replier());
        out
    }

    /// Refuses a request (a call, or each call of a batch): the runner is
    /// stopping, say.
    pub(super) async fn refuse(&self, request: service::Request, kind: WireErrorKind, why: &str) {
        if request.message.payload.first() != Some(&BATCH_V1) {
            let call = CallRequest::single(request);
            self.respond_error(&call, kind, why.to_string(), &[]).await;
            return;
        }
        let Ok(calls) = read_batch(&request.message.payload) else {
            return;
        };
        let closed = ReplyBatch::open();
        closed.close(self.replier());
        for call in calls {
            let call = CallRequest::batched(call, &closed);
            self.respond_error(&call, kind, why.to_string(), &[]).await;
        }
    }

    /// One call: checked, then run (see [`Runner::dispatch`]).
    fn dispatch_call(self: Arc<Self>, request: CallRequest) -> Dispatched {
        let checked = self.check(&request);
        let inline_name = checked.as_ref().ok().map(|call| call.function);
        // A caller that stops waiting names its call by the reply subject.
        let reply = request.reply.clone();
        let accepted = checked.is_ok();
        let runner = self.clone();
        let inline = inline_name
            .and_then(|name| runner.slow_polls.get(name))
            .filter(|watch| watch.inline());
        let (span, trace) = match &checked {
            Ok(call) => self.run_span(call.function, call.trace),
            Err(_) => (Span::none(), None),
        };
        let work = async move {
            let Checked {
                function,
                handler,
                timeout,
                cast,
                args,
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
                            self.respond_error(&request, WireErrorKind::Timeout, message, &[])
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
                    Some(function),
                    handler,
                    args,
                    timeout,
                    deadline,
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
                        self.respond_error(
                            &request,
                            WireErrorKind::ResultTooLarge,
                            message,
                            &extra,
                        )
                        .await;
                    } else {
                        if !Span::current().is_disabled() {
                            Span::current().record("outcome", "ok");
                        }
                        request.respond_ok(self.replier(), Bytes::from(bytes)).await;
                    }
                }
                Err((kind, message)) => {
                    if !Span::current().is_disabled() {
                        Span::current().record("outcome", kind.as_str());
                    }
                    self.failed(function, cast, &message);
                    self.respond_error(&request, kind, message, &[]).await;
                }
            }
        };
        // Calls the function makes continue its trace.
        let mut work = Box::pin(trace::scope(trace, work.instrument(span)));
        if let Some(watch) = inline {
            // CPU time, not wall time: being preempted on a busy machine
            // must not mark a quick function as slow.
            let done = if watch.time_this_one() {
                let started = thread_cpu_time();
                let done = (&mut work).now_or_never().is_some();
                let took = thread_cpu_time().saturating_sub(started);
                if watch.timed(took) {
                    debug!(function = ?inline_name, ?took, "CPU work before the first await; spawning its calls from now on");
                }
                done
            } else {
                (&mut work).now_or_never().is_some()
            };
            if done {
                return Dispatched {
                    accepted,
                    cancellable: Vec::new(),
                };
            }
        }
        let task = tokio::spawn(work).abort_handle();
        Dispatched {
            accepted,
            cancellable: reply.map(|r| (r.to_string(), task)).into_iter().collect(),
        }
    }

    /// Checks a call's signature (see `protocol/sign.rs`); returns where
    /// its plain body (the envelope) starts.
    fn authenticate(&self, request: &CallRequest) -> Result<usize, Refusal> {
        let body = &request.body;
        let signed = body.first() == Some(&SIGNED_V1);
        let Some(key) = &self.call_key else {
            // No key to check with (a shared pool without a secret): a
            // signature is skipped.
            return Ok(if signed && body.len() >= SIGNED_HEAD {
                SIGNED_HEAD
            } else {
                0
            });
        };
        let refused = |why: Refused| {
            self.counters
                .unauthenticated
                .fetch_add(1, Ordering::Relaxed);
            (WireErrorKind::Unauthenticated, why.to_string(), Vec::new())
        };
        if !signed {
            return Err(refused(Refused::Unsigned));
        }
        let call = Signed::read(body).map_err(refused)?;
        let reply = request.reply.as_deref().unwrap_or("");
        call.verify(key, &self.call_subject, reply)
            .map_err(refused)?;
        // (Only a verified tag is remembered: nobody else can fill the
        // guard.)
        self.replays
            .lock()
            .unwrap()
            .admit(&call, now_ms())
            .map_err(refused)?;
        Ok(SIGNED_HEAD)
    }

    fn check(&self, request: &CallRequest) -> Result<Checked, Refusal> {
        let malformed = |m: &str| (WireErrorKind::Malformed, m.to_string(), Vec::new());
        let start = self.authenticate(request)?;
        let body = &request.body;
        let envelope = wire::read_envelope(&body[start..]).map_err(malformed)?;
        if envelope.build != self.build {
            return Err((
                WireErrorKind::BuildMismatch,
                format!(
                    "caller is build {}, this runner is build {}",
                    envelope.build, self.build
                ),
                vec![(wire::HEADER_RUNNER_BUILD, self.build.to_string())],
            ));
        }
        let (function, handler) = self.registry.lookup(envelope.function).ok_or_else(|| {
            (
                WireErrorKind::UnknownFunction,
                format!("no function named `{}` is registered", envelope.function),
                Vec::new(),
            )
        })?;
        let trace = request
            .headers
            .as_ref()
            .and_then(|h| h.get(trace::HEADER_TRACEPARENT))
            .and_then(|v| TraceContext::parse(v.as_str()));
        Ok(Checked {
            function,
            handler,
            timeout: envelope.timeout,
            cast: envelope.cast,
            trace,
            args: body.slice(start + envelope.args_at..),
        })
    }

    /// Runs a call, enforcing its deadline. Async functions are polled
    /// right here (no thread hop); plain functions go to the blocking pool so
    /// CPU-heavy code cannot stall the runner's NATS connection.
    pub(super) async fn execute(
        &self,
        handler: Handler,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Vec<u8>, (WireErrorKind, String)> {
        let deadline = Instant::now() + timeout;
        self.execute_holding(None, handler, payload, timeout, deadline, None)
            .await
    }

    /// [`Runner::execute`], keeping `hold` alive as long as the work runs: a
    /// plain function keeps its thread (and its in-flight count) even when
    /// the caller is gone, since a thread cannot be stopped from outside.
    ///
    /// A plain function (`function`, when given) that proved short runs
    /// inline, on the serve loop: see [`TRUST_PLAIN_AFTER`].
    async fn execute_holding(
        &self,
        function: Option<&'static str>,
        handler: Handler,
        payload: Bytes,
        timeout: Duration,
        deadline: Instant,
        hold: Option<Arc<InFlight>>,
    ) -> Result<Vec<u8>, (WireErrorKind, String)> {
        let timed_out = || {
            (
                WireErrorKind::Timeout,
                format!("deadline of {timeout:?} passed; the work was cancelled"),
            )
        };
        // Decoding the arguments runs the app's `Deserialize` impls, which
        // may panic on crafted bytes: inside the guard too.
        let invocation = std::panic::catch_unwind(AssertUnwindSafe(|| {
            with_transport(&self.transport, || handler(payload, &self.states))
        }))
        .unwrap_or_else(|panic| {
            Invocation::Refused(InvokeError::DecodeArgs(format!(
                "decoding the arguments panicked: {}",
                panic_message(panic)
            )))
        });
        let result = match invocation {
            Invocation::Refused(e) => Err(e),
            Invocation::Async(mut fut) => {
                // Streams in the result are offered through this runner's
                // hub, which must be current wherever the future is polled.
                // A stream in the result holds the call's permit until it
                // ends: the runner is still busy with it.
                let transport = self.transport.clone();
                let hold = hold.clone();
                let fut = futures::future::poll_fn(move |cx| {
                    with_transport(&transport, || match &hold {
                        Some(h) => holding(h.clone(), || fut.poll_unpin(cx)),
                        None => fut.poll_unpin(cx),
                    })
                });
                let guarded = std::panic::AssertUnwindSafe(fut).catch_unwind();
                match tokio::time::timeout_at(deadline, guarded).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(panic)) => return Err((WireErrorKind::Panicked, panic_message(panic))),
                    // Dropping the future cancelled the work.
                    Err(_) => return Err(timed_out()),
                }
            }
            Invocation::Blocking(f) => {
                let watch = function.and_then(|name| self.slow_polls.get(name));
                if watch.is_some_and(PollWatch::plain_inline) {
                    // Trusted short: no hand-off to a thread and back.
                    let started = Instant::now();
                    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        run_plain(&self.transport, hold, f)
                    }));
                    let took = started.elapsed();
                    if watch.is_some_and(|w| w.plain_ran(took, true)) {
                        debug!(?function, ?took, "a plain function ran long inline; running it on the blocking pool from now on");
                    }
                    match ran {
                        Ok(result) => result,
                        Err(panic) => return Err((WireErrorKind::Panicked, panic_message(panic))),
                    }
                } else {
                    let transport = self.transport.clone();
                    let (span, trace) = (Span::current(), trace::current());
                    let mut work = tokio::task::spawn_blocking(move || {
                        let _entered = span.enter();
                        let started = Instant::now();
                        let result =
                            trace::blocking_scope(trace, || run_plain(&transport, hold, f));
                        (result, started.elapsed())
                    });
                    match tokio::time::timeout_at(deadline, &mut work).await {
                        Ok(Ok((result, took))) => {
                            if let Some(w) = watch {
                                w.plain_ran(took, false);
                            }
                            result
                        }
                        Ok(Err(join)) => {
                            return Err((WireErrorKind::Panicked, panic_message(join.into_panic())))
                        }
                        Err(_) => {
                            // A thread cannot be stopped from outside; the
                            // slot stays counted until the function returns.
                            let _ = work.await;
                            return Err(timed_out());
                        }
                    }
                }
            }
        };
        result.map_err(|e| match e {
            InvokeError::DecodeArgs(m) => (WireErrorKind::DecodeArgs, m),
            InvokeError::EncodeResult(m) => (WireErrorKind::EncodeResult, m),
            InvokeError::MissingState(state) => (WireErrorKind::MissingState, state.to_string()),
        })
    }

    /// The span a call runs in, and the trace context of its work: a child
    /// of the caller's span when the call carried one, else a new trace if
    /// anyone listens to the span.
    fn run_span(
        &self,
        function: &'static str,
        caller: Option<TraceContext>,
    ) -> (Span, Option<TraceContext>) {
        let span = tracing::info_span!(
            "flame.run",
            pool = %self.info.pool,
            runner = %self.info.runner_id,
            function,
            outcome = Empty,
            trace_id = Empty,
            span_id = Empty,
            parent_span_id = Empty,
        );
        let ctx = trace::start(&span, caller, true);
        (span, ctx)
    }

    fn failed(&self, function: &str, cast: bool, message: &str) {
        if cast {
            self.counters.casts_failed.fetch_add(1, Ordering::Relaxed);
            warn!(runner = %self.info.runner_id, function, "cast failed: {message}");
        } else {
            debug!(runner = %self.info.runner_id, function, "call failed: {message}");
        }
    }

    pub(super) async fn respond_error(
        &self,
        request: &CallRequest,
        kind: WireErrorKind,
        message: String,
        extra: &[(&str, String)],
    ) {
        request
            .respond_error(self.replier(), kind, message, extra)
            .await;
    }

    /// What answering a call needs of this runner.
    fn replier(&self) -> Replier<'_> {
        Replier {
            client: &self.client,
            counters: &self.counters,
            unconfirmed: &self.unconfirmed,
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    pub(super) fn idle_for(&self) -> Duration {
        // Work in flight, or an open stream (a result still being read,
        // say), is not idleness.
        if self.counters.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        if self.streams.active() > 0 {
            self.touch();
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn begin(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> InFlight {
        let now = self.counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // (No touch: a runner with work in flight is not idle, see
        // `idle_for`; the end of the work touches.)
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
}

/// A request that passed the checks.
struct Checked {
    function: &'static str,
    handler: Handler,
    timeout: Duration,
    cast: bool,
    /// The caller's span, from `traceparent`.
    trace: Option<TraceContext>,
    /// The encoded arguments (the body after the envelope).
    args: Bytes,
}

/// Why a request was refused: kind, message, extra reply headers.
type Refusal = (WireErrorKind, String, Vec<(&'static str, String)>);

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

/// Runs a plain function with the runner's stream hub current (streams in
/// its result are offered through it), keeping `hold` alive until it
/// returns.
fn run_plain(
    transport: &Arc<dyn StreamTransport>,
    hold: Option<Arc<InFlight>>,
    f: Box<dyn FnOnce() -> Result<Vec<u8>, InvokeError> + Send>,
) -> Result<Vec<u8>, InvokeError> {
    with_transport(transport, || match hold {
        Some(h) => holding(h, f),
        None => f(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_polls_are_timed_until_trusted_then_sampled() {
        let watch = PollWatch::default();
        let fast = Duration::from_micros(10);
        for _ in 0..TRUST_AFTER {
            assert!(watch.time_this_one());
            assert!(!watch.timed(fast));
        }
        let timed = (0..SAMPLE_EVERY * 4)
            .filter(|_| watch.time_this_one())
            .count();
        assert_eq!(timed, 4);
        // Slow three times in a row (as sampled): spawned from then on.
        let slow = SLOW_FIRST_POLL * 2;
        assert!(!watch.timed(slow));
        assert!(!watch.timed(slow));
        assert!(watch.inline());
        assert!(watch.timed(slow));
        assert!(!watch.inline());
        // A slow one resets the trust: timed every call again.
        assert!((0..3).all(|_| watch.time_this_one()));
    }

    #[test]
    fn short_plain_functions_go_inline_and_slow_ones_back_to_the_pool() {
        let w = PollWatch::default();
        for _ in 0..TRUST_PLAIN_AFTER - 1 {
            assert!(!w.plain_inline());
            w.plain_ran(Duration::from_micros(50), false);
        }
        // A slow run on the pool starts the count again.
        w.plain_ran(Duration::from_millis(5), false);
        assert!(!w.plain_inline());
        for _ in 0..TRUST_PLAIN_AFTER {
            w.plain_ran(Duration::from_micros(50), false);
        }
        assert!(w.plain_inline());
        // Slow inline runs: a hiccup is forgiven, a habit is not.
        assert!(!w.plain_ran(Duration::from_millis(5), true));
        assert!(!w.plain_ran(Duration::from_micros(10), true));
        assert!(w.plain_inline());
        for i in 1..=SLOW_STRIKES {
            let banned = w.plain_ran(Duration::from_millis(5), true);
            assert_eq!(banned, i == SLOW_STRIKES);
        }
        assert!(!w.plain_inline());
        for _ in 0..2 * TRUST_PLAIN_AFTER {
            w.plain_ran(Duration::from_micros(50), false);
        }
        assert!(!w.plain_inline());
    }
}
