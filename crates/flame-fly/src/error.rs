//! What went wrong talking to the Machines API ([`FlyError`]), and how the
//! pool takes it when a boot fails: permanent or worth another try.

use flame_core::backend::BootError;
use flame_core::BoxError;

/// What went wrong talking to the Machines API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlyError {
    /// The API answered with an error status.
    #[error("Machines API answered {status}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The body of the answer (Fly's error message).
        message: String,
    },
    /// The API could not be reached, or its answer not read.
    #[error("Machines API unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// The API answered something flame does not understand.
    #[error("unexpected answer from the Machines API: {0}")]
    Unexpected(String),
    /// The Machine did not start: it is in `state` (e.g. `failed`), and
    /// the platform said `message`.
    #[error("Fly Machine {machine} did not start: it is {state} ({message})")]
    NotStarted {
        /// The Machine's id.
        machine: String,
        /// Its state.
        state: String,
        /// What the Machines API said when asked to wait for it.
        message: String,
    },
}

/// A failed boot as the pool should take it: the API refusing the request
/// as such (bad token, no permission, no such app, an invalid config) or a
/// Machine that failed is permanent; rate limits, no capacity, the API's
/// own errors and a Machine still on its way when time ran out are
/// transient.
pub(crate) fn boot_error(e: FlyError) -> BoxError {
    let permanent = match &e {
        FlyError::Api { status, .. } => matches!(status, 400 | 401 | 403 | 404 | 422),
        FlyError::NotStarted { state, .. } => !matches!(state.as_str(), "created" | "starting"),
        FlyError::Transport(_) | FlyError::Unexpected(_) => false,
    };
    Box::new(if permanent {
        BootError::permanent(e)
    } else {
        BootError::transient(e)
    })
}
