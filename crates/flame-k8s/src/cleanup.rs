//! Cleaning up after runner Pods: deletes that happen even when whoever
//! asked is gone (a boot future dropped, a pool dropped after its
//! runtime), and waits, bounded, for a Pod to leave the API.

use std::time::Duration;

use flame_core::backend::run_detached;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::api::{Pods, REQUEST_TIMEOUT};
use crate::watch::{Change, PodWatch};

/// Longest wait for a Pod deleted with no grace to leave the API.
pub(crate) const GONE_WAIT: Duration = Duration::from_secs(10);

/// Deletes the Pod of a boot that did not finish, when dropped armed: a
/// boot future dropped mid-way (the pool's boot timeout, a closed pool)
/// still leaves nothing behind.
pub(crate) struct DeleteOnDrop {
    pub(crate) pods: Pods,
    pub(crate) name: String,
    pub(crate) armed: bool,
}

impl DeleteOnDrop {
    /// Deletes the Pod now (no grace: it never served) and waits until it
    /// is gone.
    pub(crate) async fn delete_now(mut self) {
        self.armed = false;
        delete_and_wait(&self.pods, &self.name).await;
    }

    /// The boot succeeded: the Pod is the runner's now.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let (pods, name) = (self.pods.clone(), std::mem::take(&mut self.name));
            debug!(pod = %name, "boot abandoned; deleting its Pod");
            drop(run_detached("a runner Pod", async move {
                delete_and_wait(&pods, &name).await;
            }));
        }
    }
}

/// Deletes a Pod with no grace and waits (a while) until the API has
/// let it go.
pub(crate) async fn delete_and_wait(pods: &Pods, name: &str) {
    match pods
        .delete(name, 0, Some(Instant::now() + REQUEST_TIMEOUT))
        .await
    {
        Ok(None) => {}
        Ok(Some(_)) => {
            wait_gone(pods, name, Instant::now() + GONE_WAIT).await;
        }
        Err(e) => warn!(pod = %name, "cannot delete runner Pod: {e}"),
    }
}

/// Waits until Pod `name` is gone from the API, at most until `until`;
/// true when it is.
pub(crate) async fn wait_gone(pods: &Pods, name: &str, until: Instant) -> bool {
    // A read first, to watch from its version: the Pod may be gone
    // already.
    let version = match pods.list_one(name, Some(until)).await {
        Ok((None, _)) => return true,
        Ok((Some(_), version)) => version,
        Err(e) => {
            debug!(pod = %name, "cannot read the Pod: {e}");
            return false;
        }
    };
    let mut watch = PodWatch::new(pods.clone(), name, &version);
    loop {
        match tokio::time::timeout_at(until, watch.next()).await {
            Ok(Ok(Change::Deleted)) => return true,
            Ok(Ok(Change::Updated(_))) => {}
            Ok(Err(e)) => {
                debug!(pod = %name, "cannot watch the Pod's end: {e}");
                return false;
            }
            Err(_) => return false,
        }
    }
}
