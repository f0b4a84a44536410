//! Running one checked call: within its deadline, panics caught, inline or
//! handed off as `inline.rs` decides, in the span its trace context gives.
//! [`Executor`] is the runner's part that runs them.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flame_core::registry::{Handler, Invocation, InvokeError, Registry};
use flame_core::state::States;
use flame_core::stream::{with_transport, StreamTransport};
use futures::FutureExt;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{debug, Span};

use super::inline::PollWatch;
use super::request::WireError;
use super::work::InFlight;
use crate::protocol::bootstrap::ParentInfo;
use crate::protocol::call::WireErrorKind;
use crate::stream_hub::holding;
use crate::trace::{self, TraceContext};

/// What running the app's functions needs: the app's state, the stream
/// transport their arguments and results use, and how each function's
/// calls went so far.
pub(super) struct Executor {
    /// The app's state, for functions that take `State<T>`.
    states: States,
    /// The runner's streams, as the transport that arguments and results
    /// use.
    transport: Arc<dyn StreamTransport>,
    /// Per function, how its first polls went (see `dispatch::dispatch`).
    pub(super) slow_polls: HashMap<&'static str, PollWatch>,
}

impl Executor {
    /// Runs the functions of `registry` with `states` and `transport`.
    pub(super) fn new(
        registry: &Registry,
        states: States,
        transport: Arc<dyn StreamTransport>,
    ) -> Executor {
        Executor {
            slow_polls: registry
                .names()
                .into_iter()
                .map(|name| (name, PollWatch::default()))
                .collect(),
            transport,
            states,
        }
    }

    /// Runs a call, enforcing its deadline. Async functions are polled
    /// right here (no thread hop); plain functions go to the blocking pool so
    /// CPU-heavy code cannot stall the runner's NATS connection.
    pub(super) async fn execute(
        &self,
        handler: Handler,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Vec<u8>, WireError> {
        let deadline = Instant::now() + timeout;
        self.execute_holding(None, handler, payload, timeout, deadline, None)
            .await
    }

    /// [`Executor::execute`], keeping `hold` alive as long as the work runs: a
    /// plain function keeps its thread (and its in-flight count) even when
    /// the caller is gone, since a thread cannot be stopped from outside.
    ///
    /// A plain function (`function`, when given) that proved short runs
    /// inline, on the serve loop: see [`TRUST_PLAIN_AFTER`](super::inline::TRUST_PLAIN_AFTER).
    pub(super) async fn execute_holding(
        &self,
        function: Option<&'static str>,
        handler: Handler,
        payload: Bytes,
        timeout: Duration,
        deadline: Instant,
        hold: Option<Arc<InFlight>>,
    ) -> Result<Vec<u8>, WireError> {
        let timed_out = || {
            WireError::new(
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
                    Ok(Err(panic)) => {
                        return Err(WireError::new(
                            WireErrorKind::Panicked,
                            panic_message(panic),
                        ))
                    }
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
                        Err(panic) => {
                            return Err(WireError::new(
                                WireErrorKind::Panicked,
                                panic_message(panic),
                            ))
                        }
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
                            return Err(WireError::new(
                                WireErrorKind::Panicked,
                                panic_message(join.into_panic()),
                            ))
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
            InvokeError::DecodeArgs(m) => WireError::new(WireErrorKind::DecodeArgs, m),
            InvokeError::EncodeResult(m) => WireError::new(WireErrorKind::EncodeResult, m),
            InvokeError::MissingState(state) => {
                WireError::new(WireErrorKind::MissingState, state.to_string())
            }
        })
    }
}

/// The span a call runs in, and the trace context of its work: a child
/// of the caller's span when the call carried one, else a new trace if
/// anyone listens to the span.
pub(super) fn run_span(
    info: &ParentInfo,
    function: &'static str,
    caller: Option<TraceContext>,
) -> (Span, Option<TraceContext>) {
    let span = tracing::info_span!(
        "flame.run",
        pool = %info.pool,
        runner = %info.runner_id,
        function,
        outcome = Empty,
        trace_id = Empty,
        span_id = Empty,
        parent_span_id = Empty,
    );
    let ctx = trace::start(&span, caller, true);
    (span, ctx)
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
