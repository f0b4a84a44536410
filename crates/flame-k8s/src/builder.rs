//! [`K8sBackendBuilder`]: where the backend finds the API, its namespace
//! and the parent's Pod, and the pool's overrides of the runner Pods.

use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements, Toleration};

use crate::pod::{Settings, GPU_RESOURCE};

/// Environment variable with the parent's Pod name (set it through the
/// downward API: `fieldRef: {fieldPath: metadata.name}`).
pub const POD_NAME_ENV: &str = "POD_NAME";
/// Environment variable with the parent's namespace (downward API:
/// `fieldRef: {fieldPath: metadata.namespace}`).
pub const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";

/// What a checked [`K8sBackendBuilder`] gives the backend.
pub(crate) struct Parts {
    pub(crate) connection: Connection,
    pub(crate) namespace: String,
    pub(crate) parent_pod: Option<String>,
    pub(crate) container: Option<String>,
    pub(crate) settings: Settings,
    pub(crate) unschedulable_timeout: Duration,
}

/// Default of [`K8sBackendBuilder::unschedulable_timeout`]: shorter than a
/// pool's default boot timeout (30 s), so that callers learn the
/// scheduler's reason rather than a bare timeout.
pub const DEFAULT_UNSCHEDULABLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How the backend reaches the API.
#[derive(Clone)]
pub(crate) enum Connection {
    /// A client is made from it on first use (inside the runtime).
    Config(Box<kube::Config>),
    /// Given ready-made.
    Client(kube::Client),
    /// The in-cluster service account, read on first use.
    InCluster,
}

/// Builds a [`K8sBackend`](crate::K8sBackend) (its `build` checks the
/// settings). Unset settings come from the Pod the parent runs in.
#[derive(Clone)]
#[must_use]
pub struct K8sBackendBuilder {
    connection: Connection,
    namespace: Option<String>,
    parent_pod: Option<String>,
    container: Option<String>,
    settings: Settings,
    unschedulable_timeout: Duration,
}

impl std::fmt::Debug for K8sBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let connection = match &self.connection {
            Connection::Config(c) => format!("config for {}", c.cluster_url),
            Connection::Client(_) => "a client".into(),
            Connection::InCluster => "in-cluster".into(),
        };
        f.debug_struct("K8sBackendBuilder")
            .field("connection", &connection)
            .field("namespace", &self.namespace)
            .field("parent_pod", &self.parent_pod)
            .field("container", &self.container)
            .field("settings", &self.settings)
            .field("unschedulable_timeout", &self.unschedulable_timeout)
            .finish()
    }
}

impl Default for K8sBackendBuilder {
    fn default() -> Self {
        K8sBackendBuilder {
            connection: Connection::InCluster,
            namespace: None,
            parent_pod: None,
            container: None,
            settings: Settings::default(),
            unschedulable_timeout: DEFAULT_UNSCHEDULABLE_TIMEOUT,
        }
    }
}

impl K8sBackendBuilder {
    /// Connects with this configuration (e.g. `kube::Config::infer()`'s,
    /// or `kube::Config::new(url)` with a token) instead of the in-cluster
    /// service account. The backend turns off kube's own retries for it
    /// (it retries itself, within the boot timeout).
    pub fn config(mut self, config: kube::Config) -> Self {
        self.connection = Connection::Config(Box::new(config));
        self
    }

    /// Connects with this client instead of the in-cluster service
    /// account.
    pub fn client(mut self, client: kube::Client) -> Self {
        self.connection = Connection::Client(client);
        self
    }

    /// Namespace of the runner Pods (default: `POD_NAMESPACE`, else the
    /// configuration's default namespace).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The parent's own Pod, which runner Pods are made from (default:
    /// `POD_NAME`). Without one, runners are made from [`image`] alone.
    ///
    /// [`image`]: K8sBackendBuilder::image
    pub fn parent_pod(mut self, name: impl Into<String>) -> Self {
        self.parent_pod = Some(name.into());
        self
    }

    /// The parent Pod's container that runs the app (default: its first).
    pub fn container(mut self, name: impl Into<String>) -> Self {
        self.container = Some(name.into());
        self
    }

    /// Image of the runners (default: the parent container's). Required
    /// when there is no parent Pod.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.settings.image = Some(image.into());
        self
    }

    /// Service account of the runner Pods (default: the parent Pod's).
    pub fn service_account(mut self, name: impl Into<String>) -> Self {
        self.settings.service_account = Some(name.into());
        self
    }

    /// Requests and limits of the runner container (default: the parent
    /// container's). [`cpu`], [`memory`] and [`gpus`] set single entries on
    /// top of them.
    ///
    /// [`cpu`]: K8sBackendBuilder::cpu
    /// [`memory`]: K8sBackendBuilder::memory
    /// [`gpus`]: K8sBackendBuilder::gpus
    pub fn resources(mut self, resources: ResourceRequirements) -> Self {
        self.settings.resources = Some(resources);
        self
    }

    /// CPU request and limit of a runner, in Kubernetes' quantities
    /// (`"500m"`, `"2"`).
    pub fn cpu(mut self, quantity: impl Into<String>) -> Self {
        let q = quantity.into();
        self.settings
            .quantities
            .insert("cpu".into(), (Some(q.clone()), q));
        self
    }

    /// Memory request and limit of a runner (`"512Mi"`, `"4Gi"`). A runner
    /// past its limit is OOM-killed, and the pool reports it as out of
    /// memory.
    pub fn memory(mut self, quantity: impl Into<String>) -> Self {
        let q = quantity.into();
        self.settings
            .quantities
            .insert("memory".into(), (Some(q.clone()), q));
        self
    }

    /// GPUs per runner: a limit of `count` on `nvidia.com/gpu` (NVIDIA's
    /// device plugin; Kubernetes sets the request to the limit). Pair it
    /// with a [`node_selector`] or [`toleration`] for the GPU nodes.
    ///
    /// [`node_selector`]: K8sBackendBuilder::node_selector
    /// [`toleration`]: K8sBackendBuilder::toleration
    pub fn gpus(mut self, count: u32) -> Self {
        self.settings
            .quantities
            .insert(GPU_RESOURCE.into(), (None, count.to_string()));
        self
    }

    /// Adds a node selector entry (the first one replaces the parent
    /// Pod's node selector).
    pub fn node_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.node_selector.insert(key.into(), value.into());
        self
    }

    /// Adds a toleration (the first one replaces the parent Pod's
    /// tolerations).
    pub fn toleration(mut self, toleration: Toleration) -> Self {
        self.settings.tolerations.push(toleration);
        self
    }

    /// Sets a variable in every runner, written into its Pod as a literal
    /// value (for a secret, give the parent container a `secretKeyRef`
    /// instead: runners inherit it as a reference).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.env.insert(key.into(), value.into());
        self
    }

    /// Edits each runner Pod before it is created, for anything the
    /// builder has no setting for (affinity, a priority class, a runtime
    /// class, sidecars, ...). The backend puts back its labels,
    /// annotations and `restartPolicy: Never` after it.
    pub fn edit_pod(mut self, edit: impl Fn(&mut Pod) + Send + Sync + 'static) -> Self {
        self.settings.edit = Some(Arc::new(edit));
        self
    }

    /// How long a runner Pod may stay unschedulable (the scheduler's
    /// `PodScheduled=False`, reason `Unschedulable`) before its boot fails
    /// with the scheduler's message (default
    /// [`DEFAULT_UNSCHEDULABLE_TIMEOUT`]). With a cluster autoscaler that
    /// adds nodes on demand, raise it, and the pool's boot timeout, above
    /// the time a node takes to join.
    pub fn unschedulable_timeout(mut self, timeout: Duration) -> Self {
        self.unschedulable_timeout = timeout;
        self
    }

    /// The checked settings ([`crate::K8sBackend`]'s `build`).
    pub(crate) fn into_parts(self) -> Result<Parts, Error> {
        let from_env = |v: Option<String>, var: &str| {
            v.or_else(|| std::env::var(var).ok())
                .filter(|s| !s.trim().is_empty())
        };
        let parent_pod = from_env(self.parent_pod, POD_NAME_ENV);
        if parent_pod.is_none() && self.settings.image.is_none() {
            return Err(Error::Config(format!(
                "Kubernetes backend: no parent Pod and no image; set {POD_NAME_ENV} (and \
                 {POD_NAMESPACE_ENV}) through the downward API, or call \
                 K8sBackendBuilder::image"
            )));
        }
        let connection = match self.connection {
            Connection::InCluster => {
                let mut config = kube::Config::incluster().map_err(|e| {
                    Error::Config(format!(
                        "Kubernetes backend: not inside a cluster ({e}); give it a \
                         configuration with K8sBackendBuilder::config"
                    ))
                })?;
                config.default_retry = false;
                Connection::Config(Box::new(config))
            }
            Connection::Config(mut config) => {
                config.default_retry = false;
                Connection::Config(config)
            }
            client => client,
        };
        let namespace =
            from_env(self.namespace, POD_NAMESPACE_ENV).unwrap_or_else(|| match &connection {
                Connection::Config(c) => c.default_namespace.clone(),
                Connection::Client(c) => c.default_namespace().to_string(),
                Connection::InCluster => "default".into(),
            });
        Ok(Parts {
            connection,
            namespace,
            parent_pod,
            container: self.container,
            settings: self.settings,
            unschedulable_timeout: self.unschedulable_timeout,
        })
    }
}

/// Quantities of the builder, for tests.
#[cfg(test)]
pub(crate) fn quantities(
    b: &K8sBackendBuilder,
) -> &std::collections::BTreeMap<String, (Option<String>, String)> {
    &b.settings.quantities
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_settings_are_named() {
        // An explicit parent Pod or image, so that the test does not
        // depend on POD_NAME being unset.
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let err = K8sBackendBuilder::default()
            .parent_pod("")
            .config(config.clone())
            .into_parts();
        if std::env::var(POD_NAME_ENV).is_err() {
            let err = err.err().unwrap().to_string();
            assert!(err.contains(POD_NAME_ENV) && err.contains("image"), "{err}");
        }
        let b = K8sBackendBuilder::default()
            .image("registry.example/app:1")
            .namespace("apps")
            .memory("1Gi")
            .gpus(2)
            .config(config);
        assert_eq!(quantities(&b)["memory"], (Some("1Gi".into()), "1Gi".into()));
        assert_eq!(quantities(&b)[GPU_RESOURCE], (None, "2".into()));
        assert!(b.into_parts().is_ok());
    }
}
