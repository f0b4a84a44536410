//! The stream transport of one connection (a parent's or a runner's):
//! producers for the streams this side sends, consumers for those it
//! receives, with credit-based flow control and keepalives
//! ([`crate::protocol::stream`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;

use async_nats::Client;
use flame_core::stream::{
    with_transport, ChannelItem, ItemSender, ItemSink, ItemSource, StreamTransport,
};
use flame_core::Error;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::debug;

use crate::protocol::stream::{Control, OPEN_WAIT, SILENCE, WINDOW};

mod consumer;
mod producer;
mod scope;

use consumer::{Consumer, ReadCount};
use producer::Producer;
use scope::{current_hold, current_scope, scope_ended};
pub(crate) use scope::{holding, scoped, CallStreams, RunnerStreams};

/// Producers by stream id: where control messages for them go.
type Producers = Mutex<HashMap<u64, mpsc::UnboundedSender<Control>>>;

/// Sinks by id: local channels waiting for the stream of their far end,
/// with the scope they end with.
type Sinks = Mutex<HashMap<u64, (ItemSender, Option<CallStreams>)>>;

/// Streams sent and received over one connection.
pub(crate) struct StreamHub {
    client: Client,
    /// `<inbox>.s.`: a stream's address is this plus its id.
    prefix: String,
    producers: Arc<Producers>,
    sinks: Arc<Sinks>,
    next: AtomicU64,
    /// This hub, as the transport its producers encode with.
    me: Weak<StreamHub>,
    /// Streams open now, both ways (a runner with open streams is busy).
    active: Arc<AtomicUsize>,
}

impl std::fmt::Debug for StreamHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHub")
            .field("prefix", &self.prefix)
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl StreamHub {
    /// Subscribes to this side's stream addresses and routes what arrives.
    pub(crate) async fn start(client: &Client) -> Result<Arc<StreamHub>, Error> {
        let prefix = format!("{}.s.", client.new_inbox());
        let mut sub = client
            .subscribe(format!("{prefix}*"))
            .await
            .map_err(|e| Error::nats("cannot subscribe to stream addresses", e))?;
        let hub = Arc::new_cyclic(|me: &Weak<StreamHub>| StreamHub {
            client: client.clone(),
            prefix,
            producers: Arc::new(Mutex::new(HashMap::new())),
            sinks: Arc::new(Mutex::new(HashMap::new())),
            next: AtomicU64::new(1),
            me: me.clone(),
            active: Arc::new(AtomicUsize::new(0)),
        });
        let weak = Arc::downgrade(&hub);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(hub) = weak.upgrade() else {
                    return;
                };
                hub.route(msg).await;
            }
        });
        Ok(hub)
    }

    /// Streams open now, both ways.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    async fn route(&self, msg: async_nats::Message) {
        let id = msg
            .subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|id| id.parse::<u64>().ok());
        let control = serde_json::from_slice::<Control>(&msg.payload).ok();
        let delivered = match (id, control) {
            (Some(id), Some(Control::Offer { address })) => {
                let sink = self.sinks.lock().unwrap().remove(&id);
                match sink {
                    Some((items, scope)) => {
                        self.forward(address, items, scope);
                        true
                    }
                    None => false,
                }
            }
            (Some(id), Some(control)) => self
                .producers
                .lock()
                .unwrap()
                .get(&id)
                .is_some_and(|tx| tx.send(control).is_ok()),
            _ => false,
        };
        if let Some(reply) = msg.reply {
            let answer = if delivered { "ok" } else { "gone" };
            let _ = self.client.publish(reply, answer.into()).await;
        }
    }
}

impl StreamHub {
    /// Opens the stream at `address` for a sink's local channel, whose
    /// reader reads it straight (so that its items wait nowhere else, and
    /// credit goes back as that reader takes them). If the local end is
    /// gone, dropping the stream cancels it.
    fn forward(&self, address: String, items: ItemSender, scope: Option<CallStreams>) {
        let stream = self.consume_in(address, scope);
        let _ = items.send(ChannelItem::Splice(stream));
    }
}

impl StreamTransport for StreamHub {
    fn produce(&self, source: ItemSource) -> String {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.producers.lock().unwrap().insert(id, tx);
        let scope = current_scope();
        let source = match self.me.upgrade() {
            // Items are encoded as they are polled: with this hub current,
            // for senders inside them (which end with this stream's scope).
            Some(hub) => {
                let transport: Arc<dyn StreamTransport> = hub;
                let mut source = source;
                let scope = scope.clone();
                futures::stream::poll_fn(move |cx| {
                    with_transport(&transport, || {
                        scoped(scope.clone(), || source.poll_next_unpin(cx))
                    })
                })
                .boxed()
            }
            None => source,
        };
        let producer = Producer {
            client: self.client.clone(),
            control: rx,
            source,
            active: Active::new(&self.active),
            scope,
            _hold: current_hold(),
        };
        // A producer removes its own entry when it ends.
        let producers: Weak<Producers> = Arc::downgrade(&self.producers);
        tokio::spawn(async move {
            producer.run().await;
            if let Some(producers) = producers.upgrade() {
                producers.lock().unwrap().remove(&id);
            }
        });
        format!("{}{id}", self.prefix)
    }

    fn consume(&self, address: String) -> ItemSink {
        self.consume_in(address, current_scope())
    }

    fn sink(&self, items: ItemSender) -> String {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let scope = current_scope();
        self.sinks
            .lock()
            .unwrap()
            .insert(id, (items, scope.clone()));
        // A far end that never shows up (its call failed first) must not
        // leave the local end waiting for ever.
        let sinks = Arc::downgrade(&self.sinks);
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = tokio::time::sleep(OPEN_WAIT) => Error::Stream(format!(
                    "the other end of this channel was never opened within {OPEN_WAIT:?} (its call failed?)"
                )),
                e = scope_ended(&scope) => e,
            };
            let unclaimed = sinks.upgrade().and_then(|s| s.lock().unwrap().remove(&id));
            if let Some((items, _)) = unclaimed {
                let _ = items.send(ChannelItem::End(why));
            }
        });
        format!("{}{id}", self.prefix)
    }

    fn offer(&self, sink_address: String, source: ItemSource) {
        self.offer_source(sink_address, source)
    }
}

impl StreamHub {
    /// Opens the stream at `address`, ending it with `scope`.
    fn consume_in(&self, address: String, scope: Option<CallStreams>) -> ItemSink {
        // Room for the whole window and the end.
        let (tx, rx) = mpsc::channel(WINDOW as usize + 1);
        let taken = Arc::new(ReadCount::default());
        let consumer = Consumer {
            client: self.client.clone(),
            address,
            tx,
            active: Active::new(&self.active),
            scope,
            taken: taken.clone(),
        };
        tokio::spawn(consumer.run());
        let hold = current_hold();
        let mut rx = rx;
        futures::stream::poll_fn(move |cx| {
            let _ = &hold;
            let item = rx.poll_recv(cx);
            if let Poll::Ready(Some(Ok(_))) = &item {
                // Credit goes back as the reader takes items, not as they
                // arrive: nothing more than the window waits unread.
                taken.count.fetch_add(1, Ordering::SeqCst);
                taken.wake.notify_one();
            }
            item
        })
        .boxed()
    }

    fn offer_source(&self, sink_address: String, source: ItemSource) {
        let address = self.produce(source);
        let client = self.client.clone();
        tokio::spawn(async move {
            let body = serde_json::to_vec(&Control::Offer { address })
                .expect("control messages serialize");
            let request = async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(SILENCE));
            match client.send_request(sink_address, request).await {
                Ok(answer) if &answer.payload[..] == b"ok" => {}
                // The producer gives up unopened after OPEN_WAIT, and then
                // the sender's `send` fails.
                Ok(_) => debug!("the channel's receiving end is gone"),
                Err(e) => debug!("cannot offer a channel's stream: {e}"),
            }
        });
    }
}

/// Counts a stream as open while alive.
pub(super) struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(count: &Arc<AtomicUsize>) -> Active {
        count.fetch_add(1, Ordering::SeqCst);
        Active(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
