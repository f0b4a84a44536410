//! The error type every flame operation returns.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error, as backends return them (tower's convention).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The underlying cause of an [`Error`]: a NATS, I/O or HTTP error kept
/// whole behind an `Arc`, so that [`Error`] stays `Clone` and
/// [`std::error::Error::source`] still reaches the original.
#[derive(Clone)]
pub struct Source(Arc<dyn std::error::Error + Send + Sync>);

impl Source {
    /// Wraps an error.
    pub fn new(error: impl Into<BoxError>) -> Source {
        Source(Arc::from(error.into()))
    }

    /// The wrapped error.
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

// Stands in for the wrapped error in a `source()` chain: same text, same
// further sources.
impl std::error::Error for Source {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// What went wrong with a call, a cast, a pool or the connection to NATS.
///
/// The remote function's *own* errors are not here: a remote function returns
/// whatever type it likes (often a `Result<T, MyError>`), and that value comes
/// back to the caller intact inside `Ok(..)`. This enum is for everything that
/// stops the value from coming back.
///
/// Two families share it, told apart by [`Error::kind`] and
/// [`ErrorKind::is_setup`]: errors of setting flame up (`Config`,
/// `MissingState`, `DuplicateFunction`, `EmbeddedServer`,
/// `JetStreamDisabled`, `RunnerStart`), which `init`, `connect` or a
/// pool's `start` return and which only a change to the app or its
/// environment cures; and errors of a call, cast, stream or child and of
/// the connection they use (the rest), which a caller may retry or report.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// the deadline is cancelled there. With `RUST_LOG=flame_nats=debug` the
    /// parent logs which it was: "no runner had room before the deadline",
    /// or "no reply before the deadline" with the runner's id.
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
    #[error("{what} of `{function}` is {size} bytes, more than the NATS server's max_payload of {max} bytes; send large data as a flame::Stream, which has no size limit")]
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
        /// The client's error, when there is one.
        #[source]
        source: Option<Source>,
    },

    /// The NATS server refused a publish or a subscription that flame needs:
    /// the connection's user lacks a permission. `reason` is the server's
    /// own words, e.g. `Permissions Violation for Subscription to
    /// "flame.thumbs.parent.<id>.*"`; it names the subject, never a
    /// credential. The README's "Least privilege" section lists what a
    /// parent and a runner need.
    #[error("the NATS server denied a permission flame needs: {reason}")]
    PermissionDenied {
        /// What the server said.
        reason: String,
    },

    /// Something went wrong talking to NATS after connecting: `context`
    /// says what flame was doing, `source` what the client reported.
    #[error("{context}: {source}")]
    Nats {
        /// What flame was doing, e.g. "cannot subscribe to runner events".
        context: String,
        /// The client's error.
        #[source]
        source: Source,
    },

    /// The NATS server has no JetStream, which shared pools need for their
    /// KV bucket.
    #[error("pool `{pool}` is shared, which needs JetStream, but JetStream is not enabled on the NATS server (start nats-server with -js, or add `jetstream {{}}` to its config)")]
    JetStreamDisabled {
        /// The pool.
        pool: String,
    },

    /// A shared pool's JetStream did not answer in time: the server has
    /// JetStream, but it is not ready (a cluster still electing its meta
    /// leader, or one without a majority of its servers up, or a bucket
    /// whose stream has no leader). flame retries such an operation with
    /// exponential backoff and jitter, each attempt bounded, for at most the
    /// pool's `boot_timeout` (30 s by default) before giving up with this.
    #[error("pool `{pool}`: JetStream is not ready: tried to {tried} {attempts} times in {waited:?}; the last attempt: {last}")]
    JetStreamNotReady {
        /// The pool.
        pool: String,
        /// What flame tried, e.g. "open or create the KV bucket flame-thumbs".
        tried: String,
        /// How many attempts were made.
        attempts: u32,
        /// How long it kept trying (the bound).
        waited: Duration,
        /// What the last attempt got, in words.
        last: String,
    },

    /// The embedded nats-server could not be started.
    #[error("could not start an embedded nats-server: {reason}")]
    EmbeddedServer {
        /// What went wrong.
        reason: String,
        /// The I/O error, when there is one.
        #[source]
        source: Option<Source>,
    },

    /// A runner could not be booted. Callers still waiting for a runner
    /// when their deadline comes get this (with the last boot's reason)
    /// rather than [`Error::Timeout`], in private and shared pools alike.
    #[error("pool `{pool}` could not boot a runner: {reason}")]
    BootFailed {
        /// The pool.
        pool: String,
        /// What went wrong, in words.
        reason: String,
        /// The backend's error, when there is one.
        #[source]
        source: Option<Source>,
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

    /// This process is a runner and could not start serving (it exits with
    /// this error): its parent or its lease is gone, or the failsafe
    /// deadline passed before it was acknowledged.
    #[error("runner could not start: {0}")]
    RunnerStart(String),

    /// A registered function takes a type of state that the app did not
    /// give flame (`FlameBuilder::state`). Found at start-up, in parent and
    /// runner alike.
    #[error("remote function `{function}` takes State<{state}>, but no {state} was given to flame; add it with FlameBuilder::state before init/connect")]
    MissingState {
        /// The function.
        function: String,
        /// The state type.
        state: String,
    },

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

    /// The runner refused the call because it is not signed with the pool's
    /// key, or is a replay: nothing ran. In a shared pool this parent's
    /// `FLAME_SECRET` differs from the one the pool's runners were booted
    /// with; otherwise someone else sent the call (`PROTOCOL.md` section 9).
    #[error("runner {runner} refused the call as unauthenticated: {message}")]
    Unauthenticated {
        /// The runner.
        runner: String,
        /// What it said (never the key).
        message: String,
    },

    /// A stream broke: its sender failed (the message is the sender's
    /// error), went away (a dead runner or parent), stopped answering, or
    /// an item did not decode. It is the last item of the stream.
    #[error("stream ended with an error: {0}")]
    Stream(String),

    /// The pool has been shut down.
    #[error("pool `{0}` is shut down")]
    PoolClosed(String),
}

impl Error {
    /// A NATS failure while doing `context`.
    pub fn nats(context: impl Into<String>, source: impl Into<BoxError>) -> Error {
        Error::Nats {
            context: context.into(),
            source: Source::new(source),
        }
    }

    /// What kind of error this is, as a `Copy` value to match on, or to
    /// name in metrics and logs ([`ErrorKind::as_str`]: `timeout`,
    /// `runner_down`, ...).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Panicked { .. } => ErrorKind::Panicked,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::RunnerDown { .. } => ErrorKind::RunnerDown,
            Error::UnknownFunction { .. } => ErrorKind::UnknownFunction,
            Error::BuildMismatch { .. } => ErrorKind::BuildMismatch,
            Error::PayloadTooLarge { .. } => ErrorKind::PayloadTooLarge,
            Error::Encode { .. } => ErrorKind::Encode,
            Error::Decode { .. } => ErrorKind::Decode,
            Error::NatsUnreachable { .. } => ErrorKind::NatsUnreachable,
            Error::Nats { .. } => ErrorKind::Nats,
            Error::JetStreamDisabled { .. } => ErrorKind::JetStreamDisabled,
            Error::JetStreamNotReady { .. } => ErrorKind::JetStreamNotReady,
            Error::EmbeddedServer { .. } => ErrorKind::EmbeddedServer,
            Error::BootFailed { .. } => ErrorKind::BootFailed,
            Error::BootTimeout { .. } => ErrorKind::BootTimeout,
            Error::Config(_) => ErrorKind::Config,
            Error::RunnerStart(_) => ErrorKind::RunnerStart,
            Error::MissingState { .. } => ErrorKind::MissingState,
            Error::DuplicateFunction { .. } => ErrorKind::DuplicateFunction,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Unauthenticated { .. } => ErrorKind::Unauthenticated,
            Error::Stream(_) => ErrorKind::Stream,
            Error::PoolClosed(_) => ErrorKind::PoolClosed,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
        }
    }

    /// A boot failure, keeping the backend's error as the source.
    pub fn boot_failed(pool: impl Into<String>, source: impl Into<BoxError>) -> Error {
        let source = Source::new(source);
        Error::BootFailed {
            pool: pool.into(),
            reason: source.to_string(),
            source: Some(source),
        }
    }
}

/// The kind of an [`Error`], one per variant: `Copy`, to match on
/// without the variant's fields, and named in snake case by
/// [`ErrorKind::as_str`] (stable: for span fields, metrics and logs).
///
/// Set-up errors, which come from `init`, `connect` or a pool's `start`
/// and mean the app or its environment must change: `Config`,
/// `MissingState`, `DuplicateFunction`, `EmbeddedServer`,
/// `JetStreamDisabled`, `RunnerStart`. The others are errors of a call
/// (or cast, stream or child) and of the connection it uses; among them
/// `is_setup()` is false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Panicked`]: `panicked`.
    Panicked,
    /// [`Error::Timeout`]: `timeout`.
    Timeout,
    /// [`Error::RunnerDown`]: `runner_down`.
    RunnerDown,
    /// [`Error::UnknownFunction`]: `unknown_function`.
    UnknownFunction,
    /// [`Error::BuildMismatch`]: `build_mismatch`.
    BuildMismatch,
    /// [`Error::PayloadTooLarge`]: `payload_too_large`.
    PayloadTooLarge,
    /// [`Error::Encode`]: `encode`.
    Encode,
    /// [`Error::Decode`]: `decode`.
    Decode,
    /// [`Error::NatsUnreachable`]: `nats_unreachable`.
    NatsUnreachable,
    /// [`Error::Nats`]: `nats`.
    Nats,
    /// [`Error::JetStreamDisabled`]: `jetstream_disabled`.
    JetStreamDisabled,
    /// [`Error::JetStreamNotReady`]: `jetstream_not_ready`.
    JetStreamNotReady,
    /// [`Error::EmbeddedServer`]: `embedded_server`.
    EmbeddedServer,
    /// [`Error::BootFailed`]: `boot_failed`.
    BootFailed,
    /// [`Error::BootTimeout`]: `boot_timeout`.
    BootTimeout,
    /// [`Error::Config`]: `config`.
    Config,
    /// [`Error::RunnerStart`]: `runner_start`.
    RunnerStart,
    /// [`Error::MissingState`]: `missing_state`.
    MissingState,
    /// [`Error::DuplicateFunction`]: `duplicate_function`.
    DuplicateFunction,
    /// [`Error::Protocol`]: `protocol`.
    Protocol,
    /// [`Error::Unauthenticated`]: `unauthenticated`.
    Unauthenticated,
    /// [`Error::Stream`]: `stream`.
    Stream,
    /// [`Error::PoolClosed`]: `pool_closed`.
    PoolClosed,
    /// [`Error::PermissionDenied`]: `permission_denied`.
    PermissionDenied,
}

impl ErrorKind {
    /// The kind's name in snake case (`timeout`, `runner_down`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Panicked => "panicked",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RunnerDown => "runner_down",
            ErrorKind::UnknownFunction => "unknown_function",
            ErrorKind::BuildMismatch => "build_mismatch",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Encode => "encode",
            ErrorKind::Decode => "decode",
            ErrorKind::NatsUnreachable => "nats_unreachable",
            ErrorKind::Nats => "nats",
            ErrorKind::JetStreamDisabled => "jetstream_disabled",
            ErrorKind::JetStreamNotReady => "jetstream_not_ready",
            ErrorKind::EmbeddedServer => "embedded_server",
            ErrorKind::BootFailed => "boot_failed",
            ErrorKind::BootTimeout => "boot_timeout",
            ErrorKind::Config => "config",
            ErrorKind::RunnerStart => "runner_start",
            ErrorKind::MissingState => "missing_state",
            ErrorKind::DuplicateFunction => "duplicate_function",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Stream => "stream",
            ErrorKind::PoolClosed => "pool_closed",
            ErrorKind::PermissionDenied => "permission_denied",
        }
    }

    /// True for the errors of setting flame up (see [`ErrorKind`]), which
    /// retrying will not cure: the app or its environment must change.
    pub fn is_setup(self) -> bool {
        matches!(
            self,
            ErrorKind::Config
                | ErrorKind::MissingState
                | ErrorKind::DuplicateFunction
                | ErrorKind::EmbeddedServer
                | ErrorKind::JetStreamDisabled
                | ErrorKind::RunnerStart
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result alias used throughout flame.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
