//! Connecting to NATS.

use std::time::Duration;

use flame_core::Error;

/// Environment variable with the NATS server URL (the `nats` CLI's
/// convention).
pub const NATS_URL_ENV: &str = "NATS_URL";

/// Connects, turning failures into [`Error::NatsUnreachable`].
pub(crate) async fn connect(
    url: &str,
    name: String,
    timeout: Duration,
) -> Result<async_nats::Client, Error> {
    let unreachable = |reason: String| Error::NatsUnreachable {
        url: url.to_string(),
        reason,
    };
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout)
        // Keep requests bounded by our own deadlines, not the client's 10 s.
        .request_timeout(None);
    tokio::time::timeout(timeout, options.connect(url))
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))
}
