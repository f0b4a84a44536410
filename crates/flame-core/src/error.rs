//! The error type every flame operation returns.

use std::time::Duration;

/// What went wrong with a call, a cast, a pool or the connection to NATS.
///
/// The remote function's *own* errors are not here: a remote function returns
/// whatever type it likes (often a `Result<T, MyError>`), and that value comes
/// back to the caller intact inside `Ok(..)`. This enum is for everything that
/// stops the value from coming back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The remote code panicked. The runner caught it and keeps serving.
    #[error("`{function}` panicked on runner {runner}: {message}")]
    Panicked {
        /// Registered name of the function.
        function: String,
        /// Runner that ran it.
        runner: String,
        /// The panic message.
        message: String,
    },

    /// The call did not finish within its timeout. Time spent waiting for a
    /// runner counts against the timeout; work still running on the runner at
    /// the deadline is cancelled there.
    #[error("`{function}` timed out after {timeout:?}")]
    Timeout {
        /// Registered name of the function.
        function: String,
        /// The call's whole timeout.
        timeout: Duration,
    },

    /// The runner holding the call stopped (crashed, was killed, or lost its
    /// connection) before the call finished.
    #[error("runner {runner} went down while running `{function}`: {reason}")]
    RunnerDown {
        /// Registered name of the function.
        function: String,
        /// The runner that went down.
        runner: String,
        /// What is known about why.
        reason: String,
    },

    /// The runner has no function registered under that name.
    #[error("no function named `{function}` is registered on runner {runner}; is it marked #[flame::remote] in this build?")]
    UnknownFunction {
        /// The name that was asked for.
        function: String,
        /// The runner that was asked.
        runner: String,
    },

    /// Parent and runner are different builds of the app, so the same name
    /// may mean different code. They must be the same build.
    #[error("build mismatch: this parent is build {parent}, runner {runner} is build {runner_build}; parent and runners must run the same build")]
    BuildMismatch {
        /// Build id of the caller.
        parent: String,
        /// Build id of the runner.
        runner_build: String,
        /// The runner.
        runner: String,
    },

    /// An encoded payload does not fit in one NATS message.
    #[error("{what} of `{function}` is {size} bytes, more than the NATS server's max_payload of {max} bytes")]
    PayloadTooLarge {
        /// Registered name of the function.
        function: String,
        /// "arguments" or "result".
        what: &'static str,
        /// Encoded size in bytes.
        size: usize,
        /// The server's limit in bytes.
        max: usize,
    },

    /// Arguments or result could not be encoded.
    #[error("could not encode the {what} of `{function}`: {reason}")]
    Encode {
        /// Registered name of the function.
        function: String,
        /// "arguments" or "result".
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },

    /// Arguments or result could not be decoded.
    #[error("could not decode the {what} of `{function}`: {reason}")]
    Decode {
        /// Registered name of the function.
        function: String,
        /// "arguments" or "result".
        what: &'static str,
        /// The deserializer's message.
        reason: String,
    },

    /// The NATS server cannot be reached (or the connection was lost).
    #[error("cannot reach NATS at {url}: {reason}")]
    NatsUnreachable {
        /// The server address used.
        url: String,
        /// What the client reported.
        reason: String,
    },

    /// Something went wrong talking to NATS after connecting.
    #[error("NATS error: {0}")]
    Nats(String),

    /// The embedded nats-server could not be started.
    #[error("could not start an embedded nats-server: {0}")]
    EmbeddedServer(String),

    /// A runner could not be booted.
    #[error("pool `{pool}` could not boot a runner: {reason}")]
    BootFailed {
        /// The pool.
        pool: String,
        /// What went wrong.
        reason: String,
    },

    /// A runner was booted but did not report ready within the boot timeout.
    #[error("pool `{pool}`: runner did not become ready within {timeout:?}")]
    BootTimeout {
        /// The pool.
        pool: String,
        /// The pool's boot timeout.
        timeout: Duration,
    },

    /// Configuration is missing or invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The same function name is registered twice in this build.
    #[error(
        "remote function `{name}` is registered twice ({first} and {second}); rename one of them"
    )]
    DuplicateFunction {
        /// The name.
        name: String,
        /// Where it was first registered (file:line).
        first: String,
        /// Where it was registered again (file:line).
        second: String,
    },

    /// The runner refused or could not understand the request. Seen when a
    /// foreign client sends garbage, or on version skew of flame itself.
    #[error("runner {runner} refused the request: {message}")]
    Protocol {
        /// The runner.
        runner: String,
        /// What it said.
        message: String,
    },

    /// The pool has been shut down.
    #[error("pool `{0}` is shut down")]
    PoolClosed(String),
}

/// Result alias used throughout flame.
pub type Result<T, E = Error> = std::result::Result<T, E>;
