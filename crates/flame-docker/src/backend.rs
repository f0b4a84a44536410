//! The backend: boots runner containers, lists and terminates them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, DeviceRequest, HostConfig,
    NetworkConnectRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, StartContainerOptions,
};
use flame_core::backend::{Backend, BootSpec, Booted, Listed};
use flame_core::BoxError;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::api::Api;
use crate::builder::{DockerBackendBuilder, Gpus, Settings};
use crate::error::{boot_error, DockerError};
use crate::exit::{watch_exit, Since};
use crate::own_container::{self, OwnContainer};
use crate::stop::{DockerStopper, RemoveOnDrop};
use crate::{PARENT_LABEL, POOL_LABEL, RUNNER_LABEL, SCOPE_LABEL};

/// Boots runners as Docker containers. Make one with
/// [`DockerBackend::builder`].
#[derive(Clone)]
pub struct DockerBackend {
    pub(crate) api: Api,
    pub(crate) settings: Arc<Settings>,
    /// The parent's container, once found (only looked for when no image
    /// is configured).
    pub(crate) own: Arc<OnceCell<OwnContainer>>,
}

impl std::fmt::Debug for DockerBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerBackend")
            .field("api", &self.api)
            .field("settings", &self.settings)
            .field("own", &self.own.get())
            .finish()
    }
}

/// What every runner container of this backend is made from.
struct Template {
    image: String,
    env: Vec<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    init: Option<bool>,
    network_mode: Option<String>,
    /// Networks to attach beside the network mode's.
    more_networks: Vec<String>,
    scope: String,
}

impl DockerBackend {
    /// Starts building; see [`DockerBackendBuilder`].
    pub fn builder() -> DockerBackendBuilder {
        DockerBackendBuilder::default()
    }

    /// The runners' template: from the settings, and the parent's own
    /// container when no image is configured.
    async fn template(&self) -> Result<Template, DockerError> {
        let s = &self.settings;
        let own = match &s.image {
            Some(_) => None,
            None => Some(
                self.own
                    .get_or_try_init(|| async {
                        let own = own_container::find(&self.api).await?;
                        info!(container = %own.id, image = %own.image, network_mode = ?own.network_mode, networks = ?own.networks, "Docker backend: runners are made from this process's container");
                        Ok::<_, DockerError>(own)
                    })
                    .await?,
            ),
        };
        let own = own.cloned().unwrap_or_default();
        let image = s.image.clone().unwrap_or(own.image);
        let (network_mode, more_networks) = match &s.network {
            Some(network) => (Some(network.clone()), Vec::new()),
            None => {
                let mode = own.network_mode;
                let shares = mode
                    .as_deref()
                    .is_some_and(|m| m == "host" || m == "none" || m.starts_with("container:"));
                let more = if shares {
                    Vec::new()
                } else {
                    own.networks
                        .into_iter()
                        .filter(|n| Some(n) != mode.as_ref())
                        .collect()
                };
                (mode, more)
            }
        };
        // A given command replaces the parent's, keeping the image's
        // entrypoint.
        let (entrypoint, cmd) = match &s.command {
            Some(command) => (None, Some(command.clone())),
            None => (own.entrypoint, own.cmd),
        };
        Ok(Template {
            scope: s
                .scope
                .clone()
                .or(own.compose_project)
                .unwrap_or_else(|| image.clone()),
            image,
            env: own.env,
            entrypoint,
            cmd,
            working_dir: own.working_dir,
            init: own.init,
            network_mode,
            more_networks,
        })
    }

    /// The create request of one runner's container. No `Debug`: its
    /// environment holds the runner's secrets.
    fn create_body(&self, template: &Template, spec: &BootSpec) -> ContainerCreateBody {
        let s = &self.settings;
        // Later settings win: the parent's variables, the backend's, the
        // runner's own.
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for kv in &template.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            env.insert(k.to_string(), v.to_string());
        }
        env.extend(s.env.clone());
        env.extend(spec.env.iter().cloned());
        let labels = HashMap::from([
            (POOL_LABEL.to_string(), spec.pool.clone()),
            (PARENT_LABEL.to_string(), spec.parent_id.clone()),
            (RUNNER_LABEL.to_string(), spec.runner_id.clone()),
            (SCOPE_LABEL.to_string(), template.scope.clone()),
        ]);
        let memory = s.memory_mb.map(|mb| (mb * 1024 * 1024) as i64);
        ContainerCreateBody {
            image: Some(template.image.clone()),
            env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            entrypoint: template.entrypoint.clone(),
            cmd: template.cmd.clone(),
            working_dir: template.working_dir.clone(),
            labels: Some(labels),
            host_config: Some(HostConfig {
                // The Engine removes a runner's container once it exits.
                auto_remove: Some(true),
                init: template.init,
                network_mode: template.network_mode.clone(),
                memory,
                // No swap beyond the memory limit.
                memory_swap: memory,
                nano_cpus: s.cpus.map(|c| (c * 1e9) as i64),
                device_requests: s.gpus.as_ref().map(|g| vec![device_request(g)]),
                binds: (!s.binds.is_empty()).then(|| s.binds.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Creates and starts the container, putting the guard that removes it
    /// into `guard` as soon as it exists.
    async fn create_and_start(
        &self,
        spec: &BootSpec,
        deadline: Option<Instant>,
        guard: &mut Option<RemoveOnDrop>,
    ) -> Result<String, DockerError> {
        let template = self.template().await?;
        let body = self.create_body(&template, spec);
        let name = container_name(&spec.pool, &spec.runner_id);
        let created = self
            .api
            .send("create the runner container", deadline, |docker| {
                let options = CreateContainerOptionsBuilder::new().name(&name).build();
                let body = body.clone();
                async move { docker.create_container(Some(options), body).await }
            })
            .await?;
        let id = created.id;
        *guard = Some(RemoveOnDrop {
            api: self.api.clone(),
            id: id.clone(),
            armed: true,
        });
        debug!(pool = %spec.pool, runner = %spec.runner_id, container = %id, "runner container created");
        for network in &template.more_networks {
            self.api
                .send(
                    "attach the runner container to a network",
                    deadline,
                    |docker| {
                        let request = NetworkConnectRequest {
                            container: id.clone(),
                            ..Default::default()
                        };
                        async move { docker.connect_network(network, request).await }
                    },
                )
                .await?;
        }
        self.api
            .send("start the runner container", deadline, |docker| {
                let id = id.clone();
                async move {
                    docker
                        .start_container(&id, None::<StartContainerOptions>)
                        .await
                }
            })
            .await?;
        Ok(id)
    }
}

/// A device request for `gpus`, as `docker run --gpus` makes it.
fn device_request(gpus: &Gpus) -> DeviceRequest {
    let (count, device_ids) = match gpus {
        Gpus::Count(n) => (Some(i64::from(*n)), None),
        Gpus::All => (Some(-1), None),
        Gpus::Devices(ids) => (None, Some(ids.clone())),
    };
    DeviceRequest {
        count,
        device_ids,
        capabilities: Some(vec![vec!["gpu".to_string()]]),
        ..Default::default()
    }
}

/// `flame-<pool>-<runner>`, with what Docker refuses in a name replaced.
fn container_name(pool: &str, runner_id: &str) -> String {
    format!("flame-{pool}-{runner_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

impl Backend for DockerBackend {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let me = self.clone();
        let deadline = spec.boot_timeout.map(|t| Instant::now() + t);
        async move {
            let since = Since::now();
            // Kept out here, so that a failed or timed-out attempt removes
            // its container before the boot returns.
            let mut guard = None;
            let started = match deadline {
                Some(at) => {
                    tokio::time::timeout_at(at, me.create_and_start(&spec, deadline, &mut guard))
                        .await
                        .unwrap_or_else(|_| {
                            Err(DockerError::TooSlow(spec.boot_timeout.unwrap_or_default()))
                        })
                }
                None => me.create_and_start(&spec, None, &mut guard).await,
            };
            let id = match started {
                Ok(id) => id,
                Err(e) => {
                    if let Some(guard) = guard.take() {
                        guard.remove_now().await;
                    }
                    return Err(boot_error(e));
                }
            };
            if let Some(guard) = guard {
                guard.disarm();
            }
            Ok(Booted {
                handle: id.clone(),
                // The pool learns of the container's end from the Engine at
                // once, not only by missed heartbeats.
                exited: Some(watch_exit(me.api.clone(), id.clone(), since).boxed()),
                stopper: Box::new(DockerStopper { api: me.api, id }),
            })
        }
        .boxed()
    }

    /// True when the runners share the host's network (`network("host")`):
    /// a NATS server on the host's loopback address reaches them.
    fn runners_are_local(&self) -> bool {
        self.settings.network.as_deref() == Some("host")
    }

    /// The pool's containers in this backend's scope, by label, whatever
    /// their state but those being removed.
    fn list(&self, pool: &str) -> BoxFuture<'static, Result<Vec<Listed>, BoxError>> {
        let me = self.clone();
        let pool = pool.to_string();
        async move {
            let scope = me.template().await?.scope;
            let filters = HashMap::from([(
                "label",
                vec![
                    format!("{POOL_LABEL}={pool}"),
                    format!("{SCOPE_LABEL}={scope}"),
                ],
            )]);
            let listed = me
                .api
                .send("list the pool's containers", None, |docker| {
                    let options = ListContainersOptionsBuilder::new()
                        .all(true)
                        .filters(&filters)
                        .build();
                    async move { docker.list_containers(Some(options)).await }
                })
                .await?;
            Ok(listed
                .into_iter()
                .filter(|c| c.state != Some(ContainerSummaryStateEnum::REMOVING))
                .filter_map(|c| {
                    let labels = c.labels.unwrap_or_default();
                    Some(Listed::new(
                        c.id?,
                        labels.get(RUNNER_LABEL)?.clone(),
                        labels.get(PARENT_LABEL).cloned().unwrap_or_default(),
                    ))
                })
                .collect())
        }
        .boxed()
    }

    /// Removes the container by force (killing it first if it runs).
    fn terminate(
        &self,
        handle: &str,
        _runner_id: &str,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let api = self.api.clone();
        let id = handle.to_string();
        async move { api.remove(&id).await.map_err(BoxError::from) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_device_requests_are_as_docker_takes_them() {
        assert_eq!(container_name("thumbs", "a1b2"), "flame-thumbs-a1b2");
        assert_eq!(container_name("my pool/x", "r"), "flame-my-pool-x-r");
        let all = device_request(&Gpus::All);
        assert_eq!(all.count, Some(-1));
        assert_eq!(all.capabilities, Some(vec![vec!["gpu".to_string()]]));
        let some = device_request(&Gpus::Devices(vec!["0".into(), "2".into()]));
        assert_eq!(
            some.device_ids,
            Some(vec!["0".to_string(), "2".to_string()])
        );
        assert_eq!(some.count, None);
    }
}
