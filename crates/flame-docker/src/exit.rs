//! How a runner container ended, from the Engine's event stream.
//!
//! Runner containers are made with `AutoRemove`, so once one exits it is
//! soon gone, and with it `State.OOMKilled` and `State.ExitCode`: the
//! backend learns the end from the events the Engine sends about the
//! container instead (`oom` when the kernel's OOM killer struck in its
//! cgroup, `die` with the exit code). The stream is asked from a time
//! before the container was created (`since`), so nothing is missed
//! however late it is opened, and opened again from the last event seen
//! if it breaks.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::{EventsOptionsBuilder, InspectContainerOptions};
use futures::StreamExt;
use tracing::debug;

use crate::api::Api;

/// How long past a `die` with code 137 (SIGKILL) an `oom` event may still
/// come: the Engine reports the OOM kill and the exit separately, and
/// older ones (containerd before 2.2) in either order.
const LATE_OOM: Duration = Duration::from_millis(300);

/// Pause before opening the stream again after it broke.
const REOPEN_PAUSE: Duration = Duration::from_millis(500);

/// A point in time as the Engine's `since` takes it: seconds and
/// nanoseconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Since(Duration);

impl Since {
    /// A little before now (the Engine's clock may lag behind this one).
    pub(crate) fn now() -> Since {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Since(now.saturating_sub(Duration::from_secs(5)))
    }

    fn param(self) -> String {
        format!("{}.{:09}", self.0.as_secs(), self.0.subsec_nanos())
    }
}

/// Resolves when the container `id` has exited (or is gone), with a
/// reason for the pool: out of memory when the OOM killer ended it, else
/// its exit code.
pub(crate) async fn watch_exit(api: Api, id: String, mut since: Since) -> String {
    let short = &id[..id.len().min(12)];
    let mut oom = false;
    loop {
        let docker = match api.client().await {
            Ok(docker) => docker.clone(),
            Err(e) => {
                debug!(container = %short, "cannot watch the runner container: {e}");
                tokio::time::sleep(REOPEN_PAUSE).await;
                continue;
            }
        };
        let filters = HashMap::from([
            ("type", vec!["container"]),
            ("container", vec![id.as_str()]),
            ("event", vec!["oom", "die", "destroy"]),
        ]);
        let options = EventsOptionsBuilder::new()
            .since(&since.param())
            .filters(&filters)
            .build();
        let mut events = docker.events(Some(options));
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    debug!(container = %short, "the Engine's event stream broke: {e}");
                    break;
                }
            };
            if let Some(nanos) = event.time_nano {
                since = Since(Duration::from_nanos(nanos.max(0) as u64));
            }
            let attributes = event.actor.and_then(|a| a.attributes).unwrap_or_default();
            match event.action.as_deref() {
                Some("oom") => oom = true,
                Some("die") => {
                    let code = attributes
                        .get("exitCode")
                        .and_then(|c| c.parse::<i64>().ok());
                    if code == Some(137) && !oom {
                        // An OOM kill is a SIGKILL too: give its own event
                        // a moment to come.
                        let late = tokio::time::timeout(LATE_OOM, async {
                            while let Some(Ok(e)) = events.next().await {
                                if e.action.as_deref() == Some("oom") {
                                    return true;
                                }
                            }
                            false
                        });
                        oom = late.await.unwrap_or(false);
                    }
                    return reason(short, code, oom);
                }
                Some("destroy") => {
                    return format!("Docker container {short} was removed");
                }
                _ => {}
            }
        }
        // The stream ended or broke: a container the Engine no longer
        // knows will send nothing more.
        let inspected = docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await;
        if let Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) = inspected
        {
            return format!("Docker container {short} is gone");
        }
        tokio::time::sleep(REOPEN_PAUSE).await;
    }
}

/// The words the pool reports a container's end with.
pub(crate) fn reason(short: &str, code: Option<i64>, oom: bool) -> String {
    match (code, oom) {
        (Some(code), true) => format!(
            "Docker container {short}: runner process ran out of memory (killed by the OOM killer, exit code {code})"
        ),
        (None, true) => {
            format!("Docker container {short}: runner process ran out of memory (killed by the OOM killer)")
        }
        (Some(code), false) if code > 128 && code < 160 => format!(
            "Docker container {short}: runner process exited with code {code} (killed by signal {})",
            code - 128
        ),
        (Some(code), false) => {
            format!("Docker container {short}: runner process exited with code {code}")
        }
        (None, false) => format!("Docker container {short}: runner process exited"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_are_told_apart() {
        assert!(reason("abc", Some(137), true).contains("ran out of memory"));
        let killed = reason("abc", Some(137), false);
        assert!(
            killed.contains("code 137") && killed.contains("signal 9"),
            "{killed}"
        );
        assert!(reason("abc", Some(3), false).contains("exited with code 3"));
        assert_eq!(Since(Duration::new(12, 5)).param(), "12.000000005");
    }
}
