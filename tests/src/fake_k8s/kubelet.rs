//! The stand-in's kubelet: takes a created Pod through scheduling, image
//! pull and container start (or the ways those fail), runs its process,
//! and records how the process ended.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{PodRec, Shared};
use crate::harness::testapp;

/// Time as the API writes it (RFC 3339, UTC, whole seconds).
pub(crate) fn now() -> String {
    at(Duration::ZERO)
}

/// The time `after` from now, as the API writes it.
pub(crate) fn at(after: Duration) -> String {
    let secs = (SystemTime::now() + after)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

type Key = (String, String);

/// Changes the Pod at `key` with `edit` and tells the watches; false when
/// the Pod is gone.
fn update(s: &Shared, key: &Key, edit: impl FnOnce(&mut PodRec)) -> bool {
    let mut inner = s.inner.lock().unwrap();
    let Some(rec) = inner.pods.get_mut(key) else {
        return false;
    };
    edit(rec);
    s.changed(&mut inner, key, "MODIFIED");
    true
}

/// The container status of the Pod's (only) container in `state`.
fn container_status(pod: &Value, state: Value, ready: bool) -> Value {
    let c = &pod["spec"]["containers"][0];
    json!([{
        "name": c["name"], "image": c["image"], "imageID": "",
        "ready": ready, "started": state.get("running").is_some(), "restartCount": 0,
        "state": state,
    }])
}

fn waiting(rec: &mut PodRec, reason: &str, message: &str) {
    let statuses = container_status(
        &rec.pod,
        json!({"waiting": {"reason": reason, "message": message}}),
        false,
    );
    rec.pod["status"]["containerStatuses"] = statuses;
}

/// Bytes of a Kubernetes memory quantity (`512Mi`, `1G`, `1048576`).
fn quantity_bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    Some(n * factor)
}

/// The container's environment as the kubelet makes it: literal values,
/// Secret references resolved (a missing Secret or key is the
/// `CreateContainerConfigError` message), the Pod's own fields.
fn resolve_env(s: &Shared, pod: &Value) -> Result<Vec<(String, String)>, String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let c = &pod["spec"]["containers"][0];
    let inner = s.inner.lock().unwrap();
    let secret = |name: &str| inner.secrets.get(&(ns.to_string(), name.to_string()));
    let mut env = Vec::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        if let Some(name) = from["secretRef"]["name"].as_str() {
            match secret(name) {
                Some(data) => env.extend(data.iter().map(|(k, v)| {
                    let prefix = from["prefix"].as_str().unwrap_or_default();
                    (format!("{prefix}{k}"), v.clone())
                })),
                None if from["secretRef"]["optional"] == true => {}
                None => return Err(format!("secret \"{name}\" not found")),
            }
        } else if let Some(name) = from["configMapRef"]["name"].as_str() {
            return Err(format!("configmap \"{name}\" not found"));
        }
    }
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_string();
        let from = &var["valueFrom"];
        let value = if let Some(value) = var["value"].as_str() {
            value.to_string()
        } else if let Some(key_ref) = from.get("secretKeyRef") {
            let (secret_name, key) = (
                key_ref["name"].as_str().unwrap_or_default(),
                key_ref["key"].as_str().unwrap_or_default(),
            );
            match secret(secret_name).map(|data| data.get(key)) {
                Some(Some(v)) => v.clone(),
                _ if key_ref["optional"] == true => continue,
                Some(None) => {
                    return Err(format!(
                        "couldn't find key {key} in Secret {ns}/{secret_name}"
                    ))
                }
                None => return Err(format!("secret \"{secret_name}\" not found")),
            }
        } else if let Some(field) = from["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.name" => pod["metadata"]["name"].as_str().unwrap_or_default().into(),
                "metadata.namespace" => ns.into(),
                "status.podIP" => "127.0.0.1".into(),
                _ => String::new(),
            }
        } else if let Some(cm) = from["configMapKeyRef"]["name"].as_str() {
            return Err(format!("configmap \"{cm}\" not found"));
        } else {
            String::new()
        };
        env.push((name, value));
    }
    Ok(env)
}

/// Takes the Pod at `key` from `Pending` to running its process, or to
/// the state where it stays.
pub(crate) async fn run(s: Arc<Shared>, key: Key) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let Some(pod) = s
        .inner
        .lock()
        .unwrap()
        .pods
        .get(&key)
        .map(|r| r.pod.clone())
    else {
        return;
    };
    let c = &pod["spec"]["containers"][0];
    let image = c["image"].as_str().unwrap_or_default().to_string();
    let wants_gpu = !c["resources"]["limits"]["nvidia.com/gpu"].is_null()
        || !c["resources"]["requests"]["nvidia.com/gpu"].is_null();
    if wants_gpu {
        update(&s, &key, |rec| {
            rec.pod["status"]["conditions"] = json!([{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "lastTransitionTime": now(),
                "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. \
                            preemption: 0/1 nodes are available: 1 No preemption victims \
                            found for incoming pod.",
            }]);
        });
        return;
    }
    let scheduled = update(&s, &key, |rec| {
        rec.pod["spec"]["nodeName"] = json!("stand-in-node");
        rec.pod["status"]["conditions"] = json!([{
            "type": "PodScheduled", "status": "True", "lastTransitionTime": now(),
        }]);
        waiting(rec, "ContainerCreating", "");
    });
    if !scheduled || image.contains("stuck") {
        return;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    if image.contains("no-such-image") {
        let pull_failed = format!(
            "rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": \
             failed to resolve reference \"{image}\": not found"
        );
        if update(&s, &key, |rec| waiting(rec, "ErrImagePull", &pull_failed)) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let backoff = format!("Back-off pulling image \"{image}\"");
            update(&s, &key, |rec| waiting(rec, "ImagePullBackOff", &backoff));
        }
        return;
    }
    let env = match resolve_env(&s, &pod) {
        Ok(env) => env,
        Err(message) => {
            update(&s, &key, |rec| {
                waiting(rec, "CreateContainerConfigError", &message)
            });
            return;
        }
    };
    let limit = c["resources"]["limits"]["memory"]
        .as_str()
        .filter(|_| image.contains("memory-limited"))
        .and_then(quantity_bytes);
    start(&s, &key, &image, env, limit);
}

/// Starts the container's process (under the lock, so that a Pod deleted
/// meanwhile gets none) and marks the Pod running.
fn start(s: &Arc<Shared>, key: &Key, image: &str, env: Vec<(String, String)>, limit: Option<u64>) {
    let mut cmd = std::process::Command::new(testapp());
    if image.contains("exits-early") {
        cmd.arg("no-state");
    }
    // A container starts with only the env its Pod gives it.
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(env).stdin(std::process::Stdio::null());
    if let Some(bytes) = limit {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches no memory of
        // the parent.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut inner = s.inner.lock().unwrap();
    let Some(rec) = inner.pods.get_mut(key) else {
        return;
    };
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            waiting(rec, "RunContainerError", &e.to_string());
            s.changed(&mut inner, key, "MODIFIED");
            return;
        }
    };
    rec.pid = Some(child.id());
    rec.limited = limit.is_some();
    rec.pod["status"]["phase"] = json!("Running");
    rec.pod["status"]["podIP"] = json!("127.0.0.1");
    rec.pod["status"]["startTime"] = json!(now());
    rec.pod["status"]["conditions"] = json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True"},
    ]);
    let statuses = container_status(&rec.pod, json!({"running": {"startedAt": now()}}), true);
    rec.pod["status"]["containerStatuses"] = statuses;
    s.changed(&mut inner, key, "MODIFIED");
    drop(inner);
    let (s, key) = (s.clone(), key.clone());
    std::thread::spawn(move || {
        use std::os::unix::process::ExitStatusExt;
        let mut child = child;
        let Ok(ended) = child.wait() else {
            return;
        };
        exited(&s, &key, ended.code(), ended.signal());
    });
}

/// Records how the Pod's process ended; a Pod being deleted then leaves
/// the API.
fn exited(s: &Shared, key: &Key, code: Option<i32>, signal: Option<i32>) {
    let mut inner = s.inner.lock().unwrap();
    let Some(rec) = inner.pods.get_mut(key) else {
        return;
    };
    // A process at its memory limit that was killed, or aborted on a
    // failed allocation, is what the node's OOM killer would have ended.
    let oom = rec.limited && matches!(signal, Some(libc::SIGKILL | libc::SIGABRT));
    let exit_code = if oom {
        137
    } else {
        code.unwrap_or_else(|| 128 + signal.unwrap_or(0))
    };
    let reason = match (oom, exit_code) {
        (true, _) => "OOMKilled",
        (false, 0) => "Completed",
        _ => "Error",
    };
    let state = json!({"terminated": {
        "exitCode": exit_code, "reason": reason,
        "startedAt": rec.pod["status"]["startTime"], "finishedAt": now(),
    }});
    rec.pod["status"]["phase"] = json!(if exit_code == 0 {
        "Succeeded"
    } else {
        "Failed"
    });
    rec.pod["status"]["conditions"] = json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "False", "reason": "PodCompleted"},
    ]);
    rec.pod["status"]["containerStatuses"] = container_status(&rec.pod, state, false);
    let deleting = !rec.pod["metadata"]["deletionTimestamp"].is_null();
    s.changed(&mut inner, key, "MODIFIED");
    if deleting {
        s.changed(&mut inner, key, "DELETED");
    }
}
