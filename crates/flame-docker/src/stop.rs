//! Stopping runner containers: the pool's stopper, and the guard that
//! removes the container of a boot that did not finish.

use std::time::Duration;

use flame_core::backend::{run_detached, StopRunner};
use futures::future::BoxFuture;
use tracing::{debug, warn};

use crate::api::Api;

/// Seconds past `shutdown_timeout` before a stopping runner is killed: the
/// runner's own drain takes all of `shutdown_timeout`, and its exit comes
/// after it.
const STOP_MARGIN: Duration = Duration::from_secs(1);

/// The `t` of a stop for a drain of `grace`: whole seconds, rounded up,
/// plus [`STOP_MARGIN`].
pub(crate) fn stop_secs(grace: Duration) -> u64 {
    let grace = grace + STOP_MARGIN;
    grace.as_secs() + u64::from(grace.subsec_nanos() > 0)
}

/// Removes the container of a boot that did not finish, when dropped
/// armed: a boot future dropped mid-way (the pool's boot timeout, a closed
/// pool) still leaves nothing behind.
pub(crate) struct RemoveOnDrop {
    pub(crate) api: Api,
    pub(crate) id: String,
    pub(crate) armed: bool,
}

impl RemoveOnDrop {
    /// Removes the container now and waits for it.
    pub(crate) async fn remove_now(mut self) {
        self.armed = false;
        if let Err(e) = self.api.remove(&self.id).await {
            warn!(container = %self.id, "cannot remove a runner container that did not start: {e}");
        }
    }

    /// The boot succeeded: the container is the runner's now.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let (api, id) = (self.api.clone(), std::mem::take(&mut self.id));
            debug!(container = %id, "boot abandoned; removing its container");
            drop(run_detached("a runner container", async move {
                if let Err(e) = api.remove(&id).await {
                    warn!(container = %id, "cannot remove the container of an abandoned boot: {e}");
                }
            }));
        }
    }
}

/// Stops one runner container.
pub(crate) struct DockerStopper {
    pub(crate) api: Api,
    pub(crate) id: String,
}

impl StopRunner for DockerStopper {
    /// A stop with `t` covering `grace` (SIGTERM: the runner drains and
    /// exits, and the Engine removes its container; SIGKILL after `t`),
    /// then a wait for the removal; with no grace, a forced removal at
    /// once. The work starts now on a task of its own (a thread when there
    /// is no runtime), so it is done even if the returned future is
    /// dropped.
    fn stop(&self, grace: Duration) -> BoxFuture<'static, ()> {
        let (api, id) = (self.api.clone(), self.id.clone());
        run_detached("a runner container", async move {
            let secs = (!grace.is_zero()).then(|| stop_secs(grace));
            api.stop_and_remove(&id, secs).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_covers_the_drain() {
        assert_eq!(stop_secs(Duration::from_millis(1900)), 3);
        assert_eq!(stop_secs(Duration::from_secs(30)), 31);
        assert_eq!(stop_secs(Duration::from_millis(1)), 2);
    }
}
