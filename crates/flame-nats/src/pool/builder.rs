//! Describing a pool and starting it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use flame_core::{Backend, Error, LocalBackend, RemoteFn};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{booting, orphans, reports, runners, Pool, PoolInner};
use crate::boot::Booter;
use crate::boot::{Hooks, PoolChange};
use crate::config::PoolConfig;
use crate::fleet::Fleet;
use crate::parent::ParentContext;
use crate::protocol::pool_events::POOLS_INFO_SUBJECT;
use crate::protocol::reports::{ReportKey, ReportKind};
use crate::protocol::sign::CallKey;
use crate::protocol::subjects;

/// Longest wait for the server's answer when checking that it took the
/// pool's subscriptions.
const PERMISSION_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds and starts a [`Pool`]. Get one from [`crate::Flame::pool`].
#[derive(Debug)]
#[must_use = "a pool builder does nothing until .start().await"]
pub struct PoolBuilder {
    parent: Arc<ParentContext>,
    config: PoolConfig,
    backend: Option<Arc<dyn Backend>>,
    hooks: Hooks,
    /// Shared pools: the secret calls are signed with, instead of
    /// `FLAME_SECRET`.
    secret: Option<Secret>,
}

/// A shared pool's secret; `Debug` does not show it.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$name = value;
            self
        }
    )*};
}

impl PoolBuilder {
    pub(crate) fn new(parent: Arc<ParentContext>, name: String) -> PoolBuilder {
        PoolBuilder {
            parent,
            config: PoolConfig::new(name),
            backend: None,
            hooks: Hooks::default(),
            secret: None,
        }
    }

    /// Shared pools: the secret that signs calls to the pool's runners,
    /// instead of the `FLAME_SECRET` environment variable. Every parent of
    /// the pool must use the same one: a parent with another secret cannot
    /// call the runners that parents with the right one booted (its calls
    /// fail with `Error::Unauthenticated`). Private pools need none: each
    /// of their runners gets its own key from its parent. Never logged.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(Secret(secret.into()));
        self
    }

    setters! {
        /// Runners kept up at all times (default 0).
        min: usize,
        /// Most runners booted or booting (default 1).
        max: usize,
        /// Concurrent calls per runner (default 100).
        max_concurrency: usize,
        /// Default timeout of a call, waiting for a runner included (default 30 s).
        timeout: Duration,
        /// Limit for a runner to boot and report ready (default 30 s).
        boot_timeout: Duration,
        /// After a permanent boot failure, calls that need a new runner
        /// fail at once with it for this long (default 5 s); see
        /// [`PoolConfig::boot_cooldown`].
        boot_cooldown: Duration,
        /// A runner with no work for this long stops (default 30 s).
        idle_shutdown_after: Duration,
        /// Drain time for in-flight work when a runner stops (default 30 s).
        shutdown_timeout: Duration,
        /// A runner that cannot reach NATS and its parent this soon after
        /// starting exits (default 20 s).
        failsafe_timeout: Duration,
        /// A runner keeps serving this long after it last heard from its
        /// parent (default 5 s).
        parent_grace: Duration,
        /// Interval of runner liveness pings; a runner silent for two
        /// intervals counts as down (default 1.5 s).
        heartbeat: Duration,
        /// Each runner takes one call or cast, then stops (default false).
        single_use: bool,
        /// Share the pool with every parent on the NATS server that uses
        /// this name, coordinated through the KV bucket `flame-<name>`
        /// (default false).
        shared: bool,
        /// Shared pools: replicas of the KV bucket `flame-<name>` when this
        /// parent is the one that creates it (1 to 5, default 1). Use 3 on a
        /// JetStream cluster of three or more servers, so the pool survives
        /// the loss of any one of them.
        kv_replicas: usize,
    }

    /// Runs `F` on an idle runner before it stops; it stops only if `F`
    /// returns true, and asks again later otherwise. `F` is a registered
    /// function without arguments, e.g. `#[flame::remote] async fn
    /// may_stop() -> bool`.
    pub fn idle_shutdown_when<F>(mut self) -> Self
    where
        F: RemoteFn<Args = (), Output = bool>,
    {
        self.config.idle_shutdown_check = Some(F::NAME);
        self
    }

    /// Runs `hook` each time the pool starts booting a runner.
    pub fn on_grow_start(mut self, hook: impl Fn(&PoolChange) + Send + Sync + 'static) -> Self {
        self.hooks.on_grow_start = Some(Arc::new(hook));
        self
    }

    /// Runs `hook` each time a boot ends, with its outcome.
    pub fn on_grow_end(mut self, hook: impl Fn(&PoolChange) + Send + Sync + 'static) -> Self {
        self.hooks.on_grow_end = Some(Arc::new(hook));
        self
    }

    /// Runs `hook` each time a ready runner leaves the pool.
    pub fn on_shrink(mut self, hook: impl Fn(&PoolChange) + Send + Sync + 'static) -> Self {
        self.hooks.on_shrink = Some(Arc::new(hook));
        self
    }

    /// Lets the `min` runners stop too after this much idle time (default:
    /// they stay up).
    pub fn min_idle_shutdown_after(mut self, value: Duration) -> Self {
        self.config.min_idle_shutdown_after = Some(value);
        self
    }

    /// Hot start: boots one more runner (within `max`) as soon as the calls
    /// on the ready runners reach `fraction` of their capacity, so that a
    /// burst finds a runner ready instead of waiting for a cold start.
    /// `0.75` boots the next runner when the pool is three quarters busy.
    /// Must be above 0 and at most 1 (checked by `start`). Default: off.
    pub fn hot_start(mut self, fraction: f64) -> Self {
        let percent = (fraction * 100.0).round();
        self.config.hot_start_percent =
            Some(if percent.is_finite() && (0.0..=255.0).contains(&percent) {
                percent as u8
            } else {
                0
            });
        self
    }

    /// Runners send their log lines to this parent, which logs each in its
    /// own subscriber as an event of target `flame::runner` at the line's
    /// level, with fields `pool`, `runner` and `from` (the line's own
    /// target): one stream for local development, or runner logs from Fly
    /// next to the parent's. The app must add [`crate::runner_log_layer`]
    /// to its subscriber (it forwards what that subscriber lets through).
    /// Lines are signed with the runner's event key; forged ones are
    /// dropped. Private pools only (`start` refuses it on a shared pool).
    /// Default false.
    pub fn forward_runner_logs(mut self, on: bool) -> Self {
        self.config.forward_runner_logs = on;
        self
    }

    /// Copies an environment variable of the parent into every runner.
    pub fn forward_env(mut self, var: impl Into<String>) -> Self {
        self.config.forward_env.push(var.into());
        self
    }

    /// Boots runners with this backend (default: [`LocalBackend`]).
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// The settings so far.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Starts the pool and waits until its `min` runners are ready.
    pub async fn start(self) -> Result<Pool, Error> {
        self.config.validate()?;
        let config = self.config;
        let mut forwarded = Vec::new();
        for var in &config.forward_env {
            match std::env::var(var) {
                Ok(v) => forwarded.push((var.clone(), v)),
                Err(_) => {
                    return Err(Error::Config(format!(
                        "pool `{}` forwards {var}, which is not set in the parent",
                        config.name
                    )))
                }
            }
        }
        let backend = self
            .backend
            .unwrap_or_else(|| Arc::new(LocalBackend::new()));
        self.parent
            .runner_nats_url
            .check_reachable_from(&config.name, backend.as_ref())?;
        let shared_key = if config.shared {
            shared_pool_key(&config.name, self.secret.map(|s| s.0), &self.parent)
        } else {
            None
        };
        let booter = Arc::new(Booter::new(
            &self.parent,
            &config,
            backend,
            self.hooks,
            forwarded,
            shared_key,
        ));
        // A subscription or request the server refuses fails the start
        // with Error::PermissionDenied, saying which, rather than leaving a
        // pool whose runners can never report (or a request to time out).
        let permissions = self.parent.events.permissions.clone();
        let pool = &config.name;
        let mark = permissions.mark_about(vec![
            format!("\"flame.{pool}."),
            format!("KV_flame-{pool}\""),
            format!("KV_flame-{pool}."),
            format!("$KV.flame-{pool}."),
            "\"$JS.API.INFO\"".to_string(),
        ]);
        let client = self.parent.client.clone();
        // Runners of a private pool report to this parent; those of a
        // shared pool send no events (they keep a lease in the KV bucket),
        // so a shared pool does not listen for any.
        let events = if config.shared {
            None
        } else {
            let events = client
                .subscribe(subjects::parent_events(
                    &config.name,
                    &self.parent.parent_id,
                ))
                .await
                .map_err(|e| Error::nats("cannot subscribe to runner events", e))?;
            Some(events)
        };
        let closed = CancellationToken::new();
        let fleet = if config.shared {
            let fleet = Fleet::open(
                self.parent.clone(),
                config.clone(),
                booter.clone(),
                closed.clone(),
            );
            Some(Arc::new(permissions.guard(&mark, fleet).await?))
        } else {
            None
        };
        let inner = Arc::new(PoolInner::new(
            config,
            self.parent,
            booter,
            fleet.clone(),
            closed,
        ));
        if let Some(events) = events {
            tokio::spawn(reports::listen(inner.clone(), events));
            tokio::spawn(runners::watch_heartbeats(inner.clone()));
            tokio::spawn(orphans::reap(inner.clone()));
            let subject = subjects::parent_event(
                &inner.config.name,
                &inner.parent.parent_id,
                ReportKind::Ping,
            );
            // No refusal reported for anything sent so far, and this
            // parent answers on its events subject.
            let listening = permissions.guard(&mark, async {
                permissions
                    .check(&client, &mark, PERMISSION_CHECK_TIMEOUT)
                    .await?;
                own_events_answer(&client, subject).await
            });
            if let Err(e) = listening.await {
                inner.closed.cancel();
                inner.listener.stop();
                return Err(e);
            }
        }
        if let Some(fleet) = &fleet {
            let started = async {
                fleet.start(inner.clone()).await?;
                permissions
                    .check(&client, &mark, PERMISSION_CHECK_TIMEOUT)
                    .await
            };
            if let Err(e) = permissions.guard(&mark, started).await {
                inner.closed.cancel();
                return Err(e);
            }
        }
        // Every started pool answers operators' discovery requests (no
        // queue group: each parent answers for its own view).
        let requests = inner
            .parent
            .client
            .subscribe(POOLS_INFO_SUBJECT)
            .await
            .map_err(|e| Error::nats("cannot subscribe to the pools info subject", e))?;
        tokio::spawn(super::info::answer(inner.clone(), requests));
        let pool = Pool::new(inner.clone());
        booting::grow(&inner);
        if inner.config.min > 0 {
            if let Err(e) = booting::wait_min_ready(&inner).await {
                // Nothing of a pool that did not start may run on, even if
                // the app exits right after this error.
                inner.shut_down(Duration::ZERO).await;
                return Err(e);
            }
        }
        info!(pool = %inner.config.name, min = inner.config.min, max = inner.config.max, "pool started");
        Ok(pool)
    }
}

/// The `event_key` of a shared pool's runners, from which the key that
/// signs calls to them derives: from the pool's secret (`secret`, else
/// `FLAME_SECRET`), the same in every parent that has it. Without one, on
/// the embedded nats-server (no other parent can join the pool) a secret of
/// this process's own; elsewhere none, and the pool's calls go unsigned,
/// which a warning says once.
fn shared_pool_key(
    pool: &str,
    secret: Option<String>,
    parent: &ParentContext,
) -> Option<ReportKey> {
    let embedded = parent.embedded.lock().unwrap().is_some();
    choose_shared_key(
        pool,
        secret,
        std::env::var(crate::env::SECRET).ok(),
        embedded,
    )
}

/// [`shared_pool_key`], given the secret set in code, the one in the
/// environment, and whether the parent runs its own nats-server.
fn choose_shared_key(
    pool: &str,
    secret: Option<String>,
    env: Option<String>,
    embedded: bool,
) -> Option<ReportKey> {
    static PROCESS_SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(secret) = secret.or(env).filter(|s| !s.is_empty()) {
        return Some(CallKey::shared_event_key(secret.as_bytes(), pool));
    }
    if embedded {
        let own = PROCESS_SECRET.get_or_init(|| ReportKey::random().to_hex());
        return Some(CallKey::shared_event_key(own.as_bytes(), pool));
    }
    tracing::warn!(
        pool,
        "shared pool `{pool}` has no secret (FLAME_SECRET is not set), so its calls are not signed: \
         any client of the NATS account that may publish to flame.{pool}.runner.* can run its functions; \
         set FLAME_SECRET to the same secret in every parent of the pool"
    );
    None
}

/// Makes sure this parent's runners can reach it: asks its own event
/// subject, where its listener answers anything (a refusal, for a message
/// that is no runner event). Nobody there means the server did not take
/// the subscription (a missing permission, whose report
/// [`crate::connect::Permissions::guard`] then turns into the error).
async fn own_events_answer(client: &async_nats::Client, subject: String) -> Result<(), Error> {
    let request = async_nats::Request::new()
        .payload(bytes::Bytes::new())
        .timeout(Some(PERMISSION_CHECK_TIMEOUT));
    match client.send_request(subject.clone(), request).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => {
            // The violation report normally wins the race; this is for a
            // report that comes late.
            Err(Error::PermissionDenied {
                reason: format!(
                    "the NATS server did not take this parent's subscription to {subject}"
                ),
            })
        }
        // Slow, not refused: the pool can start.
        Err(e) => {
            tracing::debug!("no answer on {subject} at pool start: {e}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What `f` logs, as text.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_shared_pool_without_a_secret_says_so_once_and_never_logs_one() {
        let expected = Some(CallKey::shared_event_key(b"s3cret", "p"));
        let (key, log) = logged(|| choose_shared_key("p", Some("s3cret".into()), None, false));
        assert_eq!((key, log.as_str()), (expected.clone(), ""));
        let (key, log) = logged(|| choose_shared_key("p", None, Some("s3cret".into()), false));
        assert_eq!((key, log.as_str()), (expected.clone(), ""));
        // Set in code wins over the environment.
        let (key, _) =
            logged(|| choose_shared_key("p", Some("s3cret".into()), Some("x".into()), false));
        assert_eq!(key, expected);
        // The embedded server: a secret of the process, the same each time.
        let (key, log) = logged(|| choose_shared_key("p", None, None, true));
        assert!(key.is_some() && log.is_empty(), "{log}");
        assert_eq!(key, choose_shared_key("p", None, None, true));
        // Elsewhere: unsigned, and one warning naming the variable.
        let (key, log) = logged(|| choose_shared_key("p", None, Some(String::new()), false));
        assert_eq!(key, None);
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains("WARN") && log.contains("FLAME_SECRET is not set"),
            "{log}"
        );
        let builder_debug = format!("{:?}", Secret("s3cret".into()));
        assert!(!builder_debug.contains("s3cret"));
    }
}
