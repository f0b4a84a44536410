//! What the NATS server refused this command: a publish or subscription
//! its user may not make. The server reports it asynchronously (`-ERR
//! 'Permissions Violation for Publish to "flame.pools.info"'`) and the
//! client only through its event callback, so a refused request would just
//! go unanswered ("no pool answered") and a refused subscription stay
//! silent. Each command runs its work under [`Refusals::guard`] and ends
//! with `permission denied on <subject>` instead.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::error::CliError;

/// The permission violations the server reported on the connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Refusals {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    seen: Mutex<Vec<String>>,
    reported: Notify,
}

impl Refusals {
    /// `options` with an event callback that records violations.
    pub(crate) fn watch(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        let refusals = self.clone();
        options.event_callback(move |event| {
            if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = &event {
                refusals.record(text);
            }
            async {}
        })
    }

    fn record(&self, text: &str) {
        if !text
            .to_ascii_lowercase()
            .starts_with("permissions violation")
        {
            return;
        }
        self.inner.seen.lock().unwrap().push(text.to_string());
        self.inner.reported.notify_waiters();
    }

    /// The first violation reported, as the command's error.
    pub(crate) fn first(&self) -> Option<CliError> {
        self.inner.seen.lock().unwrap().first().map(|t| denied(t))
    }

    /// Resolves with the first violation reported.
    pub(crate) async fn refused(&self) -> CliError {
        loop {
            let reported = self.inner.reported.notified();
            tokio::pin!(reported);
            reported.as_mut().enable();
            if let Some(e) = self.first() {
                return e;
            }
            reported.await;
        }
    }

    /// Runs `work`, then makes sure the server reported nothing it did:
    /// fails at once with "permission denied" when the server refuses
    /// something meanwhile (a refused request would otherwise go
    /// unanswered until its wait ends), and after it when a round trip
    /// shows a refusal that came late.
    pub(crate) async fn guard<T>(
        &self,
        client: &async_nats::Client,
        work: impl Future<Output = Result<T, CliError>>,
    ) -> Result<T, CliError> {
        let checked = async {
            let value = work.await?;
            // The server answers in order: once a message to our own
            // inbox came back (twice, as the client hands its events to
            // the callback on a task of its own), every refusal of what
            // was sent before has been read.
            for _ in 0..2 {
                crate::gather::round_trip(client).await?;
            }
            Ok(value)
        };
        let value = tokio::select! {
            biased;
            e = self.refused() => return Err(e),
            value = checked => value?,
        };
        match self.first() {
            Some(e) => Err(e),
            None => Ok(value),
        }
    }
}

/// `permission denied on <subject>`, from the server's words.
fn denied(text: &str) -> CliError {
    match quoted_subject(text) {
        Some(subject) => CliError::Failed(format!(
            "permission denied on {subject} (the NATS server refused: {text})"
        )),
        None => CliError::Failed(format!(
            "permission denied (the NATS server refused: {text})"
        )),
    }
}

/// The subject in `Permissions Violation for Publish to "<subject>"`.
fn quoted_subject(text: &str) -> Option<&str> {
    let start = text.find('"')? + 1;
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_subject_is_named() {
        let message = |e: CliError| match e {
            CliError::Failed(m) | CliError::Usage(m) => m,
        };
        let e = denied("Permissions Violation for Publish to \"flame.pools.info\"");
        assert!(message(e).starts_with("permission denied on flame.pools.info (the NATS server refused: Permissions Violation for Publish to \"flame.pools.info\")"));
        let e = denied(
            "Permissions Violation for Subscription to \"flame.*.events.>\" using queue \"q\"",
        );
        assert!(message(e).starts_with("permission denied on flame.*.events.> "));
        let refusals = Refusals::default();
        refusals.record("Slow consumer");
        assert!(refusals.first().is_none());
        refusals.record("Permissions Violation for Publish to \"a\"");
        assert!(refusals.first().is_some());
    }
}
