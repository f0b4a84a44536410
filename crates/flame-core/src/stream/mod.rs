//! Streams as arguments and results of remote calls: a file sent to a
//! runner chunk by chunk, results sent back as they are made.
//!
//! A [`Stream<T>`] made on one side (from any `futures::Stream`, or from an
//! `AsyncRead` for bytes) and passed as an argument or returned as a result
//! arrives on the other side as a `futures::Stream` of `Result<T, Error>`.
//! Nothing is buffered whole: items flow as the receiver takes them, with a
//! few in flight at most (flow control), so memory stays bounded whatever
//! the size.
//!
//! The transport is the runtime's business ([`StreamTransport`]); while a
//! call's arguments or result are encoded or decoded the runtime makes it
//! current on the thread, which is how a `Stream` value finds it.

mod channel;
mod items;
mod reader;
mod transport;

pub use channel::{channel, Sender};
pub use items::{error_message, ChannelItem, Encoder, ItemSender, ItemSink, ItemSource, Taken};
pub use reader::Reader;
pub use transport::{set_default_transport, with_transport, StreamTransport};

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::stream::reader::ByteChunks;
use crate::stream::transport::current_transport;
use crate::{codec, Error};

/// Bytes per chunk of [`Stream::from_reader`]: 128 KiB.
pub const CHUNK_SIZE: usize = 128 * 1024;

/// A stream of `T` that can be an argument or the result of a remote call.
///
/// Make one from any stream with [`Stream::new`] (or [`Stream::try_new`]
/// for a fallible one, whose error ends the stream on the receiving side),
/// or from an `AsyncRead` with [`Stream::from_reader`]. Read it as a
/// `futures::Stream` of `Result<T, Error>`: an `Err` (the sender failed,
/// went away, or the receiver could not decode an item) is the last item.
///
/// A `Stream` can be sent once. Dropping the receiving end stops the
/// sender.
///
/// Across a call: the streams and channels of a call whose runner is known
/// to be down end at once with [`Error::RunnerDown`] (else after 5 s
/// without keepalives); those among the arguments of a call that failed
/// end with its error. The call's timeout bounds the call until its result
/// arrives; a stream in the result flows past it for as long as it is read
/// (holding the call's slot until it ends or is dropped).
pub struct Stream<T> {
    inner: Mutex<Inner>,
    _item: std::marker::PhantomData<fn() -> T>,
}

enum Inner {
    /// Made here: not sent yet.
    Local(ItemSource),
    /// Received from the other side, through this transport (current while
    /// its items are decoded, for senders inside them).
    Remote(ItemSink, Arc<dyn StreamTransport>),
    /// Sent away, or read to its end.
    Gone,
}

impl<T> Stream<T> {
    /// A stream of the encoded items of `source` (a channel's receiving
    /// end).
    pub(crate) fn from_source(source: ItemSource) -> Stream<T> {
        Stream {
            inner: Mutex::new(Inner::Local(source)),
            _item: std::marker::PhantomData,
        }
    }
}

impl<T: Serialize + Send + 'static> Stream<T> {
    /// A stream of the items of `items`.
    pub fn new(items: impl futures::Stream<Item = T> + Send + 'static) -> Stream<T> {
        Stream::try_new(items.map(Ok::<T, std::convert::Infallible>))
    }

    /// A stream of the items of `items`; an `Err` ends it, and the receiver
    /// gets it as [`Error::Stream`].
    pub fn try_new<E: fmt::Display>(
        items: impl futures::Stream<Item = Result<T, E>> + Send + 'static,
    ) -> Stream<T> {
        let source = items.map(|item| match item {
            Ok(value) => codec::encode(&value)
                .map(|bytes| (bytes, None))
                .map_err(|e| Error::Stream(format!("cannot encode an item: {e}"))),
            Err(e) => Err(Error::Stream(e.to_string())),
        });
        Stream {
            inner: Mutex::new(Inner::Local(source.boxed())),
            _item: std::marker::PhantomData,
        }
    }
}

impl Stream<Bytes> {
    /// The bytes of `reader`, in chunks of up to [`CHUNK_SIZE`].
    pub fn from_reader(reader: impl tokio::io::AsyncRead + Send + 'static) -> Stream<Bytes> {
        let chunks = tokio_util::io::ReaderStream::with_capacity(reader, CHUNK_SIZE);
        Stream::try_new(chunks)
    }

    /// The stream as an `AsyncRead`, so that `tokio::io::copy` (or any
    /// reader of bytes) can take it whole:
    ///
    /// ```no_run
    /// # async fn demo(video: flame_core::Stream<bytes::Bytes>) -> std::io::Result<()> {
    /// let mut file = tokio::fs::File::create("/tmp/video.mp4").await?;
    /// tokio::io::copy(&mut video.into_reader(), &mut file).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// An error that ends the stream (the sender failed or went away, its
    /// runner is down) is read as an `std::io::Error` of kind `Other`
    /// whose inner error is the [`Error`] (`io::Error::get_ref` and
    /// `downcast` reach it).
    pub fn into_reader(self) -> Reader {
        let chunks: ByteChunks = Box::pin(self.map(|item| item.map_err(std::io::Error::other)));
        Reader::new(chunks)
    }
}

impl<T> fmt::Debug for Stream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*self.inner.lock().unwrap() {
            Inner::Local(_) => "local",
            Inner::Remote(..) => "remote",
            Inner::Gone => "gone",
        };
        f.debug_struct("Stream").field("state", &state).finish()
    }
}

/// How a stream travels inside arguments or results: its address.
#[derive(Serialize, Deserialize)]
struct Wire {
    flame_stream: String,
}

impl<T> Serialize for Stream<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let Some(transport) = current_transport() else {
            return Err(S::Error::custom(
                "a flame::Stream can only be sent as an argument or result of a flame call",
            ));
        };
        let source = match std::mem::replace(&mut *self.inner.lock().unwrap(), Inner::Gone) {
            Inner::Local(source) => source,
            Inner::Remote(sink, _) => {
                // Passed on: forward what arrives.
                sink.map(|item| item.map(|b| (b.to_vec(), None))).boxed()
            }
            Inner::Gone => return Err(S::Error::custom("this flame::Stream was already sent")),
        };
        Wire {
            flame_stream: transport.produce(source),
        }
        .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Stream<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let wire = Wire::deserialize(deserializer)?;
        let transport = current_transport().ok_or_else(|| {
            D::Error::custom("a flame::Stream can only be received in a flame call")
        })?;
        Ok(Stream {
            inner: Mutex::new(Inner::Remote(
                transport.consume(wire.flame_stream),
                transport,
            )),
            _item: std::marker::PhantomData,
        })
    }
}

impl<T: DeserializeOwned + Unpin> futures::Stream for Stream<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut inner = self.inner.lock().unwrap();
        let item = match &mut *inner {
            Inner::Local(source) => match source.poll_next_unpin(cx) {
                // Read: its place in a channel's bound is given back.
                Poll::Ready(Some(Ok((bytes, _taken)))) => Some(decode_item(&bytes)),
                Poll::Ready(Some(Err(e))) => Some(Err(e)),
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            },
            Inner::Remote(sink, transport) => match sink.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    Some(with_transport(transport, || decode_item(&bytes)))
                }
                Poll::Ready(Some(Err(e))) => Some(Err(e)),
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            },
            Inner::Gone => None,
        };
        match item {
            // An error is the last item.
            Some(Err(e)) => {
                *inner = Inner::Gone;
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(value)) => Poll::Ready(Some(Ok(value))),
            None => {
                *inner = Inner::Gone;
                Poll::Ready(None)
            }
        }
    }
}

fn decode_item<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    codec::decode(bytes).map_err(|e| Error::Stream(format!("cannot decode an item: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_stream_reads_as_itself_and_cannot_be_sent_outside_a_call() {
        let mut s = Stream::new(futures::stream::iter(vec![1u32, 2, 3]));
        assert!(codec::encode(&s).is_err(), "no transport, no sending");
        let items: Vec<u32> = futures::executor::block_on(async {
            let mut out = Vec::new();
            while let Some(item) = s.next().await {
                out.push(item.unwrap());
            }
            out
        });
        // The refused send did not take the items.
        assert_eq!(items, vec![1, 2, 3]);
    }

    #[test]
    fn an_error_is_the_last_item() {
        let items = futures::stream::iter(vec![Ok(1u32), Err("broken pipe"), Ok(3)]);
        let s = Stream::try_new(items);
        let got: Vec<Result<u32, Error>> = futures::executor::block_on(s.collect());
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[1], Err(Error::Stream(m)) if m == "broken pipe"));
    }
}
