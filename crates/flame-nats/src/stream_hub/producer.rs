//! The sending side of one stream: items go out as the consumer grants
//! credit, with keepalives, until the source ends, the consumer stops
//! reading, or the stream's scope ends it.

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use flame_core::stream::{error_message, ItemSource};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::scope::{scope_ended, CallStreams, Hold};
use super::Active;
use crate::protocol::stream::{Control, Frame, HEADER_STREAM, KEEPALIVE, OPEN_WAIT, SILENCE};

/// Sends the items of one stream, within the credit its consumer grants.
pub(super) struct Producer {
    pub(super) client: Client,
    pub(super) control: mpsc::UnboundedReceiver<Control>,
    pub(super) source: ItemSource,
    pub(super) active: Active,
    /// Ends it early: its call failed, or its runner is down.
    pub(super) scope: Option<CallStreams>,
    /// Kept until the stream ends.
    pub(super) _hold: Option<Hold>,
}

impl Producer {
    pub(super) async fn run(mut self) {
        let _active = &self.active;
        // Wait to be opened.
        let deadline = Instant::now() + OPEN_WAIT;
        let scope = self.scope.clone();
        let (data, mut credit) = loop {
            tokio::select! {
                control = tokio::time::timeout_at(deadline, self.control.recv()) => match control {
                    Ok(Some(Control::Open { data, credit })) => break (data, credit),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => {
                        debug!("stream never opened; dropped");
                        return;
                    }
                },
                e = scope_ended(&scope) => {
                    debug!("stream dropped unopened: {e}");
                    return;
                }
            }
        };
        let mut heard = Instant::now();
        let mut unread = std::collections::VecDeque::new();
        let mut tick = tokio::time::interval(KEEPALIVE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                control = self.control.recv() => match control {
                    Some(Control::Credit { n }) => {
                        credit = credit.saturating_add(n);
                        heard = Instant::now();
                        // Credit is granted as the reader takes items.
                        let read = (n as usize).min(unread.len());
                        unread.drain(..read);
                    }
                    Some(Control::Keepalive | Control::Open { .. } | Control::Offer { .. }) => {
                        heard = Instant::now()
                    }
                    Some(Control::Cancel) | None => {
                        debug!("stream cancelled by its reader");
                        return;
                    }
                },
                e = scope_ended(&scope) => {
                    // Its reader may still be there (the call failed on
                    // this side): say why it ends.
                    send_frame(&self.client, &data, Frame::Error, error_message(&e).into()).await;
                    return;
                }
                item = self.source.next(), if credit > 0 => match item {
                    Some(Ok((bytes, place))) => {
                        let max = self.client.max_payload();
                        if bytes.len() > max {
                            let message = format!(
                                "an item of {} bytes is larger than the NATS server's max_payload of {max} bytes; send smaller items (Stream::from_reader makes chunks of 128 KiB)",
                                bytes.len()
                            );
                            send_frame(&self.client, &data, Frame::Error, message.into()).await;
                            return;
                        }
                        if let Err(e) = self.client.publish(data.clone(), bytes.into()).await {
                            debug!("cannot send a stream item: {e}");
                            return;
                        }
                        credit -= 1;
                        // A channel's message keeps its place in the
                        // channel's bound until the reader took it.
                        unread.push_back(place);
                    }
                    Some(Err(e)) => {
                        send_frame(&self.client, &data, Frame::Error, error_message(&e).into()).await;
                        return;
                    }
                    None => {
                        send_frame(&self.client, &data, Frame::End, Bytes::new()).await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    if heard.elapsed() > SILENCE {
                        debug!("stream reader silent for {:?}; stopping", heard.elapsed());
                        return;
                    }
                    send_frame(&self.client, &data, Frame::Keepalive, Bytes::new()).await;
                }
            }
        }
    }
}

/// Sends a non-item message (end, error, keepalive) on a data subject.
async fn send_frame(client: &Client, data: &str, frame: Frame, body: Bytes) {
    let mut headers = HeaderMap::new();
    if let Some(value) = frame.as_header() {
        headers.insert(HEADER_STREAM, value);
    }
    let _ = client
        .publish_with_headers(data.to_string(), headers, body)
        .await;
}
