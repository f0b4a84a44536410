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

use std::cell::RefCell;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{codec, Error};

/// Bytes per chunk of [`Stream::from_reader`]: 128 KiB.
pub const CHUNK_SIZE: usize = 128 * 1024;

/// A message's place in its channel's bound ([`channel`]): given back
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

/// The source of a channel's receiving end: the messages sent here, and
/// those of its senders that went elsewhere. It ends when every sender is
/// gone.
fn channel_source(mut rx: tokio::sync::mpsc::UnboundedReceiver<ChannelItem>) -> ItemSource {
    let mut here_done = false;
    let mut spliced: Vec<ItemSink> = Vec::new();
    futures::stream::poll_fn(move |cx| {
        while !here_done {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(ChannelItem::Message(encode, taken))) => {
                    return Poll::Ready(Some(encode().map(|bytes| (bytes, Some(taken)))))
                }
                Poll::Ready(Some(ChannelItem::End(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(ChannelItem::Splice(sink))) => spliced.push(sink),
                Poll::Ready(None) => here_done = true,
                Poll::Pending => break,
            }
        }
        let mut i = 0;
        while i < spliced.len() {
            match spliced[i].poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => {
                    return Poll::Ready(Some(item.map(|bytes| (bytes.to_vec(), None))))
                }
                Poll::Ready(None) => {
                    drop(spliced.swap_remove(i));
                }
                Poll::Pending => i += 1,
            }
        }
        if here_done && spliced.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .boxed()
}

/// Moves stream items between parent and runner. Implemented by the
/// runtime; backend authors never need it.
pub trait StreamTransport: Send + Sync + 'static {
    /// Offers `source` to one consumer; returns the address it is opened
    /// at. The items flow once a consumer opens it.
    fn produce(&self, source: ItemSource) -> String;
    /// Opens the stream offered at `address`.
    fn consume(&self, address: String) -> ItemSink;
    /// Waits for one stream to be offered at the returned address (by
    /// [`StreamTransport::offer`] on the other side), and forwards its
    /// items into `items`.
    fn sink(&self, items: ItemSender) -> String;
    /// Offers `source` to the sink at `sink_address`, whose owner opens it.
    fn offer(&self, sink_address: String, source: ItemSource);
}

thread_local! {
    static TRANSPORT: RefCell<Option<Arc<dyn StreamTransport>>> = const { RefCell::new(None) };
}

/// The transport of this process's flame connection, for streams and
/// channels used outside a call's encoding (a `Sender` sending a message
/// that holds another `Sender`, say).
static DEFAULT_TRANSPORT: std::sync::RwLock<Option<Arc<dyn StreamTransport>>> =
    std::sync::RwLock::new(None);

/// Makes `transport` the one used where no call is being encoded or
/// decoded. Used by the runtime when it connects.
pub fn set_default_transport(transport: Arc<dyn StreamTransport>) {
    *DEFAULT_TRANSPORT.write().unwrap() = Some(transport);
}

/// Runs `f` with `transport` as the current stream transport: encoding or
/// decoding a [`Stream`] inside `f` uses it. Used by the runtime.
pub fn with_transport<R>(transport: &Arc<dyn StreamTransport>, f: impl FnOnce() -> R) -> R {
    let previous = TRANSPORT.with(|t| t.replace(Some(transport.clone())));
    // Restored even if `f` panics (the runner catches panics and serves on).
    struct Restore(Option<Arc<dyn StreamTransport>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            TRANSPORT.with(|t| *t.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

fn current_transport() -> Option<Arc<dyn StreamTransport>> {
    TRANSPORT
        .with(|t| t.borrow().clone())
        .or_else(|| DEFAULT_TRANSPORT.read().unwrap().clone())
}

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
        Reader(tokio_util::io::StreamReader::new(chunks))
    }
}

/// The chunks of a [`Stream<Bytes>`] as `Reader` reads them.
type ByteChunks =
    Pin<Box<dyn futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>>;

/// A [`Stream<Bytes>`] read as an `AsyncRead` (and `AsyncBufRead`): made
/// by [`Stream::into_reader`].
pub struct Reader(tokio_util::io::StreamReader<ByteChunks, Bytes>);

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reader")
    }
}

impl tokio::io::AsyncRead for Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncBufRead for Reader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().0).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.0).consume(amt)
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

/// Messages sent on a [`channel`] and not yet read before its senders
/// wait, wherever its ends are.
const CHANNEL_CAPACITY: usize = 16;

/// A channel's local queue and its bound.
fn local_channel() -> (ItemSender, Arc<tokio::sync::Semaphore>, ItemSource) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let bound = Arc::new(tokio::sync::Semaphore::new(CHANNEL_CAPACITY));
    (tx, bound, channel_source(rx))
}

/// A channel whose ends can be sent to a runner (or back): what one side
/// sends on the [`Sender`] arrives on the [`Stream`], wherever each end is.
/// Either end may be an argument of a remote call (the other stays here),
/// or be sent inside a message on another channel (a reply address for a
/// request, say).
///
/// At most 16 messages wait at once, wherever the ends are: `send` waits
/// while 16 messages sent on the channel are not yet read by its receiving
/// end (those on their way over NATS, or waiting on the other side,
/// included).
///
/// ```no_run
/// # async fn demo() -> Result<(), flame_core::Error> {
/// let (tx, mut rx) = flame_core::stream::channel::<String>();
/// tx.send("hello".to_string()).await?;
/// # Ok(()) }
/// ```
pub fn channel<T>() -> (Sender<T>, Stream<T>) {
    let (tx, bound, source) = local_channel();
    (
        Sender {
            tx: Mutex::new(Some((tx, bound))),
            _item: std::marker::PhantomData,
        },
        Stream {
            inner: Mutex::new(Inner::Local(source)),
            _item: std::marker::PhantomData,
        },
    )
}

/// The sending end of a [`channel`].
pub struct Sender<T> {
    /// `None` once sent away (to a runner, or back); with the channel's
    /// bound.
    tx: Mutex<Option<(ItemSender, Arc<tokio::sync::Semaphore>)>>,
    _item: std::marker::PhantomData<fn(T)>,
}

impl<T: Serialize + Send + 'static> Sender<T> {
    /// Sends a message, waiting while 16 sent messages are not yet read.
    /// Fails with [`Error::Stream`] when the receiving end is gone.
    pub async fn send(&self, message: T) -> Result<(), Error> {
        let (tx, bound) = self
            .tx
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Error::Stream("this sender was sent away".into()))?;
        let gone = || Error::Stream("the receiving end of the channel is gone".into());
        let taken = tokio::select! {
            taken = bound.acquire_owned() => taken.map_err(|_| gone())?,
            // (A reader that went away gives every place back, but may
            // have taken none.)
            _ = tx.closed() => return Err(gone()),
        };
        let encode: Encoder = Box::new(move || {
            codec::encode(&message)
                .map_err(|e| Error::Stream(format!("cannot encode a message: {e}")))
        });
        tx.send(ChannelItem::Message(encode, taken))
            .map_err(|_| gone())
    }

    /// Ends the channel with an error, which the receiving end reads as its
    /// last item ([`Error::Stream`]).
    pub async fn fail(self, message: impl fmt::Display) {
        let tx = self.tx.lock().unwrap().take();
        if let Some((tx, _)) = tx {
            let _ = tx.send(ChannelItem::End(Error::Stream(message.to_string())));
        }
    }
}

impl<T> Clone for Sender<T> {
    /// Another sender on the same channel (while this one is here).
    fn clone(&self) -> Self {
        Sender {
            tx: Mutex::new(self.tx.lock().unwrap().clone()),
            _item: std::marker::PhantomData,
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let here = self.tx.lock().unwrap().is_some();
        f.debug_struct("Sender").field("here", &here).finish()
    }
}

/// How a sender travels: the address its messages are offered to.
#[derive(Serialize, Deserialize)]
struct SenderWire {
    flame_sender: String,
}

impl<T> Serialize for Sender<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let Some(transport) = current_transport() else {
            return Err(S::Error::custom(
                "a flame::Sender can only be sent within a flame call",
            ));
        };
        let (tx, _) = self
            .tx
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| S::Error::custom("this flame::Sender was already sent"))?;
        SenderWire {
            flame_sender: transport.sink(tx),
        }
        .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Sender<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let wire = SenderWire::deserialize(deserializer)?;
        let transport = current_transport().ok_or_else(|| {
            D::Error::custom("a flame::Sender can only be received within a flame call")
        })?;
        let (tx, bound, source) = local_channel();
        transport.offer(wire.flame_sender, source);
        Ok(Sender {
            tx: Mutex::new(Some((tx, bound))),
            _item: std::marker::PhantomData,
        })
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
    fn a_local_channel_delivers_in_order_and_reports_a_gone_receiver() {
        futures::executor::block_on(async {
            let (tx, mut rx) = channel::<u32>();
            tx.send(1).await.unwrap();
            tx.send(2).await.unwrap();
            assert_eq!(rx.next().await.unwrap().unwrap(), 1);
            assert_eq!(rx.next().await.unwrap().unwrap(), 2);
            drop(rx);
            assert!(matches!(tx.send(3).await, Err(Error::Stream(_))));
            let (tx, rx) = channel::<u32>();
            tx.fail("no more").await;
            let got: Vec<_> = rx.collect().await;
            assert!(matches!(&got[..], [Err(Error::Stream(m))] if m == "no more"));
        });
    }

    #[test]
    fn a_byte_stream_reads_as_an_async_read_with_its_error_last() {
        use tokio::io::AsyncReadExt;
        let chunks = vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
            Err("cut off"),
        ];
        let mut reader = Stream::try_new(futures::stream::iter(chunks)).into_reader();
        let (text, error) = futures::executor::block_on(async {
            let mut text = vec![0u8; 11];
            reader.read_exact(&mut text).await.unwrap();
            let error = reader.read_u8().await.unwrap_err();
            (text, error)
        });
        assert_eq!(text, b"hello world");
        assert_eq!(error.kind(), std::io::ErrorKind::Other);
        let inner = error.get_ref().and_then(|e| e.downcast_ref::<Error>());
        assert!(
            matches!(inner, Some(Error::Stream(m)) if m == "cut off"),
            "{error:?}"
        );
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
