//! A call as the runner got it: alone, as a micro-service request, or as one
//! of a batch of coalesced calls (`protocol/batch.rs`), and how it is
//! answered either way.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_nats::{service, HeaderMap, Subject};
use bytes::Bytes;
use futures::FutureExt;
use tracing::debug;

use super::unconfirmed::Unconfirmed;
use super::Counters;
use crate::protocol::batch::{reply_batch_body, split_reply, ReadCall, BATCH_REPLY_TOKEN};
use crate::protocol::call::{self as wire, error_headers, WireErrorKind};

/// An error reply, as the runner sends it: its kind (the `Flame-Error`
/// header), its message, and the extra headers some kinds carry (the
/// runner's build on a build mismatch, the sizes of a result too large).
#[derive(Debug)]
pub(super) struct WireError {
    pub(super) kind: WireErrorKind,
    pub(super) message: String,
    pub(super) headers: Vec<(&'static str, String)>,
}

impl WireError {
    pub(super) fn new(kind: WireErrorKind, message: impl Into<String>) -> WireError {
        WireError {
            kind,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// With an extra header.
    pub(super) fn header(mut self, name: &'static str, value: impl Into<String>) -> WireError {
        self.headers.push((name, value.into()));
        self
    }
}

/// One call to run.
pub(super) struct CallRequest {
    /// The envelope and the arguments.
    pub(super) body: Bytes,
    pub(super) headers: Option<HeaderMap>,
    /// Where its reply goes; `None` for a cast.
    pub(super) reply: Option<Subject>,
    answer: Answer,
}

// (One per call, moved once: boxing the request would cost an allocation
// per call instead.)
#[allow(clippy::large_enum_variant)]
enum Answer {
    /// Through the micro service (which counts it in its stats).
    Service(service::Request),
    /// Published by the runner; a successful reply joins the batch's
    /// replies while the batch is being read.
    Batched(Arc<ReplyBatch>),
}

impl CallRequest {
    /// A call that came alone.
    pub(super) fn single(request: service::Request) -> CallRequest {
        CallRequest {
            body: request.message.payload.clone(),
            headers: request.message.headers.clone(),
            reply: request.message.reply.clone(),
            answer: Answer::Service(request),
        }
    }

    /// A call of a batch.
    pub(super) fn batched(call: ReadCall, batch: &Arc<ReplyBatch>) -> CallRequest {
        let headers = call.trace.map(|trace| {
            let mut h = HeaderMap::new();
            h.insert(crate::trace::HEADER_TRACEPARENT, trace.as_str());
            h
        });
        CallRequest {
            body: call.body,
            headers,
            reply: Some(call.reply.into()),
            answer: Answer::Batched(batch.clone()),
        }
    }

    /// Sends the function's result.
    pub(super) async fn respond_ok(&self, to: Replier<'_>, value: Bytes) {
        let Some(reply) = &self.reply else {
            return;
        };
        to.counters.calls.fetch_add(1, Ordering::Relaxed);
        let sent = match &self.answer {
            Answer::Service(request) => {
                to.unconfirmed.keep(reply, None, &value);
                request.respond(Ok(value)).await
            }
            Answer::Batched(batch) => match batch.join(reply, value) {
                None => return,
                Some(value) => {
                    to.unconfirmed.keep(reply, None, &value);
                    to.client.publish(reply.clone(), value).await
                }
            },
        };
        if let Err(e) = sent {
            debug!("cannot send reply: {e}");
        }
    }

    /// Sends an error reply (never batched): the micro-service error
    /// headers plus `Flame-Error` naming the kind.
    pub(super) async fn respond_error(&self, to: Replier<'_>, error: WireError) {
        let WireError {
            kind,
            message,
            headers,
        } = error;
        let extra = &headers[..];
        let Some(reply) = &self.reply else {
            return;
        };
        to.counters.calls.fetch_add(1, Ordering::Relaxed);
        to.counters.errors.fetch_add(1, Ordering::Relaxed);
        let status = wire::header_safe(&message);
        // Flame's headers; the micro service adds its two error headers.
        let ours = error_headers(kind, extra);
        // All of them, as the micro service sends them: for a batched
        // call's reply and for the copy kept to send again.
        let mut all = ours.clone();
        all.insert(wire::HEADER_SERVICE_ERROR, status.as_str());
        all.insert(
            wire::HEADER_SERVICE_ERROR_CODE,
            kind.code().to_string().as_str(),
        );
        to.unconfirmed.keep(reply, Some(&all), &Bytes::new());
        let sent = match &self.answer {
            Answer::Service(request) => {
                let err = service::error::Error {
                    status,
                    code: kind.code(),
                };
                request.respond_with_headers(Err(err), ours).await
            }
            Answer::Batched(_) => {
                to.client
                    .publish_with_headers(reply.clone(), all, Bytes::new())
                    .await
            }
        };
        if let Err(e) = sent {
            debug!("cannot send error reply: {e}");
        }
    }
}

/// What answering a call needs of its runner.
#[derive(Clone, Copy)]
pub(super) struct Replier<'a> {
    pub(super) client: &'a async_nats::Client,
    pub(super) counters: &'a Counters,
    /// Where each reply is kept until the server is known to have it.
    pub(super) unconfirmed: &'a Unconfirmed,
}

/// The successful replies of a batch's calls that finish while the batch is
/// being read: they go back together when it is done.
#[derive(Default)]
pub(super) struct ReplyBatch {
    /// `None` once the batch was read: later replies go alone.
    replies: Mutex<Option<Vec<(Subject, Bytes)>>>,
}

impl ReplyBatch {
    pub(super) fn open() -> Arc<ReplyBatch> {
        Arc::new(ReplyBatch {
            replies: Mutex::new(Some(Vec::new())),
        })
    }

    /// Keeps a reply for the batch; gives it back if the batch is closed.
    fn join(&self, reply: &Subject, value: Bytes) -> Option<Bytes> {
        match self.replies.lock().unwrap().as_mut() {
            Some(replies) => {
                replies.push((reply.clone(), value));
                None
            }
            None => Some(value),
        }
    }

    /// Closes the batch and sends what it kept: one message per parent
    /// inbox, to `<inbox>.0`.
    pub(super) fn close(&self, to: Replier<'_>) {
        let Some(replies) = self.replies.lock().unwrap().take() else {
            return;
        };
        let mut by_inbox: Vec<(&str, Vec<(&str, &Bytes)>)> = Vec::new();
        for (reply, value) in &replies {
            let (prefix, token) = split_reply(reply);
            match by_inbox.iter_mut().find(|(p, _)| *p == prefix) {
                Some((_, list)) => list.push((token, value)),
                None => by_inbox.push((prefix, vec![(token, value)])),
            }
        }
        for (prefix, list) in by_inbox {
            let subject = Subject::from(format!("{prefix}{BATCH_REPLY_TOKEN}"));
            let body = reply_batch_body(list.into_iter());
            to.unconfirmed.keep(&subject, None, &body);
            let client = to.client.clone();
            let send = async move {
                if let Err(e) = client.publish(subject, body).await {
                    debug!("cannot send replies: {e}");
                }
            };
            // Out now if the client has room, else on a task of its own.
            let mut send = Box::pin(send);
            if (&mut send).now_or_never().is_none() {
                tokio::spawn(send);
            }
        }
    }
}
