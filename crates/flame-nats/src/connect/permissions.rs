//! What the NATS server refused a connection ([`Permissions`]): the
//! permission violations it reported, told to the operations they concern
//! ([`Mark`]), which then fail at once with `PermissionDenied`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use flame_core::Error;

/// How many permission violations [`Permissions`] keeps.
const KEEP_VIOLATIONS: usize = 16;

/// The permission violations the NATS server reported on one connection
/// (`-ERR 'Permissions Violation for ...'`). The server reports them
/// asynchronously, and the client only through its event callback, so a
/// refused subscription or publish shows here, not where it was made.
#[derive(Debug, Clone, Default)]
pub(crate) struct Permissions {
    inner: Arc<PermissionsInner>,
}

#[derive(Default)]
struct PermissionsInner {
    /// How many violations so far, and the latest ones, numbered from 1.
    seen: Mutex<(u64, std::collections::VecDeque<(u64, String)>)>,
    /// How many times the connection was lost (or dropped on purpose).
    disconnects: std::sync::atomic::AtomicU64,
    /// Woken on every violation and every disconnection.
    reported: Notify,
    /// Told of every violation as it is reported (see
    /// [`Permissions::on_violation`]).
    listeners: Mutex<Vec<ViolationListener>>,
}

/// See [`Permissions::on_violation`].
type ViolationListener = Box<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for PermissionsInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PermissionsInner")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl Permissions {
    /// Takes note of a connection event: a permission violation, or a
    /// disconnection.
    pub(super) fn record(&self, event: &async_nats::Event) {
        match event {
            async_nats::Event::ServerError(error) => self.record_error(error),
            async_nats::Event::Disconnected => {
                self.inner.disconnects.fetch_add(1, Ordering::SeqCst);
                self.inner.reported.notify_waiters();
            }
            _ => {}
        }
    }

    /// Records a server error if it is a permission violation.
    fn record_error(&self, error: &async_nats::ServerError) {
        let async_nats::ServerError::Other(text) = error else {
            return;
        };
        if !text
            .to_ascii_lowercase()
            .starts_with("permissions violation")
        {
            return;
        }
        {
            let mut seen = self.inner.seen.lock().unwrap();
            seen.0 += 1;
            let n = seen.0;
            seen.1.push_back((n, text.clone()));
            if seen.1.len() > KEEP_VIOLATIONS {
                seen.1.pop_front();
            }
        }
        self.inner.reported.notify_waiters();
        tracing::warn!("the NATS server refused: {text}");
        for listener in self.inner.listeners.lock().unwrap().iter() {
            listener(text);
        }
    }

    /// Calls `listener` with the text of every violation reported from now
    /// on (on the client's event task: it must not block).
    pub(crate) fn on_violation(&self, listener: impl Fn(&str) + Send + Sync + 'static) {
        self.inner
            .listeners
            .lock()
            .unwrap()
            .push(Box::new(listener));
    }

    /// A mark for the violations reported from now on that name one of
    /// `about` (parts of subjects, e.g. `flame.thumbs.`): what concerns an
    /// operation starting now, not a late report of an earlier one.
    pub(crate) fn mark_about(&self, about: Vec<String>) -> Mark {
        Mark {
            after: self.inner.seen.lock().unwrap().0,
            about,
        }
    }

    /// The first violation that `mark` covers, as an error.
    pub(crate) fn since(&self, mark: &Mark) -> Option<Error> {
        let seen = self.inner.seen.lock().unwrap();
        seen.1
            .iter()
            .find(|(n, text)| mark.covers(*n, text))
            .map(|(_, reason)| Error::PermissionDenied {
                reason: reason.clone(),
            })
    }

    /// Resolves with the first violation that `mark` covers.
    async fn violated(&self, mark: &Mark) -> Error {
        loop {
            let reported = self.inner.reported.notified();
            tokio::pin!(reported);
            reported.as_mut().enable();
            if let Some(e) = self.since(mark) {
                return e;
            }
            reported.await;
        }
    }

    /// Runs `work`, but fails at once with [`Error::PermissionDenied`] when
    /// the server reports a violation after `mark` meanwhile (a refused
    /// request would otherwise only time out).
    pub(crate) async fn guard<T>(
        &self,
        mark: &Mark,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::select! {
            biased;
            e = self.violated(mark) => Err(e),
            result = work => result,
        }
    }

    /// A request that only this client answers: to a fresh inbox of its
    /// own, which it subscribes to and answers itself. The server deals
    /// with a client's messages in order, so once the request comes back,
    /// the server has reported every violation of what was sent before,
    /// and the client has read those reports.
    ///
    /// Another client of the account subscribed to `_INBOX.>` (or `>`) sees
    /// the request too, but cannot keep it from coming back, nor answer in
    /// our place before our own subscription has it: asking for "no
    /// responders" instead, as this did before, waited the whole timeout
    /// whenever such a client was there. A connection without echo (a
    /// hook's `no_echo`) never hears itself: then the server's
    /// no-responders answer ends the wait, as long as nobody else listens.
    async fn round_trip(
        &self,
        client: &async_nats::Client,
        mark: &Mark,
        timeout: Duration,
    ) -> Result<(), Error> {
        let probe = async {
            let subject = client.new_inbox();
            let mut own = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| Error::nats("cannot subscribe to this connection's inbox", e))?;
            let answer = async {
                while let Some(message) = own.next().await {
                    if let Some(reply) = message.reply {
                        let _ = client.publish(reply, bytes::Bytes::new()).await;
                    }
                }
                std::future::pending::<()>().await
            };
            let request = async_nats::Request::new().timeout(Some(timeout));
            tokio::select! {
                // Any end will do: our own answer, no responders, or the
                // timeout (a slow server).
                _ = client.send_request(subject, request) => {}
                _ = answer => {}
            }
            Ok(())
        };
        self.guard(mark, probe).await
    }

    /// Fails with the first violation after `mark` that the server
    /// reported for what was sent on `client` so far, if the client has
    /// passed it on by the end of two round trips (the client hands reports
    /// to the event callback on a task of its own, which may run late on a
    /// busy machine: a report that comes later is still logged, and still
    /// fails a [`Permissions::guard`] in progress).
    pub(crate) async fn check(
        &self,
        client: &async_nats::Client,
        mark: &Mark,
        timeout: Duration,
    ) -> Result<(), Error> {
        for _ in 0..2 {
            self.round_trip(client, mark, timeout).await?;
        }
        match self.since(mark) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Like [`Permissions::check`], but certain to see every violation of
    /// what was sent on `client` so far: after a round trip it drops the
    /// connection and waits for the client to report that, which the
    /// client does after every report it read before (its events come in
    /// order). The client reconnects at once and makes its subscriptions
    /// again, before anything sent later. Costs a reconnection: for a
    /// runner's start, where a refused subscription would leave a runner
    /// its parents cannot reach.
    pub(crate) async fn settle(
        &self,
        client: &async_nats::Client,
        deadline: tokio::time::Instant,
    ) -> Result<(), Error> {
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let all = Mark::default();
        self.round_trip(client, &all, left().min(Duration::from_secs(2)))
            .await?;
        let disconnects = self.inner.disconnects.load(Ordering::SeqCst);
        client
            .force_reconnect()
            .await
            .map_err(|e| Error::nats("cannot reconnect to NATS", e))?;
        let dropped = async {
            loop {
                let reported = self.inner.reported.notified();
                tokio::pin!(reported);
                reported.as_mut().enable();
                if self.inner.disconnects.load(Ordering::SeqCst) > disconnects {
                    return Ok(());
                }
                reported.await;
            }
        };
        tokio::time::timeout(left(), self.guard(&all, dropped))
            .await
            .map_err(|_| {
                Error::RunnerStart("failsafe: the NATS client did not reconnect in time".into())
            })??;
        match self.since(&all) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Which violations an operation counts as its own (see
/// [`Permissions::mark_about`]). The default covers every violation of the
/// connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Mark {
    /// Violations numbered higher than this.
    after: u64,
    /// Naming one of these; all when empty.
    about: Vec<String>,
}

impl Mark {
    fn covers(&self, n: u64, text: &str) -> bool {
        n > self.after && (self.about.is_empty() || self.about.iter().any(|a| text.contains(a)))
    }
}
