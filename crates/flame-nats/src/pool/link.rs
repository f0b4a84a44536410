//! The parent's line to one runner: [`RunnerLink`], what calls to it hold
//! on to (its subjects, the key calls to it are signed with, the streams
//! of its calls, why it went down), and its [`Outbox`].
//!
//! Call coalescing: calls to one runner that are ready to go while another
//! call to it is being sent go together, in one NATS message (see
//! `protocol/batch.rs`).
//!
//! No call ever waits to be batched. The caller that finds the runner's
//! outbox idle sends its own call at once, and becomes the sender: calls
//! that arrive meanwhile queue behind it, and it sends them, as one batch,
//! as soon as its own send is out. Only when the runner already has other
//! calls of this parent in flight (under load, when replies come back in
//! bursts and wake many callers together) does the sender first yield
//! once, so that the callers woken with it can queue their calls and leave
//! in the same message. Per-call deadlines, cancellation and errors are
//! untouched: each call keeps its own envelope and reply subject.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use flame_core::Error;
use tracing::debug;

use super::model::RunnerId;
use crate::parent::Replies;
use crate::protocol::batch::{batch_body, split_reply, BatchedCall, PER_CALL_OVERHEAD};
use crate::protocol::call as wire;
use crate::protocol::pool_events::{classify_gone, Reason};
use crate::protocol::sign::CallKey;
use crate::protocol::subjects;
use crate::stream_hub::RunnerStreams;
use crate::trace::TraceContext;

/// How long a call on a runner that stopped on purpose still waits for its
/// reply after the runner's exit is seen.
const TRAILING_REPLY_GRACE: Duration = Duration::from_millis(500);

/// What a call holds on to while it runs on a runner.
#[derive(Debug)]
pub(crate) struct RunnerLink {
    pub(super) id: RunnerId,
    /// Built once: cloning a `Subject` is a reference count, not a copy.
    pub(super) subject: async_nats::Subject,
    pub(super) cancel_subject: String,
    /// Signs the calls to it and their cancellations: a private pool's
    /// runner has its own, a shared pool's runners share the pool's (none
    /// without a secret).
    pub(super) key: Option<CallKey>,
    /// Set when the runner said it is stopping (drains, then exits).
    pub(super) stopping: AtomicBool,
    /// Why it went down, once it did.
    down_reason: OnceLock<String>,
    /// Calls waiting to go to it together (call coalescing).
    pub(super) outbox: Outbox,
    /// The streams and channels of its calls, ended when it goes down.
    pub(super) streams: RunnerStreams,
}

impl RunnerLink {
    pub(super) fn new(pool: &str, id: &RunnerId, key: Option<CallKey>) -> RunnerLink {
        RunnerLink {
            id: id.clone(),
            subject: subjects::runner(pool, id).into(),
            cancel_subject: subjects::runner_cancel(pool, id),
            key,
            stopping: AtomicBool::new(false),
            down_reason: OnceLock::new(),
            outbox: Default::default(),
            streams: RunnerStreams::default(),
        }
    }

    /// Records why the runner is gone and fails the calls waiting on it,
    /// and ends the streams and channels of its calls: at once, or, if it
    /// stopped cleanly (it drained and sent its last
    /// replies before exiting, which may be read after its exit is seen),
    /// after a short grace. A clean stop is one it said it was making, or
    /// an exit with code 0 or the removal of its lease: the runner's own
    /// last steps, which the news of its draining may not have preceded
    /// (a shared pool's runner says so in the KV bucket, read apart from
    /// its process's exit and from its replies).
    pub(super) fn fail(&self, replies: &Arc<Replies>, reason: String) {
        let _ = self.down_reason.set(reason.clone());
        let clean = matches!(classify_gone(&reason), Reason::Stopped | Reason::LeaseLost);
        let grace = if clean || self.stopping.load(Ordering::SeqCst) {
            TRAILING_REPLY_GRACE
        } else {
            Duration::ZERO
        };
        self.end_streams(&reason, grace);
        replies.fail_runner(&self.id, reason, grace);
    }

    /// Ends the streams of its calls with `RunnerDown`, after `grace`.
    fn end_streams(&self, reason: &str, grace: Duration) {
        let rt = tokio::runtime::Handle::try_current();
        match rt {
            Ok(rt) if !grace.is_zero() => {
                let (id, reason) = (self.id.clone(), reason.to_string());
                let streams = self.streams.clone();
                rt.spawn(async move {
                    tokio::time::sleep(grace).await;
                    streams.down(&id, &reason);
                });
            }
            _ => self.streams.down(&self.id, reason),
        }
    }

    pub(super) fn reason(&self) -> String {
        self.down_reason
            .get()
            .cloned()
            .unwrap_or_else(|| "runner went down".to_string())
    }
}

/// Calls larger than this go alone: batching saves per-message work,
/// which large calls do not spend most of their time on.
const MAX_COALESCED_CALL: usize = 16 * 1024;

/// Most bytes of calls in one batch (and never more than the server's
/// max_payload).
const MAX_BATCH: usize = 256 * 1024;

/// A runner's outbox: the calls waiting to go while another is sent.
#[derive(Default)]
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    /// This parent's calls on the runner that were sent (or queued) and are
    /// not over: more than one means the runner is busy.
    in_flight: AtomicUsize,
}

// (Counts only: queued calls hold the app's arguments.)
impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued = self.state.lock().map_or(0, |st| st.queued.len());
        f.debug_struct("Outbox")
            .field("queued", &queued)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish()
    }
}

#[derive(Default)]
struct OutboxState {
    /// A caller is sending; new calls queue.
    sending: bool,
    queued: Vec<Queued>,
}

struct Queued {
    token: u64,
    reply: Subject,
    /// Where the call is in its trace, for a traced call.
    trace: Option<TraceContext>,
    body: Bytes,
}

impl Outbox {
    /// A call starts (see [`Outbox::call_ended`]).
    pub(crate) fn call_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A call is over: answered, failed, timed out or dropped.
    pub(crate) fn call_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The sender's role. If its caller goes away mid-send, the calls it had
/// taken for the message being sent (a send that did not finish sent
/// nothing: the client's queue takes a message whole or not at all) and
/// those queued behind it are sent by a task of its own.
struct Sending {
    link: Arc<RunnerLink>,
    client: async_nats::Client,
    replies: Arc<Replies>,
    /// The calls of the message being sent.
    taken: Vec<Queued>,
    /// The sender's own call (not sent again for a caller that left).
    own: Option<u64>,
    done: bool,
}

impl Sending {
    /// The queue is sent: nothing left to hand on.
    fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let own = self.own;
        let mut taken = std::mem::take(&mut self.taken);
        taken.retain(|q| Some(q.token) != own);
        let mut heir = Sending {
            link: self.link.clone(),
            client: self.client.clone(),
            replies: self.replies.clone(),
            taken,
            own: None,
            done: false,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = send_queued(&mut heir).await;
                    heir.finish();
                });
            }
            Err(_) => {
                // No runtime left: the calls cannot go; they fail.
                heir.done = true;
                let queued = {
                    let mut st = heir.link.outbox.state.lock().unwrap();
                    st.sending = false;
                    std::mem::take(&mut st.queued)
                };
                let tokens: Vec<u64> = queued.iter().chain(&heir.taken).map(|q| q.token).collect();
                heir.replies.fail_tokens(&tokens, || {
                    Error::PoolClosed("the runtime stopped before the call was sent".into())
                });
            }
        }
    }
}

/// Sends one call to the runner, with the calls queued behind it, or queues
/// it behind the call being sent.
pub(crate) async fn send_call(
    link: &Arc<RunnerLink>,
    client: &async_nats::Client,
    replies: &Arc<Replies>,
    token: u64,
    reply: Subject,
    trace: Option<&TraceContext>,
    body: Bytes,
) -> Result<(), Error> {
    let trace = trace.copied();
    // Large calls gain nothing from company: they go alone, at once.
    if body.len() > MAX_COALESCED_CALL {
        let one = Queued {
            token,
            reply,
            trace,
            body,
        };
        return send_alone(link, client, &one)
            .await
            .map_err(|e| not_sent(link, e));
    }
    {
        let mut st = link.outbox.state.lock().unwrap();
        if st.sending {
            st.queued.push(Queued {
                token,
                reply,
                trace,
                body,
            });
            return Ok(());
        }
        st.sending = true;
    }
    let mut sending = Sending {
        link: link.clone(),
        client: client.clone(),
        replies: replies.clone(),
        taken: vec![Queued {
            token,
            reply,
            trace,
            body,
        }],
        own: Some(token),
        done: false,
    };
    if link.outbox.in_flight.load(Ordering::Relaxed) > 1 {
        // Busy: let the callers woken with this one queue behind it.
        tokio::task::yield_now().await;
    }
    let result = send_queued(&mut sending).await;
    sending.finish();
    result
}

/// Sends the calls taken and everything queued, in batches, until the
/// queue is empty; then the outbox is idle again. Fails only if the
/// sender's own call could not be sent (other calls that cannot be sent
/// fail through `replies`).
async fn send_queued(sending: &mut Sending) -> Result<(), Error> {
    let (link, client, replies) = (
        sending.link.clone(),
        sending.client.clone(),
        sending.replies.clone(),
    );
    let own_token = sending.own;
    let limit = client.max_payload().min(MAX_BATCH);
    let mut result = Ok(());
    loop {
        let mut calls = std::mem::take(&mut sending.taken);
        {
            let mut st = link.outbox.state.lock().unwrap();
            let mut size: usize = calls.iter().map(weight).sum();
            let mut take = 0;
            for q in &st.queued {
                let w = weight(q);
                // (At least one call goes, whatever its size.)
                if (take > 0 || !calls.is_empty()) && size + w > limit {
                    break;
                }
                size += w;
                take += 1;
            }
            calls.extend(st.queued.drain(..take));
            if calls.is_empty() {
                st.sending = false;
                return result;
            }
        }
        // Held by the sender while the message goes out (see `Sending`).
        sending.taken = calls;
        let sent = publish(&link, &client, &replies, &sending.taken).await;
        let calls = std::mem::take(&mut sending.taken);
        if let Err(e) = sent {
            debug!(runner = %link.id, "cannot send calls: {e}");
            let others: Vec<u64> = calls
                .iter()
                .map(|q| q.token)
                .filter(|t| Some(*t) != own_token)
                .collect();
            let text = e.to_string();
            replies.fail_tokens(&others, || not_sent(&link, text.clone()));
            if calls.iter().any(|q| Some(q.token) == own_token) {
                result = Err(not_sent(&link, e));
            }
        }
    }
}

/// The error of a call that could not be sent to `link`'s runner.
fn not_sent(link: &RunnerLink, e: impl Into<flame_core::BoxError>) -> Error {
    Error::nats(format!("cannot send the call to runner {}", link.id), e)
}

/// Bytes a call takes in a batch.
fn weight(q: &Queued) -> usize {
    // (A `traceparent` is 55 bytes.)
    q.body.len() + q.reply.len() + q.trace.map_or(0, |_| 55) + PER_CALL_OVERHEAD
}

/// One call in a message of its own: its trace context, if any, in the
/// `traceparent` header.
async fn send_alone(
    link: &RunnerLink,
    client: &async_nats::Client,
    call: &Queued,
) -> Result<(), async_nats::PublishError> {
    let subject = link.subject.clone();
    let (reply, body) = (call.reply.clone(), call.body.clone());
    match wire::request_headers(call.trace.as_ref()) {
        Some(headers) => {
            client
                .publish_with_reply_and_headers(subject, reply, headers, body)
                .await
        }
        None => client.publish_with_reply(subject, reply, body).await,
    }
}

/// One call as it is, or several as a batch. A batch goes with the first
/// call's reply subject, so that a no-responders status reaches it, and
/// from it the others (see [`Replies::batch_sent`]).
async fn publish(
    link: &RunnerLink,
    client: &async_nats::Client,
    replies: &Replies,
    calls: &[Queued],
) -> Result<(), async_nats::PublishError> {
    if let [one] = calls {
        return send_alone(link, client, one).await;
    }
    let subject = link.subject.clone();
    let (prefix, _) = split_reply(&calls[0].reply);
    let traces: Vec<Option<String>> = calls
        .iter()
        .map(|q| q.trace.as_ref().map(TraceContext::traceparent))
        .collect();
    let body = batch_body(
        prefix,
        calls.iter().zip(&traces).map(|(q, trace)| BatchedCall {
            reply: q.reply.as_str(),
            trace: trace.as_deref(),
            body: &q.body,
        }),
    );
    replies.batch_sent(calls[0].token, calls[1..].iter().map(|q| q.token).collect());
    client
        .publish_with_reply(subject, calls[0].reply.clone(), body)
        .await
}
