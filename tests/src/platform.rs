//! The platforms the backend conformance suite runs on: the local backend
//! (child processes), the Fly backend against its stand-in
//! ([`crate::fake_fly`]), the Kubernetes backend against its stand-in
//! ([`crate::fake_k8s`]) and the Docker backend on a real, private
//! `dockerd` ([`crate::docker`]). Each gives runners that work and runners that
//! fail in the ways the suite checks, and tells what it still runs of a
//! pool, so that a test can check that nothing is left.

use flame::backend::Listed;
use flame::{Backend, BootSpec, Booted, BoxError, LocalBackend};
use flame_docker::DockerBackend;
use flame_fly::FlyBackend;
use flame_k8s::K8sBackend;
use futures::future::BoxFuture;

use crate::docker::{dockerd, Dockerd};
use crate::fake_fly::FakeFly;
use crate::fake_k8s::FakeK8s;
use crate::harness::{runner_backend, runner_pids};
use crate::TEST_BUILD;

/// Which platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Runners as child processes.
    Local,
    /// Runners as Fly Machines of the stand-in.
    Fly,
    /// Runners as Pods of the Kubernetes stand-in.
    K8s,
    /// Runners as containers of a private `dockerd`.
    Docker,
}

/// What the runners of a backend do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runners {
    /// Boot and serve.
    Working,
    /// Start, then exit before they are ready (an app missing its
    /// configuration: the test app without its state).
    ExitBeforeReady,
    /// Cannot be started at all: a program that is not there (local), an
    /// image whose Machine goes to `failed` (Fly).
    CannotStart,
    /// Never become ready: a program that is no runner (local), a Machine
    /// stuck in `created` (Fly).
    Stuck,
    /// Working, with this many MiB of memory.
    MemoryLimited(u64),
    /// Refused by the platform's API for bad credentials (Fly only).
    Unauthorized,
}

/// A platform for one test; the Fly stand-in stops with it.
pub struct Platform {
    /// Which one.
    pub kind: Kind,
    /// The Fly stand-in, for [`Kind::Fly`].
    pub fly: Option<FakeFly>,
    /// The Kubernetes stand-in, for [`Kind::K8s`].
    pub k8s: Option<FakeK8s>,
    /// The test binary's Docker Engine, for [`Kind::Docker`].
    pub docker: Option<&'static Dockerd>,
}

impl Platform {
    /// Starts the platform.
    pub async fn start(kind: Kind) -> Platform {
        let fly = match kind {
            Kind::Fly => Some(FakeFly::start("flame-test").await),
            _ => None,
        };
        let k8s = match kind {
            Kind::K8s if !crate::real_k8s::enabled() => Some(FakeK8s::start().await),
            _ => None,
        };
        let docker = match kind {
            Kind::Docker => Some(tokio::task::spawn_blocking(dockerd).await.unwrap()),
            _ => None,
        };
        Platform {
            kind,
            fly,
            k8s,
            docker,
        }
    }

    /// The platform of a parent process the suite starts: from
    /// [`Platform::env`] (the Fly stand-in's URL, the Docker Engine's).
    pub fn from_env() -> (Kind, Option<String>) {
        if let Ok(url) = std::env::var("FLAME_TEST_K8S_URL") {
            return (Kind::K8s, Some(url));
        }
        if crate::real_k8s::enabled() {
            return (Kind::K8s, None);
        }
        if let Ok(url) = std::env::var("FLAME_TEST_FLY_URL") {
            return (Kind::Fly, Some(url));
        }
        match std::env::var("FLAME_TEST_DOCKER_HOST") {
            Ok(host) => (Kind::Docker, Some(host)),
            Err(_) => (Kind::Local, None),
        }
    }

    /// What a parent process needs to use this platform.
    pub fn env(&self) -> Vec<(String, String)> {
        let fly = self
            .fly
            .iter()
            .map(|fly| ("FLAME_TEST_FLY_URL".to_string(), fly.url.clone()));
        let k8s = self
            .k8s
            .iter()
            .map(|k8s| ("FLAME_TEST_K8S_URL".to_string(), k8s.url.clone()));
        let docker = self
            .docker
            .iter()
            .map(|d| ("FLAME_TEST_DOCKER_HOST".to_string(), d.host.clone()));
        fly.chain(k8s).chain(docker).collect()
    }

    /// A backend whose runners do as `runners` says; `None` when the
    /// platform has no such failure (a local backend has no credentials).
    pub fn backend(&self, runners: Runners) -> Option<PlatformBackend> {
        let url = match self.kind {
            Kind::Docker => self.docker.map(|d| d.host.as_str()),
            Kind::K8s => self.k8s.as_ref().map(|k| k.url.as_str()),
            _ => self.fly.as_ref().map(|f| f.url.as_str()),
        };
        backend_for(self.kind, url, runners)
    }

    /// What the platform still runs (or keeps) of `pool`: live runner
    /// processes (local), Machines not destroyed (Fly), Pods not deleted
    /// (Kubernetes), containers in any state (Docker).
    pub fn leftovers(&self, pool: &str) -> Vec<String> {
        if let Some(docker) = self.docker {
            return docker.containers_labelled(&format!("flame.pool={pool}"));
        }
        if let Some(k8s) = &self.k8s {
            return k8s.leftovers();
        }
        if self.kind == Kind::K8s {
            return crate::real_k8s::leftovers();
        }
        match &self.fly {
            None => runner_pids(pool)
                .iter()
                .map(|p| format!("pid {p}"))
                .collect(),
            Some(fly) => fly.leftovers(),
        }
    }

    /// Makes the platform's API answer the next `n` creates with 429 and
    /// `Retry-After: 1`; false when it has no API.
    pub fn rate_limit_creates(&self, n: usize) -> bool {
        if let Some(fly) = &self.fly {
            fly.rate_limit_creates(n);
        }
        if let Some(k8s) = &self.k8s {
            k8s.rate_limit_creates(n);
        }
        self.fly.is_some() || self.k8s.is_some()
    }

    /// When the platform's API was asked to create a runner, in order;
    /// `None` without a stand-in that records it.
    pub fn creates(&self) -> Option<Vec<tokio::time::Instant>> {
        if self.fly.is_none() && self.k8s.is_none() {
            return None;
        }
        let fly = self.fly.iter().flat_map(|fly| {
            fly.requests()
                .into_iter()
                .filter(|r| r.method == "POST" && r.path.is_empty())
                .map(|r| r.at)
        });
        let k8s = self.k8s.iter().flat_map(|k8s| {
            k8s.requests()
                .into_iter()
                .filter(|r| r.verb == "create")
                .map(|r| r.at)
        });
        Some(fly.chain(k8s).collect())
    }
}

/// The backend of `kind` (with the Fly stand-in or the Docker Engine at
/// `url`) whose runners do as `runners` says.
pub fn backend_for(kind: Kind, url: Option<&str>, runners: Runners) -> Option<PlatformBackend> {
    match kind {
        Kind::Local => {
            let local = match runners {
                Runners::Working => runner_backend(),
                Runners::ExitBeforeReady => runner_backend().args(["no-state"]),
                Runners::CannotStart => runner_backend().program("/nonexistent/flame-runner"),
                Runners::Stuck => LocalBackend::new().program("sleep").args(["600"]),
                Runners::MemoryLimited(mb) => runner_backend().memory_limit_mb(mb),
                Runners::Unauthorized => return None,
            };
            Some(PlatformBackend::Local(local))
        }
        Kind::Fly => {
            let url = url.expect("the Fly stand-in's URL");
            let (token, image) = match runners {
                Runners::Working => ("test-token", "registry.example/flame-test:1"),
                Runners::ExitBeforeReady => {
                    ("test-token", "registry.example/flame-test:exits-early")
                }
                Runners::CannotStart => ("test-token", "registry.example/broken:1"),
                Runners::Stuck => ("test-token", "registry.example/stuck:1"),
                Runners::MemoryLimited(_) => {
                    ("test-token", "registry.example/flame-test:memory-limited")
                }
                Runners::Unauthorized => ("bad-token", "registry.example/flame-test:1"),
            };
            let memory_mb = match runners {
                Runners::MemoryLimited(mb) => mb.div_ceil(256) as u32 * 256,
                _ => 512,
            };
            let fly = fly_backend(url, token, image, memory_mb);
            Some(PlatformBackend::Fly(fly))
        }
        Kind::K8s => {
            use crate::fake_k8s::{BAD_TOKEN, TOKEN};
            if crate::real_k8s::enabled() {
                return Some(PlatformBackend::K8s(crate::real_k8s::backend(runners)));
            }
            let url = url.expect("the Kubernetes stand-in's URL");
            let (token, image) = match runners {
                Runners::Working => (TOKEN, "registry.example/flame-test:1"),
                Runners::ExitBeforeReady => (TOKEN, "registry.example/flame-test:exits-early"),
                Runners::CannotStart => (TOKEN, "registry.example/no-such-image:1"),
                Runners::Stuck => (TOKEN, "registry.example/stuck:1"),
                Runners::MemoryLimited(_) => (TOKEN, "registry.example/flame-test:memory-limited"),
                Runners::Unauthorized => (BAD_TOKEN, "registry.example/flame-test:1"),
            };
            let mut builder = k8s_builder(url, token).image(image);
            if let Runners::MemoryLimited(mb) = runners {
                builder = builder.memory(format!("{mb}Mi"));
            }
            Some(PlatformBackend::K8s(
                builder.build().expect("a valid Kubernetes backend"),
            ))
        }
        Kind::Docker => {
            use crate::docker::{IMAGE, IMAGE_EXITS_EARLY, IMAGE_MISSING, IMAGE_STUCK};
            let host = url.expect("the Docker Engine's address");
            let (image, memory_mb) = match runners {
                Runners::Working => (IMAGE, None),
                Runners::ExitBeforeReady => (IMAGE_EXITS_EARLY, None),
                Runners::CannotStart => (IMAGE_MISSING, None),
                Runners::Stuck => (IMAGE_STUCK, None),
                Runners::MemoryLimited(mb) => (IMAGE, Some(mb)),
                Runners::Unauthorized => return None,
            };
            let mut docker = docker_backend_builder(host).image(image);
            if let Some(mb) = memory_mb {
                docker = docker.memory_mb(mb);
            }
            Some(PlatformBackend::Docker(
                docker.build().expect("a valid Docker backend"),
            ))
        }
    }
}

/// A Docker backend on the engine at `host` for the test images: runners
/// on the host's network (they reach the test's nats-server on
/// 127.0.0.1) with the host's `/tmp`, the test build id, scope
/// `flame-test`.
pub fn docker_backend_builder(host: &str) -> flame_docker::DockerBackendBuilder {
    DockerBackend::builder()
        .docker_host(host)
        .network("host")
        .bind("/tmp:/tmp")
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .scope("flame-test")
}

/// A backend of either platform.
#[derive(Debug, Clone)]
pub enum PlatformBackend {
    /// Child processes.
    Local(LocalBackend),
    /// Fly Machines.
    Fly(FlyBackend),
    /// Kubernetes Pods.
    K8s(K8sBackend),
    /// Docker containers.
    Docker(DockerBackend),
}

impl PlatformBackend {
    fn inner(&self) -> &dyn Backend {
        match self {
            PlatformBackend::Local(b) => b,
            PlatformBackend::Fly(b) => b,
            PlatformBackend::K8s(b) => b,
            PlatformBackend::Docker(b) => b,
        }
    }
}

impl Backend for PlatformBackend {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        self.inner().boot(spec)
    }

    fn runners_are_local(&self) -> bool {
        self.inner().runners_are_local()
    }

    fn list(&self, pool: &str) -> BoxFuture<'static, Result<Vec<Listed>, BoxError>> {
        self.inner().list(pool)
    }

    fn terminate(&self, handle: &str, runner_id: &str) -> BoxFuture<'static, Result<(), BoxError>> {
        self.inner().terminate(handle, runner_id)
    }
}

/// A Fly backend on the stand-in at `url` for the test app `flame-test`:
/// shared CPU, one of it, `memory_mb`, the test build id.
pub fn fly_backend(url: &str, token: &str, image: &str, memory_mb: u32) -> FlyBackend {
    FlyBackend::builder()
        .api_url(url)
        .token(token)
        .app("flame-test")
        .image(image)
        .region("local")
        .cpu_kind("shared")
        .cpus(1)
        .memory_mb(memory_mb)
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .build()
        .expect("a valid Fly backend")
}

/// Namespace of the Kubernetes stand-in's runner Pods in the suite.
pub const K8S_NAMESPACE: &str = "flame-test";

/// A Kubernetes backend builder on the stand-in at `url` with bearer
/// `token`, in [`K8S_NAMESPACE`], with the test build id.
pub fn k8s_builder(url: &str, token: &str) -> flame_k8s::K8sBackendBuilder {
    let mut config = kube::Config::new(url.parse().expect("the stand-in's URL"));
    config.auth_info.token = Some(token.to_string().into());
    K8sBackend::builder()
        .config(config)
        .namespace(K8S_NAMESPACE)
        .env(flame::env::BUILD_ID, TEST_BUILD)
}
