//! Connecting to NATS.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use flame_core::Error;

/// Environment variable with the NATS server URL (the `nats` CLI's
/// convention).
pub const NATS_URL_ENV: &str = "NATS_URL";

/// What a parent learns about its connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionEvents {
    /// Counts disconnections: calls in flight when it changes fail at once
    /// (their replies are lost) instead of waiting for their deadline.
    pub(crate) disconnects: tokio::sync::watch::Receiver<u64>,
    /// Woken on every (re)connection, e.g. to recreate KV watches.
    pub(crate) connected: Arc<Notify>,
}

/// Connects, turning failures into [`Error::NatsUnreachable`].
pub(crate) async fn connect(
    url: &str,
    name: String,
    timeout: Duration,
) -> Result<async_nats::Client, Error> {
    connect_with(url, name, timeout, async_nats::ConnectOptions::new()).await
}

/// [`connect`], also reporting connection events.
pub(crate) async fn connect_watched(
    url: &str,
    name: String,
    timeout: Duration,
) -> Result<(async_nats::Client, ConnectionEvents), Error> {
    let (tx, disconnects) = tokio::sync::watch::channel(0u64);
    let connected = Arc::new(Notify::new());
    let notify = connected.clone();
    let options = async_nats::ConnectOptions::new().event_callback(move |event| {
        let (tx, notify) = (tx.clone(), notify.clone());
        async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the connection to NATS; reconnecting");
                    tx.send_modify(|n| *n += 1);
                }
                async_nats::Event::Connected => {
                    tracing::info!("connected to NATS");
                    notify.notify_waiters();
                }
                _ => {}
            }
        }
    });
    let client = connect_with(url, name, timeout, options).await?;
    Ok((
        client,
        ConnectionEvents {
            disconnects,
            connected,
        },
    ))
}

async fn connect_with(
    url: &str,
    name: String,
    timeout: Duration,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, Error> {
    let unreachable = |reason: String| Error::NatsUnreachable {
        url: url.to_string(),
        reason,
    };
    let options = options
        .name(name)
        .connection_timeout(timeout)
        // Keep requests bounded by our own deadlines, not the client's 10 s.
        .request_timeout(None);
    tokio::time::timeout(timeout, options.connect(url))
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))
}
