//! A parent's or runner's connection, watched: what it learns about its
//! connection ([`ConnectionEvents`]: disconnections, reconnections,
//! outages, refusals).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use flame_core::Error;

use crate::connect::credentials::UrlCredentials;
use crate::connect::dial::connect_with;
use crate::connect::outages::Outages;
use crate::connect::permissions::Permissions;

/// What a parent learns about its connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionEvents {
    /// Counts disconnections: calls in flight when it changes fail at once
    /// (their replies are lost) instead of waiting for their deadline.
    pub(crate) disconnects: watch::Receiver<u64>,
    /// Woken on every (re)connection, e.g. to recreate KV watches or to
    /// restart heartbeat clocks.
    pub(crate) connected: Arc<Notify>,
    /// Set when this side closes the connection on purpose: losing it is
    /// then expected and not worth a warning.
    pub(crate) closing: Arc<AtomicBool>,
    /// When the connection was last (re)established.
    pub(crate) last_connected: Arc<Mutex<Option<Instant>>>,
    /// Subscriptions and publishes the server refused.
    pub(crate) permissions: Permissions,
    /// Outages of the connection so far.
    pub(crate) outages: Arc<Mutex<Outages>>,
}

/// Connects with `options`, turning failures into
/// [`Error::NatsUnreachable`]; reports connection events and outages, and
/// watches for permission violations.
pub(crate) async fn connect_watched(
    url: &str,
    name: String,
    timeout: Duration,
    options: async_nats::ConnectOptions,
    url_credentials: Option<&UrlCredentials>,
) -> Result<(async_nats::Client, ConnectionEvents), Error> {
    let (tx, disconnects) = watch::channel(0u64);
    let connected = Arc::new(Notify::new());
    let closing = Arc::new(AtomicBool::new(false));
    let last_connected = Arc::new(Mutex::new(None));
    let outages = Arc::new(Mutex::new(Outages::default()));
    let permissions = Permissions::default();
    let (notify, quiet, at) = (connected.clone(), closing.clone(), last_connected.clone());
    let outs = outages.clone();
    let watch = permissions.clone();
    let options = options.event_callback(move |event| {
        // Read first, before the event is recorded: a reconnection made on
        // purpose (the runner's start) clears the flag as soon as it is.
        let on_purpose = quiet.load(Ordering::SeqCst);
        watch.record(&event);
        if matches!(event, async_nats::Event::Disconnected) && !on_purpose {
            // Not an outage when dropped on purpose: calls were not lost.
            outs.lock().unwrap().disconnected();
        }
        let (tx, notify, at) = (tx.clone(), notify.clone(), at.clone());
        let outs = outs.clone();
        async move {
            match event {
                async_nats::Event::Disconnected => {
                    if on_purpose {
                        tracing::debug!("disconnected from NATS");
                    } else {
                        tracing::warn!("lost the connection to NATS; reconnecting");
                    }
                    tx.send_modify(|n| *n += 1);
                }
                async_nats::Event::Connected => {
                    tracing::info!("connected to NATS");
                    let now = Instant::now();
                    *at.lock().unwrap() = Some(now);
                    outs.lock().unwrap().reconnected();
                    notify.notify_waiters();
                }
                _ => {}
            }
        }
    });
    let client = connect_with(url, name, timeout, options, url_credentials).await?;
    Ok((
        client,
        ConnectionEvents {
            disconnects,
            connected,
            closing,
            last_connected,
            outages,
            permissions,
        },
    ))
}
