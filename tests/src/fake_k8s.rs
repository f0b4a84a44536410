//! A local stand-in for the Kubernetes API server (and its kubelet): it
//! speaks what flame's Kubernetes backend uses, over plain HTTP, and really
//! starts a runner process (the test app) for each Pod it is asked to
//! create.
//!
//! What it models, and from which Kubernetes documentation:
//! - Pods of `/api/v1/namespaces/<ns>/pods` (API reference, Pod v1):
//!   create (`generateName` gets 5 random characters; `201` with the Pod,
//!   its `uid`, `resourceVersion` and `creationTimestamp`), get, list and
//!   delete; `kind`/`apiVersion` on objects, `PodList` with the list's
//!   `resourceVersion`.
//! - Label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated;
//!   not set-based ones) and the field selectors `metadata.name` and
//!   `metadata.namespace` (Labels and Selectors; Field Selectors).
//! - Watches (API concepts, "Efficient detection of changes"): `watch=1`
//!   with `resourceVersion` streams newline-separated `WatchEvent`s
//!   (`ADDED`, `MODIFIED`, `DELETED`) after that version; without one (or
//!   `0`) it starts with an `ADDED` per matching Pod. The server ends each
//!   watch after `timeoutSeconds` or its own limit
//!   ([`FakeK8s::close_watches_after`], a few seconds by default), with a
//!   `BOOKMARK` first when `allowWatchBookmarks` was asked ("Watch
//!   bookmarks"); the client must resume. History older than the server
//!   keeps ([`FakeK8s::compact`]) answers a watch with an `ERROR` event
//!   holding a `410 Gone` `Status` (reason `Expired`), as the API server's
//!   watch cache does.
//! - Errors as `Status` objects (API concepts, "Responses"): 404
//!   `NotFound`, 409 `AlreadyExists`, 422 `Invalid` (no name, no
//!   container or image, a bad label value, restart policy), 401 for an
//!   unknown bearer token, 403 `Forbidden` with the RBAC message (`User
//!   "system:serviceaccount:<ns>:<sa>" cannot <verb> resource "pods" ...`)
//!   for a token whose verbs do not include the request's (Authorization
//!   overview). 429 as API Priority and Fairness answers it: plain text
//!   and `Retry-After` ([`FakeK8s::rate_limit_creates`]).
//! - Pod lifecycle and container states (Pod Lifecycle): `Pending` with
//!   `PodScheduled`, the container `waiting` in `ContainerCreating`, then
//!   `Running` (container `running`, `ready`), then `Succeeded` or
//!   `Failed` with the container `terminated` (exit code, `Completed` /
//!   `Error` / `OOMKilled`; 128 + signal for a signal). With
//!   `restartPolicy: Never` nothing is restarted.
//! - Slow and failing paths, by image name: `no-such-image` waits in
//!   `ErrImagePull`, then `ImagePullBackOff` a second later; `stuck` stays
//!   `ContainerCreating`; `exits-early` runs the test app in its
//!   `no-state` mode (exits with code 3 before it is ready);
//!   `memory-limited` gets the container's `limits.memory` as its
//!   process's address-space limit, and a process killed at it is
//!   `OOMKilled` (exit code 137). A Pod asking for `nvidia.com/gpu` stays
//!   `Pending` with `PodScheduled=False`, reason `Unschedulable` (the node
//!   has none). An env `secretKeyRef` (or `envFrom` `secretRef`) to a
//!   Secret or key the stand-in does not have ([`FakeK8s::add_secret`])
//!   leaves the container waiting in `CreateContainerConfigError`; ones it
//!   has are resolved into the process's environment.
//! - Deletion (Pod Lifecycle, "Termination of Pods"): a running Pod
//!   deleted with a grace period gets `deletionTimestamp`, its process
//!   SIGTERM, SIGKILL when the period ends, and leaves the API (`DELETED`)
//!   once the process is gone; `gracePeriodSeconds: 0`, or a Pod with no
//!   process, leaves at once. The default period is the Pod's
//!   `terminationGracePeriodSeconds` (30). Deleting a Pod deletes the Pods
//!   whose `ownerReferences` name it (the garbage collector, background
//!   propagation; here at once, with no grace).
//! - Every request is recorded ([`FakeK8s::requests`]) with its RBAC verb,
//!   requests for anything but Pods too (a test checks there are none).
//!
//! What it does not model: authentication other than bearer tokens,
//! admission (quotas, LimitRanges, Pod Security), other resources (Secrets
//! are set in the stand-in, not served), set-based selectors, pagination,
//! `resourceVersionMatch`, `sendInitialEvents`, server-side apply, patch
//! and update, the container's `command`/`args` (every Pod runs the test
//! app), volumes, probes, restarts (`CrashLoopBackOff` never happens with
//! `restartPolicy: Never`), nodes and real scheduling, memory limits of
//! other images, and network policies.

mod create;
mod delete;
mod kubelet;
mod list_watch;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::harness::{kill9, process_alive};

/// Token with every verb the backend needs.
pub const TOKEN: &str = "test-token";
/// Token that may only read (get, list, watch): creates are forbidden.
pub const READ_ONLY_TOKEN: &str = "read-only-token";
/// Token the stand-in does not know (401).
pub const BAD_TOKEN: &str = "bad-token";

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Its RBAC verb: `create`, `get`, `list`, `watch`, `delete`.
    pub verb: &'static str,
    /// Its resource: `pods`, or `unserved` for a request the stand-in
    /// does not serve (its method and path are then in `name`).
    pub resource: &'static str,
    /// Namespace.
    pub namespace: String,
    /// Object name, for get and delete.
    pub name: Option<String>,
    /// Query parameters.
    pub query: HashMap<String, String>,
    /// JSON body, if any.
    pub body: Value,
    /// When it came.
    pub at: tokio::time::Instant,
}

/// A change of a Pod, as watches stream it.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) version: u64,
    pub(crate) kind: &'static str,
    pub(crate) namespace: String,
    pub(crate) object: Value,
}

pub(crate) struct PodRec {
    pub(crate) pod: Value,
    pub(crate) pid: Option<u32>,
    /// Its process ran with a memory limit.
    pub(crate) limited: bool,
}

pub(crate) struct Inner {
    pub(crate) requests: Vec<Recorded>,
    /// The last resource version given.
    pub(crate) version: u64,
    pub(crate) pods: BTreeMap<(String, String), PodRec>,
    pub(crate) history: Vec<Event>,
    /// Events before this version are forgotten.
    pub(crate) compacted: u64,
    pub(crate) secrets: HashMap<(String, String), BTreeMap<String, String>>,
    pub(crate) limited_creates: usize,
    pub(crate) close_watches_after: Duration,
}

/// The stand-in's state, shared by its handlers and its kubelet.
pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) events: broadcast::Sender<Event>,
}

impl Shared {
    /// Records a change of the Pod at `key` (or its removal, with its
    /// last state), with a new resource version, for watches.
    pub(crate) fn changed(&self, inner: &mut Inner, key: &(String, String), kind: &'static str) {
        inner.version += 1;
        let version = inner.version;
        let object = if kind == "DELETED" {
            let Some(mut rec) = inner.pods.remove(key) else {
                return;
            };
            rec.pod["metadata"]["resourceVersion"] = json!(version.to_string());
            rec.pod
        } else {
            let Some(rec) = inner.pods.get_mut(key) else {
                return;
            };
            rec.pod["metadata"]["resourceVersion"] = json!(version.to_string());
            rec.pod.clone()
        };
        let event = Event {
            version,
            kind,
            namespace: key.0.clone(),
            object,
        };
        inner.history.push(event.clone());
        // The watch cache keeps a window of history.
        if inner.history.len() > 2000 {
            let cut = inner.history.len() - 1000;
            inner.compacted = inner.history[cut - 1].version;
            inner.history.drain(..cut);
        }
        let _ = self.events.send(event);
    }
}

/// The fake API server; stops its server and kills its Pods' processes on
/// drop.
pub struct FakeK8s {
    /// Base URL for `kube::Config::new`.
    pub url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeK8s {
    /// Starts the server on a free port.
    pub async fn start() -> FakeK8s {
        let (events, _) = broadcast::channel(4096);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                requests: Vec::new(),
                version: 100,
                pods: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                secrets: HashMap::new(),
                limited_creates: 0,
                close_watches_after: Duration::from_secs(3),
            }),
            events,
        });
        let router = Router::new()
            .route(
                "/api/v1/namespaces/{ns}/pods",
                get(list_watch::list).post(create::create),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(show).delete(delete::delete),
            )
            .fallback(unserved)
            .with_state(shared.clone());
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeK8s {
            url,
            shared,
            server,
        }
    }

    /// A client configuration for the stand-in with bearer `token`, in
    /// namespace `default`.
    pub fn config(&self, token: &str) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.auth_info.token = Some(token.to_string().into());
        config
    }

    /// Adds a Pod that runs no process here (a parent's own Pod), as a
    /// Deployment's ReplicaSet would have made it; returns it with its
    /// `uid`.
    pub fn add_pod(&self, namespace: &str, mut pod: Value) -> Value {
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        pod["metadata"]["namespace"] = json!(namespace);
        pod["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        pod["metadata"]["creationTimestamp"] = json!(kubelet::now());
        pod["status"] = json!({"phase": "Running"});
        let key = (namespace.to_string(), name);
        let mut inner = self.shared.inner.lock().unwrap();
        inner.pods.insert(
            key.clone(),
            PodRec {
                pod,
                pid: None,
                limited: false,
            },
        );
        self.shared.changed(&mut inner, &key, "ADDED");
        inner.pods[&key].pod.clone()
    }

    /// Deletes a Pod as someone else would (`kubectl delete --now`): with
    /// no grace, and its dependents with it.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        delete::delete_now(&self.shared, &key);
    }

    /// Adds a Secret the kubelet resolves `secretKeyRef`s from.
    pub fn add_secret(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let data = data
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut inner = self.shared.inner.lock().unwrap();
        inner
            .secrets
            .insert((namespace.to_string(), name.to_string()), data);
    }

    /// Answers the next `n` creates with 429 and `Retry-After: 1`.
    pub fn rate_limit_creates(&self, n: usize) {
        self.shared.inner.lock().unwrap().limited_creates = n;
    }

    /// Ends every watch this long after it began (default 3 s).
    pub fn close_watches_after(&self, after: Duration) {
        self.shared.inner.lock().unwrap().close_watches_after = after;
    }

    /// Forgets all history: a watch from any version given so far gets
    /// `410 Gone`.
    pub fn compact(&self) {
        let mut inner = self.shared.inner.lock().unwrap();
        // (As etcd's compaction: the current version stays valid, and a
        // list answers it.)
        inner.version += 1;
        inner.compacted = inner.version;
        inner.history.clear();
    }

    /// Runner Pods the API still has (any phase), and Pods whose process
    /// still runs. What a test must see empty once flame is done.
    pub fn leftovers(&self) -> Vec<String> {
        let inner = self.shared.inner.lock().unwrap();
        let mut left: Vec<String> = inner
            .pods
            .iter()
            .filter(|(_, rec)| {
                rec.pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "flame"
                    || rec.pid.is_some_and(process_alive)
            })
            .map(|((_, name), _)| name.clone())
            .collect();
        left.sort();
        left
    }

    /// A Pod as the API has it now.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.shared.inner.lock().unwrap();
        inner
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .map(|rec| rec.pod.clone())
    }

    /// Every Pod the API has now.
    pub fn pods(&self) -> Vec<Value> {
        let inner = self.shared.inner.lock().unwrap();
        inner.pods.values().map(|rec| rec.pod.clone()).collect()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.inner.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeK8s {
    fn drop(&mut self) {
        self.server.abort();
        for rec in self.shared.inner.lock().unwrap().pods.values() {
            if let Some(pid) = rec.pid {
                kill9(pid);
            }
        }
    }
}

pub(crate) type St = State<Arc<Shared>>;

/// A `Status` object, as the API answers errors.
pub(crate) fn status(
    code: StatusCode,
    reason: &str,
    message: &str,
    name: Option<&str>,
) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    if let Some(name) = name {
        body["details"] = json!({"name": name, "kind": "pods"});
    }
    (code, Json(body)).into_response()
}

/// Records the request and checks its bearer token: `Err` with the
/// answer when the token is unknown (401) or may not do `verb` (403).
pub(crate) fn admit(
    s: &Shared,
    headers: &HeaderMap,
    verb: &'static str,
    ns: &str,
    name: Option<&str>,
    query: &HashMap<String, String>,
    body: Value,
) -> Result<(), Box<Response>> {
    s.inner.lock().unwrap().requests.push(Recorded {
        verb,
        resource: "pods",
        namespace: ns.to_string(),
        name: name.map(str::to_string),
        query: query.clone(),
        body,
        at: tokio::time::Instant::now(),
    });
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let (account, verbs): (&str, &[&str]) = match token {
        TOKEN => (
            "flame-parent",
            &["create", "get", "list", "watch", "delete"],
        ),
        READ_ONLY_TOKEN => ("flame-readonly", &["get", "list", "watch"]),
        _ => {
            return Err(Box::new(status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Unauthorized",
                None,
            )))
        }
    };
    if verbs.contains(&verb) {
        return Ok(());
    }
    let message = format!(
        "pods{} is forbidden: User \"system:serviceaccount:{ns}:{account}\" cannot {verb} \
         resource \"pods\" in API group \"\" in the namespace \"{ns}\"",
        name.map(|n| format!(" \"{n}\"")).unwrap_or_default()
    );
    Err(Box::new(status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &message,
        name,
    )))
}

/// Any other request: recorded (a test checks the backend makes none),
/// and answered 404 as the API answers an unknown path.
async fn unserved(State(s): St, request: axum::extract::Request) -> Response {
    s.inner.lock().unwrap().requests.push(Recorded {
        verb: "unknown",
        resource: "unserved",
        namespace: String::new(),
        name: Some(format!("{} {}", request.method(), request.uri())),
        query: HashMap::new(),
        body: Value::Null,
        at: tokio::time::Instant::now(),
    });
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        None,
    )
}

async fn show(
    State(s): St,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = admit(&s, &headers, "get", &ns, Some(&name), &q, Value::Null) {
        return *refused;
    }
    let inner = s.inner.lock().unwrap();
    match inner.pods.get(&(ns, name.clone())) {
        Some(rec) => Json(rec.pod.clone()).into_response(),
        None => not_found(&name),
    }
}

pub(crate) fn not_found(name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("pods \"{name}\" not found"),
        Some(name),
    )
}
