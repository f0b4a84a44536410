//! Connecting to NATS: server lists, timeouts, and the connection events a
//! parent reacts to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use flame_core::{Error, Source};

/// Environment variable with the NATS server URL (the `nats` CLI's
/// convention): one URL, or several separated by commas.
pub const NATS_URL_ENV: &str = "NATS_URL";

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
}

/// The servers of a URL list: `nats://a:4222, nats://b:4222`.
pub(crate) fn server_list(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
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
    let (tx, disconnects) = watch::channel(0u64);
    let connected = Arc::new(Notify::new());
    let closing = Arc::new(AtomicBool::new(false));
    let last_connected = Arc::new(Mutex::new(None));
    let (notify, quiet, at) = (connected.clone(), closing.clone(), last_connected.clone());
    let options = async_nats::ConnectOptions::new().event_callback(move |event| {
        let (tx, notify, quiet, at) = (tx.clone(), notify.clone(), quiet.clone(), at.clone());
        async move {
            match event {
                async_nats::Event::Disconnected => {
                    if quiet.load(Ordering::SeqCst) {
                        tracing::debug!("disconnected from NATS");
                    } else {
                        tracing::warn!("lost the connection to NATS; reconnecting");
                    }
                    tx.send_modify(|n| *n += 1);
                }
                async_nats::Event::Connected => {
                    tracing::info!("connected to NATS");
                    *at.lock().unwrap() = Some(Instant::now());
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
            closing,
            last_connected,
        },
    ))
}

async fn connect_with(
    url: &str,
    name: String,
    timeout: Duration,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, Error> {
    let unreachable = |reason: String, source: Option<Source>| Error::NatsUnreachable {
        url: url.to_string(),
        reason,
        source,
    };
    let servers = server_list(url);
    if servers.is_empty() {
        return Err(Error::Config(format!(
            "no NATS server in `{url}`; give one URL or a comma-separated list"
        )));
    }
    let options = options
        .name(name)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(timeout)
        // Keep requests bounded by our own deadlines, not the client's 10 s.
        .request_timeout(None);
    tokio::time::timeout(timeout, options.connect(servers))
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}"), None))?
        .map_err(|e| unreachable(e.to_string(), Some(Source::new(e))))
}

/// Pause before a connection attempt: none for the first, then 100 ms more
/// per attempt up to 1 s. (The client's default grows to 4 s; flame wants
/// parents and runners back within a second of the server's return, as
/// they judge each other's silence.)
fn reconnect_delay(attempts: usize) -> Duration {
    let waits = attempts.saturating_sub(1) as u64;
    Duration::from_millis(waits.saturating_mul(100).min(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_split_on_commas() {
        assert_eq!(server_list("nats://a:1"), vec!["nats://a:1"]);
        assert_eq!(
            server_list(" nats://a:1 ,nats://b:2,, "),
            vec!["nats://a:1", "nats://b:2"]
        );
        assert!(server_list(" , ").is_empty());
    }

    #[test]
    fn the_first_attempt_does_not_wait_and_later_ones_wait_at_most_a_second() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(500), Duration::from_secs(1));
    }
}
