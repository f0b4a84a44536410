//! Serving one request: check it, take a concurrency permit, run the
//! function within its deadline (panics caught), and answer. Functions of
//! the whole runner (its checks, its work, its executor, its lease's
//! queue signal, its replies): `dispatch::dispatch(runner, request)`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::service;
use bytes::Bytes;
use futures::FutureExt;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument, Span};

use super::check::{self, Checked};
use super::execute::run_span;
use super::inline::thread_cpu_time;
use super::request::{CallRequest, Replier, ReplyBatch, WireError};
use super::Runner;
use crate::protocol::batch::{read_batch, BATCH_V1};
use crate::protocol::call::{self as wire, WireErrorKind};
use crate::trace;

/// What a caller of a stopping runner is told: it may place the call
/// elsewhere at once.
pub(super) const NOTHING_RAN: &str = "the runner is stopping; nothing ran";

/// What became of one request (a call, or a batch of them).
#[derive(Default)]
pub(super) struct Dispatched {
    /// It was valid work (not refused).
    pub(super) accepted: bool,
    /// Calls still running in their own tasks, by their reply subjects.
    pub(super) cancellable: Vec<(String, AbortHandle)>,
}

/// Checks a request and starts its work.
///
/// Most calls finish without ever waiting (an echo, a lookup in memory),
/// and handing each to a new task costs a cross-thread wake-up, which on
/// small machines is most of a call's cost. So the call is polled once
/// right here and only spawned if it has to wait. A function whose first
/// poll takes more than [`SLOW_FIRST_POLL`](super::inline::SLOW_FIRST_POLL) of CPU time
/// [`SLOW_STRIKES`](super::inline::SLOW_STRIKES) times in a row (CPU work before its first await) is
/// always spawned from then on, so it can hold up the serve loop only a
/// few times; a one-off slow poll (first-use costs) does not count.
/// Once a function's first polls were fast [`TRUST_AFTER`](super::inline::TRUST_AFTER) times in a
/// row, only one call in [`SAMPLE_EVERY`](super::inline::SAMPLE_EVERY) is timed.
pub(super) fn dispatch(runner: Arc<Runner>, request: service::Request) -> Dispatched {
    if request.message.payload.first() == Some(&BATCH_V1) {
        return dispatch_batch(runner, request);
    }
    dispatch_call(runner, CallRequest::single(request))
}

/// The calls of a batch, each as if it came alone; the replies of those
/// that finish right away go back together.
fn dispatch_batch(runner: Arc<Runner>, request: service::Request) -> Dispatched {
    let calls = match read_batch(&request.message.payload) {
        Ok(calls) => calls,
        Err(message) => {
            warn!(runner = %runner.info.runner_id, "refused request: {message}");
            // (Answered on the batch's reply subject: its first call's.)
            let call = CallRequest::single(request);
            let me = runner.clone();
            tokio::spawn(async move {
                let error = WireError::new(WireErrorKind::Malformed, message.to_string());
                respond_error(&me, &call, error).await;
            });
            return Dispatched::default();
        }
    };
    let batch = ReplyBatch::open();
    let mut out = Dispatched::default();
    for call in calls {
        let call = CallRequest::batched(call, &batch);
        if out.accepted && runner.info.single_use {
            // A single-use runner takes one call; the others go elsewhere.
            let me = runner.clone();
            tokio::spawn(async move {
                let error = WireError::new(WireErrorKind::Draining, NOTHING_RAN);
                respond_error(&me, &call, error).await;
            });
            continue;
        }
        let done = dispatch_call(runner.clone(), call);
        out.accepted |= done.accepted;
        out.cancellable.extend(done.cancellable);
    }
    batch.close(replier(&runner));
    out
}

/// Refuses a request (a call, or each call of a batch): the runner is
/// stopping, say.
pub(super) async fn refuse(
    runner: &Runner,
    request: service::Request,
    kind: WireErrorKind,
    why: &str,
) {
    if request.message.payload.first() != Some(&BATCH_V1) {
        let call = CallRequest::single(request);
        respond_error(runner, &call, WireError::new(kind, why)).await;
        return;
    }
    let Ok(calls) = read_batch(&request.message.payload) else {
        return;
    };
    let closed = ReplyBatch::open();
    closed.close(replier(runner));
    for call in calls {
        let call = CallRequest::batched(call, &closed);
        respond_error(runner, &call, WireError::new(kind, why)).await;
    }
}

/// One call: checked, then run (see [`dispatch`]).
fn dispatch_call(runner: Arc<Runner>, request: CallRequest) -> Dispatched {
    let checked = check::check(&runner, &request);
    let inline_name = checked.as_ref().ok().map(|call| call.function);
    // A caller that stops waiting names its call by the reply subject.
    let reply = request.reply.clone();
    let accepted = checked.is_ok();
    let held = runner.clone();
    let inline = inline_name
        .and_then(|name| held.executor.slow_polls.get(name))
        .filter(|watch| watch.inline());
    let (span, trace) = match &checked {
        Ok(call) => run_span(&runner.info, call.function, call.trace),
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
            Err(refusal) => {
                warn!(runner = %runner.info.runner_id, "refused request: {}", refusal.message);
                respond_error(&runner, &request, refusal).await;
                return;
            }
        };
        let deadline = Instant::now() + timeout;
        let permit = match runner.work.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full (other parents' calls): wait for a slot, within
                // the call's deadline.
                let _queued = runner.work.queue();
                runner.lease.dirty.notify_one();
                let permit =
                    tokio::time::timeout_at(deadline, runner.work.permits.clone().acquire_owned())
                        .await;
                match permit {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        let message = format!(
                            "deadline of {timeout:?} passed while waiting for a free slot on the runner"
                        );
                        failed(&runner, function, cast, &message);
                        let error = WireError::new(WireErrorKind::Timeout, message);
                        respond_error(&runner, &request, error).await;
                        return;
                    }
                }
            }
        };
        // Held until the reply is out, so a draining runner does not exit
        // before answering.
        let in_flight = Arc::new(runner.work.begin(permit));
        let outcome = runner
            .executor
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
                let max = runner.client.max_payload();
                if bytes.len() > max {
                    let message = format!(
                        "the result of `{function}` is {} bytes, more than the NATS server's max_payload of {max} bytes",
                        bytes.len()
                    );
                    failed(&runner, function, cast, &message);
                    let error = WireError::new(WireErrorKind::ResultTooLarge, message)
                        .header(wire::HEADER_SIZE, bytes.len().to_string())
                        .header(wire::HEADER_MAX, max.to_string());
                    respond_error(&runner, &request, error).await;
                } else {
                    if !Span::current().is_disabled() {
                        Span::current().record("outcome", "ok");
                    }
                    request
                        .respond_ok(replier(&runner), Bytes::from(bytes))
                        .await;
                }
            }
            Err(error) => {
                if !Span::current().is_disabled() {
                    Span::current().record("outcome", error.kind.as_str());
                }
                failed(&runner, function, cast, &error.message);
                respond_error(&runner, &request, error).await;
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

fn failed(runner: &Runner, function: &str, cast: bool, message: &str) {
    if cast {
        runner.counters.casts_failed.fetch_add(1, Ordering::Relaxed);
        warn!(runner = %runner.info.runner_id, function, "cast failed: {message}");
    } else {
        debug!(runner = %runner.info.runner_id, function, "call failed: {message}");
    }
}

pub(super) async fn respond_error(runner: &Runner, request: &CallRequest, error: WireError) {
    request.respond_error(replier(runner), error).await;
}

/// What answering a call needs of this runner.
fn replier(runner: &Runner) -> Replier<'_> {
    Replier {
        client: &runner.client,
        counters: &runner.counters,
        unconfirmed: &runner.unconfirmed,
    }
}
