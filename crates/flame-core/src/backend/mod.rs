//! Backends start and stop runners: local processes, Fly Machines, and so on.
//!
//! A backend only starts the runner and can stop it; the runner connects to
//! NATS and reports ready on its own.

mod boot_error;
mod detached;
mod local;

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::BoxError;

pub use boot_error::BootError;
pub use detached::run_detached;
pub use local::{LocalBackend, RUNNER_ID_ENV};

/// Start of the line a runner writes on its stderr when it cannot start
/// serving (bad credentials, a missing NATS permission, no parent...),
/// followed by the reason, just before it exits with code 1. The reason
/// names no secret. [`LocalBackend`] reads its runners' stderr and puts the
/// last such line into the exit reason, which the pool reports as the boot
/// failure; other backends can do the same with the logs they collect.
pub const RUNNER_FAILURE_PREFIX: &str = "flame runner failed to start: ";

/// What a backend needs to start one runner.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BootSpec {
    /// The pool.
    pub pool: String,
    /// Id the runner will use.
    pub runner_id: String,
    /// Environment of the runner: `FLAME_PARENT` plus the pool's forwarded
    /// variables.
    pub env: Vec<(String, String)>,
    /// The parent that boots it. A backend that can label what it starts
    /// (Fly metadata, say) records it, so that [`Backend::list`] tells a
    /// later parent whose runners are left over.
    pub parent_id: String,
    /// How long the pool gives this runner to boot and report ready,
    /// counted from the call of [`Backend::boot`]. A backend that waits on
    /// its platform (a machine to start) never waits longer, and cleans up
    /// what it made before it returns the failure.
    pub boot_timeout: Option<Duration>,
}

impl BootSpec {
    /// Describes a runner to start.
    pub fn new(pool: String, runner_id: String, env: Vec<(String, String)>) -> BootSpec {
        BootSpec {
            pool,
            runner_id,
            env,
            parent_id: String::new(),
            boot_timeout: None,
        }
    }

    /// Sets the time the pool gives the boot ([`BootSpec::boot_timeout`]).
    pub fn boot_timeout(mut self, timeout: Duration) -> BootSpec {
        self.boot_timeout = Some(timeout);
        self
    }

    /// Names the parent that boots the runner.
    pub fn parent(mut self, parent_id: impl Into<String>) -> BootSpec {
        self.parent_id = parent_id.into();
        self
    }
}

impl fmt::Debug for BootSpec {
    /// The environment's names only: its values hold secrets (the runner's
    /// event key, forwarded credentials).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("BootSpec")
            .field("pool", &self.pool)
            .field("runner_id", &self.runner_id)
            .field("env", &names)
            .field("parent_id", &self.parent_id)
            .field("boot_timeout", &self.boot_timeout)
            .finish()
    }
}

/// A runner a backend reports by [`Backend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listed {
    /// The backend's handle, as [`Booted::handle`] was.
    pub handle: String,
    /// The runner's id.
    pub runner_id: String,
    /// The parent that booted it ([`BootSpec::parent_id`]).
    pub parent_id: String,
}

impl Listed {
    /// Describes a listed runner.
    pub fn new(handle: String, runner_id: String, parent_id: String) -> Listed {
        Listed {
            handle,
            runner_id,
            parent_id,
        }
    }
}

/// A runner the backend started.
pub struct Booted {
    /// How the backend knows it, for logs (e.g. `pid 4242`, a machine id).
    pub handle: String,
    /// Resolves with a reason when the backend sees the runner stop, e.g. a
    /// local process exiting. `None` if the backend cannot tell; the pool
    /// then relies on heartbeats.
    pub exited: Option<BoxFuture<'static, String>>,
    /// Stops the runner.
    pub stopper: Box<dyn StopRunner>,
}

impl fmt::Debug for Booted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Booted")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

/// Stops a runner a backend started.
pub trait StopRunner: Send + Sync {
    /// Asks the runner to stop (it drains in-flight work), and forces it
    /// after `grace`. Resolves once it is stopped or forced.
    ///
    /// The stop must **start when this is called**, not when the returned
    /// future is first polled: a pool that is dropped calls `stop` on every
    /// runner and cannot wait for the futures (it may not even be inside a
    /// tokio runtime any more). Do the work on a task of your own (or
    /// signal an existing one) and return a future that only waits for it.
    fn stop(&self, grace: Duration) -> BoxFuture<'static, ()>;

    /// Lets the runner outlive this handle: dropping it afterwards does not
    /// stop the runner. A parent leaving a shared pool detaches the runners
    /// it booted, so they go on serving the other parents (who stop them
    /// through the pool when they are no longer wanted). The default does
    /// nothing, for backends whose runners do not depend on the handle.
    fn detach(&self) {}
}

/// Starts runners.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Starts one runner. Resolves once the backend has started it; the
    /// runner reports ready over NATS later.
    ///
    /// A failure is reported to the pool's callers and hooks as
    /// `Error::BootFailed`, with the returned error as its source. Return a
    /// [`BootError::permanent`] for a failure that booting again would meet
    /// too (bad credentials, an invalid configuration, an image that cannot
    /// start): waiting callers then fail at once. Any other error is
    /// transient and retried with backoff.
    ///
    /// The pool drops this future when its boot timeout passes (or the
    /// pool closes): whatever the boot made by then must not outlive the
    /// drop. Clean up from a guard that acts on drop, or from a task of
    /// your own, never only after an `.await` that may not come.
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>>;

    /// True when the runners run on this machine (so a loopback NATS
    /// address reaches them). The default is false: a pool on a backend
    /// of other machines refuses to tell its runners a loopback address.
    fn runners_are_local(&self) -> bool {
        false
    }

    /// The runners of `pool` that this backend's platform still runs, with
    /// the parent that booted each: a pool lists them when it starts and
    /// every so often, and terminates those whose parent is gone (a parent
    /// killed in the middle of a boot leaves its machine behind). The
    /// default lists nothing, for backends whose runners cannot outlive
    /// their parent (child processes).
    fn list(&self, pool: &str) -> BoxFuture<'static, Result<Vec<Listed>, BoxError>> {
        let _ = pool;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Forcibly stops a runner known only by its [`Booted::handle`], e.g. one
    /// booted by another parent that has since died, and resolves once it is
    /// gone. Used by a shared pool's scaler to clean up after runners that
    /// stopped answering. The default cannot do it and says so.
    fn terminate(&self, handle: &str, runner_id: &str) -> BoxFuture<'static, Result<(), BoxError>> {
        let _ = runner_id;
        let msg = format!("this backend cannot terminate runner `{handle}` by its handle");
        Box::pin(async move { Err(msg.into()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_variable_names_not_values() {
        let spec = BootSpec::new(
            "p".into(),
            "r".into(),
            vec![("NATS_PASSWORD".into(), "s3cret".into())],
        );
        let shown = format!("{spec:?}");
        assert!(
            shown.contains("NATS_PASSWORD") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
