//! Asking everyone who answers on a subject, for a while.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::error::CliError;

/// Publishes an empty request on `subject` and collects every answer that
/// comes within `wait` (none at all: as soon as the server says nobody
/// listens).
pub(crate) async fn gather(
    client: &async_nats::Client,
    subject: String,
    wait: Duration,
) -> Result<Vec<async_nats::Message>, CliError> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| CliError::nats("cannot subscribe to an inbox", e))?;
    client
        .publish_with_reply(subject.clone(), inbox, bytes::Bytes::new())
        .await
        .map_err(|e| CliError::nats(&format!("cannot ask on {subject}"), e))?;
    client
        .flush()
        .await
        .map_err(|e| CliError::nats(&format!("cannot ask on {subject}"), e))?;
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            break;
        }
        out.push(msg);
    }
    let _ = answers.unsubscribe().await;
    Ok(out)
}

/// The answers that are JSON of type `T` (others are skipped).
pub(crate) fn decoded<T: serde::de::DeserializeOwned>(messages: &[async_nats::Message]) -> Vec<T> {
    messages
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect()
}

/// Returns once the server has processed everything `client` sent so far
/// (a flush only writes it out): a message to a fresh inbox of its own has
/// come back. After it, a subscription made before misses nothing.
pub(crate) async fn round_trip(client: &async_nats::Client) -> Result<(), CliError> {
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| CliError::nats("cannot subscribe to an inbox", e))?;
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .map_err(|e| CliError::nats("cannot reach the server", e))?;
    match tokio::time::timeout(Duration::from_secs(10), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(CliError::Failed(
            "the NATS server did not answer within 10 s".into(),
        )),
    }
}
