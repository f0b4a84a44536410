//! Channels whose ends can be sent to a runner (or back): [`channel`], its
//! [`Sender`], and the local queue behind them, bounded wherever the ends
//! are.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures::StreamExt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::stream::items::{ChannelItem, Encoder, ItemSender, ItemSink, ItemSource};
use crate::stream::transport::current_transport;
use crate::stream::Stream;
use crate::{codec, Error};

/// Messages sent on a [`channel`] and not yet read before its senders
/// wait, wherever its ends are.
const CHANNEL_CAPACITY: usize = 16;

/// A channel's local queue and its bound.
fn local_channel() -> (ItemSender, Arc<tokio::sync::Semaphore>, ItemSource) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let bound = Arc::new(tokio::sync::Semaphore::new(CHANNEL_CAPACITY));
    (tx, bound, channel_source(rx))
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
        Stream::from_source(source),
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

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

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
}
