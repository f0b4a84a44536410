//! A local server that speaks enough of the Fly Machines API for flame's Fly
//! backend, and really starts a runner process (the test app) for each
//! Machine it is asked to create. Machines exit like real ones: a process
//! that ends is a destroyed Machine (`auto_destroy`). The token `bad-token`
//! is refused with 401, as Fly refuses an unknown one, and an image whose
//! name holds `invalid` with 422, as Fly refuses a config it cannot run; a
//! Machine of an image whose name holds `broken` fails to start. A Machine
//! of an image whose name holds `memory-limited` gets its `guest.memory_mb`
//! as its process's address-space limit, and running out of it is reported
//! as Fly does: an `exit` event with `oom_killed: true` on `GET` of the
//! Machine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::harness::{process_alive, testapp};

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `POST`, `GET`, `DELETE`.
    pub method: &'static str,
    /// Path after `/v1/apps/<app>/machines`.
    pub path: String,
    /// The `Authorization` header.
    pub authorization: String,
    /// JSON body, if any.
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    /// Machine id to runner pid.
    machines: HashMap<String, u32>,
    /// Machine id to its config's metadata.
    metadata: HashMap<String, Value>,
    /// Machines that failed to start.
    failed: Vec<String>,
    /// How each Machine's process ended (exit code, signal).
    exits: HashMap<String, (Option<i32>, Option<i32>)>,
    /// Machines with a memory limit (`memory-limited` images).
    limited: Vec<String>,
    /// Machines stopped or destroyed through the API.
    stopped: Vec<String>,
}

/// The fake API; stops its server and kills its machines on drop.
pub struct FakeFly {
    /// Base URL to give `FlyBackendBuilder::api_url`.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeFly {
    /// Starts the server on a free port, for app `app`.
    pub async fn start(app: &str) -> FakeFly {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let base = format!("/v1/apps/{app}/machines");
        let router = Router::new()
            .route(&base, post(create).get(list))
            .route(&format!("{base}/{{id}}"), get(show).delete(destroy))
            .route(&format!("{base}/{{id}}/stop"), post(stop))
            .route(&format!("{base}/{{id}}/wait"), get(wait))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeFly { url, inner, server }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Pids of the Machines' processes still alive.
    pub fn live_pids(&self) -> Vec<u32> {
        let inner = self.inner.lock().unwrap();
        inner
            .machines
            .values()
            .copied()
            .filter(|p| process_alive(*p))
            .collect()
    }
}

impl Drop for FakeFly {
    fn drop(&mut self) {
        self.server.abort();
        for pid in self.inner.lock().unwrap().machines.values() {
            crate::harness::kill9(*pid);
        }
    }
}

type Shared = State<Arc<Mutex<Inner>>>;

fn record(s: &Shared, method: &'static str, path: String, headers: &HeaderMap, body: Value) {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    s.lock().unwrap().requests.push(Recorded {
        method,
        path,
        authorization,
        body,
    });
}

async fn create(
    s: Shared,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    record(&s, "POST", String::new(), &headers, body.clone());
    // A token Fly does not know.
    if headers
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == b"Bearer bad-token")
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "unauthorized" })),
        );
    }
    // A config Fly refuses.
    if body["config"]["image"]
        .as_str()
        .is_some_and(|i| i.contains("invalid"))
    {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": "invalid config: no such image" })),
        );
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..14].to_string();
    // An image that cannot start: the Machine fails at once (no process).
    if body["config"]["image"]
        .as_str()
        .is_some_and(|i| i.contains("broken"))
    {
        s.lock().unwrap().failed.push(id.clone());
        return (
            StatusCode::OK,
            Json(json!({ "id": id, "instance_id": format!("inst-{id}"), "state": "created" })),
        );
    }
    let mut cmd = std::process::Command::new(testapp());
    // A Machine starts from its image with only the env it was given.
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    if let Some(env) = body["config"]["env"].as_object() {
        for (k, v) in env {
            cmd.env(k, v.as_str().unwrap_or_default());
        }
    }
    cmd.env("FLY_MACHINE_ID", &id)
        .stdin(std::process::Stdio::null());
    let limit_mb = body["config"]["image"]
        .as_str()
        .filter(|i| i.contains("memory-limited"))
        .and_then(|_| body["config"]["guest"]["memory_mb"].as_u64());
    if let Some(mb) = limit_mb {
        use std::os::unix::process::CommandExt;
        let bytes = mb << 20;
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
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": e.to_string() })),
            )
        }
    };
    let pid = child.id();
    // Reap it when it exits (auto_destroy), keeping how it ended.
    let (exits, machine) = (s.0.clone(), id.clone());
    std::thread::spawn(move || {
        use std::os::unix::process::ExitStatusExt;
        let mut child = child;
        if let Ok(status) = child.wait() {
            let mut inner = exits.lock().unwrap();
            inner
                .exits
                .insert(machine, (status.code(), status.signal()));
        }
    });
    {
        let mut inner = s.lock().unwrap();
        if limit_mb.is_some() {
            inner.limited.push(id.clone());
        }
        inner.machines.insert(id.clone(), pid);
        inner
            .metadata
            .insert(id.clone(), body["config"]["metadata"].clone());
    }
    (
        StatusCode::OK,
        Json(json!({
            "id": id,
            "instance_id": format!("inst-{id}"),
            "state": "started",
            "region": body["region"].as_str().unwrap_or("local"),
            "config": body["config"],
        })),
    )
}

/// `GET` the app's Machines, filtered by `metadata.<key>=<value>`.
async fn list(
    s: Shared,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    record(&s, "GET", String::new(), &headers, json!(q));
    let inner = s.lock().unwrap();
    let machines: Vec<Value> = inner
        .machines
        .iter()
        .filter_map(|(id, pid)| {
            let metadata = inner.metadata.get(id).cloned().unwrap_or(Value::Null);
            let wanted = q.iter().all(|(k, v)| {
                k.strip_prefix("metadata.")
                    .is_none_or(|key| metadata[key].as_str() == Some(v.as_str()))
            });
            let state = if process_alive(*pid) {
                "started"
            } else {
                "destroyed"
            };
            wanted.then(|| json!({"id": id, "state": state, "config": {"metadata": metadata}}))
        })
        .collect();
    (StatusCode::OK, Json(Value::Array(machines)))
}

fn pid_of(s: &Shared, id: &str) -> Option<u32> {
    s.lock().unwrap().machines.get(id).copied()
}

async fn show(s: Shared, headers: HeaderMap, Path(id): Path<String>) -> (StatusCode, Json<Value>) {
    record(&s, "GET", format!("/{id}"), &headers, Value::Null);
    if s.lock().unwrap().failed.contains(&id) {
        return (StatusCode::OK, Json(json!({"id": id, "state": "failed"})));
    }
    match pid_of(&s, &id) {
        Some(pid) if process_alive(pid) => {
            (StatusCode::OK, Json(json!({"id": id, "state": "started"})))
        }
        Some(_) => (
            StatusCode::OK,
            Json(json!({"id": id, "state": "destroyed", "events": exit_events(&s, &id)})),
        ),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))),
    }
}

/// A destroyed Machine's events as Fly lists them (newest first): its
/// `exit`, with the exit code (128 + signal when killed) and whether the
/// kernel's OOM killer ended it, then `destroy`. A process at its memory
/// limit that was killed, or aborted on a failed allocation, is what the
/// Machine's kernel would have OOM-killed.
fn exit_events(s: &Shared, id: &str) -> Value {
    let inner = s.lock().unwrap();
    let Some(&(code, signal)) = inner.exits.get(id) else {
        return json!([]);
    };
    let oom = inner.limited.iter().any(|m| m == id)
        && matches!(signal, Some(libc::SIGKILL | libc::SIGABRT));
    let exit_code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
    let requested = inner.stopped.iter().any(|m| m == id);
    json!([
        {"type": "destroy", "status": "destroyed", "source": "flyd", "timestamp": 2},
        {"type": "exit", "status": "stopped", "source": "flyd", "timestamp": 1,
         "request": {"exit_event": {
            "exit_code": if oom { 137 } else { exit_code },
            "oom_killed": oom,
            "requested_stop": requested,
            "exited_at": "2026-11-22T00:00:00Z"}}}
    ])
}

async fn stop(
    s: Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Option<Json<Value>>,
) -> (StatusCode, Json<Value>) {
    record(
        &s,
        "POST",
        format!("/{id}/stop"),
        &headers,
        body.map(|b| b.0).unwrap_or(Value::Null),
    );
    match pid_of(&s, &id) {
        Some(pid) if process_alive(pid) => {
            s.lock().unwrap().stopped.push(id.clone());
            crate::harness::sigterm(pid);
            (StatusCode::OK, Json(json!({"ok": true})))
        }
        Some(_) => (StatusCode::CONFLICT, Json(json!({"error": "not started"}))),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))),
    }
}

async fn wait(
    s: Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    record(&s, "GET", format!("/{id}/wait"), &headers, json!(q));
    let secs: u64 = q.get("timeout").and_then(|t| t.parse().ok()).unwrap_or(60);
    if s.lock().unwrap().failed.contains(&id) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "machine failed to start: image cannot be run"})),
        );
    }
    let Some(pid) = pid_of(&s, &id) else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "not found"})));
    };
    if q.get("state").map(String::as_str) == Some("started") {
        return if process_alive(pid) {
            (StatusCode::OK, Json(json!({"ok": true})))
        } else {
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "machine failed to start: image cannot be run"})),
            )
        };
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while process_alive(pid) {
        if tokio::time::Instant::now() > deadline {
            return (
                StatusCode::REQUEST_TIMEOUT,
                Json(json!({"error": "timeout"})),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (StatusCode::OK, Json(json!({"ok": true})))
}

async fn destroy(
    s: Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    record(&s, "DELETE", format!("/{id}"), &headers, json!(q));
    {
        let mut inner = s.lock().unwrap();
        if let Some(i) = inner.failed.iter().position(|f| *f == id) {
            inner.failed.remove(i);
            return (StatusCode::OK, Json(json!({"ok": true})));
        }
    }
    match pid_of(&s, &id) {
        Some(pid) => {
            if process_alive(pid) {
                if q.get("force").map(String::as_str) != Some("true") {
                    return (
                        StatusCode::PRECONDITION_FAILED,
                        Json(json!({"error": "machine still running"})),
                    );
                }
                s.lock().unwrap().stopped.push(id.clone());
                crate::harness::kill9(pid);
            }
            (StatusCode::OK, Json(json!({"ok": true})))
        }
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))),
    }
}
