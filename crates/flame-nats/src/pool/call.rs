//! One call or cast: encode, wait for a slot, send, wait for the reply.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flame_core::stream::{with_transport, StreamTransport};
use flame_core::{Error, RemoteFn};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{debug, warn, Instrument, Span};

use super::model::{Checkout, RunnerId, RunnerState, WaiterId};
use super::outbox;
use super::runners::RunnerLink;
use super::{Pool, PoolInner, State};
use crate::protocol::call::{self as wire, Reply};
use crate::replies::Replies;
use crate::streams::{holding, scoped, CallStreams, StreamHub};
use crate::trace::{self, TraceContext};

/// Options of one call.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CallOptions {
    /// Overrides the pool's timeout for this call: the whole time until
    /// its result arrives, waiting for a runner included. A
    /// [`flame_core::Stream`] in the result is not bound by it: it flows
    /// for as long as it is read, holding the call's slot until it ends or
    /// is dropped.
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

    /// Sets the whole time the call may take until its result arrives,
    /// waiting for a runner included (see [`CallOptions::timeout`] for
    /// streams in the result).
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
        let payload = self.encode_args::<F>(&args)?;
        let (span, trace) = call_span(&self.inner.config.name, F::NAME, "call");
        let ran = self
            .inner
            .clone()
            .run(
                F::NAME,
                payload,
                timeout,
                Kind::Call { link: options.link },
                trace,
            )
            .instrument(span.clone())
            .await;
        let result = ran
            .and_then(|(bytes, slot)| decode_result::<F>(&self.inner.parent.streams, &bytes, slot));
        record_outcome(&span, result.as_ref().err());
        result
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
        let payload = self.encode_args::<F>(&args)?;
        let inner = self.inner.clone();
        let (span, trace) = call_span(&self.inner.config.name, F::NAME, "cast");
        tokio::spawn(
            async move {
                let ran = inner
                    .clone()
                    .run(F::NAME, payload, timeout, Kind::Cast, trace)
                    .await;
                record_outcome(&Span::current(), ran.as_ref().err());
                if let Err(e) = ran {
                    warn!(pool = %inner.config.name, function = F::NAME, "cast failed: {e}");
                }
            }
            .instrument(span),
        );
        Ok(())
    }
}

/// The span of one call or cast, and the trace context it sends along:
/// the caller's trace when it runs inside a traced remote call, else a new
/// trace if anyone listens to the span. Untraced calls send no
/// `traceparent`.
pub(super) fn call_span(
    pool: &str,
    function: &'static str,
    kind: &'static str,
) -> (Span, Option<TraceContext>) {
    let span = tracing::info_span!(
        "flame.call",
        pool,
        function,
        kind,
        runner = Empty,
        wait_ms = Empty,
        run_ms = Empty,
        outcome = Empty,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
    );
    let inherited = trace::current();
    #[allow(unused_mut)] // (changed only with OpenTelemetry)
    let mut trace = match inherited {
        Some(parent) => Some(parent.child()),
        None if !span.is_disabled() => Some(TraceContext::root()),
        None => None,
    };
    #[cfg(feature = "otel")]
    if !span.is_disabled() {
        // OpenTelemetry made the span a child of the caller's own span (a
        // request's, say): send its ids, so the trace goes on.
        if let Some(ctx) = crate::otel::adopt(&span, None) {
            trace = Some(ctx);
        }
    }
    if let (Some(ctx), false) = (&trace, span.is_disabled()) {
        span.record("trace_id", ctx.trace_hex());
        span.record("span_id", ctx.span_hex());
        if let Some(parent) = inherited {
            span.record("parent_span_id", parent.span_hex());
        }
    }
    (span, trace)
}

/// Records how a call ended on its span: `ok`, or the error's kind.
pub(super) fn record_outcome(span: &Span, error: Option<&Error>) {
    if !span.is_disabled() {
        span.record("outcome", error.map_or("ok", |e| e.kind().as_str()));
    }
}

/// A slot on a runner. Dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct Slot {
    pool: Arc<PoolInner>,
    runner: Arc<RunnerLink>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let handoff = {
            let mut st = self.pool.state.lock().unwrap();
            let handoff = st
                .model
                .checkin(&self.runner.id)
                .and_then(|(w, r)| st.slot_for(&self.pool, w, &r));
            self.pool.idle_if_last(&mut st, &self.runner.id);
            handoff
        };
        deliver(handoff);
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

impl State {
    /// The slot a queued caller was handed, with where to send it.
    pub(super) fn slot_for(
        &mut self,
        pool: &Arc<PoolInner>,
        waiter: WaiterId,
        runner: &RunnerId,
    ) -> Option<Handoff> {
        let tx = self.waiters.remove(&waiter)?;
        let link = self.runners.get(runner)?.link.clone();
        Some((
            tx,
            Slot {
                pool: pool.clone(),
                runner: link,
            },
        ))
    }
}

/// A call (someone waits for the result) or a cast (nobody does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Call { link: bool },
    Cast,
}

/// A call on its way: forgets it when dropped, and if the caller stopped
/// waiting while the runner had it (and the call is linked), tells the
/// runner to cancel it, naming it by its reply subject.
struct InFlightCall<'a> {
    client: &'a async_nats::Client,
    replies: &'a Arc<Replies>,
    runner: &'a RunnerLink,
    token: u64,
    reply: async_nats::Subject,
    /// Cancel on drop: linked, sent, and not yet answered.
    cancel: bool,
}

impl Drop for InFlightCall<'_> {
    fn drop(&mut self) {
        self.runner.outbox.call_ended();
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
        let reply = match &self.runner.key {
            Some(key) => bytes::Bytes::from(key.cancel_body(&subject, &self.reply)),
            None => bytes::Bytes::copy_from_slice(self.reply.as_bytes()),
        };
        rt.spawn(async move {
            if let Err(e) = client.publish(subject, reply).await {
                debug!("cannot send cancellation: {e}");
            }
        });
    }
}

/// Decodes a call's result. Streams in it are opened through this
/// parent's hub, and each holds the call's slot until it ends: the runner
/// is still busy with it.
pub(super) fn decode_result<F: RemoteFn>(
    streams: &Arc<StreamHub>,
    bytes: &[u8],
    slot: Slot,
) -> Result<F::Output, Error> {
    let transport: Arc<dyn StreamTransport> = streams.clone();
    let runner = slot.runner.clone();
    let hold: Arc<dyn std::any::Any + Send + Sync> = Arc::new(slot);
    // Its streams end as soon as its runner is known to be down.
    let scope = CallStreams::new(F::NAME);
    let decoded = with_transport(&transport, || {
        scoped(Some(scope.clone()), || {
            holding(hold, || F::decode_output(bytes))
        })
    });
    if scope.used() {
        runner.streams.follow(&scope);
    }
    decoded.map_err(|e| Error::Decode {
        function: F::NAME.to_string(),
        what: "result",
        reason: e.to_string(),
    })
}

impl Pool {
    /// Encodes a call's arguments; streams among them are offered through
    /// this parent's hub.
    fn encode_args<F: RemoteFn>(&self, args: &F::Args) -> Result<Payload, Error> {
        let streams: Arc<dyn StreamTransport> = self.inner.parent.streams.clone();
        encode_args::<F>(&streams, args, &self.inner.parent.build_id)
    }
}

/// A call's encoded arguments, after room for its envelope (written once
/// the call is placed, when its remaining time is known): the arguments
/// are not copied on their way out.
pub(crate) struct Payload {
    buf: Vec<u8>,
    /// Where the arguments start.
    head: usize,
    /// The streams and channels among the arguments, if any: they end when
    /// the call fails or its runner goes down.
    streams: Option<CallStreams>,
}

pub(super) fn encode_args<F: RemoteFn>(
    streams: &Arc<dyn StreamTransport>,
    args: &F::Args,
    build: &str,
) -> Result<Payload, Error> {
    let head = wire::envelope_max_len(F::NAME, build);
    let mut buf = vec![0; head];
    let scope = CallStreams::new(F::NAME);
    let encoded = with_transport(streams, || {
        scoped(Some(scope.clone()), || F::encode_args(args, &mut buf))
    });
    let streams = scope.used().then_some(scope);
    if let Err(e) = encoded {
        if let Some(streams) = &streams {
            streams.end(Error::Stream(
                "the call's arguments could not be encoded".into(),
            ));
        }
        return Err(Error::Encode {
            function: F::NAME.to_string(),
            what: "arguments",
            reason: e.to_string(),
        });
    }
    Ok(Payload { buf, head, streams })
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

impl PoolInner {
    /// Places and runs one call, retrying elsewhere if the runner turns out
    /// to be gone before it received the call. When it fails, the streams
    /// and channels among its arguments end with its error at once.
    pub(super) async fn run(
        self: Arc<Self>,
        function: &'static str,
        mut payload: Payload,
        timeout: Duration,
        kind: Kind,
        trace: Option<TraceContext>,
    ) -> Result<(Bytes, Slot), Error> {
        let streams = payload.streams.take();
        let ran = self
            .run_placed(function, payload, timeout, kind, trace, streams.as_ref())
            .await;
        if let (Err(e), Some(streams)) = (&ran, &streams) {
            streams.end(e.clone());
        }
        ran
    }

    async fn run_placed(
        self: Arc<Self>,
        function: &'static str,
        payload: Payload,
        timeout: Duration,
        kind: Kind,
        trace: Option<TraceContext>,
        streams: Option<&CallStreams>,
    ) -> Result<(Bytes, Slot), Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let cast = kind == Kind::Cast;
        let linked = kind == Kind::Call { link: true };
        let args_len = payload.buf.len() - payload.head;
        let size = args_len
            + wire::envelope_max_len(function, &self.parent.build_id)
            + if trace.is_some() {
                wire::request_headers_max_len()
            } else {
                0
            };
        let max = self.parent.client.max_payload();
        if size > max {
            return Err(Error::PayloadTooLarge {
                function: function.to_string(),
                what: "arguments",
                size,
                max,
            });
        }
        // The arguments: in `fresh` until the first send, then kept (shared
        // with that send's body) in case the call must be placed again.
        let mut fresh = Some(payload);
        let mut args = Bytes::new();
        loop {
            let slot = self.checkout(deadline, function, timeout).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout {
                    function: function.to_string(),
                    timeout,
                });
            }
            let runner = slot.runner.clone();
            if let Some(streams) = streams {
                // Its argument streams end when this runner goes down.
                runner.streams.follow(streams);
            }
            let span = Span::current();
            // (Read only for the span: a clock read less per untraced call.)
            let sent = (!span.is_disabled()).then(Instant::now);
            if let Some(sent) = sent {
                span.record("runner", &*runner.id);
                span.record("wait_ms", (sent - started).as_millis() as u64);
            }
            let replies = &self.parent.replies;
            let (token, reply, answer) = replies.register(function, runner.id.clone());
            // The signature covers the runner and the reply subject.
            let sign = runner
                .key
                .as_ref()
                .map(|key| (key, runner.subject.as_str(), reply.as_str()));
            let build = &self.parent.build_id;
            // The first send writes the envelope (and signature) in front
            // of the arguments; a call placed again (rare) copies them.
            let body = match fresh.take() {
                Some(Payload { buf, head, .. }) => {
                    let body = wire::request_body_in_place(
                        buf, head, function, build, remaining, cast, sign,
                    );
                    args = body.slice(body.len() - args_len..);
                    body
                }
                None => wire::request_body(function, build, remaining, cast, &args, sign),
            };
            runner.outbox.call_started();
            let mut call = InFlightCall {
                client: &self.parent.client,
                replies,
                runner: &runner,
                token,
                reply,
                cancel: false,
            };
            let client = &self.parent.client;
            // Sent at once, with the calls to the same runner that are
            // ready meanwhile (coalescing, see `outbox.rs`).
            outbox::send_call(
                &runner,
                client,
                replies,
                token,
                call.reply.clone(),
                trace.as_ref(),
                body,
            )
            .await?;
            call.cancel = linked;
            let outcome = tokio::time::timeout_at(deadline, answer).await;
            call.cancel = false;
            drop(call);
            if let Some(sent) = sent {
                span.record("run_ms", sent.elapsed().as_millis() as u64);
            }
            let msg = match outcome {
                Err(_) => {
                    debug!(pool = %self.config.name, runner = %runner.id, token, sent_before = ?remaining, "no reply before the deadline");
                    return Err(Error::Timeout {
                        function: function.to_string(),
                        timeout,
                    });
                }
                Ok(Err(_)) => {
                    return Err(Error::NatsUnreachable {
                        url: self.parent.nats_url.clone(),
                        reason: "the connection is closed".into(),
                        source: None,
                    });
                }
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Ok(Ok(msg))) => msg,
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                // Nobody got the call: the runner left, or it is still
                // resubscribing after a reconnect of NATS.
                debug!(runner = %runner.id, "no responders; placing the call again");
                if self.fleet.is_some() || self.parent.reconnected_within(self.config.heartbeat * 2)
                {
                    // (A shared pool's leases say what each runner is.)
                    if let Some(streams) = streams {
                        runner.streams.unfollow(streams);
                    }
                    drop(slot);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                self.set_draining(&runner.id);
            } else {
                let reply =
                    wire::read_reply(msg, function, &runner.id, &self.parent.build_id, timeout);
                match reply {
                    Reply::Value(bytes) => return Ok((bytes, slot)),
                    Reply::Failed(e) => return Err(e),
                    Reply::Draining => self.set_draining(&runner.id),
                }
            }
            // Placed again: nothing ran there.
            if let Some(streams) = streams {
                runner.streams.unfollow(streams);
            }
            drop(slot);
        }
    }

    fn set_draining(&self, runner: &RunnerId) {
        self.state.lock().unwrap().model.drain(runner);
    }

    /// Waits for a slot until the deadline.
    async fn checkout(
        self: &Arc<Self>,
        deadline: Instant,
        function: &str,
        timeout: Duration,
    ) -> Result<Slot, Error> {
        let (mut rx, waiter) = {
            let mut st = self.state.lock().unwrap();
            if st.closed {
                return Err(Error::PoolClosed(self.config.name.clone()));
            }
            let waiter = st.next_waiter;
            st.next_waiter += 1;
            match st.model.checkout(waiter) {
                Checkout::Placed(id) => {
                    if self.fleet.is_none() && st.model.boots_ahead() {
                        // Hot start: this call may have made the pool
                        // busy enough to boot ahead of demand.
                        self.boot_locked(&mut st);
                    }
                    let link = st.runners[&id].link.clone();
                    self.busy_if_first(&mut st, &id);
                    return Ok(Slot {
                        pool: self.clone(),
                        runner: link,
                    });
                }
                Checkout::Queued => {
                    if st.retry.cooling_down() && st.no_runner_coming() {
                        // A boot failed for good moments ago: booting again
                        // now would fail the same way.
                        if let Some(e) = st.last_boot_error.clone() {
                            st.model.cancel(waiter);
                            return Err(e);
                        }
                    }
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
        // A shared pool whose bucket cannot be used (a refused permission,
        // a JetStream not ready past the bound) boots no runner: its
        // callers fail with the reason at once.
        let troubled = async {
            match &self.fleet {
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
                debug!(pool = %self.config.name, "a waiting caller fails: {e}");
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
                let st = self.state.lock().unwrap();
                match &st.last_boot_error {
                    Some(e) if !st.closed => Err(e.clone()),
                    _ => Err(Error::PoolClosed(self.config.name.clone())),
                }
            }
            Err(_) => {
                drop(guard);
                // A slot may have been handed over just as time ran out.
                drop(rx.try_recv());
                let st = self.state.lock().unwrap();
                let no_runner = st.model.count(RunnerState::Ready) == 0;
                let trouble = self.fleet.as_ref().and_then(|f| f.trouble());
                match (trouble.as_ref().or(st.last_boot_error.as_ref()), no_runner) {
                    (Some(e), true) => Err(e.clone()),
                    _ => {
                        debug!(pool = %self.config.name, "no runner had room before the deadline");
                        Err(Error::Timeout {
                            function: function.to_string(),
                            timeout,
                        })
                    }
                }
            }
        }
    }
}
