//! The stream transport of one connection (a parent's or a runner's):
//! producers for the streams this side sends, consumers for those it
//! receives, with credit-based flow control and keepalives
//! ([`crate::protocol::stream`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Poll;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use flame_core::stream::{
    error_message, with_transport, ChannelItem, ItemSender, ItemSink, ItemSource, StreamTransport,
};
use flame_core::Error;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use crate::protocol::stream::{
    Control, Frame, HEADER_STREAM, KEEPALIVE, OPEN_WAIT, SILENCE, WINDOW,
};

/// Something a stream keeps alive while it is open (a call's slot on the
/// parent, a call's permit on the runner).
type Hold = Arc<dyn std::any::Any + Send + Sync>;

thread_local! {
    static HOLD: std::cell::RefCell<Option<Hold>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` so that streams it offers or opens keep `hold` alive until
/// they end: a stream in a call's result holds the call's resources.
pub(crate) fn holding<R>(hold: Hold, f: impl FnOnce() -> R) -> R {
    let previous = HOLD.with(|h| h.replace(Some(hold)));
    struct Restore(Option<Hold>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            HOLD.with(|h| *h.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

fn current_hold() -> Option<Hold> {
    HOLD.with(|h| h.borrow().clone())
}

/// The streams and channels set up for one call (by its arguments, or by
/// its result): they end together, at once, when the call fails or its
/// runner is known to be down, instead of when the keepalive goes silent.
#[derive(Clone)]
pub(crate) struct CallStreams(Arc<Ending>);

pub(crate) struct Ending {
    function: &'static str,
    /// (One allocation per call and scope, the `Arc`: calls pay for it
    /// whether they have streams or not.)
    ended: AtomicBool,
    wake: tokio::sync::Notify,
    why: OnceLock<Error>,
    /// Some stream or channel took part (most calls have none).
    used: AtomicBool,
}

impl CallStreams {
    pub(crate) fn new(function: &'static str) -> CallStreams {
        CallStreams(Arc::new(Ending {
            function,
            ended: AtomicBool::new(false),
            wake: tokio::sync::Notify::const_new(),
            why: OnceLock::new(),
            used: AtomicBool::new(false),
        }))
    }

    /// Whether any stream or channel was set up in its scope.
    pub(crate) fn used(&self) -> bool {
        self.0.used.load(Ordering::Relaxed)
    }

    /// Ends its streams with `error` (the first error given wins).
    pub(crate) fn end(&self, error: Error) {
        let _ = self.0.why.set(error);
        self.0.ended.store(true, Ordering::SeqCst);
        self.0.wake.notify_waiters();
    }

    /// Ends its streams: `runner`, where the call ran, is down.
    pub(crate) fn runner_down(&self, runner: &str, reason: &str) {
        self.end(Error::RunnerDown {
            function: self.0.function.to_string(),
            runner: runner.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Waits for its end; the error it ended with.
    async fn ended(&self) -> Error {
        loop {
            let woken = self.0.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.0.ended.load(Ordering::SeqCst) {
                break;
            }
            woken.await;
        }
        self.0
            .why
            .get()
            .cloned()
            .unwrap_or_else(|| Error::Stream("its call ended".into()))
    }
}

/// Waits for `scope`'s end, or for ever without one.
async fn scope_ended(scope: &Option<CallStreams>) -> Error {
    match scope {
        Some(scope) => scope.ended().await,
        None => std::future::pending().await,
    }
}

thread_local! {
    static SCOPE: std::cell::RefCell<Option<CallStreams>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` so that the streams and channels it sets up end with `scope`.
pub(crate) fn scoped<R>(scope: Option<CallStreams>, f: impl FnOnce() -> R) -> R {
    let previous = SCOPE.with(|c| c.replace(scope));
    struct Restore(Option<CallStreams>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SCOPE.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

/// The current scope, marked as used.
fn current_scope() -> Option<CallStreams> {
    let scope = SCOPE.with(|c| c.borrow().clone());
    if let Some(scope) = &scope {
        scope.0.used.store(true, Ordering::Relaxed);
    }
    scope
}

/// The streams of the calls on one runner: ended at once when the runner
/// is known to be down.
#[derive(Default, Clone)]
pub(crate) struct RunnerStreams(Arc<Mutex<Following>>);

#[derive(Default)]
struct Following {
    /// Set once the runner is down: (runner, reason).
    down: Option<(String, String)>,
    streams: Vec<Weak<Ending>>,
    /// Length at which ended scopes are next swept out.
    sweep_at: usize,
}

impl std::fmt::Debug for RunnerStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let following = self.0.lock().unwrap();
        f.debug_struct("RunnerStreams")
            .field("following", &following.streams.len())
            .field("down", &following.down.is_some())
            .finish()
    }
}

impl RunnerStreams {
    /// `scope`'s streams end when the runner goes down (at once if it is).
    pub(crate) fn follow(&self, scope: &CallStreams) {
        let mut following = self.0.lock().unwrap();
        if let Some((runner, reason)) = &following.down {
            scope.runner_down(runner, reason);
            return;
        }
        if following.streams.len() >= following.sweep_at {
            following.streams.retain(|w| w.strong_count() > 0);
            following.sweep_at = (following.streams.len() * 2).max(16);
        }
        following.streams.push(Arc::downgrade(&scope.0));
    }

    /// Forgets `scope` (its call went to another runner).
    pub(crate) fn unfollow(&self, scope: &CallStreams) {
        let target = Arc::as_ptr(&scope.0);
        self.0
            .lock()
            .unwrap()
            .streams
            .retain(|w| w.as_ptr() != target);
    }

    /// The runner is down: ends every stream that follows it.
    pub(crate) fn down(&self, runner: &str, reason: &str) {
        let streams = {
            let mut following = self.0.lock().unwrap();
            following.down = Some((runner.to_string(), reason.to_string()));
            std::mem::take(&mut following.streams)
        };
        for ending in streams.iter().filter_map(Weak::upgrade) {
            CallStreams(ending).runner_down(runner, reason);
        }
    }
}

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

/// Items a consumer's reader took since the consumer last looked.
#[derive(Default)]
struct ReadCount {
    count: std::sync::atomic::AtomicU32,
    wake: tokio::sync::Notify,
}

/// Counts a stream as open while alive.
struct Active(Arc<AtomicUsize>);

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

/// Sends the items of one stream, within the credit its consumer grants.
struct Producer {
    client: Client,
    control: mpsc::UnboundedReceiver<Control>,
    source: ItemSource,
    active: Active,
    /// Ends it early: its call failed, or its runner is down.
    scope: Option<CallStreams>,
    /// Kept until the stream ends.
    _hold: Option<Hold>,
}

impl Producer {
    async fn run(mut self) {
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

/// Receives the items of one stream and hands them to its reader, granting
/// credit as the reader takes them.
struct Consumer {
    client: Client,
    address: String,
    tx: mpsc::Sender<Result<Bytes, Error>>,
    active: Active,
    /// Ends it early: its call failed, or its runner is down.
    scope: Option<CallStreams>,
    /// What its reader took, to grant as credit.
    taken: Arc<ReadCount>,
}

impl Consumer {
    async fn run(self) {
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
