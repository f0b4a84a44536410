//! What goes wrong talking to Docker, and which of it is worth another try.

use flame_core::backend::BootError;
use flame_core::BoxError;

/// What went wrong with the Docker Engine API or a runner container.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DockerError {
    /// The Engine API answered with an error status to `what` (for
    /// instance `create the runner container`): Docker's own message, e.g.
    /// `No such image: app:1`.
    #[error("Docker failed to {what} (status {status}): {message}")]
    Api {
        /// What was asked.
        what: &'static str,
        /// The HTTP status.
        status: u16,
        /// Docker's message.
        message: String,
    },
    /// The Engine API could not be reached, or its answer not read.
    #[error("Docker Engine API unreachable ({what}): {source}")]
    Transport {
        /// What was asked.
        what: &'static str,
        /// The client's error.
        #[source]
        source: bollard::errors::Error,
    },
    /// This process runs in no container that the Engine knows, and no
    /// image was configured.
    #[error("cannot find this process's own container ({0}); outside a container, set DockerBackendBuilder::image")]
    OwnContainer(String),
    /// The runner container was not started within the boot timeout (the
    /// Engine is slow, not refusing): worth another try.
    #[error("the runner container did not start within the boot timeout of {0:?}")]
    TooSlow(std::time::Duration),
    /// The Engine answered something flame does not understand.
    #[error("unexpected answer from the Docker Engine API: {0}")]
    Unexpected(String),
}

impl DockerError {
    /// Wraps a client error: an error status as [`DockerError::Api`],
    /// anything else as [`DockerError::Transport`].
    pub(crate) fn from_client(what: &'static str, e: bollard::errors::Error) -> DockerError {
        match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            } => DockerError::Api {
                what,
                status: status_code,
                message,
            },
            other => DockerError::Transport {
                what,
                source: other,
            },
        }
    }

    /// The API's status, if it answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            DockerError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth another try: the Engine's own trouble (5xx) or no answer at
    /// all. A request refused as such (400 invalid configuration, 401/403,
    /// 404 no such image or container, 409 conflict) fails the same way
    /// again.
    pub fn is_transient(&self) -> bool {
        match self {
            DockerError::Api { status, .. } => *status >= 500,
            DockerError::Transport { .. } | DockerError::TooSlow(_) => true,
            DockerError::OwnContainer(_) | DockerError::Unexpected(_) => false,
        }
    }
}

/// A failed boot as the pool should take it: permanent unless
/// [`DockerError::is_transient`].
pub(crate) fn boot_error(e: DockerError) -> BoxError {
    Box::new(if e.is_transient() {
        BootError::transient(e)
    } else {
        BootError::permanent(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> DockerError {
        DockerError::Api {
            what: "create the runner container",
            status,
            message: "m".into(),
        }
    }

    #[test]
    fn refusals_are_permanent_and_the_engines_troubles_transient() {
        for status in [400, 401, 403, 404, 409] {
            assert!(!api(status).is_transient(), "{status}");
            let e = boot_error(api(status));
            assert!(BootError::is_permanent_error(e.as_ref()), "{status}");
        }
        for status in [500, 502, 503] {
            assert!(api(status).is_transient(), "{status}");
            let e = boot_error(api(status));
            assert!(!BootError::is_permanent_error(e.as_ref()), "{status}");
        }
        let refused = DockerError::from_client(
            "start the runner container",
            bollard::errors::Error::RequestTimeoutError,
        );
        assert!(refused.is_transient());
        assert!(!DockerError::OwnContainer("none".into()).is_transient());
        let text = api(404).to_string();
        assert!(
            text.contains("failed to create") && text.contains("404"),
            "{text}"
        );
    }
}
