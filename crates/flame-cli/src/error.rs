//! How a command fails ([`CliError`]): each kind ends it with its own
//! exit code.

/// A failure, with the exit code it ends the command with.
#[derive(Debug)]
pub(crate) enum CliError {
    /// NATS cannot be reached, or another failure: exit 1.
    Failed(String),
    /// Wrong use: exit 2.
    Usage(String),
}

impl CliError {
    /// A NATS operation `what` that failed with `e`.
    pub(crate) fn nats(what: &str, e: impl std::fmt::Display) -> CliError {
        CliError::Failed(format!("{what}: {e}"))
    }
}
