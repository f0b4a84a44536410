//! A local stand-in for the Fly Machines API: it speaks what flame's Fly
//! backend uses and really starts a runner process (the test app) for each
//! Machine it is asked to create.
//!
//! What it models, and from where:
//! - Create, get, list (filtered by `metadata.<key>`), stop, wait and
//!   destroy of `/v1/apps/<app>/machines`, as Fly's Machines API reference
//!   documents them (shared/REFERENCE.md section 3).
//! - Machines exit like real ones: a process that ends is a destroyed
//!   Machine (`auto_destroy`), and `GET` of it lists its `exit` event with
//!   the exit code and `oom_killed` (Fly's machine events).
//! - Refusals: the token `bad-token` gets 401, as Fly refuses an unknown
//!   token; an image whose name holds `invalid` gets 422, as Fly refuses a
//!   config it cannot run.
//! - Rate limits: [`FakeFly::rate_limit_creates`] answers the next creates
//!   with 429 and `Retry-After` (Fly documents about 1 request/s per
//!   action with bursts of 3).
//! - Machines that never run: an image whose name holds `broken` makes a
//!   Machine that goes to `failed` at once; one whose name holds `stuck`
//!   stays `created` for ever (no capacity, an image pull that never ends).
//!   Neither is destroyed by `auto_destroy` (it destroys Machines whose
//!   process exited, not ones that never started): both stay, and are
//!   listed, until deleted.
//! - A wait for `started` on a Machine that failed: Fly does not document
//!   the answer (its CLI, `internal/machine/wait.go`, matches the words
//!   "machine failed to reach desired state"), so each plausible one can be
//!   chosen with [`FakeFly::failed_wait`]: 400 with those words at once
//!   (the default), 412 at once, or 408 once the wait's own timeout ran
//!   out. A wait on a Machine stuck in `created` answers 408 at its
//!   timeout, as Fly does for any state not reached in time.
//! - Waits honour their `timeout` (whole seconds; Fly caps it at 60), and
//!   [`FakeFly::slow_started_wait`] makes a wait for `started` answer late
//!   (a slow API: the runner may report ready over NATS first).
//! - Stopping a Machine that is not started answers 409; destroying a
//!   running one without `force=true` answers 412.
//! - A runner whose image name holds `exits-early` is the test app started
//!   in its `no-state` mode: a runner process that exits (code 3) before it
//!   is ready, as an app missing its configuration does.
//! - A Machine of an image whose name holds `memory-limited` gets its
//!   `guest.memory_mb` as its process's address-space limit, and running
//!   out of it is reported as Fly does: an `exit` event with
//!   `oom_killed: true`.
//!
//! What it does not model: regions, volumes, leases, `suspend`, machine
//! updates, and `instance_id` checks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
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
    /// When it came.
    pub at: tokio::time::Instant,
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
    /// Machines that stay `created` (image `stuck`), until deleted.
    stuck: Vec<String>,
    /// Machines deleted through the API that never ran.
    deleted: Vec<String>,
    /// How a wait for `started` on a failed Machine answers.
    failed_wait: FailedWait,
    /// Creates still to answer with 429.
    limited_creates: usize,
    /// How long a wait for `started` on a started Machine takes to answer.
    started_wait_delay: Duration,
}

/// How a wait for `started` answers on a Machine that failed (Fly does not
/// document it; see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailedWait {
    /// 400 "machine failed to reach desired state" at once.
    #[default]
    Error400,
    /// 412 at once.
    Status412,
    /// 408 when the wait's timeout has run out.
    Timeout408,
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

    /// Chooses how a wait for `started` on a failed Machine answers.
    pub fn failed_wait(&self, answer: FailedWait) {
        self.inner.lock().unwrap().failed_wait = answer;
    }

    /// Answers waits for `started` this much later than the Machine
    /// started (a slow API): its runner may report ready first.
    pub fn slow_started_wait(&self, delay: Duration) {
        self.inner.lock().unwrap().started_wait_delay = delay;
    }

    /// Answers the next `n` creates with 429 and `Retry-After: 1`.
    pub fn rate_limit_creates(&self, n: usize) {
        self.inner.lock().unwrap().limited_creates = n;
    }

    /// Machines the platform still has: running processes, and Machines
    /// that failed or are stuck in `created` and were not deleted. What a
    /// test must see empty once flame is done with a pool.
    pub fn leftovers(&self) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        let mut left: Vec<String> = inner
            .machines
            .iter()
            .filter(|(_, pid)| process_alive(**pid))
            .map(|(id, _)| id.clone())
            .collect();
        left.extend(inner.failed.iter().cloned());
        left.extend(inner.stuck.iter().cloned());
        left.sort();
        left
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
        at: tokio::time::Instant::now(),
    });
}

async fn create(s: Shared, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    created(s, headers, body).await.into_response()
}

async fn created(
    s: Shared,
    headers: HeaderMap,
    body: Value,
) -> (StatusCode, HeaderMap, Json<Value>) {
    let plain = HeaderMap::new;
    record(&s, "POST", String::new(), &headers, body.clone());
    // A token Fly does not know.
    if headers
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == b"Bearer bad-token")
    {
        return (
            StatusCode::UNAUTHORIZED,
            plain(),
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
            plain(),
            Json(json!({ "error": "invalid config: no such image" })),
        );
    }
    {
        let mut inner = s.lock().unwrap();
        if inner.limited_creates > 0 {
            inner.limited_creates -= 1;
            drop(inner);
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", "1".parse().unwrap());
            return (
                StatusCode::TOO_MANY_REQUESTS,
                headers,
                Json(json!({ "error": "rate limit exceeded" })),
            );
        }
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..14].to_string();
    let image = body["config"]["image"].as_str().unwrap_or_default();
    // An image that cannot start: the Machine fails at once (no process);
    // one that never gets going stays `created`.
    for (marker, list) in [("broken", true), ("stuck", false)] {
        if image.contains(marker) {
            let mut inner = s.lock().unwrap();
            if list {
                inner.failed.push(id.clone());
            } else {
                inner.stuck.push(id.clone());
            }
            inner
                .metadata
                .insert(id.clone(), body["config"]["metadata"].clone());
            return (
                StatusCode::OK,
                plain(),
                Json(json!({ "id": id, "instance_id": format!("inst-{id}"), "state": "created" })),
            );
        }
    }
    let mut cmd = std::process::Command::new(testapp());
    if image.contains("exits-early") {
        cmd.arg("no-state");
    }
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
                plain(),
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
        plain(),
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
    let states = inner
        .machines
        .iter()
        .map(|(id, pid)| {
            let state = if process_alive(*pid) {
                "started"
            } else {
                "destroyed"
            };
            (id, state)
        })
        .chain(inner.failed.iter().map(|id| (id, "failed")))
        .chain(inner.stuck.iter().map(|id| (id, "created")));
    let machines: Vec<Value> = states
        .filter_map(|(id, state)| {
            let metadata = inner.metadata.get(id).cloned().unwrap_or(Value::Null);
            let wanted = q.iter().all(|(k, v)| {
                k.strip_prefix("metadata.")
                    .is_none_or(|key| metadata[key].as_str() == Some(v.as_str()))
            });
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
    {
        let inner = s.lock().unwrap();
        if inner.failed.contains(&id) {
            return (StatusCode::OK, Json(json!({"id": id, "state": "failed"})));
        }
        if inner.stuck.contains(&id) {
            return (StatusCode::OK, Json(json!({"id": id, "state": "created"})));
        }
        if inner.deleted.contains(&id) {
            return (StatusCode::NOT_FOUND, Json(json!({"error": "not found"})));
        }
    }
    match pid_of(&s, &id) {
        Some(pid) if process_alive(pid) => {
            (StatusCode::OK, Json(json!({"id": id, "state": "started"})))
        }
        Some(_) => {
            // The thread that reaps the process records how it ended a
            // moment after it is gone: Fly lists the exit event with the
            // destroyed Machine.
            for _ in 0..100 {
                if s.lock().unwrap().exits.contains_key(&id) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (
                StatusCode::OK,
                Json(json!({"id": id, "state": "destroyed", "events": exit_events(&s, &id)})),
            )
        }
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
    let secs: u64 = q
        .get("timeout")
        .and_then(|t| t.parse().ok())
        .unwrap_or(60)
        .min(60);
    let timed_out = || async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        (
            StatusCode::REQUEST_TIMEOUT,
            Json(
                json!({"error": "deadline_exceeded: machine did not reach the desired state in time"}),
            ),
        )
    };
    let (failed, stuck, answer) = {
        let inner = s.lock().unwrap();
        (
            inner.failed.contains(&id),
            inner.stuck.contains(&id),
            inner.failed_wait,
        )
    };
    if failed {
        return match answer {
            FailedWait::Error400 => (
                StatusCode::BAD_REQUEST,
                Json(
                    json!({"error": "machine failed to reach desired state, and restart policy was set to no restart"}),
                ),
            ),
            FailedWait::Status412 => (
                StatusCode::PRECONDITION_FAILED,
                Json(json!({"error": "machine is in a failed state"})),
            ),
            FailedWait::Timeout408 => timed_out().await,
        };
    }
    if stuck {
        return timed_out().await;
    }
    let Some(pid) = pid_of(&s, &id) else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "not found"})));
    };
    if q.get("state").map(String::as_str) == Some("started") {
        let delay = s.lock().unwrap().started_wait_delay;
        tokio::time::sleep(delay).await;
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
        let inner = &mut *inner;
        let never_ran = [&mut inner.failed, &mut inner.stuck]
            .into_iter()
            .any(|list| match list.iter().position(|f| *f == id) {
                Some(i) => {
                    list.remove(i);
                    true
                }
                None => false,
            });
        if never_ran {
            inner.deleted.push(id.clone());
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
                // Answered once it is gone (a SIGKILLed process takes a
                // moment to die).
                for _ in 0..200 {
                    if !process_alive(pid) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            (StatusCode::OK, Json(json!({"ok": true})))
        }
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))),
    }
}
