//! Ending Machines, even when whoever asked is gone: the runner's stopper
//! ([`FlyStopper`]: SIGTERM, then destroy) and the guard that destroys the
//! Machine of a boot that did not finish ([`DestroyOnDrop`]).

use std::time::Duration;

use flame_core::backend::{run_detached, StopRunner};
use futures::future::BoxFuture;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::api::Api;
use crate::error::FlyError;

/// Time past `shutdown_timeout` before a stopping Machine is destroyed by
/// force: the runner's own drain takes all of `shutdown_timeout`, and its
/// exit and the platform's bookkeeping come after it.
const STOP_MARGIN: Duration = Duration::from_secs(2);

/// Destroys a Machine whose boot did not finish, when dropped armed: a
/// boot future dropped mid-way (the pool's boot timeout, a closed pool)
/// still leaves nothing behind.
pub(crate) struct DestroyOnDrop {
    api: Api,
    id: String,
    armed: bool,
}

impl DestroyOnDrop {
    /// Armed: Machine `id` is destroyed unless [`DestroyOnDrop::disarm`]
    /// is called first.
    pub(crate) fn new(api: Api, id: String) -> Self {
        DestroyOnDrop {
            api,
            id,
            armed: true,
        }
    }

    /// Destroys the Machine now and waits for it.
    pub(crate) async fn destroy_now(mut self) {
        self.armed = false;
        if let Err(e) = self.api.destroy(&self.id).await {
            warn!(machine = %self.id, "cannot destroy a Fly Machine that did not start: {e}");
        }
    }

    /// The boot succeeded: the Machine is the runner's now.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let (api, id) = (self.api.clone(), std::mem::take(&mut self.id));
            debug!(machine = %id, "boot abandoned; destroying its Machine");
            drop(run_detached("a Fly Machine", async move {
                if let Err(e) = api.destroy(&id).await {
                    warn!(machine = %id, "cannot destroy the Machine of an abandoned boot: {e}");
                }
            }));
        }
    }
}

/// Stops one runner's Machine.
pub(crate) struct FlyStopper {
    api: Api,
    id: String,
}

impl FlyStopper {
    /// The stopper of Machine `id`.
    pub(crate) fn new(api: Api, id: String) -> Self {
        FlyStopper { api, id }
    }
}

impl StopRunner for FlyStopper {
    /// Sends SIGTERM through the API (the runner drains and exits, and the
    /// platform destroys the Machine), then destroys it by force after
    /// `grace`. The work starts at once on a task of its own (a thread when
    /// there is no runtime, e.g. a pool dropped after its runtime), so it
    /// is done even when the returned future is dropped.
    fn stop(&self, grace: Duration) -> BoxFuture<'static, ()> {
        let (api, id) = (self.api.clone(), self.id.clone());
        run_detached("a Fly Machine", async move {
            if !grace.is_zero() {
                let body = serde_json::json!({
                    "signal": "SIGTERM",
                    // A duration string (a bare number is read as
                    // nanoseconds), in milliseconds so that no drain time
                    // is rounded away.
                    "timeout": format!("{}ms", grace.as_millis().max(1)),
                });
                let stopped = api
                    .send(|http, base| http.post(format!("{base}/{id}/stop")).json(&body))
                    .await;
                // 409 (not started) or 404 (gone): it has stopped already,
                // which is what was asked.
                let running = match &stopped {
                    Ok(_) => true,
                    Err(FlyError::Api { status, .. }) => *status != 409 && *status != 404,
                    Err(_) => true,
                };
                if stopped.is_ok() && running {
                    // The whole drain, and a margin, before forcing it.
                    api.wait_destroyed(&id, Instant::now() + grace + STOP_MARGIN)
                        .await;
                }
            }
            if let Err(e) = api.destroy(&id).await {
                warn!(machine = %id, "cannot destroy Fly Machine: {e}");
            }
        })
    }
}
