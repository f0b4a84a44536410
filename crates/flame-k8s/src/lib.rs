//! Runners as Kubernetes Pods, made from the parent's own Pod.
//!
//! [`K8sBackend`] boots each runner as a new Pod in the parent's namespace.
//! Inside a cluster it reads the parent's Pod (named by `POD_NAME` and
//! `POD_NAMESPACE`, which the Deployment sets through the downward API) and
//! makes the runner from it: the app container's image, command, args,
//! env, `envFrom` and volume mounts, the Pod's service account, volumes,
//! pull secrets, security context, node selector and tolerations; not its
//! labels, ports, probes, init containers or sidecars. Each pool can
//! override the image, service account, resources, node selector and
//! tolerations, ask for GPUs, and edit the Pod with a function of its own
//! ([`K8sBackendBuilder`]).
//!
//! ```no_run
//! # async fn app(flame: flame_nats::Flame) -> Result<(), flame_core::Error> {
//! // Inside a cluster: the parent's Pod and the API come from the Pod's
//! // environment and service account.
//! let backend = flame_k8s::K8sBackend::builder().cpu("2").memory("4Gi").build()?;
//! let pool = flame.pool("thumbs").max(8).backend(backend).start().await?;
//! # Ok(()) }
//! ```
//!
//! What a runner Pod is:
//! - `generateName: flame-<pool>-`, `restartPolicy: Never`, one container
//!   named [`RUNNER_CONTAINER`];
//! - labels `app.kubernetes.io/managed-by=flame`, [`POOL_LABEL`],
//!   [`PARENT_LABEL`] and [`RUNNER_LABEL`] (annotations of the same keys
//!   hold the exact values) and none of the parent's own labels: labels
//!   that match the parent Deployment's selector would make its ReplicaSet
//!   count the runners as its own Pods and delete them;
//! - an `ownerReference` to the parent's Pod, so that Kubernetes' garbage
//!   collector deletes the runners of a parent Pod that is gone, even when
//!   flame cannot;
//! - env: the parent container's entries as they are written (a
//!   `secretKeyRef` stays a reference, never a copied value), plus
//!   `FLAME_PARENT` (which holds no secret) and the pool's forwarded
//!   variables, but those the parent has from a reference or, with
//!   `envFrom`, does not name (the runner gets them the same way).
//!
//! Boot: the Pod is created, then watched (resumed when the server closes
//! the watch, listed afresh on `410 Gone`) until its container runs; the
//! runner then reports ready over NATS. The boot fails at once, as
//! permanent, with Kubernetes' reason when the container waits on
//! `ErrImagePull`, `ImagePullBackOff`, `InvalidImageName`,
//! `CreateContainerConfigError` (a missing Secret, say),
//! `CreateContainerError` or `CrashLoopBackOff`, when it terminated, or
//! when the Pod stays `Unschedulable` past
//! [`K8sBackendBuilder::unschedulable_timeout`]. API answers 400, 401, 403
//! (naming the RBAC verb the service account lacks), 404, 409 and 422 are
//! permanent; 429 (after its `Retry-After`), 5xx and an unreachable API
//! are retried with backoff within the boot timeout, then transient.
//!
//! Exit: the same watch reports the runner's end: `OOMKilled` as "ran out
//! of memory", else the exit code and reason; the Pod is then deleted.
//! Retire: a delete with `gracePeriodSeconds` of the drain time rounded up
//! (the kubelet sends SIGTERM, then SIGKILL after it), waited for, and a
//! delete with no grace if the Pod is still there 3 s after. Reaping: [`Backend::list`] lists the pool's Pods
//! by label, whatever their phase.
//!
//! The RBAC the backend needs is on `pods` only: `create`, `get`, `list`,
//! `watch`, `delete`. The README's "Deploying on Kubernetes" has the
//! Deployment, Role, NATS and NetworkPolicy to go with it.
//!
//! Outside a cluster (or with no parent Pod), give the backend a
//! `kube::Config` or `kube::Client`, a namespace and an image:
//!
//! ```no_run
//! # fn f(config: kube::Config) -> Result<(), flame_core::Error> {
//! let backend = flame_k8s::K8sBackend::builder()
//!     .config(config)
//!     .namespace("batch")
//!     .image("registry.example/app:42")
//!     .gpus(1)
//!     .node_selector("nvidia.com/gpu.present", "true")
//!     .build()?;
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

mod api;
mod builder;
mod cleanup;
mod pod;
mod runner;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use flame_core::backend::{Backend, BootError, BootSpec, Booted, Listed};
use flame_core::{BoxError, Error};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::debug;

pub use api::K8sError;
pub use builder::{
    K8sBackendBuilder, DEFAULT_UNSCHEDULABLE_TIMEOUT, POD_NAMESPACE_ENV, POD_NAME_ENV,
};
pub use pod::{
    label_value, GPU_RESOURCE, MANAGED_BY_LABEL, PARENT_LABEL, POOL_LABEL, RUNNER_CONTAINER,
    RUNNER_LABEL,
};

use api::{Pods, REQUEST_TIMEOUT};
use builder::{Connection, Parts};
use cleanup::{wait_gone, DeleteOnDrop, GONE_WAIT};
use pod::{ParentPod, Settings};
use runner::{wait_started, watch_exit, PodStopper};
use watch::PodWatch;

/// Boots runners as Pods. Make one with [`K8sBackend::builder`].
#[derive(Clone)]
pub struct K8sBackend {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    namespace: String,
    parent_pod: Option<String>,
    container: Option<String>,
    settings: Settings,
    unschedulable_timeout: Duration,
    /// Made at first use, inside the runtime.
    pods: OnceCell<Pods>,
    /// Read at the first boot that succeeds in reading it.
    parent: OnceCell<Option<ParentPod>>,
}

impl std::fmt::Debug for K8sBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sBackend")
            .field("namespace", &self.inner.namespace)
            .field("parent_pod", &self.inner.parent_pod)
            .field("container", &self.inner.container)
            .field("settings", &self.inner.settings)
            .field("unschedulable_timeout", &self.inner.unschedulable_timeout)
            .finish_non_exhaustive()
    }
}

impl K8sBackend {
    /// Starts building; see [`K8sBackendBuilder`].
    pub fn builder() -> K8sBackendBuilder {
        K8sBackendBuilder::default()
    }

    fn new(parts: Parts) -> K8sBackend {
        K8sBackend {
            inner: Arc::new(Inner {
                connection: parts.connection,
                namespace: parts.namespace,
                parent_pod: parts.parent_pod,
                container: parts.container,
                settings: parts.settings,
                unschedulable_timeout: parts.unschedulable_timeout,
                pods: OnceCell::new(),
                parent: OnceCell::new(),
            }),
        }
    }

    /// The namespace the runner Pods go to.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }
}

impl K8sBackendBuilder {
    /// Checks the settings (no request is made yet: the client is made,
    /// and the parent's Pod read, at the first boot). Outside a cluster
    /// without [`config`] or [`client`], or with neither a parent Pod nor
    /// an image, an [`Error::Config`] says what to set.
    ///
    /// [`config`]: K8sBackendBuilder::config
    /// [`client`]: K8sBackendBuilder::client
    pub fn build(self) -> Result<K8sBackend, Error> {
        Ok(K8sBackend::new(self.into_parts()?))
    }
}

impl Inner {
    /// The Pods API of the namespace, its client made on first use.
    async fn pods(&self) -> Result<Pods, K8sError> {
        self.pods
            .get_or_try_init(|| async {
                let client = match &self.connection {
                    Connection::Client(c) => c.clone(),
                    Connection::Config(config) => {
                        kube::Client::try_from((**config).clone()).map_err(K8sError::Transport)?
                    }
                    Connection::InCluster => {
                        return Err(K8sError::Unexpected("no configuration".into()))
                    }
                };
                Ok(Pods::new(client, &self.namespace))
            })
            .await
            .cloned()
    }

    /// The parent's Pod, read once (a failed read is tried again at the
    /// next boot).
    async fn parent(
        &self,
        pods: &Pods,
        until: Option<Instant>,
    ) -> Result<Option<ParentPod>, K8sError> {
        let Some(name) = &self.parent_pod else {
            return Ok(None);
        };
        self.parent
            .get_or_try_init(|| async {
                let pod = pods.get(name, until).await.map_err(|e| match e {
                    K8sError::Api { status: 404, .. } => K8sError::Unexpected(format!(
                        "the parent Pod `{name}` ({POD_NAME_ENV}, or \
                         K8sBackendBuilder::parent_pod) is not in namespace `{}`: {e}",
                        pods.namespace()
                    )),
                    e => e,
                })?;
                ParentPod::from_pod(pod, self.container.as_deref())
                    .map(Some)
                    .map_err(K8sError::Unexpected)
            })
            .await
            .cloned()
    }
}

impl Backend for K8sBackend {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let inner = self.inner.clone();
        let deadline = spec.boot_timeout.map(|t| Instant::now() + t);
        async move {
            let pods = inner.pods().await.map_err(K8sError::into_boot_error)?;
            let parent = inner
                .parent(&pods, deadline)
                .await
                .map_err(K8sError::into_boot_error)?;
            let pod = pod::runner_pod(parent.as_ref(), pods.namespace(), &inner.settings, &spec)
                .map_err(|e| Box::new(BootError::permanent(e)) as BoxError)?;
            let created = pods
                .create(&pod, deadline)
                .await
                .map_err(K8sError::into_boot_error)?;
            let name = created.metadata.name.clone().ok_or_else(|| {
                K8sError::Unexpected("the created Pod has no name".into()).into_boot_error()
            })?;
            let guard = DeleteOnDrop {
                pods: pods.clone(),
                name: name.clone(),
                armed: true,
            };
            debug!(pool = %spec.pool, runner = %spec.runner_id, pod = %name, "runner Pod created");
            let version = created
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            let mut watch = PodWatch::new(pods.clone(), &name, &version);
            // A Pod that cannot start fails the boot now, with
            // Kubernetes' reason, and is deleted before that is reported.
            let started =
                wait_started(&mut watch, &created, deadline, inner.unschedulable_timeout).await;
            if let Err(e) = started {
                guard.delete_now().await;
                return Err(e.into_boot_error());
            }
            guard.disarm();
            Ok(Booted {
                handle: name.clone(),
                // The same watch goes on: the pool learns of the runner's
                // end from the API at once, not only by missed heartbeats.
                exited: Some(watch_exit(watch, pods.clone(), name.clone()).boxed()),
                stopper: Box::new(PodStopper { pods, name }),
            })
        }
        .boxed()
    }

    /// Lists the pool's Pods by label, whatever their phase, but those
    /// being deleted already.
    fn list(&self, pool: &str) -> BoxFuture<'static, Result<Vec<Listed>, BoxError>> {
        let inner = self.inner.clone();
        let pool = pool.to_string();
        async move {
            let pods = inner.pods().await?;
            let listed = pods.list(&pod::pool_selector(&pool)).await?;
            Ok(listed
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| {
                    let notes = p.metadata.annotations.as_ref()?;
                    // (The label is the pool's name made fit for a label:
                    // another pool's may look the same.)
                    (notes.get(POOL_LABEL)? == &pool).then(|| {
                        Some(Listed::new(
                            p.metadata.name.clone()?,
                            notes.get(RUNNER_LABEL)?.clone(),
                            notes.get(PARENT_LABEL).cloned().unwrap_or_default(),
                        ))
                    })?
                })
                .collect())
        }
        .boxed()
    }

    /// Deletes the Pod with no grace and waits until it is gone.
    fn terminate(
        &self,
        handle: &str,
        _runner_id: &str,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let inner = self.inner.clone();
        let name = handle.to_string();
        async move {
            let pods = inner.pods().await?;
            if pods
                .delete(&name, 0, Some(Instant::now() + REQUEST_TIMEOUT))
                .await?
                .is_some()
            {
                wait_gone(&pods, &name, Instant::now() + GONE_WAIT).await;
            }
            Ok(())
        }
        .boxed()
    }
}
