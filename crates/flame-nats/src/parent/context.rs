//! What every pool of one parent shares: its NATS connection, its identity
//! and its reply multiplexer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::replies::Replies;
use crate::connect::embedded::NatsServer;
use crate::connect::ConnectionEvents;

/// One connected parent, shared by its pools.
pub(crate) struct ParentContext {
    pub(crate) client: async_nats::Client,
    /// The URL (or list) this parent connected to, without credentials.
    pub(crate) nats_url: String,
    /// What runners are told to connect to.
    pub(crate) runner_nats_url: RunnerUrl,
    pub(crate) parent_id: String,
    pub(crate) build_id: Arc<str>,
    pub(crate) events: ConnectionEvents,
    /// Where replies to this parent's calls arrive.
    pub(crate) replies: Arc<Replies>,
    /// Streams this parent sends and receives.
    pub(crate) streams: Arc<crate::stream_hub::StreamHub>,
    /// The private nats-server this parent started, if any; stopped with it.
    pub(crate) embedded: std::sync::Mutex<Option<NatsServer>>,
    /// Publishes its pools' events.
    pub(crate) announcer: crate::ops::Announcer,
}

/// The NATS URL runners connect to (never with credentials), and the
/// credentials that were written in it (or in the parent's), which runners
/// are handed in a variable of their own.
#[derive(Debug, Clone)]
pub(crate) struct RunnerUrl {
    pub(crate) url: String,
    pub(crate) credentials: Option<crate::connect::UrlCredentials>,
    /// Set on purpose (`runner_nats_url`, `FLAME_RUNNER_NATS_URL`), not
    /// just the parent's own URL.
    pub(crate) explicit: bool,
}

impl RunnerUrl {
    /// Refuses a URL that runners on another machine cannot reach.
    pub(crate) fn check_reachable_from(
        &self,
        pool: &str,
        backend: &dyn flame_core::Backend,
    ) -> Result<(), flame_core::Error> {
        if self.explicit || backend.runners_are_local() || !crate::connect::only_loopback(&self.url)
        {
            return Ok(());
        }
        Err(flame_core::Error::Config(format!(
            "pool `{pool}` boots its runners on other machines ({backend:?}), but they would connect to NATS at {}, \
             which only this machine can reach; set FLAME_RUNNER_NATS_URL (or FlameBuilder::runner_nats_url) to \
             an address the runners reach, or NATS_URL to a server both sides reach",
            self.url
        )))
    }
}

impl std::fmt::Debug for ParentContext {
    /// No credentials: the URL is shown without them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParentContext")
            .field(
                "nats_url",
                &crate::connect::without_credentials(&self.nats_url),
            )
            .field("parent_id", &self.parent_id)
            .field("build_id", &self.build_id)
            .finish_non_exhaustive()
    }
}

impl ParentContext {
    /// Whether anyone may still listen on `subject`: false only when NATS
    /// answers a request there with "no responders", which it does at once
    /// for a process whose connection is gone. Used to ask whether a parent
    /// or runner still lives: a private pool's parent answers anything on
    /// its event subjects, shared-pool parents answer on `alive` and
    /// `present`, and a runner subscribes to its control subject (it
    /// ignores the request, so a live one just lets it time out). Unsure (a
    /// timeout, a slow network) counts as yes.
    ///
    /// Only a fast path: another client of the account subscribed to the
    /// subject (a `nats sub '>'`) keeps NATS from ever answering "no
    /// responders", so every answer is then "unsure", and what asked falls
    /// back on what does not need it (a lease going quiet, a runner's own
    /// parent checks), seconds later instead of at once. Nothing waits on
    /// this to start or to serve a call.
    pub(crate) async fn anyone_answers(&self, subject: String, timeout: Duration) -> bool {
        let request = async_nats::Request::new()
            .payload(bytes::Bytes::new())
            .timeout(Some(timeout));
        match self.client.send_request(subject, request).await {
            Ok(_) => true,
            Err(e) => e.kind() != async_nats::client::RequestErrorKind::NoResponders,
        }
    }

    /// True while connected to NATS.
    pub(crate) fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// True when the connection was (re)established less than `window`
    /// ago: runners may still be resubscribing.
    pub(crate) fn reconnected_within(&self, window: std::time::Duration) -> bool {
        self.events
            .last_connected
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() < window)
    }

    /// Marks the connection as closing on purpose, so that losing it is not
    /// reported as a fault.
    pub(crate) fn closing(&self) {
        self.events.closing.store(true, Ordering::SeqCst);
    }
}

impl Drop for ParentContext {
    fn drop(&mut self) {
        // The embedded server stops with us; the client sees it go.
        self.closing();
    }
}
