//! The conformance suite's `k8s` platform on a real cluster instead of the
//! stand-in, for `scripts/test-k8s` (it cannot run here: no cluster is
//! reachable from this machine). Switched on by `FLAME_TEST_K8S_REAL=1`;
//! then:
//!
//! - the cluster is the one `KUBECONFIG` names (kube's `Config::infer`),
//!   Pods go to namespace `FLAME_TEST_K8S_NAMESPACE` (default
//!   `flame-test`, which must exist);
//! - runners run `FLAME_TEST_K8S_IMAGE`, an image whose entrypoint is the
//!   test app `flame-testapp` of this tree (`deploy/k8s/testapp.Dockerfile`);
//!   the suite's failing runners are made the way they fail on a cluster:
//!   an image that does not exist (`ErrImagePull`), the test app told to
//!   exit before it is ready (its `no-state` argument), a node selector no
//!   node has (`Pending`), a memory limit, a bad token (401);
//! - each test's nats-server listens on all interfaces, and runners are
//!   told `nats://$FLAME_TEST_K8S_NATS_HOST:<port>`: an address of this
//!   machine that the cluster's Pods reach.

use std::time::Duration;

use flame_k8s::{K8sBackend, K8sBackendBuilder};
use k8s_openapi::api::core::v1::Pod;

use crate::platform::Runners;
use crate::TEST_BUILD;

/// True when the suite runs on a real cluster.
pub fn enabled() -> bool {
    std::env::var("FLAME_TEST_K8S_REAL").is_ok_and(|v| v == "1")
}

fn namespace() -> String {
    std::env::var("FLAME_TEST_K8S_NAMESPACE").unwrap_or_else(|_| "flame-test".into())
}

/// The cluster's client configuration, from `KUBECONFIG`.
fn config() -> kube::Config {
    // (Read on a thread of its own: the suite asks from sync code inside
    // a runtime.)
    std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(kube::Config::infer())
            .expect("a cluster from KUBECONFIG")
    })
    .join()
    .unwrap()
}

/// The backend whose runners do as `runners` says, on the real cluster.
pub fn backend(runners: Runners) -> K8sBackend {
    let image = std::env::var("FLAME_TEST_K8S_IMAGE")
        .expect("FLAME_TEST_K8S_IMAGE: an image of flame-testapp for the cluster");
    let mut config = config();
    if runners == Runners::Unauthorized {
        config.auth_info = Default::default();
        config.auth_info.token = Some("bad-token".to_string().into());
    }
    let builder: K8sBackendBuilder = K8sBackend::builder()
        .config(config)
        .namespace(namespace())
        .env(flame::env::BUILD_ID, TEST_BUILD);
    let builder = match runners {
        Runners::Working | Runners::Unauthorized => builder.image(image),
        Runners::ExitBeforeReady => builder.image(image).edit_pod(|pod: &mut Pod| {
            if let Some(spec) = pod.spec.as_mut() {
                spec.containers[0].args = Some(vec!["no-state".into()]);
            }
        }),
        Runners::CannotStart => builder.image("registry.invalid/flame-no-such-image:1"),
        Runners::Stuck => builder
            .image(image)
            .node_selector("flame-test/no-such-node", "true")
            .unschedulable_timeout(Duration::from_secs(3600)),
        Runners::MemoryLimited(mb) => builder.image(image).memory(format!("{mb}Mi")),
    };
    builder.build().expect("a valid Kubernetes backend")
}

/// The runner Pods the cluster still has in the namespace.
pub fn leftovers() -> Vec<String> {
    let config = config();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let client = kube::Client::try_from(config).expect("a client");
                let pods: kube::Api<Pod> = kube::Api::namespaced(client, &namespace());
                let params =
                    kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=flame");
                pods.list(&params)
                    .await
                    .expect("a list of the runner Pods")
                    .items
                    .into_iter()
                    .filter_map(|p| p.metadata.name)
                    .collect()
            })
    })
    .join()
    .unwrap()
}

/// A test's nats-server, and the URL its runners are told: on a real
/// cluster one they reach from their Pods.
pub fn nats_server() -> (flame::embedded::NatsServer, Option<String>) {
    if !enabled() {
        return (
            flame::embedded::NatsServer::start().expect("start nats-server"),
            None,
        );
    }
    let host = std::env::var("FLAME_TEST_K8S_NATS_HOST")
        .expect("FLAME_TEST_K8S_NATS_HOST: this machine's address as the cluster's Pods reach it");
    let server = flame::embedded::NatsServer::builder()
        .arg("-a")
        .arg("0.0.0.0")
        .start()
        .expect("start nats-server");
    let url = format!("nats://{host}:{}", server.port());
    (server, Some(url))
}
