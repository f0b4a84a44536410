//! Runners as Fly Machines.
//!
//! [`FlyBackend`] boots each runner as a new Machine of your app, running the
//! same image as the parent (`FLY_IMAGE_REF`), with the runner's environment
//! (`FLAME_PARENT` plus the pool's forwarded variables). Machines are created
//! with `auto_destroy: true` and restart policy `no`, so a runner that exits
//! is destroyed by the platform; a runner that stops answering is destroyed
//! through the API.
//!
//! ```no_run
//! # async fn app(flame: flame_nats::Flame) -> Result<(), flame_core::Error> {
//! // Inside a Machine, app, image, region and token come from the environment.
//! let backend = flame_fly::FlyBackend::builder().cpus(1).memory_mb(2048).build()?;
//! let pool = flame.pool("thumbs").max(8).backend(backend).start().await?;
//! # Ok(()) }
//! ```
//!
//! The parent's NATS URL must be reachable from the runners (for instance
//! over Fly's private network).

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use flame_core::backend::{Backend, BootError, BootSpec, Booted, Listed, StopRunner};
use flame_core::backoff::Backoff;
use flame_core::{BoxError, Error};
use futures::future::BoxFuture;
use futures::FutureExt;
use reqwest::StatusCode;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Default Machines API endpoint.
pub const DEFAULT_API_URL: &str = "https://api.machines.dev";

/// Environment variable with the API token.
pub const TOKEN_ENV: &str = "FLY_API_TOKEN";
/// Environment variable with the app name (set inside every Machine).
pub const APP_ENV: &str = "FLY_APP_NAME";
/// Environment variable with the running image (set inside every Machine).
pub const IMAGE_ENV: &str = "FLY_IMAGE_REF";
/// Environment variable with the region (set inside every Machine).
pub const REGION_ENV: &str = "FLY_REGION";
/// Environment variable with the Machines API host, as Fly's own tools
/// read it: a URL (`https://api.machines.dev`) or a bare `host:port`
/// (`_api.internal:4280`, spoken over plain HTTP inside Fly's private
/// network).
pub const API_HOST_ENV: &str = "FLY_API_HOSTNAME";

/// CPU counts Fly offers per kind: shared 1, 2, 4, 8; performance also 16.
const SHARED_CPUS: [u32; 4] = [1, 2, 4, 8];
const PERFORMANCE_CPUS: [u32; 5] = [1, 2, 4, 8, 16];

/// Attempts of one API request before a transient failure is final.
const ATTEMPTS: u32 = 8;

/// First pause between attempts; doubled each time, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(8);

/// Statuses worth another try: rate limited (429), no capacity right now
/// (412), and the API's own troubles (5xx). Anything else (401 bad token,
/// 422 invalid config, ...) is final at once.
fn transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::PRECONDITION_FAILED
        || status.is_server_error()
}

/// The pause before attempt `attempt + 1`: exponential, with jitter (so
/// that many parents do not retry in step), or what `Retry-After` asks.
fn pause(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(wait) = retry_after {
        return wait.min(MAX_PAUSE * 4);
    }
    Backoff::new(FIRST_PAUSE, MAX_PAUSE).pause(attempt)
}

/// Time past `shutdown_timeout` before a stopping Machine is destroyed by
/// force: the runner's own drain takes all of `shutdown_timeout`, and its
/// exit and the platform's bookkeeping come after it.
const STOP_MARGIN: Duration = Duration::from_secs(2);

/// Longest single wait for a Machine to start: a Machine that fails
/// while a wait is held may only be answered at the wait's timeout (Fly
/// does not document what it answers then), so the state is read at least
/// this often.
const WAIT_SLICE: Duration = Duration::from_secs(5);

/// Pause before asking again after a wait that answered at once with an
/// error (not a timeout).
const WAIT_AGAIN_PAUSE: Duration = Duration::from_millis(250);

/// Whole seconds for a wait's `timeout` parameter: `left` rounded up (a
/// wait never ends before what it stands for), within Fly's 1 to 60.
fn wait_secs(left: Duration) -> u64 {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    secs.clamp(1, 60)
}

/// A failed boot as the pool should take it: the API refusing the request
/// as such (bad token, no permission, no such app, an invalid config) or a
/// Machine that failed is permanent; rate limits, no capacity, the API's
/// own errors and a Machine still on its way when time ran out are
/// transient.
fn boot_error(e: FlyError) -> BoxError {
    let permanent = match &e {
        FlyError::Api { status, .. } => matches!(status, 400 | 401 | 403 | 404 | 422),
        FlyError::NotStarted { state, .. } => !matches!(state.as_str(), "created" | "starting"),
        FlyError::Transport(_) | FlyError::Unexpected(_) => false,
    };
    Box::new(if permanent {
        BootError::permanent(e)
    } else {
        BootError::transient(e)
    })
}

/// Runs cleanup that must happen even when whoever started it is gone: on
/// the current runtime, or on a thread of its own when there is none (a
/// pool dropped after its runtime). Returns a future that resolves when it
/// is done; dropping that future does not stop the work.
fn run_detached(
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> BoxFuture<'static, ()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let work = async move {
        work.await;
        let _ = done_tx.send(());
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(work);
        }
        Err(_) => {
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(work),
                    Err(e) => warn!("cannot clean up a Fly Machine: no runtime ({e})"),
                }
            });
        }
    }
    async move {
        let _ = done_rx.await;
    }
    .boxed()
}

/// Destroys a Machine whose boot did not finish, when dropped armed: a
/// boot future dropped mid-way (the pool's boot timeout, a closed pool)
/// still leaves nothing behind.
struct DestroyOnDrop {
    api: Api,
    id: String,
    armed: bool,
}

impl DestroyOnDrop {
    /// Destroys the Machine now and waits for it.
    async fn destroy_now(mut self) {
        self.armed = false;
        if let Err(e) = self.api.destroy(&self.id).await {
            warn!(machine = %self.id, "cannot destroy a Fly Machine that did not start: {e}");
        }
    }

    /// The boot succeeded: the Machine is the runner's now.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let (api, id) = (self.api.clone(), std::mem::take(&mut self.id));
            debug!(machine = %id, "boot abandoned; destroying its Machine");
            drop(run_detached(async move {
                if let Err(e) = api.destroy(&id).await {
                    warn!(machine = %id, "cannot destroy the Machine of an abandoned boot: {e}");
                }
            }));
        }
    }
}

/// Size of a runner Machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Guest {
    /// `shared` or `performance`.
    pub cpu_kind: String,
    /// Number of CPUs.
    pub cpus: u32,
    /// Memory in MB, a multiple of 256.
    pub memory_mb: u32,
    /// GPU model, e.g. `a100-pcie-40gb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_kind: Option<String>,
    /// Number of GPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

/// Builds a [`FlyBackend`]. Unset settings come from the environment a
/// Machine runs in.
#[derive(Clone)]
#[must_use]
pub struct FlyBackendBuilder {
    api_url: Option<String>,
    token: Option<String>,
    app: Option<String>,
    image: Option<String>,
    region: Option<String>,
    guest: Guest,
    /// Set by `cpus` / `memory_mb`; else derived from the CPUs.
    cpus_set: bool,
    memory_set: bool,
    env: BTreeMap<String, String>,
}

impl std::fmt::Debug for FlyBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyBackendBuilder")
            .field("api_url", &self.api_url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("app", &self.app)
            .field("image", &self.image)
            .field("region", &self.region)
            .field("guest", &self.guest)
            .finish_non_exhaustive()
    }
}

impl FlyBackendBuilder {
    /// Machines API base URL (default: `FLY_API_HOSTNAME` if set, else
    /// [`DEFAULT_API_URL`]; inside Fly's private network also
    /// `http://_api.internal:4280`).
    pub fn api_url(mut self, url: impl Into<String>) -> Self {
        self.api_url = Some(url.into());
        self
    }

    /// API token (default: `FLY_API_TOKEN`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// App to create the Machines in (default: `FLY_APP_NAME`).
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = Some(app.into());
        self
    }

    /// Image of the runners (default: `FLY_IMAGE_REF`, the parent's own).
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// Region (default: `FLY_REGION`, the parent's, else Fly's choice).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// `shared` or `performance` CPUs (default `performance`).
    pub fn cpu_kind(mut self, kind: impl Into<String>) -> Self {
        self.guest.cpu_kind = kind.into();
        self
    }

    /// CPUs per runner: 1, 2, 4 or 8 (`shared`), also 16 (`performance`).
    /// Default: as many as this machine has, rounded down to one of those.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.guest.cpus = cpus;
        self.cpus_set = true;
        self
    }

    /// Memory per runner in MB, a multiple of 256 within what Fly allows
    /// for the CPUs: 256 to 2048 per shared CPU, 2048 to 8192 per
    /// performance CPU. Default: 4096, raised to the least the CPUs allow
    /// (2048 per performance CPU, 256 per shared CPU), lowered to the most
    /// they allow.
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.guest.memory_mb = mb;
        self.memory_set = true;
        self
    }

    /// GPUs per runner, e.g. `("a100-pcie-40gb", 1)`.
    pub fn gpus(mut self, kind: impl Into<String>, count: u32) -> Self {
        self.guest.gpu_kind = Some(kind.into());
        self.guest.gpus = Some(count);
        self
    }

    /// Sets an extra variable in every runner.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Checks the settings. Missing token, app or image is an
    /// [`Error::Config`] naming the setting and its variable.
    pub fn build(self) -> Result<FlyBackend, Error> {
        let from_env = |v: Option<String>, var: &str| {
            v.or_else(|| std::env::var(var).ok())
                .filter(|s| !s.trim().is_empty())
        };
        let missing = |what: &str, var: &str, setter: &str| {
            Error::Config(format!(
                "Fly backend: no {what}; set {var} or call FlyBackendBuilder::{setter}"
            ))
        };
        let token = from_env(self.token, TOKEN_ENV)
            .ok_or_else(|| missing("API token", TOKEN_ENV, "token"))?;
        let app = from_env(self.app, APP_ENV).ok_or_else(|| missing("app", APP_ENV, "app"))?;
        let image =
            from_env(self.image, IMAGE_ENV).ok_or_else(|| missing("image", IMAGE_ENV, "image"))?;
        let guest = sized(self.guest, self.cpus_set, self.memory_set)?;
        let api_url = match self.api_url {
            Some(url) => url,
            None => std::env::var(API_HOST_ENV)
                .ok()
                .filter(|h| !h.trim().is_empty())
                .map(|h| api_url_from_host(h.trim()))
                .unwrap_or_else(|| DEFAULT_API_URL.to_string()),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| Error::Config(format!("Fly backend: cannot make an HTTP client: {e}")))?;
        Ok(FlyBackend {
            api: Api {
                http,
                base: format!("{}/v1/apps/{app}/machines", api_url.trim_end_matches('/')),
                token,
            },
            image,
            region: from_env(self.region, REGION_ENV),
            guest,
            env: self.env,
        })
    }
}

/// `FLY_API_HOSTNAME` as a base URL: a bare `host:port` is plain HTTP (the
/// private network's `_api.internal:4280`).
fn api_url_from_host(host: &str) -> String {
    if host.starts_with("http://") || host.starts_with("https://") {
        host.to_string()
    } else {
        format!("http://{host}")
    }
}

/// Checks a guest against the sizes Fly offers, filling in the defaults:
/// unset CPUs are this machine's count rounded down to an offered one, and
/// unset memory is 4096 MB brought within what those CPUs allow. Settings
/// given explicitly are checked, never changed.
fn sized(mut guest: Guest, cpus_set: bool, memory_set: bool) -> Result<Guest, Error> {
    let bad = |msg: String| Err(Error::Config(format!("Fly backend: {msg}")));
    let (offered, per_cpu): (&[u32], (u32, u32)) = match guest.cpu_kind.as_str() {
        "shared" => (&SHARED_CPUS, (256, 2048)),
        "performance" => (&PERFORMANCE_CPUS, (2048, 8192)),
        other => {
            return bad(format!(
                "cpu_kind must be `shared` or `performance`, not `{other}`"
            ))
        }
    };
    if !cpus_set {
        guest.cpus = offered
            .iter()
            .copied()
            .filter(|&n| n <= guest.cpus.max(1))
            .max()
            .unwrap_or(1);
    }
    if !offered.contains(&guest.cpus) {
        return bad(format!(
            "{} CPUs are not offered for cpu_kind `{}`; choose one of {offered:?}",
            guest.cpus, guest.cpu_kind
        ));
    }
    let (least, most) = (per_cpu.0 * guest.cpus, per_cpu.1 * guest.cpus);
    if !memory_set {
        guest.memory_mb = guest.memory_mb.clamp(least, most);
    }
    if guest.memory_mb == 0 || !guest.memory_mb.is_multiple_of(256) {
        return bad(format!(
            "memory_mb must be a multiple of 256, not {}",
            guest.memory_mb
        ));
    }
    if !(least..=most).contains(&guest.memory_mb) {
        return bad(format!(
            "memory_mb {} is outside what {} {} CPU(s) allow: {least} to {most}",
            guest.memory_mb, guest.cpus, guest.cpu_kind
        ));
    }
    Ok(guest)
}

/// Boots runners as Fly Machines. Make one with [`FlyBackend::builder`].
#[derive(Debug, Clone)]
pub struct FlyBackend {
    api: Api,
    image: String,
    region: Option<String>,
    guest: Guest,
    env: BTreeMap<String, String>,
}

impl FlyBackend {
    /// Starts building; see [`FlyBackendBuilder`].
    pub fn builder() -> FlyBackendBuilder {
        FlyBackendBuilder {
            api_url: None,
            token: None,
            app: None,
            image: None,
            region: None,
            guest: Guest {
                cpu_kind: "performance".into(),
                cpus: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                memory_mb: 4096,
                gpu_kind: None,
                gpus: None,
            },
            cpus_set: false,
            memory_set: false,
            env: BTreeMap::new(),
        }
    }
}

// No Debug: the env holds the runner's secrets.
#[derive(Serialize)]
struct CreateMachine<'a> {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    config: MachineConfig<'a>,
}

#[derive(Serialize)]
struct MachineConfig<'a> {
    image: &'a str,
    env: BTreeMap<String, String>,
    guest: &'a Guest,
    auto_destroy: bool,
    restart: Restart,
    metadata: BTreeMap<&'static str, String>,
}

#[derive(Debug, Serialize)]
struct Restart {
    policy: &'static str,
}

impl Backend for FlyBackend {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let mut env = self.env.clone();
        env.extend(spec.env.iter().cloned());
        let body = CreateMachine {
            name: format!("flame-{}-{}", spec.pool, spec.runner_id),
            region: self.region.as_deref(),
            config: MachineConfig {
                image: &self.image,
                env,
                guest: &self.guest,
                // A runner that exits is destroyed by the platform.
                auto_destroy: true,
                restart: Restart { policy: "no" },
                metadata: BTreeMap::from([
                    ("flame_pool", spec.pool.clone()),
                    ("flame_runner", spec.runner_id.clone()),
                    ("flame_parent", spec.parent_id.clone()),
                ]),
            },
        };
        let body = serde_json::to_value(&body).expect("machine config serializes");
        let api = self.api.clone();
        let deadline = spec.boot_timeout.map(|t| Instant::now() + t);
        async move {
            let created = api
                .send_until(|http, base| http.post(base).json(&body), deadline)
                .await
                .map_err(boot_error)?;
            let machine: serde_json::Value = created
                .json()
                .await
                .map_err(|e| boot_error(FlyError::Transport(e)))?;
            let id = machine["id"]
                .as_str()
                // (Not the response itself: it holds the Machine's
                // config, secrets in its environment included.)
                .ok_or_else(|| {
                    boot_error(FlyError::Unexpected(
                        "the created Machine's description has no id".into(),
                    ))
                })?
                .to_string();
            let guard = DestroyOnDrop {
                api: api.clone(),
                id: id.clone(),
                armed: true,
            };
            let instance = machine["instance_id"].as_str().map(str::to_string);
            debug!(pool = %spec.pool, runner = %spec.runner_id, machine = %id, "Fly Machine created");
            // A Machine that cannot start (a broken image, say) fails the
            // boot now, with what the platform says, not at the boot
            // timeout; and it is destroyed before the failure is reported.
            if let Err(e) = api.wait_started(&id, instance.as_deref(), deadline).await {
                guard.destroy_now().await;
                return Err(boot_error(e));
            }
            guard.disarm();
            Ok(Booted {
                handle: id.clone(),
                // The pool learns of the Machine's end from the API at once,
                // not only by missed heartbeats.
                exited: Some(api.clone().watch_exit(id.clone(), instance).boxed()),
                stopper: Box::new(FlyStopper { api, id }),
            })
        }
        .boxed()
    }

    /// Lists the pool's Machines by their `flame_pool` metadata, but those
    /// already destroyed.
    fn list(&self, pool: &str) -> BoxFuture<'static, Result<Vec<Listed>, BoxError>> {
        let api = self.api.clone();
        let pool = pool.to_string();
        async move {
            let listed = api
                .send(|http, base| http.get(base).query(&[("metadata.flame_pool", &pool)]))
                .await?;
            let machines: Vec<serde_json::Value> =
                listed.json().await.map_err(FlyError::Transport)?;
            Ok(machines
                .iter()
                .filter(|m| !matches!(m["state"].as_str(), Some("destroyed" | "destroying")))
                .filter_map(|m| {
                    let meta = &m["config"]["metadata"];
                    Some(Listed::new(
                        m["id"].as_str()?.to_string(),
                        meta["flame_runner"].as_str()?.to_string(),
                        meta["flame_parent"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ))
                })
                .collect())
        }
        .boxed()
    }

    fn terminate(
        &self,
        handle: &str,
        _runner_id: &str,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let api = self.api.clone();
        let id = handle.to_string();
        async move { api.destroy(&id).await.map_err(BoxError::from) }.boxed()
    }
}

struct FlyStopper {
    api: Api,
    id: String,
}

impl StopRunner for FlyStopper {
    /// Sends SIGTERM through the API (the runner drains and exits, and the
    /// platform destroys the Machine), then destroys it by force after
    /// `grace`. The work starts at once on a task of its own (a thread when
    /// there is no runtime, e.g. a pool dropped after its runtime), so it
    /// is done even when the returned future is dropped.
    fn stop(&self, grace: Duration) -> BoxFuture<'static, ()> {
        let (api, id) = (self.api.clone(), self.id.clone());
        run_detached(async move {
            if !grace.is_zero() {
                let body = serde_json::json!({
                    "signal": "SIGTERM",
                    // A duration string (a bare number is read as
                    // nanoseconds), in milliseconds so that no drain time
                    // is rounded away.
                    "timeout": format!("{}ms", grace.as_millis().max(1)),
                });
                let stopped = api
                    .send(|http, base| http.post(format!("{base}/{id}/stop")).json(&body))
                    .await;
                // 409 (not started) or 404 (gone): it has stopped already,
                // which is what was asked.
                let running = match &stopped {
                    Ok(_) => true,
                    Err(FlyError::Api { status, .. }) => *status != 409 && *status != 404,
                    Err(_) => true,
                };
                if stopped.is_ok() && running {
                    // The whole drain, and a margin, before forcing it.
                    api.wait_destroyed(&id, Instant::now() + grace + STOP_MARGIN)
                        .await;
                }
            }
            if let Err(e) = api.destroy(&id).await {
                warn!(machine = %id, "cannot destroy Fly Machine: {e}");
            }
        })
    }
}

/// What went wrong talking to the Machines API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlyError {
    /// The API answered with an error status.
    #[error("Machines API answered {status}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The body of the answer (Fly's error message).
        message: String,
    },
    /// The API could not be reached, or its answer not read.
    #[error("Machines API unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// The API answered something flame does not understand.
    #[error("unexpected answer from the Machines API: {0}")]
    Unexpected(String),
    /// The Machine did not start: it is in `state` (e.g. `failed`), and
    /// the platform said `message`.
    #[error("Fly Machine {machine} did not start: it is {state} ({message})")]
    NotStarted {
        /// The Machine's id.
        machine: String,
        /// Its state.
        state: String,
        /// What the Machines API said when asked to wait for it.
        message: String,
    },
}

#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    /// `<api>/v1/apps/<app>/machines`
    base: String,
    token: String,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Api {
    /// Sends a request. Transient failures (rate limits, no capacity,
    /// 5xx, the API unreachable) are retried with exponential backoff and
    /// jitter, honouring `Retry-After`; any other error is returned at once
    /// with the API's status and message.
    async fn send<F>(&self, make: F) -> Result<reqwest::Response, FlyError>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        self.send_until(make, None).await
    }

    /// [`Api::send`], retrying only while a pause still ends before
    /// `until`.
    async fn send_until<F>(
        &self,
        make: F,
        until: Option<Instant>,
    ) -> Result<reqwest::Response, FlyError>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let mut attempt = 1;
        loop {
            let (error, retry_after) = match self.once(&make).await {
                Ok(response) => return Ok(response),
                Err(failed) => failed,
            };
            let worth_it = match &error {
                FlyError::Transport(e) => e.is_connect() || e.is_timeout(),
                FlyError::Api { status, .. } => StatusCode::from_u16(*status)
                    .map(transient)
                    .unwrap_or(false),
                _ => false,
            };
            let wait = pause(attempt, retry_after);
            let in_time = until.is_none_or(|at| Instant::now() + wait < at);
            if !(worth_it && attempt < ATTEMPTS && in_time) {
                return Err(error);
            }
            debug!(attempt, "Machines API asks to try again: {error}");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One request: the response when it succeeded, else the error with
    /// the `Retry-After` the API asked for.
    async fn once<F>(&self, make: &F) -> Result<reqwest::Response, (FlyError, Option<Duration>)>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let response = make(&self.http, &self.base)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| (FlyError::Transport(e), None))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let message = response.text().await.unwrap_or_default();
        Err((
            FlyError::Api {
                status: status.as_u16(),
                message,
            },
            retry_after,
        ))
    }

    /// The Machine's state (`started`, `failed`, ...), `destroyed` when the
    /// API no longer knows it.
    async fn state(&self, id: &str, until: Option<Instant>) -> Result<String, FlyError> {
        let shown = self
            .send_until(|http, base| http.get(format!("{base}/{id}")), until)
            .await;
        let shown = match shown {
            Ok(shown) => shown,
            Err(FlyError::Api { status: 404, .. }) => return Ok("destroyed".into()),
            Err(e) => return Err(e),
        };
        let machine: serde_json::Value = shown.json().await.map_err(FlyError::Transport)?;
        Ok(machine["state"].as_str().unwrap_or("unknown").to_string())
    }

    /// Waits until the Machine has started, at most until `deadline`; an
    /// error when it cannot (it failed, or was destroyed or stopped
    /// first), or when time runs out while it is still `created` or
    /// `starting`.
    ///
    /// Fly does not document what a wait answers once the Machine has
    /// failed (its CLI matches the words "machine failed to reach desired
    /// state"); so after any wait that does not say "started", the Machine
    /// is read (`GET`) before waiting again, and a Machine in any state
    /// but `created` or `starting` ends the boot at once.
    async fn wait_started(
        &self,
        id: &str,
        instance: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<(), FlyError> {
        let instance = instance
            .map(|i| format!("instance_id={i}&"))
            .unwrap_or_default();
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let secs = wait_secs(left.unwrap_or(WAIT_SLICE).min(WAIT_SLICE));
            let asked = Instant::now();
            let make = |http: &reqwest::Client, base: &str| {
                http.get(format!(
                    "{base}/{id}/wait?{instance}state=started&timeout={secs}"
                ))
            };
            let wait = self.once(&make);
            let waited = match deadline {
                Some(at) => tokio::time::timeout_at(at, wait).await.ok(),
                None => Some(wait.await),
            };
            let message = match waited {
                Some(Ok(_)) => return Ok(()),
                Some(Err((e, _))) => e.to_string(),
                None => "the boot timeout ran out while waiting".to_string(),
            };
            let state = self.state(id, deadline).await?;
            match state.as_str() {
                "started" => return Ok(()),
                "created" | "starting" if deadline.is_none_or(|at| Instant::now() < at) => {
                    debug!(machine = %id, %state, "Machine not started yet: {message}");
                    // A wait refused at once (a rate limit, say) is not
                    // asked again in a tight loop.
                    if asked.elapsed() < WAIT_AGAIN_PAUSE {
                        tokio::time::sleep(WAIT_AGAIN_PAUSE).await;
                    }
                }
                _ => {
                    return Err(FlyError::NotStarted {
                        machine: id.to_string(),
                        state,
                        message,
                    })
                }
            }
        }
    }

    /// Waits until the Machine is destroyed, at most until `until` (a wait
    /// answered otherwise than "destroyed" or its timeout is followed by a
    /// read of the Machine's state).
    async fn wait_destroyed(&self, id: &str, until: Instant) {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let secs = wait_secs(left);
            let asked = Instant::now();
            let make = |http: &reqwest::Client, base: &str| {
                http.get(format!("{base}/{id}/wait?state=destroyed&timeout={secs}"))
            };
            let wait = self.once(&make);
            match tokio::time::timeout_at(until, wait).await {
                Err(_) => return,
                Ok(Ok(_)) => return,
                Ok(Err((FlyError::Api { status: 408, .. }, _))) => continue,
                Ok(Err((FlyError::Api { status: 404, .. }, _))) => return,
                Ok(Err((e, _))) => {
                    debug!(machine = %id, "cannot wait for the Machine's end: {e}");
                    if matches!(
                        self.state(id, Some(until)).await.as_deref(),
                        Ok("destroyed" | "destroying")
                    ) {
                        return;
                    }
                    if asked.elapsed() < WAIT_AGAIN_PAUSE {
                        tokio::time::sleep(WAIT_AGAIN_PAUSE).await;
                    }
                }
            }
        }
    }

    /// Resolves when the Machine is destroyed (its runner exited; Machines
    /// are made with `auto_destroy`), with a reason for the pool, and makes
    /// sure it is gone.
    async fn watch_exit(self, id: String, instance: Option<String>) -> String {
        let instance = instance
            .map(|i| format!("instance_id={i}&"))
            .unwrap_or_default();
        let reason = loop {
            let waited = self
                .http
                .get(format!(
                    "{}/{id}/wait?{instance}state=destroyed&timeout=60",
                    self.base
                ))
                .bearer_auth(&self.token)
                .send()
                .await;
            match waited.map(|r| r.status()) {
                Ok(s) if s.is_success() => {
                    break match self.exit_of(&id).await {
                        Some(exit) => exit,
                        None => format!("Fly Machine {id} was destroyed (its runner exited)"),
                    }
                }
                Ok(StatusCode::NOT_FOUND) => break format!("Fly Machine {id} is gone"),
                // 408: still running after the wait's limit; wait again.
                Ok(StatusCode::REQUEST_TIMEOUT) => {}
                Ok(s) => {
                    debug!(machine = %id, status = %s, "cannot wait for the Machine's end");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    debug!(machine = %id, "cannot wait for the Machine's end: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // Destroyed already, normally; make sure nothing is left.
        if let Err(e) = self.destroy(&id).await {
            warn!(machine = %id, "cannot destroy Fly Machine: {e}");
        }
        reason
    }

    /// How the Machine's runner ended, from its latest `exit` event (`GET`
    /// of the Machine lists its events): out of memory when the kernel's
    /// OOM killer ended it, else its exit code. `None` when the API does
    /// not say.
    async fn exit_of(&self, id: &str) -> Option<String> {
        let shown = self
            .send(|http, base| http.get(format!("{base}/{id}")))
            .await
            .ok()?;
        let machine: serde_json::Value = shown.json().await.ok()?;
        let exit = machine["events"]
            .as_array()?
            .iter()
            .filter(|e| e["type"] == "exit")
            .max_by_key(|e| e["timestamp"].as_i64().unwrap_or(0))?;
        let exit = &exit["request"]["exit_event"];
        // (No code, no claim: "exited with code 0" would read as a clean
        // stop.)
        let code = exit["exit_code"].as_i64()?;
        Some(if exit["oom_killed"].as_bool() == Some(true) {
            format!(
                "Fly Machine {id}: runner process ran out of memory (killed by the OOM killer, exit code {code})"
            )
        } else {
            format!("Fly Machine {id}: runner process exited with code {code}")
        })
    }

    /// Destroys a Machine, running or not. Gone already counts as done.
    async fn destroy(&self, id: &str) -> Result<(), FlyError> {
        let response = self
            .http
            .delete(format!("{}/{id}?force=true", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(FlyError::Transport)?;
        match response.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(FlyError::Api {
                status: s.as_u16(),
                message: response.text().await.unwrap_or_default(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried_with_growing_pauses() {
        assert!(transient(StatusCode::TOO_MANY_REQUESTS));
        assert!(transient(StatusCode::PRECONDITION_FAILED));
        assert!(transient(StatusCode::BAD_GATEWAY));
        assert!(!transient(StatusCode::UNAUTHORIZED));
        assert!(!transient(StatusCode::UNPROCESSABLE_ENTITY));
        assert!(!transient(StatusCode::CONFLICT));
        let first = pause(1, None);
        assert!(
            first >= FIRST_PAUSE && first <= FIRST_PAUSE * 5 / 4,
            "{first:?}"
        );
        assert!(pause(3, None) >= FIRST_PAUSE * 4);
        assert!(pause(30, None) <= MAX_PAUSE * 5 / 4);
        assert_eq!(
            pause(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn missing_settings_are_named() {
        // An empty setting given in code counts as missing and is not
        // replaced from the environment, so this test does not depend on
        // FLY_* variables of the machine it runs on.
        let err = FlyBackend::builder()
            .token("")
            .app("a")
            .image("i")
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no API token") && err.contains(TOKEN_ENV),
            "{err}"
        );
        let ok = FlyBackend::builder()
            .token("secret-token")
            .app("a")
            .image("i");
        assert!(!format!("{ok:?}").contains("secret-token"));
        assert!(!format!("{:?}", ok.clone().build().unwrap()).contains("secret-token"));
        let err = ok.clone().memory_mb(1000).build().unwrap_err().to_string();
        assert!(err.contains("multiple of 256"), "{err}");
        assert!(ok.build().is_ok());
    }

    fn guest(kind: &str, cpus: u32, memory_mb: u32) -> Guest {
        Guest {
            cpu_kind: kind.into(),
            cpus,
            memory_mb,
            gpu_kind: None,
            gpus: None,
        }
    }

    #[test]
    fn default_sizes_are_ones_fly_offers() {
        // Defaults: cores rounded down to an offered count, memory within
        // what those CPUs allow.
        let g = sized(guest("performance", 12, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (8, 16384));
        let g = sized(guest("performance", 2, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (2, 4096));
        let g = sized(guest("shared", 32, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (8, 4096));
        let g = sized(guest("shared", 1, 4096), false, false).unwrap();
        assert_eq!((g.cpus, g.memory_mb), (1, 2048));
        // Explicit settings are checked, not changed.
        let err = sized(guest("performance", 3, 8192), true, true).unwrap_err();
        assert!(
            err.to_string().contains("choose one of [1, 2, 4, 8, 16]"),
            "{err}"
        );
        let err = sized(guest("shared", 1, 4096), true, true).unwrap_err();
        assert!(err.to_string().contains("256 to 2048"), "{err}");
        let err = sized(guest("performance", 4, 4096), true, true).unwrap_err();
        assert!(err.to_string().contains("8192 to 32768"), "{err}");
        let err = sized(guest("gpu", 1, 4096), true, true).unwrap_err();
        assert!(err.to_string().contains("cpu_kind"), "{err}");
    }

    #[test]
    fn api_host_as_fly_tools_give_it() {
        assert_eq!(
            api_url_from_host("_api.internal:4280"),
            "http://_api.internal:4280"
        );
        assert_eq!(
            api_url_from_host("https://api.machines.dev"),
            "https://api.machines.dev"
        );
    }
}
