//! The runner's Pod: made from the parent's own Pod (its app container's
//! image, command, env and mounts; the Pod's service account, volumes and
//! pull secrets) or, without one, from a configured image; with the pool's
//! overrides, flame's labels and an owner reference to the parent Pod.

use std::collections::BTreeMap;
use std::sync::Arc;

use flame_core::backend::BootSpec;
use k8s_openapi::api::core::v1::{
    Container, EnvVar, Pod, PodSpec, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// Name of the runner's container in its Pod.
pub const RUNNER_CONTAINER: &str = "flame-runner";

/// Label (and annotation) with the runner's pool. The label's value is the
/// pool's name made fit for a label (see [`label_value`]); the annotation
/// holds it exactly.
pub const POOL_LABEL: &str = "flame/pool";
/// Label (and annotation) with the id of the parent that booted the
/// runner.
pub const PARENT_LABEL: &str = "flame/parent";
/// Label (and annotation) with the runner's id.
pub const RUNNER_LABEL: &str = "flame/runner";
/// Label every runner Pod carries: `app.kubernetes.io/managed-by=flame`.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The extended resource a GPU pool requests (NVIDIA's device plugin).
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A function that edits the runner's Pod before it is created.
pub(crate) type EditPod = Arc<dyn Fn(&mut Pod) + Send + Sync>;

/// A pool's settings for its runner Pods.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    pub(crate) image: Option<String>,
    pub(crate) service_account: Option<String>,
    pub(crate) resources: Option<ResourceRequirements>,
    /// `requests` and `limits` set one by one (cpu, memory, GPUs).
    pub(crate) quantities: BTreeMap<String, (Option<String>, String)>,
    pub(crate) node_selector: BTreeMap<String, String>,
    pub(crate) tolerations: Vec<Toleration>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) edit: Option<EditPod>,
}

impl std::fmt::Debug for Settings {
    /// The extra variables' names only: their values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("image", &self.image)
            .field("service_account", &self.service_account)
            .field("resources", &self.resources)
            .field("quantities", &self.quantities)
            .field("node_selector", &self.node_selector)
            .field("tolerations", &self.tolerations.len())
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("edit", &self.edit.as_ref().map(|_| "fn"))
            .finish()
    }
}

/// The parent's Pod, as read from the API.
#[derive(Clone)]
pub(crate) struct ParentPod {
    pub(crate) name: String,
    pub(crate) uid: String,
    /// Its app container.
    pub(crate) container: Container,
    pub(crate) spec: PodSpec,
}

impl std::fmt::Debug for ParentPod {
    /// Names only: its container's literal env values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<&str> = self
            .container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        f.debug_struct("ParentPod")
            .field("name", &self.name)
            .field("uid", &self.uid)
            .field("container", &self.container.name)
            .field("env", &env)
            .finish_non_exhaustive()
    }
}

impl ParentPod {
    /// The parent from its Pod: the container named `container`, else the
    /// first one.
    pub(crate) fn from_pod(pod: Pod, container: Option<&str>) -> Result<ParentPod, String> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.unwrap_or_default();
        let found = match container {
            Some(wanted) => spec.containers.iter().find(|c| c.name == wanted),
            None => spec.containers.first(),
        };
        let Some(found) = found.cloned() else {
            let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "the parent Pod {name} has no container {} (it has {names:?})",
                container.unwrap_or("at all")
            ));
        };
        Ok(ParentPod {
            name,
            uid,
            container: found,
            spec,
        })
    }
}

/// `text` as a label value: at most 63 characters of letters, digits,
/// `-`, `_` and `.`, starting and ending with a letter or digit (others
/// become `-`). The annotations keep the exact value.
pub fn label_value(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The Pods' `generateName`: `flame-<pool>-`, the pool in lower case
/// letters, digits and `-`, short enough that the name Kubernetes makes
/// (5 more characters) is a valid host name.
pub(crate) fn generate_name(pool: &str) -> String {
    let pool: String = pool
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(50)
        .collect();
    let pool = pool.trim_matches('-');
    if pool.is_empty() {
        "flame-".into()
    } else {
        format!("flame-{pool}-")
    }
}

/// The label selector of a pool's runner Pods.
pub(crate) fn pool_selector(pool: &str) -> String {
    format!(
        "{MANAGED_BY_LABEL}=flame,{POOL_LABEL}={}",
        label_value(pool)
    )
}

/// The runner's environment: the parent container's own entries (Secret
/// and ConfigMap references stay references), then the pool's extra
/// variables, then those of the boot (`FLAME_PARENT` and the forwarded
/// ones). A boot variable the parent container has as a reference keeps
/// the reference; one it does not name, when the container has `envFrom`,
/// comes to the runner through the same `envFrom` (or the image) and is
/// not written in; `FLAME_*` variables are always written in.
fn runner_env(
    parent: Option<&Container>,
    extra: &BTreeMap<String, String>,
    spec: &BootSpec,
) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = parent.and_then(|c| c.env.clone()).unwrap_or_default();
    let has_env_from = parent.is_some_and(|c| c.env_from.as_ref().is_some_and(|e| !e.is_empty()));
    let literal = |name: &str, value: &str| EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    };
    let set = |env: &mut Vec<EnvVar>, name: &str, value: &str, from_boot: bool| match env
        .iter_mut()
        .find(|e| e.name == name)
    {
        Some(e) if from_boot && e.value_from.is_some() => {}
        Some(e) => *e = literal(name, value),
        None if from_boot && has_env_from && !name.starts_with("FLAME_") => {}
        None => env.push(literal(name, value)),
    };
    for (name, value) in extra {
        set(&mut env, name, value, false);
    }
    for (name, value) in &spec.env {
        set(&mut env, name, value, true);
    }
    env
}

/// The resources of the runner container: the pool's, else the parent
/// container's, with the quantities set one by one on top.
fn runner_resources(
    parent: Option<&Container>,
    settings: &Settings,
) -> Option<ResourceRequirements> {
    let mut resources = settings
        .resources
        .clone()
        .or_else(|| parent.and_then(|c| c.resources.clone()));
    if settings.quantities.is_empty() {
        return resources;
    }
    let r = resources.get_or_insert_with(Default::default);
    for (name, (request, limit)) in &settings.quantities {
        let requests = r.requests.get_or_insert_with(Default::default);
        match request {
            Some(q) => {
                requests.insert(name.clone(), Quantity(q.clone()));
            }
            None => {
                requests.remove(name);
            }
        }
        r.limits
            .get_or_insert_with(Default::default)
            .insert(name.clone(), Quantity(limit.clone()));
    }
    resources
}

/// The runner's Pod for `spec`.
pub(crate) fn runner_pod(
    parent: Option<&ParentPod>,
    namespace: &str,
    settings: &Settings,
    spec: &BootSpec,
) -> Result<Pod, String> {
    let from = parent.map(|p| &p.container);
    let image = settings
        .image
        .clone()
        .or_else(|| from.and_then(|c| c.image.clone()))
        .ok_or("no image for the runner: the parent container has none and none is configured")?;
    let container = Container {
        name: RUNNER_CONTAINER.into(),
        image: Some(image),
        env: Some(runner_env(from, &settings.env, spec)),
        resources: runner_resources(from, settings),
        // What makes the parent's process (the runner is the same program,
        // told by FLAME_PARENT to serve).
        command: from.and_then(|c| c.command.clone()),
        args: from.and_then(|c| c.args.clone()),
        working_dir: from.and_then(|c| c.working_dir.clone()),
        env_from: from.and_then(|c| c.env_from.clone()),
        volume_mounts: from.and_then(|c| c.volume_mounts.clone()),
        volume_devices: from.and_then(|c| c.volume_devices.clone()),
        image_pull_policy: from.and_then(|c| c.image_pull_policy.clone()),
        security_context: from.and_then(|c| c.security_context.clone()),
        // Not taken: ports, probes and lifecycle hooks (a runner serves
        // over NATS; the parent's probes would fail or kill it).
        ..Default::default()
    };
    let p = parent.map(|p| &p.spec);
    let mut pod_spec = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        service_account_name: settings
            .service_account
            .clone()
            .or_else(|| p.and_then(|s| s.service_account_name.clone())),
        automount_service_account_token: p.and_then(|s| s.automount_service_account_token),
        volumes: p.and_then(|s| s.volumes.clone()),
        image_pull_secrets: p.and_then(|s| s.image_pull_secrets.clone()),
        security_context: p.and_then(|s| s.security_context.clone()),
        dns_policy: p.and_then(|s| s.dns_policy.clone()),
        dns_config: p.and_then(|s| s.dns_config.clone()),
        node_selector: p.and_then(|s| s.node_selector.clone()),
        tolerations: p.and_then(|s| s.tolerations.clone()),
        ..Default::default()
    };
    if !settings.node_selector.is_empty() {
        pod_spec.node_selector = Some(settings.node_selector.clone());
    }
    if !settings.tolerations.is_empty() {
        pod_spec.tolerations = Some(settings.tolerations.clone());
    }
    let mut pod = Pod {
        metadata: ObjectMeta {
            generate_name: Some(generate_name(&spec.pool)),
            namespace: Some(namespace.to_string()),
            owner_references: parent.map(|p| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: p.name.clone(),
                    uid: p.uid.clone(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(pod_spec),
        status: None,
    };
    if let Some(edit) = &settings.edit {
        edit(&mut pod);
    }
    // After the user's edit: what the backend relies on.
    let labels = pod.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(MANAGED_BY_LABEL.into(), "flame".into());
    for (key, value) in [
        (POOL_LABEL, &spec.pool),
        (PARENT_LABEL, &spec.parent_id),
        (RUNNER_LABEL, &spec.runner_id),
    ] {
        labels.insert(key.into(), label_value(value));
        pod.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.clone());
    }
    if let Some(s) = pod.spec.as_mut() {
        s.restart_policy = Some("Never".into());
    }
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvFromSource, EnvVarSource, SecretKeySelector};

    fn parent() -> ParentPod {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-7d9-abcde", "uid": "u-1",
                         "labels": {"app": "web", "pod-template-hash": "7d9"}},
            "spec": {
                "serviceAccountName": "web",
                "volumes": [{"name": "cache", "emptyDir": {}}],
                "containers": [{
                    "name": "app", "image": "registry.example/web:3",
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}},
                    "env": [
                        {"name": "NATS_URL", "value": "nats://nats:4222"},
                        {"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "nats", "key": "password"}}},
                    ],
                    "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                }],
            },
        }))
        .unwrap();
        ParentPod::from_pod(pod, None).unwrap()
    }

    fn spec() -> BootSpec {
        BootSpec::new(
            "Thumbs".into(),
            "r1".into(),
            vec![
                ("FLAME_PARENT".into(), "{\"pool\":\"Thumbs\"}".into()),
                ("NATS_PASSWORD".into(), "hunter2".into()),
            ],
        )
        .parent("parent-1")
    }

    #[test]
    fn made_from_the_parent_pod_with_secrets_as_references() {
        let pod = runner_pod(Some(&parent()), "apps", &Settings::default(), &spec()).unwrap();
        let text = serde_json::to_string(&pod).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        let s = pod.spec.as_ref().unwrap();
        assert_eq!(s.restart_policy.as_deref(), Some("Never"));
        assert_eq!(s.service_account_name.as_deref(), Some("web"));
        let c = &s.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/web:3"));
        assert!(c.ports.is_none() && c.readiness_probe.is_none());
        let env = c.env.as_ref().unwrap();
        let password = env.iter().find(|e| e.name == "NATS_PASSWORD").unwrap();
        assert_eq!(
            password.value_from,
            Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "nats".into(),
                    key: "password".into(),
                    optional: None
                }),
                ..Default::default()
            })
        );
        assert!(env
            .iter()
            .any(|e| e.name == "FLAME_PARENT" && e.value.is_some()));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert!(!labels.contains_key("app") && !labels.contains_key("pod-template-hash"));
        assert_eq!(labels[POOL_LABEL], "Thumbs");
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("flame-thumbs-"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "u-1"));
    }

    #[test]
    fn forwarded_variables_from_env_from_stay_out() {
        let mut p = parent();
        p.container.env_from = Some(vec![EnvFromSource::default()]);
        let mut s = spec();
        s.env.push(("API_KEY".into(), "from-a-secret".into()));
        let pod = runner_pod(Some(&p), "apps", &Settings::default(), &s).unwrap();
        let text = serde_json::to_string(&pod).unwrap();
        assert!(!text.contains("from-a-secret"), "{text}");
    }

    #[test]
    fn overrides_and_edits() {
        let mut settings = Settings {
            image: Some("registry.example/web:gpu".into()),
            node_selector: BTreeMap::from([("gpu".into(), "a100".into())]),
            edit: Some(Arc::new(|pod: &mut Pod| {
                pod.spec.as_mut().unwrap().priority_class_name = Some("batch".into());
                pod.spec.as_mut().unwrap().restart_policy = Some("Always".into());
            })),
            ..Default::default()
        };
        settings
            .quantities
            .insert(GPU_RESOURCE.into(), (None, "1".into()));
        let pod = runner_pod(Some(&parent()), "apps", &settings, &spec()).unwrap();
        let s = pod.spec.unwrap();
        assert_eq!(s.priority_class_name.as_deref(), Some("batch"));
        assert_eq!(s.restart_policy.as_deref(), Some("Never"));
        assert_eq!(s.node_selector.unwrap()["gpu"], "a100");
        let limits = s.containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits[GPU_RESOURCE], Quantity("1".into()));
    }

    #[test]
    fn names_and_labels_are_valid() {
        assert_eq!(label_value("-my pool/1-"), "my-pool-1");
        assert_eq!(label_value(&"x".repeat(80)).len(), 63);
        assert_eq!(generate_name("Thumbs_Pool"), "flame-thumbs-pool-");
        assert!(generate_name(&"a".repeat(90)).len() <= 57);
    }
}
