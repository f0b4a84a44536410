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

mod kubelet;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
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
    version: u64,
    kind: &'static str,
    namespace: String,
    object: Value,
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
    history: Vec<Event>,
    /// Events at or below this version are forgotten.
    compacted: u64,
    pub(crate) secrets: HashMap<(String, String), BTreeMap<String, String>>,
    limited_creates: usize,
    close_watches_after: Duration,
}

/// The stand-in's state, shared by its handlers and its kubelet.
pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
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
            .route("/api/v1/namespaces/{ns}/pods", get(list).post(create))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(show).delete(delete),
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
        delete_now(&self.shared, &key);
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

type St = State<Arc<Shared>>;

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
fn admit(
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

/// A label value as the API accepts it.
fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))))
}

/// 5 characters of the alphabet the API server's name generator uses.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

async fn create(
    State(s): St,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Json(mut pod): Json<Value>,
) -> Response {
    if let Err(refused) = admit(&s, &headers, "create", &ns, None, &q, pod.clone()) {
        return *refused;
    }
    {
        let mut inner = s.inner.lock().unwrap();
        if inner.limited_creates > 0 {
            inner.limited_creates -= 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1"), ("content-type", "text/plain")],
                "Too many requests, please try again later.\n",
            )
                .into_response();
        }
    }
    let invalid = |field: &str, what: &str| {
        status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!("Pod is invalid: {field}: {what}"),
            None,
        )
    };
    let meta = &pod["metadata"];
    if meta["namespace"].as_str().is_some_and(|n| n != ns) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            None,
        );
    }
    let name = match (meta["name"].as_str(), meta["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{}", random_suffix()),
        _ => {
            return invalid(
                "metadata.name",
                "Required value: name or generateName is required",
            )
        }
    };
    if let Some(labels) = meta["labels"].as_object() {
        for (k, v) in labels {
            if !v.as_str().is_some_and(valid_label_value) {
                return invalid(&format!("metadata.labels[{k}]"), "Invalid value");
            }
        }
    }
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        return invalid("spec.containers", "Required value");
    }
    for (i, c) in containers.iter().enumerate() {
        if c["image"].as_str().is_none_or(str::is_empty) {
            return invalid(&format!("spec.containers[{i}].image"), "Required value");
        }
    }
    let spec = &mut pod["spec"];
    match spec["restartPolicy"].as_str() {
        None => spec["restartPolicy"] = json!("Always"),
        Some("Always" | "OnFailure" | "Never") => {}
        Some(other) => {
            return invalid(
                "spec.restartPolicy",
                &format!("Unsupported value: \"{other}\""),
            )
        }
    }
    if spec["terminationGracePeriodSeconds"].is_null() {
        spec["terminationGracePeriodSeconds"] = json!(30);
    }
    if spec["serviceAccountName"].is_null() {
        spec["serviceAccountName"] = json!("default");
    }
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    let meta = &mut pod["metadata"];
    meta["name"] = json!(name);
    meta["namespace"] = json!(ns);
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = json!(kubelet::now());
    pod["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
    let key = (ns.clone(), name.clone());
    let created = {
        let mut inner = s.inner.lock().unwrap();
        if inner.pods.contains_key(&key) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("pods \"{name}\" already exists"),
                Some(&name),
            );
        }
        inner.pods.insert(
            key.clone(),
            PodRec {
                pod,
                pid: None,
                limited: false,
            },
        );
        s.changed(&mut inner, &key, "ADDED");
        inner.pods[&key].pod.clone()
    };
    tokio::spawn(kubelet::run(s.clone(), key));
    (StatusCode::CREATED, Json(created)).into_response()
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

fn not_found(name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("pods \"{name}\" not found"),
        Some(name),
    )
}

/// A label or field selector, as a list of terms that must all hold.
struct Selector {
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String)>,
}

impl Selector {
    fn parse(q: &HashMap<String, String>) -> Result<Selector, String> {
        let mut labels = Vec::new();
        for term in q
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(format!("set-based selector not supported here: {term}"));
            }
            let term_parsed = if let Some((k, v)) = term.split_once("!=") {
                (k.to_string(), Some(v.to_string()), false)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k.to_string(), Some(v.to_string()), true)
            } else if let Some(k) = term.strip_prefix('!') {
                (k.to_string(), None, false)
            } else {
                (term.to_string(), None, true)
            };
            labels.push(term_parsed);
        }
        let mut fields = Vec::new();
        for term in q
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (k, v) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("invalid field selector: {term}"))?;
            if !matches!(k, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {k}"));
            }
            fields.push((k.to_string(), v.to_string()));
        }
        Ok(Selector { labels, fields })
    }

    fn matches(&self, pod: &Value) -> bool {
        let labels = &pod["metadata"]["labels"];
        self.labels.iter().all(|(k, v, equal)| {
            let have = labels[k.as_str()].as_str();
            match v {
                Some(v) => (have == Some(v.as_str())) == *equal,
                None => have.is_some() == *equal,
            }
        }) && self.fields.iter().all(|(k, v)| {
            let field = k.strip_prefix("metadata.").unwrap_or(k);
            pod["metadata"][field].as_str() == Some(v.as_str())
        })
    }
}

async fn list(
    State(s): St,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let watch = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    let verb = if watch { "watch" } else { "list" };
    if let Err(refused) = admit(&s, &headers, verb, &ns, None, &q, Value::Null) {
        return *refused;
    }
    let selector = match Selector::parse(&q) {
        Ok(selector) => selector,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e, None),
    };
    if watch {
        return watch_pods(s, ns, selector, q);
    }
    let inner = s.inner.lock().unwrap();
    let items: Vec<Value> = inner
        .pods
        .iter()
        .filter(|((n, _), rec)| *n == ns && selector.matches(&rec.pod))
        .map(|(_, rec)| rec.pod.clone())
        .collect();
    Json(json!({
        "kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": inner.version.to_string()},
        "items": items,
    }))
    .into_response()
}

/// A watch: past events after the asked version (or the Pods as they are),
/// then live ones, until the watch's time is up.
fn watch_pods(
    s: Arc<Shared>,
    ns: String,
    selector: Selector,
    q: HashMap<String, String>,
) -> Response {
    let asked: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<String, std::convert::Infallible>>();
    let line =
        |kind: &str, object: &Value| Ok(format!("{}\n", json!({"type": kind, "object": object})));
    let (backlog, mut live, mut seen, limit) = {
        let inner = s.inner.lock().unwrap();
        let limit = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800))
            .min(inner.close_watches_after);
        if asked != 0 && asked < inner.compacted {
            let expired = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {asked} ({})", inner.compacted + 1),
                "reason": "Expired", "code": 410,
            });
            let _ = tx.unbounded_send(line("ERROR", &expired));
            drop(tx);
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(rx))
                .unwrap();
        }
        let backlog: Vec<String> = if asked == 0 {
            inner
                .pods
                .iter()
                .filter(|((n, _), rec)| *n == ns && selector.matches(&rec.pod))
                .map(|(_, rec)| line("ADDED", &rec.pod).unwrap())
                .collect()
        } else {
            inner
                .history
                .iter()
                .filter(|e| e.version > asked && e.namespace == ns && selector.matches(&e.object))
                .map(|e| line(e.kind, &e.object).unwrap())
                .collect()
        };
        (backlog, s.events.subscribe(), inner.version, limit)
    };
    tokio::spawn(async move {
        for l in backlog {
            if tx.unbounded_send(Ok(l)).is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(limit);
        tokio::pin!(end);
        loop {
            tokio::select! {
                _ = &mut end => break,
                event = live.recv() => match event {
                    Ok(e) => {
                        seen = seen.max(e.version);
                        if e.namespace == ns && selector.matches(&e.object)
                            && tx.unbounded_send(line(e.kind, &e.object)).is_err()
                        {
                            return;
                        }
                    }
                    // Fallen behind, or shut down: the client resumes.
                    Err(_) => return,
                },
                _ = tx_closed(&tx) => return,
            }
        }
        if bookmarks {
            let mark = json!({"kind": "Pod", "apiVersion": "v1",
                              "metadata": {"resourceVersion": seen.to_string()}});
            let _ = tx.unbounded_send(line("BOOKMARK", &mark));
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(rx))
        .unwrap()
}

/// Resolves when the watch's client has gone.
async fn tx_closed(
    tx: &futures::channel::mpsc::UnboundedSender<Result<String, std::convert::Infallible>>,
) {
    while !tx.is_closed() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn delete(
    State(s): St,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let body = body.map(|b| b.0).unwrap_or(Value::Null);
    if let Err(refused) = admit(&s, &headers, "delete", &ns, Some(&name), &q, body.clone()) {
        return *refused;
    }
    let key = (ns, name.clone());
    let grace = body["gracePeriodSeconds"]
        .as_u64()
        .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
    let mut inner = s.inner.lock().unwrap();
    let Some(rec) = inner.pods.get_mut(&key) else {
        return not_found(&name);
    };
    let grace = grace.unwrap_or_else(|| {
        rec.pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30)
    });
    let running = rec.pid.filter(|p| process_alive(*p));
    match running {
        Some(pid) if grace > 0 => {
            if rec.pod["metadata"]["deletionTimestamp"].is_null() {
                rec.pod["metadata"]["deletionTimestamp"] =
                    json!(kubelet::at(Duration::from_secs(grace)));
                rec.pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                crate::harness::sigterm(pid);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(grace)).await;
                    kill9(pid);
                });
                s.changed(&mut inner, &key, "MODIFIED");
            }
            Json(inner.pods[&key].pod.clone()).into_response()
        }
        _ => {
            drop(inner);
            let last = delete_now(&s, &key);
            Json(last.unwrap_or(Value::Null)).into_response()
        }
    }
}

/// Removes a Pod from the API at once (its process SIGKILLed), and the
/// Pods it owns; its last state.
pub(crate) fn delete_now(s: &Shared, key: &(String, String)) -> Option<Value> {
    let (last, uid) = {
        let mut inner = s.inner.lock().unwrap();
        let rec = inner.pods.get(key)?;
        if let Some(pid) = rec.pid {
            kill9(pid);
        }
        let uid = rec.pod["metadata"]["uid"].clone();
        s.changed(&mut inner, key, "DELETED");
        let last = inner.history.last().map(|e| e.object.clone());
        (last, uid)
    };
    // The garbage collector: dependents go too.
    let owned: Vec<(String, String)> = {
        let inner = s.inner.lock().unwrap();
        inner
            .pods
            .iter()
            .filter(|(k, rec)| {
                k.0 == key.0
                    && rec.pod["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect()
    };
    for k in owned {
        delete_now(s, &k);
    }
    last
}
