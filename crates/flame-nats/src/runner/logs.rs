//! The runner's side of log forwarding (`PoolBuilder::forward_runner_logs`):
//! a `tracing` layer the app adds to its subscriber, which in a runner whose
//! parent asked for them passes each log event to a task that sends them in
//! signed batches to the parent. Anywhere else the layer does nothing.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::field::{Field, Visit};
use tracing::{debug, Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::protocol::logs::{LogBatch, LogLine, HEADER_PROOF};
use crate::protocol::reports::ReportKey;

/// Lines waiting to be sent; more are dropped (and counted) rather than
/// make the app wait for NATS.
const QUEUE: usize = 4096;
/// Most lines in one batch.
const BATCH: usize = 256;
/// How long a batch waits for more lines after its first.
const LINGER: Duration = Duration::from_millis(20);

/// Where the layer puts lines, once a runner forwards its logs.
struct Sink {
    tx: mpsc::Sender<LogLine>,
    dropped: AtomicU64,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// A `tracing` layer that forwards a runner's log events to its parent when
/// the pool asks for it (`PoolBuilder::forward_runner_logs`); in a parent,
/// or in a runner of a pool that did not ask, it does nothing.
///
/// Add it to the subscriber the app sets up in `main` (parent and runners
/// both run `main`). It forwards the events the subscriber lets through:
/// put it under the same filter as the app's output.
///
/// ```no_run
/// use tracing_subscriber::prelude::*;
///
/// tracing_subscriber::registry()
///     .with(tracing_subscriber::EnvFilter::new("info"))
///     .with(tracing_subscriber::fmt::layer())
///     .with(flame_nats::runner_log_layer()) // flame::runner_log_layer() in an app
///     .init();
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RunnerLogLayer {
    _private: (),
}

/// The layer that forwards a runner's logs to its parent; see
/// [`RunnerLogLayer`].
pub fn runner_log_layer() -> RunnerLogLayer {
    RunnerLogLayer::default()
}

impl<S: Subscriber> Layer<S> for RunnerLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(sink) = SINK.get() else {
            return;
        };
        let meta = event.metadata();
        // Not the forwarding's own work (sending a batch must not make the
        // next one).
        if meta.target().starts_with("async_nats") || meta.target() == module_path!() {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let line = LogLine {
            level: meta.level().to_string(),
            target: meta.target().to_string(),
            message: text.message + &text.fields,
        };
        if sink.tx.try_send(line).is_err() {
            sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An event's message and its other fields as ` name=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

/// Sends the lines the layer collects; stopped with [`Forwarder::finish`].
pub(super) struct Forwarder {
    finish: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding this process's log lines to `subject`. `None` if
    /// this process forwards already (one runner per process).
    pub(super) fn start(
        client: async_nats::Client,
        subject: String,
        runner: String,
        key: ReportKey,
    ) -> Option<Forwarder> {
        let (tx, rx) = mpsc::channel(QUEUE);
        SINK.set(Sink {
            tx,
            dropped: AtomicU64::new(0),
        })
        .ok()?;
        let (finish, finished) = oneshot::channel();
        let task = tokio::spawn(send_batches(client, subject, runner, key, rx, finished));
        Some(Forwarder {
            finish: Some(finish),
            task,
        })
    }

    /// Sends what is still waiting, within a second.
    pub(super) async fn finish(mut self) {
        if let Some(finish) = self.finish.take() {
            let _ = finish.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.task).await;
    }
}

async fn send_batches(
    client: async_nats::Client,
    subject: String,
    runner: String,
    key: ReportKey,
    mut rx: mpsc::Receiver<LogLine>,
    mut finished: oneshot::Receiver<()>,
) {
    let mut seq = 0;
    loop {
        let mut lines = Vec::new();
        let stopping = tokio::select! {
            line = rx.recv() => match line {
                Some(line) => {
                    lines.push(line);
                    false
                }
                None => true,
            },
            _ = &mut finished => true,
        };
        if !stopping {
            // A little while for the lines that come with it.
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while lines.len() < BATCH {
                tokio::select! {
                    line = rx.recv() => match line {
                        Some(line) => lines.push(line),
                        None => break,
                    },
                    _ = &mut linger => break,
                }
            }
        } else {
            while let Ok(line) = rx.try_recv() {
                lines.push(line);
            }
        }
        let dropped = SINK
            .get()
            .map_or(0, |s| s.dropped.swap(0, Ordering::Relaxed));
        if !lines.is_empty() || dropped > 0 {
            seq += 1;
            let batch = LogBatch {
                runner: runner.clone(),
                seq,
                dropped,
                lines,
            };
            let body = serde_json::to_vec(&batch).unwrap_or_default();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(HEADER_PROOF, key.prove_logs(&body).as_str());
            if let Err(e) = client
                .publish_with_headers(subject.clone(), headers, Bytes::from(body))
                .await
            {
                debug!("cannot forward log lines: {e}");
            }
        }
        if stopping {
            let _ = client.flush().await;
            return;
        }
    }
}
