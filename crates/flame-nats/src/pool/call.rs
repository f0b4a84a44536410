//! One call or cast: encode, wait for a slot, send, wait for the reply.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flame_core::codec::with_source;
use flame_core::stream::{with_transport, StreamTransport};
use flame_core::{Error, RemoteFn};
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{debug, warn, Instrument, Span};

use super::link::{self, RunnerLink};
use super::model::RunnerId;
use super::slot::{self, Slot};
use super::PoolInner;
use crate::parent::Replies;
use crate::protocol::call::{self as wire, Reply};
use crate::stream_hub::{holding, scoped, CallStreams, StreamHub};
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

/// A call of `F` through `pool`: see [`super::Pool::call_with`].
pub(super) async fn call<F: RemoteFn>(
    pool: &Arc<PoolInner>,
    args: F::Args,
    options: CallOptions,
) -> Result<F::Output, Error> {
    let timeout = options.timeout.unwrap_or(pool.config.timeout);
    let payload = encode::<F>(pool, &args)?;
    let (span, trace) = call_span(&pool.config.name, F::NAME, "call");
    let ran = run(
        pool.clone(),
        F::NAME,
        payload,
        timeout,
        Kind::Call { link: options.link },
        trace,
    )
    .instrument(span.clone())
    .await;
    let result =
        ran.and_then(|(bytes, slot)| decode_result::<F>(&pool.parent.streams, &bytes, slot));
    record_outcome(&span, result.as_ref().err());
    result
}

/// A cast of `F` through `pool`: see [`super::Pool::cast_with`].
pub(super) fn cast<F: RemoteFn>(
    pool: &Arc<PoolInner>,
    args: F::Args,
    options: CallOptions,
) -> Result<(), Error> {
    if pool.closed.is_cancelled() {
        return Err(Error::PoolClosed(pool.config.name.clone()));
    }
    let timeout = options.timeout.unwrap_or(pool.config.timeout);
    let payload = encode::<F>(pool, &args)?;
    let inner = pool.clone();
    let (span, trace) = call_span(&pool.config.name, F::NAME, "cast");
    tokio::spawn(
        async move {
            let ran = run(inner.clone(), F::NAME, payload, timeout, Kind::Cast, trace).await;
            record_outcome(&Span::current(), ran.as_ref().err());
            if let Err(e) = ran {
                warn!(pool = %inner.config.name, function = F::NAME, "cast failed: {e}");
            }
        }
        .instrument(span),
    );
    Ok(())
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
    let trace = trace::start(&span, trace::current(), false);
    (span, trace)
}

/// Records how a call ended on its span: `ok`, or the error's kind.
pub(super) fn record_outcome(span: &Span, error: Option<&Error>) {
    if !span.is_disabled() {
        span.record("outcome", error.map_or("ok", |e| e.kind().as_str()));
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
/// is still busy with it. A `Bytes` result is a slice of the reply (see
/// [`flame_core::codec::SharedBytes`]).
pub(super) fn decode_result<F: RemoteFn>(
    streams: &Arc<StreamHub>,
    bytes: &Bytes,
    slot: Slot,
) -> Result<F::Output, Error> {
    let transport: Arc<dyn StreamTransport> = streams.clone();
    let runner = slot.runner.clone();
    let hold: Arc<dyn std::any::Any + Send + Sync> = Arc::new(slot);
    // Its streams end as soon as its runner is known to be down.
    let scope = CallStreams::new(F::NAME);
    let decoded = with_transport(&transport, || {
        scoped(Some(scope.clone()), || {
            holding(hold, || with_source(bytes, || F::decode_output(bytes)))
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

/// Encodes a call's arguments; streams among them are offered through
/// this parent's hub.
fn encode<F: RemoteFn>(pool: &PoolInner, args: &F::Args) -> Result<Payload, Error> {
    let streams: Arc<dyn StreamTransport> = pool.parent.streams.clone();
    encode_args::<F>(&streams, args, &pool.parent.build_id)
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

/// Places and runs one call, retrying elsewhere if the runner turns out
/// to be gone before it received the call. When it fails, the streams
/// and channels among its arguments end with its error at once.
pub(super) async fn run(
    pool: Arc<PoolInner>,
    function: &'static str,
    mut payload: Payload,
    timeout: Duration,
    kind: Kind,
    trace: Option<TraceContext>,
) -> Result<(Bytes, Slot), Error> {
    let streams = payload.streams.take();
    let ran = run_placed(
        pool,
        function,
        payload,
        timeout,
        kind,
        trace,
        streams.as_ref(),
    )
    .await;
    if let (Err(e), Some(streams)) = (&ran, &streams) {
        streams.end(e.clone());
    }
    ran
}

async fn run_placed(
    pool: Arc<PoolInner>,
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
        + wire::envelope_max_len(function, &pool.parent.build_id)
        + if trace.is_some() {
            wire::request_headers_max_len()
        } else {
            0
        };
    let max = pool.parent.client.max_payload();
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
        let slot = slot::checkout(&pool, deadline, function, timeout).await?;
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
        let replies = &pool.parent.replies;
        let (token, reply, answer) = replies.register(function, runner.id.clone());
        // The signature covers the runner and the reply subject.
        let sign = runner
            .key
            .as_ref()
            .map(|key| (key, runner.subject.as_str(), reply.as_str()));
        let build = &pool.parent.build_id;
        // The first send writes the envelope (and signature) in front
        // of the arguments; a call placed again (rare) copies them.
        let body = match fresh.take() {
            Some(Payload { buf, head, .. }) => {
                let body =
                    wire::request_body_in_place(buf, head, function, build, remaining, cast, sign);
                args = body.slice(body.len() - args_len..);
                body
            }
            None => wire::request_body(function, build, remaining, cast, &args, sign),
        };
        runner.outbox.call_started();
        let mut call = InFlightCall {
            client: &pool.parent.client,
            replies,
            runner: &runner,
            token,
            reply,
            cancel: false,
        };
        let client = &pool.parent.client;
        // Sent at once, with the calls to the same runner that are
        // ready meanwhile (coalescing, see `link.rs`).
        link::send_call(
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
                debug!(pool = %pool.config.name, runner = %runner.id, token, sent_before = ?remaining, "no reply before the deadline");
                return Err(Error::Timeout {
                    function: function.to_string(),
                    timeout,
                });
            }
            Ok(Err(_)) => {
                return Err(Error::NatsUnreachable {
                    url: pool.parent.nats_url.clone(),
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
            if pool.fleet.is_some() || pool.parent.reconnected_within(pool.config.heartbeat * 2) {
                // (A shared pool's leases say what each runner is.)
                if let Some(streams) = streams {
                    runner.streams.unfollow(streams);
                }
                drop(slot);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            set_draining(&pool, &runner.id);
        } else {
            let reply = wire::read_reply(msg, function, &runner.id, &pool.parent.build_id, timeout);
            match reply {
                Reply::Value(bytes) => return Ok((bytes, slot)),
                Reply::Failed(e) => return Err(e),
                Reply::Draining => set_draining(&pool, &runner.id),
            }
        }
        // Placed again: nothing ran there.
        if let Some(streams) = streams {
            runner.streams.unfollow(streams);
        }
        drop(slot);
    }
}

/// The runner turned the call away: place nothing more on it.
fn set_draining(pool: &PoolInner, runner: &RunnerId) {
    pool.state.lock().unwrap().model.drain(runner);
}
