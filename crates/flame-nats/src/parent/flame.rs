//! The entry point: become a runner, or connect as a parent and make pools.

use std::sync::Arc;
use std::time::Duration;

use flame_core::{Error, Registry, States};

use super::build_id::build_id;
use super::context::{ParentContext, RunnerUrl};
use super::replies::Replies;
use crate::connect::embedded::NatsServer;
use crate::connect::{
    connect_watched, options_from_env_and, without_credentials, ConnectHook, Mark, UrlCredentials,
};
use crate::pool::builder::PoolBuilder;
use crate::protocol::bootstrap::ParentInfo;
use crate::protocol::subjects;
use crate::stream_hub::StreamHub;

/// Sets up flame in `main`: [`serve_if_runner`], then
/// [`FlameBuilder::connect`] with the default settings.
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

/// Serves as a runner if this process is one, else returns `Ok(())` at once.
///
/// In a runner (the `FLAME_PARENT` variable is set) it serves calls until
/// the runner is told to stop and then exits the process: it never returns.
/// Call it first in `main`, before setup that only a parent needs (starting
/// its own nats-server, reading its config, binding a web server), then
/// connect with [`FlameBuilder::connect`]:
///
/// ```no_run
/// # async fn app() -> Result<(), flame_core::Error> {
/// flame_nats::serve_if_runner().await?;            // runners stop here
/// let server = flame_nats::embedded::NatsServer::start()?;   // parent-only setup
/// let flame = flame_nats::FlameBuilder::new()
///     .nats_url(server.url())
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
pub async fn serve_if_runner() -> Result<(), Error> {
    FlameBuilder::new().serve_if_runner().await
}

/// Settings for [`init`] and [`FlameBuilder::connect`].
#[derive(Clone, Default)]
pub struct FlameBuilder {
    nats_url: Option<String>,
    runner_nats_url: Option<String>,
    connect_timeout: Option<Duration>,
    build_id: Option<String>,
    states: States,
    nats_options: Option<ConnectHook>,
}

impl std::fmt::Debug for FlameBuilder {
    /// Shows the URL without credentials, and no option values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlameBuilder")
            .field(
                "nats_url",
                &self.nats_url.as_deref().map(without_credentials),
            )
            .field(
                "runner_nats_url",
                &self.runner_nats_url.as_deref().map(without_credentials),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("build_id", &self.build_id)
            .field("states", &self.states)
            .field(
                "nats_options",
                &self.nats_options.as_ref().map(|_| "<hook>"),
            )
            .finish()
    }
}

impl FlameBuilder {
    /// Default settings.
    pub fn new() -> FlameBuilder {
        FlameBuilder::default()
    }

    /// Uses this NATS server (overrides `NATS_URL`): one URL, or several
    /// separated by commas (`nats://a:4222,nats://b:4222`). A user and
    /// password or a token written in it (`nats://user:password@host`,
    /// `nats://token@host`) are used in place of `NATS_USER`/
    /// `NATS_PASSWORD` and `NATS_TOKEN`. Runners get the same URL without
    /// them, unless [`FlameBuilder::runner_nats_url`] says otherwise, and
    /// the credentials in [`crate::env::NATS_URL_CREDENTIALS`].
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.nats_url = Some(url.into());
        self
    }

    /// The NATS server runners connect to, when they reach it at another
    /// address than the parent (overrides `FLAME_RUNNER_NATS_URL`; default:
    /// the parent's URL). Runners on other machines (a Fly Machine, say)
    /// cannot reach a loopback address: a pool on such a backend refuses
    /// to start when runners would be told one, unless it was set here or
    /// in `FLAME_RUNNER_NATS_URL` on purpose. Credentials written in it
    /// are handed to runners (in [`crate::env::NATS_URL_CREDENTIALS`]) in place
    /// of the parent URL's.
    pub fn runner_nats_url(mut self, url: impl Into<String>) -> Self {
        self.runner_nats_url = Some(url.into());
        self
    }

    /// Adjusts the NATS connection options, in the parent and in every
    /// runner alike (both run `main`): credentials, TLS, reconnect
    /// settings, anything `async_nats::ConnectOptions` offers. It runs
    /// after the options the conventional environment sets (`NATS_CREDS`,
    /// `NATS_NKEY`, `NATS_USER`/`NATS_PASSWORD`, `NATS_TOKEN`, `NATS_CA`,
    /// `NATS_CERT`/`NATS_KEY`, `NATS_TLS_FIRST`; see the README), so it
    /// can add to them or replace them. flame sets the connection's name,
    /// timeouts, reconnect pacing and event callback after it.
    ///
    /// ```no_run
    /// # async fn app() -> Result<(), flame_core::Error> {
    /// let flame = flame_nats::FlameBuilder::new()
    ///     .nats_options(|o| o.require_tls(true).ping_interval(std::time::Duration::from_secs(10)))
    ///     .init()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn nats_options(
        mut self,
        hook: impl Fn(async_nats::ConnectOptions) -> async_nats::ConnectOptions + Send + Sync + 'static,
    ) -> Self {
        self.nats_options = Some(std::sync::Arc::new(hook));
        self
    }

    /// The options to connect with: the environment's (with the
    /// credentials of the URL in place of `NATS_USER`/`NATS_PASSWORD` and
    /// `NATS_TOKEN`), `inbox_prefix` if given, then the hook.
    async fn connect_options(
        &self,
        inbox_prefix: Option<String>,
        url_credentials: Option<&UrlCredentials>,
    ) -> Result<async_nats::ConnectOptions, Error> {
        let mut options = options_from_env_and(url_credentials).await?;
        if let Some(prefix) = inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        Ok(match &self.nats_options {
            Some(hook) => hook(options),
            None => options,
        })
    }

    /// How long to try to connect (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Uses this build id instead of [`crate::build_id()`] (which is
    /// `FLAME_BUILD_ID` or the executable's GNU build id or hash). Runners
    /// check theirs against it on every call, so runners must be given the
    /// same id, e.g. `FLAME_BUILD_ID` in their environment (a backend's
    /// `env`).
    pub fn build_id(mut self, id: impl Into<String>) -> Self {
        self.build_id = Some(id.into());
        self
    }

    /// Gives remote functions `value`: a function (or inline block) that
    /// takes `State<T>` receives a clone of it on the runner. Build it in
    /// `main` before [`FlameBuilder::init`], as parent and runner both run
    /// `main`; one value per type. A function whose state is missing stops
    /// `init` with [`Error::MissingState`], in parent and runner alike.
    ///
    /// ```no_run
    /// use flame_core::State;
    ///
    /// #[derive(Clone)]
    /// struct Config { greeting: String }
    ///
    /// # async fn app() -> Result<(), flame_core::Error> {
    /// let config = Config { greeting: "hello".into() };
    /// let flame = flame_nats::FlameBuilder::new().state(config).init().await?;
    /// # Ok(()) }
    /// ```
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// [`FlameBuilder::serve_if_runner`], then [`FlameBuilder::connect`].
    /// See [`init`].
    pub async fn init(self) -> Result<Flame, Error> {
        self.serve_if_runner().await?;
        self.connect().await
    }

    /// [`serve_if_runner`] with this builder's state: serves as a runner
    /// if this process is one (and never returns), else returns `Ok(())`.
    pub async fn serve_if_runner(&self) -> Result<(), Error> {
        let Ok(value) = std::env::var(crate::env::PARENT) else {
            // Refuse duplicate names and missing state before anything runs,
            // in parent and runner.
            Registry::global()?.check_states(&self.states)?;
            return Ok(());
        };
        let prepared = async {
            Registry::global()?.check_states(&self.states)?;
            let info = ParentInfo::from_env_value(&value)?;
            // The runner's own inboxes (replies to its requests, its
            // streams) are under a prefix of its pool, so that a runner's
            // NATS user can be allowed to read those and no other replies.
            let inbox = subjects::runner_inbox_prefix(&info.pool);
            // Handed over by the parent, which took them out of the URL.
            let credentials = match UrlCredentials::handed_over()? {
                Some(credentials) => Some(credentials),
                None => UrlCredentials::from_url(&info.nats_url)?,
            };
            let options = self
                .connect_options(Some(inbox), credentials.as_ref())
                .await?;
            Ok::<_, Error>((info, options, credentials))
        };
        match prepared.await {
            Ok((info, options, credentials)) => {
                let code =
                    crate::runner::serve(info, self.states.clone(), options, credentials).await;
                // `exit` runs no destructor: send the spans still buffered.
                #[cfg(feature = "otel")]
                crate::otel::flush();
                std::process::exit(code);
            }
            Err(e) => {
                // Whatever the app does with the error, the parent learns
                // why this runner did not start.
                crate::runner::report_start_failure(&e);
                Err(e)
            }
        }
    }

    /// Connects as a parent. A runner must call [`serve_if_runner`] (or
    /// [`init`]) instead: in a process with `FLAME_PARENT` set this fails
    /// with [`Error::Config`].
    pub async fn connect(self) -> Result<Flame, Error> {
        Registry::global()?.check_states(&self.states)?;
        if std::env::var_os(crate::env::PARENT).is_some() {
            return Err(Error::Config(
                "this process is a runner (FLAME_PARENT is set): call flame::serve_if_runner() \
                 (or flame::init()) first in main, before connecting as a parent"
                    .into(),
            ));
        }
        let timeout = self.connect_timeout.unwrap_or(Duration::from_secs(5));
        let (nats_url, embedded) = match self.nats_url.clone().or_else(|| {
            std::env::var(crate::env::NATS_URL)
                .ok()
                .filter(|u| !u.is_empty())
        }) {
            Some(url) => (url, None),
            None => {
                let server = tokio::task::spawn_blocking(NatsServer::start)
                    .await
                    .map_err(|e| Error::EmbeddedServer {
                        reason: "the task starting nats-server failed".into(),
                        source: Some(flame_core::Source::new(e)),
                    })??;
                tracing::info!(url = %server.url(), "started a private nats-server (set NATS_URL to use your own)");
                (server.url(), Some(server))
            }
        };
        let credentials = UrlCredentials::from_url(&nats_url)?;
        let options = self.connect_options(None, credentials.as_ref()).await?;
        let parent_id = uuid::Uuid::new_v4().simple().to_string();
        let build_id: Arc<str> = match self.build_id {
            Some(id) => id.into(),
            // Hashing the executable (when it has no GNU build id) reads it
            // whole: off the async threads.
            None => tokio::task::spawn_blocking(build_id)
                .await
                .unwrap_or("unknown")
                .into(),
        };
        let (client, events) = connect_watched(
            &nats_url,
            format!("flame parent {parent_id}"),
            timeout,
            options,
            credentials.as_ref(),
        )
        .await?;
        let replies = Replies::start(
            &client,
            without_credentials(&nats_url),
            events.disconnects.clone(),
        )
        .await?;
        let refused = Arc::downgrade(&replies);
        events.permissions.on_violation(move |violation| {
            if let Some(replies) = refused.upgrade() {
                replies.publish_refused(violation);
            }
        });
        let streams = StreamHub::start(&client).await?;
        // The server took both subscriptions (a user without them would
        // get no reply to any call).
        events
            .permissions
            .check(
                &client,
                &Mark::default(),
                timeout.min(Duration::from_secs(2)),
            )
            .await?;
        flame_core::stream::set_default_transport(streams.clone());
        let given = self.runner_nats_url.or_else(|| {
            std::env::var(crate::env::RUNNER_NATS_URL)
                .ok()
                .filter(|u| !u.is_empty())
        });
        // Runners get the runners' URL's credentials, else the parent's,
        // in a variable of their own: never in FLAME_PARENT.
        let runner_credentials = match &given {
            Some(url) => UrlCredentials::from_url(url)?,
            None => None,
        }
        .or(credentials)
        .map(|c| c.for_runners());
        let runner_nats_url = RunnerUrl {
            explicit: given.is_some(),
            url: without_credentials(given.as_deref().unwrap_or(&nats_url)),
            credentials: runner_credentials,
        };
        let announcer = crate::ops::Announcer::start(
            client.clone(),
            parent_id.as_str().into(),
            build_id.clone(),
        );
        Ok(Flame {
            parent: Arc::new(ParentContext {
                announcer,
                client,
                runner_nats_url,
                // (Shown in errors and to the app: never with credentials.)
                nats_url: without_credentials(&nats_url),
                parent_id,
                build_id,
                events,
                replies,
                streams,
                embedded: std::sync::Mutex::new(embedded),
            }),
        })
    }
}

/// A connected parent. Make pools with [`Flame::pool`]; close it with
/// [`Flame::close`] (or drop it).
#[derive(Debug, Clone)]
pub struct Flame {
    parent: Arc<ParentContext>,
}

impl Flame {
    /// Starts describing a pool named `name` (ASCII letters, digits, `-`, `_`).
    pub fn pool(&self, name: impl Into<String>) -> PoolBuilder {
        PoolBuilder::new(self.parent.clone(), name.into())
    }

    /// The NATS client, for your own use.
    pub fn client(&self) -> &async_nats::Client {
        &self.parent.client
    }

    /// The NATS server address this parent connected to, without
    /// credentials (runners use it too, unless `runner_nats_url` says
    /// otherwise).
    pub fn nats_url(&self) -> &str {
        &self.parent.nats_url
    }

    /// This parent's id, as it appears in subjects.
    pub fn parent_id(&self) -> &str {
        &self.parent.parent_id
    }

    /// This process's build id.
    pub fn build_id(&self) -> &str {
        &self.parent.build_id
    }

    /// Closes this parent (every clone of it): flushes and closes the NATS
    /// connection, then stops the embedded nats-server if this `Flame`
    /// started one. Shut your pools down first ([`crate::Pool::shutdown`]):
    /// calls made afterwards fail. Closing twice is harmless.
    pub async fn close(&self) {
        self.parent.closing();
        if let Err(e) = self.parent.client.drain().await {
            tracing::debug!("closing the NATS connection: {e}");
        }
        let server = self.parent.embedded.lock().unwrap().take();
        if let Some(mut server) = server {
            tokio::task::spawn_blocking(move || server.stop())
                .await
                .ok();
        }
    }
}
