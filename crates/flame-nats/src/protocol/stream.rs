//! Streams on the wire: a producer offers a stream at an address
//! (`<producer inbox>.s.<id>`); the consumer opens it with a request naming
//! its own data subject and an initial credit, and then grants more credit
//! as it takes items. Items flow as plain messages on the data subject, at
//! most the granted credit ahead of the consumer. Both sides send
//! keepalives while the stream is open, so that either notices when the
//! other is gone.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Header on non-item messages of a data subject: `end`, `error` (body:
/// the message) or `keepalive`. Items carry no headers.
pub(crate) const HEADER_STREAM: &str = "Flame-Stream";

/// Items a consumer lets the producer send ahead: the most in flight.
pub(crate) const WINDOW: u32 = 16;

/// Interval of keepalives, both ways.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(1);

/// Silence after which the other side counts as gone.
pub(crate) const SILENCE: Duration = Duration::from_secs(5);

/// How long an offered stream waits to be opened before it is dropped (the
/// call that carried it may have failed before anyone read it).
pub(crate) const OPEN_WAIT: Duration = Duration::from_secs(60);

/// What a consumer sends to a producer's address (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum Control {
    /// Start sending to `data`, up to `credit` items ahead (a request; the
    /// producer's side answers `ok`, or `gone` for an unknown stream).
    Open { data: String, credit: u32 },
    /// `n` more items may be sent.
    Credit { n: u32 },
    /// Still reading.
    Keepalive,
    /// Stop: the consumer dropped the stream.
    Cancel,
    /// To a sink (the address of a `Sender` that was sent away): the
    /// stream at `address` carries the messages sent on it; open it (a
    /// request, answered like `open`).
    Offer { address: String },
}

/// What a message on a data subject is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Item,
    End,
    Error,
    Keepalive,
}

impl Frame {
    pub(crate) fn as_header(&self) -> Option<&'static str> {
        match self {
            Frame::Item => None,
            Frame::End => Some("end"),
            Frame::Error => Some("error"),
            Frame::Keepalive => Some("keepalive"),
        }
    }

    /// Reads a message's frame from its `Flame-Stream` header.
    pub(crate) fn of(message: &async_nats::Message) -> Option<Frame> {
        let value = message
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_STREAM).map(|v| v.as_str().to_string()));
        match value.as_deref() {
            None => Some(Frame::Item),
            Some("end") => Some(Frame::End),
            Some("error") => Some(Frame::Error),
            Some("keepalive") => Some(Frame::Keepalive),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_as_tagged_json() {
        for c in [
            Control::Open {
                data: "_INBOX.x".into(),
                credit: 16,
            },
            Control::Credit { n: 8 },
            Control::Keepalive,
            Control::Cancel,
            Control::Offer {
                address: "_INBOX.y.s.3".into(),
            },
        ] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Control>(&json).unwrap(), c);
        }
        assert_eq!(
            serde_json::to_string(&Control::Credit { n: 8 }).unwrap(),
            r#"{"type":"credit","n":8}"#
        );
        for f in [Frame::End, Frame::Error, Frame::Keepalive] {
            let mut h = async_nats::HeaderMap::new();
            h.insert(HEADER_STREAM, f.as_header().unwrap());
            let m = async_nats::Message {
                subject: "s".into(),
                reply: None,
                payload: bytes::Bytes::new(),
                headers: Some(h),
                status: None,
                description: None,
                length: 0,
            };
            assert_eq!(Frame::of(&m), Some(f));
        }
    }
}
