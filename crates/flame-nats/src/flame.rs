//! The entry point: connect (or become a runner) and make pools.

use std::sync::Arc;
use std::time::Duration;

use flame_core::{build_id, wire, Error, ParentInfo, Registry};

use crate::connect::{connect_watched, ConnectionEvents, NATS_URL_ENV};
use crate::embedded::NatsServer;
use crate::pool::PoolBuilder;

/// What every pool of one parent shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) client: async_nats::Client,
    pub(crate) nats_url: String,
    pub(crate) parent_id: String,
    pub(crate) build_id: Arc<str>,
    pub(crate) events: ConnectionEvents,
    /// Where replies to this parent's calls arrive.
    pub(crate) replies: Arc<crate::replies::Replies>,
    /// Kept alive as long as any pool uses it.
    _embedded: Option<NatsServer>,
}

/// Sets up flame in `main`.
///
/// In a runner (the `FLAME_PARENT` variable is set) this serves calls until
/// the runner is told to stop, then exits the process: it never returns.
/// In the parent it connects to NATS and returns a [`Flame`] handle.
///
/// The NATS server is, in order: [`FlameBuilder::nats_url`], the `NATS_URL`
/// variable, or a private nats-server started for this process (the embedded
/// default, for development and demos).
///
/// ```no_run
/// # async fn app() -> Result<(), flame_core::Error> {
/// let flame = flame_nats::init().await?;
/// let pool = flame.pool("thumbs").max(4).start().await?;
/// # Ok(()) }
/// ```
pub async fn init() -> Result<Flame, Error> {
    FlameBuilder::new().init().await
}

/// Settings for [`init`].
#[derive(Debug, Clone, Default)]
pub struct FlameBuilder {
    nats_url: Option<String>,
    connect_timeout: Option<Duration>,
    build_id: Option<String>,
}

impl FlameBuilder {
    /// Default settings.
    pub fn new() -> FlameBuilder {
        FlameBuilder::default()
    }

    /// Uses this NATS server (overrides `NATS_URL`).
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.nats_url = Some(url.into());
        self
    }

    /// How long to try to connect (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Uses this build id instead of [`flame_core::build_id`] (which is
    /// `FLAME_BUILD_ID` or a hash of the executable). Runners check theirs
    /// against it on every call.
    pub fn build_id(mut self, id: impl Into<String>) -> Self {
        self.build_id = Some(id.into());
        self
    }

    /// See [`init`].
    pub async fn init(self) -> Result<Flame, Error> {
        // Refuse duplicate names before anything runs.
        Registry::global()?;
        if let Ok(value) = std::env::var(wire::PARENT_ENV) {
            let info = ParentInfo::from_env_value(&value)?;
            let code = crate::runner::serve(info).await;
            std::process::exit(code);
        }
        let timeout = self.connect_timeout.unwrap_or(Duration::from_secs(5));
        let (nats_url, embedded) = match self
            .nats_url
            .or_else(|| std::env::var(NATS_URL_ENV).ok().filter(|u| !u.is_empty()))
        {
            Some(url) => (url, None),
            None => {
                let server = tokio::task::spawn_blocking(NatsServer::start)
                    .await
                    .map_err(|e| Error::EmbeddedServer(e.to_string()))??;
                tracing::info!(url = %server.url(), "started a private nats-server (set NATS_URL to use your own)");
                (server.url(), Some(server))
            }
        };
        let parent_id = uuid::Uuid::new_v4().simple().to_string();
        let build_id: Arc<str> = match self.build_id {
            Some(id) => id.into(),
            None => tokio::task::spawn_blocking(build_id)
                .await
                .map_err(|e| Error::Config(e.to_string()))?
                .into(),
        };
        let (client, events) =
            connect_watched(&nats_url, format!("flame parent {parent_id}"), timeout).await?;
        let replies =
            crate::replies::Replies::start(&client, nats_url.clone(), events.disconnects.clone())
                .await?;
        Ok(Flame {
            shared: Arc::new(Shared {
                client,
                nats_url,
                parent_id,
                build_id,
                events,
                replies,
                _embedded: embedded,
            }),
        })
    }
}

/// A connected parent. Make pools with [`Flame::pool`].
#[derive(Debug, Clone)]
pub struct Flame {
    shared: Arc<Shared>,
}

impl Flame {
    /// Starts describing a pool named `name` (ASCII letters, digits, `-`, `_`).
    pub fn pool(&self, name: impl Into<String>) -> PoolBuilder {
        PoolBuilder::new(self.shared.clone(), name.into())
    }

    /// The NATS client, for your own use.
    pub fn client(&self) -> &async_nats::Client {
        &self.shared.client
    }

    /// The NATS server address in use (runners connect to it too).
    pub fn nats_url(&self) -> &str {
        &self.shared.nats_url
    }

    /// This parent's id, as it appears in subjects.
    pub fn parent_id(&self) -> &str {
        &self.shared.parent_id
    }

    /// This process's build id.
    pub fn build_id(&self) -> &str {
        &self.shared.build_id
    }
}
