//! The Docker Engine API as the backend uses it: one client, its version
//! agreed with the Engine on first use, and requests retried with backoff
//! while the failure is transient.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use flame_core::backoff::Backoff;
use futures::StreamExt;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::debug;

use crate::error::DockerError;

/// Attempts of one request before a transient failure is final.
const ATTEMPTS: u32 = 6;
/// First pause between attempts; doubled each time, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(4);

/// Time for a request's answer to begin (bollard's client timeout). A
/// stop is given its own, longer one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for an auto-removed container to be gone after it
/// stopped, before it is removed by force.
pub(crate) const REMOVAL_WAIT: Duration = Duration::from_secs(10);

/// Where the Engine is, and the client once its version is agreed.
#[derive(Clone)]
pub(crate) struct Api {
    host: Option<String>,
    docker: Arc<OnceCell<Docker>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("host", &self.host.as_deref().unwrap_or("DOCKER_HOST"))
            .finish()
    }
}

impl Api {
    /// The Engine at `host` (`unix:///var/run/docker.sock`,
    /// `tcp://host:2375`), else at `DOCKER_HOST`, else at the default
    /// socket. Nothing is asked before the first request.
    pub(crate) fn new(host: Option<String>) -> Api {
        Api {
            host,
            docker: Arc::new(OnceCell::new()),
        }
    }

    /// The client, its API version lowered to the Engine's if that is
    /// older than bollard's (Debian's Docker 20.10 speaks 1.41).
    pub(crate) async fn client(&self) -> Result<&Docker, DockerError> {
        self.docker
            .get_or_try_init(|| async {
                let docker = match &self.host {
                    Some(host) => Docker::connect_with_host(host),
                    None => Docker::connect_with_defaults(),
                }
                .map_err(|e| DockerError::from_client("connect", e))?
                .with_timeout(REQUEST_TIMEOUT);
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| DockerError::from_client("agree on an API version", e))
            })
            .await
    }

    /// Sends a request made by `make` (called again for each attempt),
    /// retrying transient failures with exponential backoff and jitter
    /// while a pause still ends before `until`.
    pub(crate) async fn send<T, F, Fut>(
        &self,
        what: &'static str,
        until: Option<Instant>,
        make: F,
    ) -> Result<T, DockerError>
    where
        F: Fn(Docker) -> Fut,
        Fut: Future<Output = Result<T, bollard::errors::Error>>,
    {
        let backoff = Backoff::new(FIRST_PAUSE, MAX_PAUSE);
        let mut attempt = 1;
        loop {
            let result = match self.client().await {
                Ok(docker) => make(docker.clone())
                    .await
                    .map_err(|e| DockerError::from_client(what, e)),
                Err(e) => Err(e),
            };
            let error = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let wait = backoff.pause(attempt);
            let in_time = until.is_none_or(|at| Instant::now() + wait < at);
            if !(error.is_transient() && attempt < ATTEMPTS && in_time) {
                return Err(error);
            }
            debug!(attempt, "Docker Engine API: trying again: {error}");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Removes a container by force (killing it if it runs). Gone already
    /// (404) or being removed (409) counts as done.
    pub(crate) async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let removed = self
            .send("remove the runner container", None, |docker| async move {
                let options = RemoveContainerOptionsBuilder::new().force(true).build();
                docker.remove_container(id, Some(options)).await
            })
            .await;
        match removed {
            Err(e) if matches!(e.status(), Some(404 | 409)) => Ok(()),
            other => other,
        }
    }

    /// Stops a container: SIGTERM, then SIGKILL after `secs` seconds.
    /// Resolves once it has stopped. Not running or gone counts as done.
    pub(crate) async fn stop(&self, id: &str, secs: u64) -> Result<(), DockerError> {
        let docker = self
            .client()
            .await?
            .clone()
            .with_timeout(REQUEST_TIMEOUT + Duration::from_secs(secs));
        let options = StopContainerOptionsBuilder::new()
            .t(secs.min(i32::MAX as u64) as i32)
            .build();
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => match DockerError::from_client("stop the runner container", e) {
                e if matches!(e.status(), Some(304 | 404 | 409)) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Waits until the container is removed, at most until `until`; true
    /// when it is (or was never there).
    pub(crate) async fn wait_removed(&self, id: &str, until: Instant) -> bool {
        let Ok(docker) = self.client().await else {
            return false;
        };
        let options = WaitContainerOptionsBuilder::new()
            .condition("removed")
            .build();
        let mut wait = docker.wait_container(id, Some(options));
        match tokio::time::timeout_at(until, wait.next()).await {
            Err(_) => false,
            // An exit code other than 0 comes as an error; the container
            // is gone all the same.
            Ok(None | Some(Ok(_))) => true,
            Ok(Some(Err(bollard::errors::Error::DockerContainerWaitError { .. }))) => true,
            Ok(Some(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            }))) => true,
            Ok(Some(Err(e))) => {
                debug!(container = %id, "cannot wait for the container's removal: {e}");
                false
            }
        }
    }

    /// Stops (with `secs` of grace; none: kills) and makes sure the
    /// container is removed.
    pub(crate) async fn stop_and_remove(&self, id: &str, secs: Option<u64>) {
        if let Some(secs) = secs {
            match self.stop(id, secs).await {
                // Auto-removed after it stopped, normally; forced after a
                // while.
                Ok(()) => {
                    if self.wait_removed(id, Instant::now() + REMOVAL_WAIT).await {
                        return;
                    }
                }
                Err(e) => debug!(container = %id, "cannot stop the runner container: {e}"),
            }
        }
        if let Err(e) = self.remove(id).await {
            tracing::warn!(container = %id, "cannot remove the runner container: {e}");
        }
    }
}
