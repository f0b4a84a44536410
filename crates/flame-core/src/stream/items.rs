//! The items streams and channels carry, as the transport sees them:
//! encoded, each with its place in a channel's bound, and what an error
//! that ends a stream is sent on as.

use std::fmt;

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::Error;

/// A message's place in its channel's bound ([`channel`](super::channel)): given back
/// when its reader takes the message (dropped), wherever the reader is.
pub type Taken = tokio::sync::OwnedSemaphorePermit;

/// Encoded items a producer sends, each with its place in a channel's
/// bound if it came from a channel (the producer keeps it until the reader
/// on the other side took the item); an `Err` ends the stream with that
/// error (sent on as its message: [`error_message`]).
pub type ItemSource = BoxStream<'static, Result<(Vec<u8>, Option<Taken>), Error>>;

/// Encoded items a consumer receives.
pub type ItemSink = BoxStream<'static, Result<Bytes, Error>>;

/// Encodes one message of a channel. Messages are encoded where they are
/// read (in the runtime's stream task when the channel's far end is
/// elsewhere), so that senders inside them use the right connection.
pub type Encoder = Box<dyn FnOnce() -> Result<Vec<u8>, Error> + Send>;

/// What goes into a local channel.
pub enum ChannelItem {
    /// A message sent here, with its place in the channel's bound.
    Message(Encoder, Taken),
    /// The error that ends the channel.
    End(Error),
    /// The messages of a sender that went elsewhere, arriving from there:
    /// read straight from the transport, so that they wait nowhere else.
    Splice(ItemSink),
}

impl fmt::Debug for ChannelItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelItem::Message(..) => f.write_str("Message"),
            ChannelItem::End(e) => f.debug_tuple("End").field(e).finish(),
            ChannelItem::Splice(_) => f.write_str("Splice"),
        }
    }
}

/// Where a local channel's messages go.
pub type ItemSender = tokio::sync::mpsc::UnboundedSender<ChannelItem>;

/// What the other side of a stream is told when `error` ends it: an
/// [`Error::Stream`]'s own message (so that it is not said twice when the
/// reader gets it as an [`Error::Stream`] again), any other error whole.
pub fn error_message(error: &Error) -> String {
    match error {
        Error::Stream(message) => message.clone(),
        other => other.to_string(),
    }
}
