//! The receiving side of one stream: items are handed to the reader as
//! they arrive, and credit is granted back as the reader takes them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::Client;
use bytes::Bytes;
use flame_core::Error;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::scope::{scope_ended, CallStreams};
use super::Active;
use crate::protocol::stream::{Control, Frame, KEEPALIVE, SILENCE, WINDOW};

/// Items a consumer's reader took since the consumer last looked.
#[derive(Default)]
pub(super) struct ReadCount {
    pub(super) count: std::sync::atomic::AtomicU32,
    pub(super) wake: tokio::sync::Notify,
}

/// Receives the items of one stream and hands them to its reader, granting
/// credit as the reader takes them.
pub(super) struct Consumer {
    pub(super) client: Client,
    pub(super) address: String,
    pub(super) tx: mpsc::Sender<Result<Bytes, Error>>,
    pub(super) active: Active,
    /// Ends it early: its call failed, or its runner is down.
    pub(super) scope: Option<CallStreams>,
    /// What its reader took, to grant as credit.
    pub(super) taken: Arc<ReadCount>,
}

impl Consumer {
    pub(super) async fn run(self) {
        let _active = &self.active;
        let fail = |message: String| async {
            let _ = self.tx.send(Err(Error::Stream(message))).await;
        };
        let data = self.client.new_inbox();
        let mut sub = match self.client.subscribe(data.clone()).await {
            Ok(sub) => sub,
            Err(e) => return fail(format!("cannot subscribe to the stream: {e}")).await,
        };
        let open = Control::Open {
            data,
            credit: WINDOW,
        };
        let body = serde_json::to_vec(&open).expect("control messages serialize");
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(SILENCE));
        let opened = tokio::select! {
            opened = self.client.send_request(self.address.clone(), request) => opened,
            e = scope_ended(&self.scope) => {
                self.control(Control::Cancel).await;
                let _ = self.tx.send(Err(e)).await;
                return;
            }
        };
        match opened {
            Ok(answer) if &answer.payload[..] == b"ok" => {}
            Ok(_) => {
                return fail("the stream was already read, or its sender gave up on it".into())
                    .await
            }
            Err(e) => return fail(format!("the stream's sender is gone ({e})")).await,
        }
        let mut owed = 0u32;
        let mut pending: Option<Bytes> = None;
        let mut heard = Instant::now();
        let mut tick = tokio::time::interval(KEEPALIVE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // (Only a producer that sends past its credit fills it.)
                permit = self.tx.reserve(), if pending.is_some() => {
                    let Ok(permit) = permit else { break };
                    permit.send(Ok(pending.take().expect("pending")));
                }
                _ = self.taken.wake.notified() => {
                    owed += self.taken.count.swap(0, Ordering::SeqCst);
                    if owed >= WINDOW / 2 {
                        self.control(Control::Credit { n: owed }).await;
                        owed = 0;
                    }
                }
                msg = sub.next(), if pending.is_none() => {
                    let Some(msg) = msg else {
                        return fail("the connection to NATS was closed".into()).await;
                    };
                    heard = Instant::now();
                    match Frame::of(&msg) {
                        Some(Frame::Item) => match self.tx.try_reserve() {
                            Ok(permit) => permit.send(Ok(msg.payload)),
                            Err(_) => pending = Some(msg.payload),
                        },
                        Some(Frame::Keepalive) => {}
                        Some(Frame::End) => return,
                        Some(Frame::Error) => {
                            return fail(String::from_utf8_lossy(&msg.payload).into_owned()).await;
                        }
                        None => return fail("unreadable stream message".into()).await,
                    }
                }
                _ = self.tx.closed() => break,
                e = scope_ended(&self.scope) => {
                    // Its call failed, or its runner is down: no need to
                    // wait for the silence.
                    self.control(Control::Cancel).await;
                    if let Some(item) = pending.take() {
                        let _ = self.tx.send(Ok(item)).await;
                    }
                    let _ = self.tx.send(Err(e)).await;
                    return;
                }
                _ = tick.tick() => {
                    // Waiting for the sender (not for our reader): count its
                    // silence.
                    if pending.is_none() && heard.elapsed() > SILENCE {
                        return fail(format!(
                            "the stream's sender stopped answering for {:?} (its process died or lost NATS)",
                            heard.elapsed()
                        ))
                        .await;
                    }
                    self.control(Control::Keepalive).await;
                }
            }
        }
        // The reader dropped the stream: stop the sender.
        self.control(Control::Cancel).await;
    }

    async fn control(&self, control: Control) {
        let body = serde_json::to_vec(&control).expect("control messages serialize");
        if let Err(e) = self.client.publish(self.address.clone(), body.into()).await {
            debug!("cannot reach the stream's sender: {e}");
        }
    }
}
