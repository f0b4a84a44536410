//! Following one Pod: a watch that is resumed where it stopped when the
//! server closes it, and started again from a fresh read when the server
//! says its place is too old (`410 Gone`), as the Kubernetes API concepts
//! ("Efficient detection of changes") ask of clients; and what the Pod's
//! status says about its runner (started, failed to start, exited).

use std::time::Duration;

use flame_core::backoff::Backoff;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};
use kube::api::WatchEvent;
use tokio::time::Instant;
use tracing::debug;

use crate::api::{boxed, from_status, K8sError, PodEvents, Pods, REQUEST_TIMEOUT};

/// How long the server may keep one watch open (`timeoutSeconds`); it is
/// resumed after.
const WATCH_SECS: u32 = 60;

/// Longest wait for the next event of an open watch: past the watch's own
/// timeout (and bookmarks), silence means a dead connection.
const EVENT_SILENCE: Duration = Duration::from_secs(WATCH_SECS as u64 + 30);

/// What became of the watched Pod.
#[derive(Debug)]
pub(crate) enum Change {
    /// It was created or changed: its latest state.
    Updated(Box<Pod>),
    /// It is gone from the API.
    Deleted,
}

/// A watch of one Pod.
pub(crate) struct PodWatch {
    pods: Pods,
    name: String,
    /// The resource version to resume from.
    version: String,
    events: Option<PodEvents>,
    backoff: Backoff,
}

impl std::fmt::Debug for PodWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodWatch")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl PodWatch {
    /// Follows Pod `name` from resource version `version` on (that of the
    /// answer that created or read it).
    pub(crate) fn new(pods: Pods, name: &str, version: &str) -> PodWatch {
        PodWatch {
            pods,
            name: name.to_string(),
            version: version.to_string(),
            events: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        }
    }

    /// The next change of the Pod. Errors are those that watching again
    /// would meet too (403: no `watch` permission); anything else (a
    /// closed watch, a dropped connection, 5xx) is resumed here.
    pub(crate) async fn next(&mut self) -> Result<Change, K8sError> {
        loop {
            let events = match &mut self.events {
                Some(events) => events,
                None => match self.pods.watch(&self.name, &self.version, WATCH_SECS).await {
                    Ok(stream) => self.events.insert(boxed(stream)),
                    Err(e) => {
                        if e.status() == Some(410) {
                            return self.relist().await;
                        }
                        if !e.is_transient() {
                            return Err(e);
                        }
                        debug!(pod = %self.name, "cannot watch the Pod, trying again: {e}");
                        tokio::time::sleep(self.backoff.next_pause()).await;
                        continue;
                    }
                },
            };
            let event = match tokio::time::timeout(EVENT_SILENCE, events.next()).await {
                Ok(event) => event,
                Err(_) => {
                    debug!(pod = %self.name, "watch silent for {EVENT_SILENCE:?}; resuming it");
                    None
                }
            };
            match event {
                // The server ended the watch (its timeout, a restart):
                // resume where it stopped.
                None => {
                    debug!(pod = %self.name, version = %self.version, "watch closed; resuming it");
                    self.events = None;
                }
                Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                    self.backoff.reset();
                    if let Some(v) = &pod.metadata.resource_version {
                        self.version = v.clone();
                    }
                    return Ok(Change::Updated(Box::new(pod)));
                }
                Some(Ok(WatchEvent::Deleted(_))) => return Ok(Change::Deleted),
                Some(Ok(WatchEvent::Bookmark(mark))) => {
                    self.version = mark.metadata.resource_version;
                }
                // The place to resume from is older than the server keeps:
                // read the Pod afresh and watch from there.
                Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                    self.events = None;
                    return self.relist().await;
                }
                Some(Ok(WatchEvent::Error(status))) => {
                    let e = from_status(&status, self.pods.namespace());
                    self.events = None;
                    if !e.is_transient() {
                        return Err(e);
                    }
                    tokio::time::sleep(self.backoff.next_pause()).await;
                }
                Some(Err(e)) => {
                    debug!(pod = %self.name, "watch broke, resuming it: {e}");
                    self.events = None;
                    tokio::time::sleep(self.backoff.next_pause()).await;
                }
            }
        }
    }

    /// After a `410 Gone`: the Pod as it is now, read by a list (whose
    /// version a watch can start from), as the API concepts ask.
    async fn relist(&mut self) -> Result<Change, K8sError> {
        debug!(pod = %self.name, version = %self.version, "watch expired (410); listing the Pod again");
        let until = Some(Instant::now() + REQUEST_TIMEOUT * 2);
        let (pod, version) = self.pods.list_one(&self.name, until).await?;
        self.version = version;
        Ok(match pod {
            Some(pod) => Change::Updated(Box::new(pod)),
            None => Change::Deleted,
        })
    }
}

/// Waiting reasons of a container that will not start by waiting longer
/// (with `restartPolicy: Never`), from Kubernetes' container states.
const HOPELESS_WAITS: [&str; 7] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
];

/// Where a booting Pod stands.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Its runner container runs.
    Started,
    /// It will not start: Kubernetes' reason and message.
    Failed { reason: String, message: String },
    /// The scheduler finds no node for it (its message).
    Unschedulable(String),
    /// On its way.
    Pending(String),
}

/// The status of the runner container (named `container`).
fn container_status<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)
}

/// What the Pod's status says of its boot.
pub(crate) fn progress(pod: &Pod, container: &str) -> Progress {
    let status = pod.status.clone().unwrap_or_default();
    if let Some(state) = container_status(pod, container).and_then(|c| c.state.as_ref()) {
        if let Some(ended) = &state.terminated {
            return Progress::Failed {
                reason: ended.reason.clone().unwrap_or_else(|| "Terminated".into()),
                message: ended_message(ended),
            };
        }
        if let Some(waiting) = &state.waiting {
            let reason = waiting.reason.clone().unwrap_or_default();
            if HOPELESS_WAITS.contains(&reason.as_str()) {
                return Progress::Failed {
                    reason,
                    message: waiting.message.clone().unwrap_or_default(),
                };
            }
        }
        if state.running.is_some() {
            return Progress::Started;
        }
    }
    let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
    if phase == "Failed" || phase == "Succeeded" {
        return Progress::Failed {
            reason: status.reason.clone().unwrap_or(phase),
            message: status.message.clone().unwrap_or_default(),
        };
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        return Progress::Unschedulable(c.message.clone().unwrap_or_default());
    }
    let waiting = container_status(pod, container)
        .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
    Progress::Pending(match waiting {
        Some(reason) => format!("{phase} ({reason})"),
        None => phase,
    })
}

/// How a terminated container ended, in words the pool's callers read:
/// out of memory for `OOMKilled`, else the exit code and Kubernetes'
/// reason.
fn ended_message(ended: &ContainerStateTerminated) -> String {
    let reason = ended.reason.as_deref().unwrap_or("");
    if reason == "OOMKilled" {
        return format!(
            "runner process ran out of memory (OOMKilled, exit code {})",
            ended.exit_code
        );
    }
    let mut text = format!("runner process exited with code {}", ended.exit_code);
    if let Some(signal) = ended.signal {
        text.push_str(&format!(" (signal {signal})"));
    }
    if !reason.is_empty() {
        text.push_str(&format!(" ({reason})"));
    }
    if let Some(message) = ended.message.as_deref().filter(|m| !m.is_empty()) {
        text.push_str(&format!(": {message}"));
    }
    text
}

/// How the runner of a started Pod ended, once it has: `None` while its
/// container still runs.
pub(crate) fn exit_reason(pod: &Pod, container: &str) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    if let Some(ended) = container_status(pod, container)
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
    {
        return Some(format!("Pod {name}: {}", ended_message(ended)));
    }
    let status = pod.status.as_ref()?;
    match status.phase.as_deref() {
        Some(phase @ ("Failed" | "Succeeded")) => Some(format!(
            "Pod {name} {}: {}",
            phase.to_lowercase(),
            status
                .message
                .as_deref()
                .or(status.reason.as_deref())
                .unwrap_or("its runner ended")
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "flame-p-x1"},
            "spec": {"containers": [{"name": "runner"}]},
            "status": status,
        }))
        .unwrap()
    }

    fn waiting(reason: &str) -> Pod {
        pod(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "runner", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": "says why"}}}]}),
        )
    }

    fn terminated(reason: &str, code: i32) -> Pod {
        pod(
            serde_json::json!({"phase": "Failed", "containerStatuses": [{
            "name": "runner", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"reason": reason, "exitCode": code}}}]}),
        )
    }

    #[test]
    fn hopeless_waits_fail_and_others_wait() {
        for reason in [
            "ErrImagePull",
            "ImagePullBackOff",
            "CreateContainerConfigError",
            "CrashLoopBackOff",
        ] {
            assert_eq!(
                progress(&waiting(reason), "runner"),
                Progress::Failed {
                    reason: reason.into(),
                    message: "says why".into()
                }
            );
        }
        assert_eq!(
            progress(&waiting("ContainerCreating"), "runner"),
            Progress::Pending("Pending (ContainerCreating)".into())
        );
        let unschedulable = pod(serde_json::json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}));
        assert_eq!(
            progress(&unschedulable, "runner"),
            Progress::Unschedulable(
                "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".into()
            )
        );
    }

    #[test]
    fn exits_say_out_of_memory_or_their_code() {
        let oom = exit_reason(&terminated("OOMKilled", 137), "runner").unwrap();
        assert!(
            oom.contains("ran out of memory") && oom.contains("137"),
            "{oom}"
        );
        let error = exit_reason(&terminated("Error", 3), "runner").unwrap();
        assert_eq!(
            error,
            "Pod flame-p-x1: runner process exited with code 3 (Error)"
        );
        assert!(matches!(
            progress(&terminated("Error", 3), "runner"),
            Progress::Failed { message, .. } if message.contains("exited with code 3")
        ));
    }
}
