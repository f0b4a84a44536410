//! Settings of a [`DockerBackend`], checked when it is built.

use std::collections::BTreeMap;
use std::sync::Arc;

use flame_core::Error;

use crate::api::Api;
use crate::DockerBackend;

/// Least memory Docker lets a container have.
const LEAST_MEMORY_MB: u64 = 6;

/// GPUs per runner, as Docker's device requests give them (`docker run
/// --gpus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    /// This many GPUs (`--gpus 2`).
    Count(u32),
    /// Every GPU of the host (`--gpus all`).
    All,
    /// These GPUs, by index or UUID (`--gpus '"device=0,2"'`).
    Devices(Vec<String>),
}

/// What the backend was told.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    pub(crate) image: Option<String>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) network: Option<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) binds: Vec<String>,
    pub(crate) memory_mb: Option<u64>,
    pub(crate) cpus: Option<f64>,
    pub(crate) gpus: Option<Gpus>,
    pub(crate) scope: Option<String>,
}

impl std::fmt::Debug for Settings {
    /// The variables' names only: their values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("image", &self.image)
            .field("command", &self.command)
            .field("network", &self.network)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("binds", &self.binds)
            .field("memory_mb", &self.memory_mb)
            .field("cpus", &self.cpus)
            .field("gpus", &self.gpus)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Builds a [`DockerBackend`]: see the crate's documentation for what a
/// runner container takes from where.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct DockerBackendBuilder {
    host: Option<String>,
    settings: Settings,
}

impl DockerBackendBuilder {
    /// The Docker Engine to talk to: `unix:///var/run/docker.sock`,
    /// `tcp://127.0.0.1:2375`... Default: `DOCKER_HOST`, else
    /// `unix:///var/run/docker.sock`.
    pub fn docker_host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Image of the runners. Default: the image of the parent's own
    /// container (by id, so the very same build); set it when the parent
    /// runs outside a container. Setting it also stops the backend from
    /// looking for the parent's container: runners then get no networks
    /// or variables from it.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.settings.image = Some(image.into());
        self
    }

    /// The runners' command (the image's `CMD`; its `ENTRYPOINT` stays).
    /// Default: the parent container's own command and entrypoint, or the
    /// image's.
    pub fn command<I, S>(mut self, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.settings.command = Some(command.into_iter().map(Into::into).collect());
        self
    }

    /// Network of the runners: a network's name, `bridge`, or `host` (the
    /// host's own network: runners reach a NATS server on the host's
    /// loopback address, and the backend says its runners are local).
    /// Default: the parent container's networks (its network mode and every
    /// network it is attached to), or Docker's default bridge.
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.settings.network = Some(network.into());
        self
    }

    /// Sets a variable in every runner (after the parent container's own,
    /// before the runner's `FLAME_PARENT` and the pool's forwarded ones).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.env.insert(key.into(), value.into());
        self
    }

    /// Mounts a host path or named volume into every runner, as `docker
    /// run -v` takes it: `/host/path:/in/container[:ro]`,
    /// `volume:/in/container`. None by default: runners get none of the
    /// parent container's mounts (which may hold the Docker socket).
    pub fn bind(mut self, bind: impl Into<String>) -> Self {
        self.settings.binds.push(bind.into());
        self
    }

    /// Memory limit of each runner container, in MiB (no swap on top). The
    /// kernel's OOM killer ends a runner that needs more, and the pool
    /// reports it as out of memory. Default: no limit.
    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.settings.memory_mb = Some(mb);
        self
    }

    /// CPUs of each runner container, e.g. `1.5` (`docker run --cpus`).
    /// Default: no limit.
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.settings.cpus = Some(cpus);
        self
    }

    /// GPUs of each runner container, through a device request of the
    /// `gpu` capability (the NVIDIA container toolkit must be set up on
    /// the host). Default: none.
    pub fn gpus(mut self, gpus: Gpus) -> Self {
        self.settings.gpus = Some(gpus);
        self
    }

    /// The app's name among others on the same Docker host: runner
    /// containers are labelled with it, and a pool lists (and reaps) only
    /// its own scope's runners, so two apps with a pool of the same name
    /// leave each other's runners alone. Default: the parent container's
    /// Compose project, else the runners' image.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.settings.scope = Some(scope.into());
        self
    }

    /// Checks the settings. Nothing is asked of Docker yet: the Engine is
    /// first reached (and the parent's container looked up) by the first
    /// boot or list, whose error says what is missing.
    pub fn build(self) -> Result<DockerBackend, Error> {
        let bad = |msg: String| Err(Error::Config(format!("Docker backend: {msg}")));
        let s = &self.settings;
        if let Some(image) = &s.image {
            if image.trim().is_empty() {
                return bad("the image is empty".into());
            }
        }
        if let Some(mb) = s.memory_mb {
            if mb < LEAST_MEMORY_MB {
                return bad(format!(
                    "memory_mb must be at least {LEAST_MEMORY_MB} (Docker's least), not {mb}"
                ));
            }
        }
        if let Some(cpus) = s.cpus {
            if !(cpus.is_finite() && cpus > 0.0) {
                return bad(format!("cpus must be more than 0, not {cpus}"));
            }
        }
        if matches!(&s.gpus, Some(Gpus::Count(0))) {
            return bad("gpus: a count of 0; leave GPUs unset instead".into());
        }
        if s.network.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return bad("the network is empty".into());
        }
        Ok(DockerBackend {
            api: Api::new(self.host),
            settings: Arc::new(self.settings),
            own: Arc::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_named_and_secrets_not_shown() {
        let err = DockerBackend::builder()
            .memory_mb(2)
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory_mb"), "{err}");
        let err = DockerBackend::builder()
            .cpus(0.0)
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpus"), "{err}");
        let backend = DockerBackend::builder()
            .image("app:1")
            .env("NATS_PASSWORD", "s3cret")
            .build()
            .unwrap();
        let shown = format!("{backend:?}");
        assert!(
            shown.contains("NATS_PASSWORD") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
