//! A runner's Pod from the boot's side: waiting until it has started,
//! following it to its end, and stopping it with a grace period.

use std::time::Duration;

use flame_core::backend::StopRunner;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use tokio::time::Instant;
use tracing::warn;

use crate::api::{K8sError, Pods, REQUEST_TIMEOUT};
use crate::cleanup::{delete_and_wait, wait_gone};
use crate::pod::RUNNER_CONTAINER;
use crate::watch::{self, Change, PodWatch, Progress};
use flame_core::backend::run_detached;

/// Time past the drain before a stopping Pod is deleted with no grace: the
/// kubelet's SIGKILL comes at the grace period's end, and the API removes
/// the Pod once the kubelet reports it gone.
const STOP_MARGIN: Duration = Duration::from_secs(3);

/// Waits until the created Pod's container runs: an error when it will
/// not (Kubernetes' reason), is unschedulable past `unschedulable`, or is
/// still pending at `deadline`.
pub(crate) async fn wait_started(
    watch: &mut PodWatch,
    created: &Pod,
    deadline: Option<Instant>,
    unschedulable: Duration,
) -> Result<(), K8sError> {
    let name = created.metadata.name.clone().unwrap_or_default();
    let since = Instant::now();
    let mut now = watch::progress(created, RUNNER_CONTAINER);
    loop {
        let mut wake = deadline;
        match now {
            Progress::Started => return Ok(()),
            Progress::Failed { reason, message } => {
                return Err(K8sError::NotStarted {
                    pod: name,
                    reason,
                    message,
                })
            }
            Progress::Unschedulable(ref message) => {
                if since.elapsed() >= unschedulable {
                    return Err(K8sError::NotStarted {
                        pod: name,
                        reason: "Unschedulable".into(),
                        message: format!(
                            "{message} (unschedulable for {unschedulable:?}: \
                             K8sBackendBuilder::unschedulable_timeout)"
                        ),
                    });
                }
                let at = since + unschedulable;
                wake = Some(deadline.map_or(at, |d| d.min(at)));
            }
            Progress::Pending(_) => {}
        }
        let next = match wake {
            Some(at) => tokio::time::timeout_at(at, watch.next()).await.ok(),
            None => Some(watch.next().await),
        };
        match next {
            Some(Ok(Change::Updated(pod))) => now = watch::progress(&pod, RUNNER_CONTAINER),
            Some(Ok(Change::Deleted)) => {
                return Err(K8sError::NotYet {
                    pod: name,
                    what: "it was deleted before it started".into(),
                })
            }
            Some(Err(e)) => return Err(e),
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                let what = match now {
                    Progress::Pending(what) => what,
                    Progress::Unschedulable(message) => format!("unschedulable: {message}"),
                    _ => "on its way".into(),
                };
                return Err(K8sError::NotYet {
                    pod: name,
                    what: format!("still {what} when the boot timeout ran out"),
                });
            }
            // The unschedulable bound came: judged at the loop's top.
            None => {}
        }
    }
}

/// Resolves when the runner's Pod ends, with a reason for the pool, and
/// deletes the Pod (an ended Pod stays in the API until deleted).
pub(crate) async fn watch_exit(mut watch: PodWatch, pods: Pods, name: String) -> String {
    loop {
        match watch.next().await {
            Ok(Change::Updated(pod)) => {
                if let Some(reason) = watch::exit_reason(&pod, RUNNER_CONTAINER) {
                    // (A Pod being deleted already, by a stop say, leaves
                    // by itself now that its container has ended.)
                    if pod.metadata.deletion_timestamp.is_none() {
                        delete_and_wait(&pods, &name).await;
                    }
                    return reason;
                }
            }
            Ok(Change::Deleted) => return format!("Pod {name} was deleted"),
            Err(e) => {
                // Heartbeats still tell the pool when the runner is gone.
                warn!(pod = %name, "cannot watch the runner's Pod any more: {e}");
                return futures::future::pending().await;
            }
        }
    }
}

pub(crate) struct PodStopper {
    pub(crate) pods: Pods,
    pub(crate) name: String,
}

/// `grace` in whole seconds, rounded up: a grace period never ends before
/// the drain it stands for.
fn grace_secs(grace: Duration) -> u32 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

impl StopRunner for PodStopper {
    /// Deletes the Pod with `gracePeriodSeconds` of `grace` rounded up
    /// (the kubelet sends SIGTERM, the runner drains and exits, SIGKILL
    /// comes at the period's end), waits until it is gone, and deletes it
    /// with no grace if it is still there a margin later. The work starts
    /// at once on a task of its own (a thread when there is no runtime),
    /// so it is done even when the returned future is dropped.
    fn stop(&self, grace: Duration) -> BoxFuture<'static, ()> {
        let (pods, name) = (self.pods.clone(), self.name.clone());
        run_detached("a runner Pod", async move {
            let secs = grace_secs(grace);
            let asked = Instant::now();
            match pods
                .delete(&name, secs, Some(asked + REQUEST_TIMEOUT))
                .await
            {
                Ok(None) => return,
                Ok(Some(_)) => {
                    let until = Instant::now() + Duration::from_secs(secs.into()) + STOP_MARGIN;
                    if wait_gone(&pods, &name, until).await {
                        return;
                    }
                }
                Err(e) => warn!(pod = %name, "cannot delete runner Pod: {e}"),
            }
            delete_and_wait(&pods, &name).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_is_rounded_up() {
        assert_eq!(grace_secs(Duration::ZERO), 0);
        assert_eq!(grace_secs(Duration::from_millis(1900)), 2);
        assert_eq!(grace_secs(Duration::from_secs(30)), 30);
    }
}
