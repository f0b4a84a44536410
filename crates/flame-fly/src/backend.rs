//! [`FlyBackend`], the [`Backend`] that boots runners as Machines, and its
//! builder [`FlyBackendBuilder`] (in one file, as the builder makes the
//! backend and the backend hands out the builder: apart, the two files
//! would use each other).

use std::collections::BTreeMap;
use std::time::Duration;

use flame_core::backend::{Backend, BootSpec, Booted, Listed};
use flame_core::{BoxError, Error};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Serialize;
use tokio::time::Instant;
use tracing::debug;

use crate::api::Api;
use crate::env::{API_HOST_ENV, APP_ENV, DEFAULT_API_URL, IMAGE_ENV, REGION_ENV, TOKEN_ENV};
use crate::error::{boot_error, FlyError};
use crate::guest::{sized, Guest};
use crate::stop::{DestroyOnDrop, FlyStopper};

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
            api: Api::new(http, &api_url, &app, token),
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
            let guard = DestroyOnDrop::new(api.clone(), id.clone());
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
                stopper: Box::new(FlyStopper::new(api, id)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
