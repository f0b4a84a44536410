//! The Pod requests the backend makes (create, get, list, watch, delete:
//! the verbs of its RBAC Role, nothing more), their retries, and their
//! errors.

use std::time::Duration;

use flame_core::backend::BootError;
use flame_core::backoff::Backoff;
use flame_core::BoxError;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::core::{ObjectList, Request};
use kube::Client;
use tokio::time::Instant;
use tracing::debug;

/// Attempts of one request before a transient failure is final.
const ATTEMPTS: u32 = 8;

/// First pause between attempts; doubled each time, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(8);

/// Longest a single request (not a watch) may take: an API server that
/// accepts the connection and never answers does not hold a boot, a stop
/// or a reap for ever.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The pause before attempt `attempt + 1`: exponential with jitter, or
/// what `Retry-After` asks (within reason).
fn pause(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(wait) = retry_after {
        return wait.min(MAX_PAUSE * 4);
    }
    Backoff::new(FIRST_PAUSE, MAX_PAUSE).pause(attempt)
}

/// Statuses worth another try: rate limited (429, the API server's
/// priority and fairness), and the API server's own troubles (5xx).
/// Anything else (401, 403, 404, 409, 422, ...) is final at once.
pub(crate) fn transient_status(status: u16) -> bool {
    status == 429 || (500..600).contains(&status)
}

/// What went wrong talking to the Kubernetes API, or with a Pod.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    /// The API answered with an error status (a `Status` object, or plain
    /// text from a proxy or the rate limiter).
    #[error("{}", api_message(*.status, .reason, .message, .verb, .namespace))]
    Api {
        /// The HTTP status.
        status: u16,
        /// The `Status` object's `reason` (`Forbidden`, `NotFound`, ...),
        /// empty when the answer was no `Status`.
        reason: String,
        /// The `Status` object's message (or the body's text).
        message: String,
        /// The RBAC verb of the request (`create`, `get`, `list`, `watch`,
        /// `delete`).
        verb: &'static str,
        /// The namespace it was made in.
        namespace: String,
    },
    /// The API could not be reached, or its answer not read.
    #[error("Kubernetes API unreachable: {0}")]
    Transport(#[source] kube::Error),
    /// A request got no answer within its time.
    #[error(
        "Kubernetes API did not answer a {verb} of pods within {0:?}",
        REQUEST_TIMEOUT
    )]
    Timeout {
        /// The RBAC verb of the request.
        verb: &'static str,
    },
    /// The API answered something the backend does not understand.
    #[error("unexpected answer from the Kubernetes API: {0}")]
    Unexpected(String),
    /// The runner's Pod did not start, for the reason Kubernetes gives
    /// (`ErrImagePull`, `Unschedulable`, a container that exited, ...).
    #[error("Pod {pod} failed to start: {reason}: {message}")]
    NotStarted {
        /// The Pod's name.
        pod: String,
        /// Kubernetes' reason.
        reason: String,
        /// Kubernetes' message (or what the backend saw).
        message: String,
    },
    /// The Pod was still on its way (`Pending`) when the boot ran out of
    /// time, or was deleted by someone else before it started.
    #[error("Pod {pod} did not start: {what}")]
    NotYet {
        /// The Pod's name.
        pod: String,
        /// Where it stood.
        what: String,
    },
}

fn api_message(status: u16, reason: &str, message: &str, verb: &str, namespace: &str) -> String {
    let said = if message.is_empty() { reason } else { message };
    match status {
        401 => format!(
            "Kubernetes API answered 401 unauthorized: {said} (the client's credentials were \
             refused: in a Pod, its service account token)"
        ),
        403 => format!(
            "Kubernetes API answered 403 forbidden: {said} (the backend's service account needs \
             the RBAC verb `{verb}` on `pods` in namespace `{namespace}`: see the Role in the \
             README's \"Deploying on Kubernetes\")"
        ),
        _ if reason.is_empty() => format!("Kubernetes API answered {status}: {said}"),
        _ => format!("Kubernetes API answered {status} {reason}: {said}"),
    }
}

impl K8sError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            K8sError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when asking again may work: 429, 5xx, no answer, a Pod still
    /// on its way.
    pub fn is_transient(&self) -> bool {
        match self {
            K8sError::Api { status, .. } => transient_status(*status),
            K8sError::Transport(_) | K8sError::Timeout { .. } | K8sError::NotYet { .. } => true,
            K8sError::Unexpected(_) | K8sError::NotStarted { .. } => false,
        }
    }

    /// As the pool takes a failed boot: permanent (401, 403, 404, 409,
    /// 422, a Pod that cannot start) or transient.
    pub(crate) fn into_boot_error(self) -> BoxError {
        Box::new(if self.is_transient() {
            BootError::transient(self)
        } else {
            BootError::permanent(self)
        })
    }
}

/// The Pods of one namespace.
#[derive(Clone)]
pub(crate) struct Pods {
    client: Client,
    namespace: String,
    /// `/api/v1/namespaces/<ns>/pods`
    request: std::sync::Arc<Request>,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// A failed attempt: the error, and the `Retry-After` the API asked for.
type Failed = (K8sError, Option<Duration>);

impl Pods {
    pub(crate) fn new(client: Client, namespace: &str) -> Pods {
        Pods {
            client,
            namespace: namespace.to_string(),
            request: std::sync::Arc::new(Request::new(format!(
                "/api/v1/namespaces/{namespace}/pods"
            ))),
        }
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Creates a Pod (named by `generateName`); retried while transient and
    /// a pause ends before `until`.
    pub(crate) async fn create(&self, pod: &Pod, until: Option<Instant>) -> Result<Pod, K8sError> {
        let body = serde_json::to_vec(pod).map_err(|e| K8sError::Unexpected(e.to_string()))?;
        let make = || self.request.create(&PostParams::default(), body.clone());
        self.json(self.retried("create", make, until).await?)
    }

    /// Reads a Pod.
    pub(crate) async fn get(&self, name: &str, until: Option<Instant>) -> Result<Pod, K8sError> {
        let make = || self.request.get(name, &Default::default());
        self.json(self.retried("get", make, until).await?)
    }

    /// Lists the Pods matching a label selector.
    pub(crate) async fn list(&self, selector: &str) -> Result<Vec<Pod>, K8sError> {
        let params = ListParams::default().labels(selector);
        let make = || self.request.list(&params);
        let list: ObjectList<Pod> = self.json(self.retried("list", make, None).await?)?;
        Ok(list.items)
    }

    /// Pod `name` as a list of it (by `fieldSelector`), and the list's
    /// resource version: the version a watch can start from after
    /// `410 Gone` (an object's own may be older than the server keeps).
    pub(crate) async fn list_one(
        &self,
        name: &str,
        until: Option<Instant>,
    ) -> Result<(Option<Pod>, String), K8sError> {
        let params = ListParams::default().fields(&format!("metadata.name={name}"));
        let make = || self.request.list(&params);
        let list: ObjectList<Pod> = self.json(self.retried("list", make, until).await?)?;
        let version = list.metadata.resource_version.unwrap_or_default();
        Ok((list.items.into_iter().next(), version))
    }

    /// Deletes a Pod with a grace period (in whole seconds; 0 deletes it
    /// at once). `Ok(None)` when it is gone already; else the Pod as the
    /// API left it (being deleted, or deleted).
    pub(crate) async fn delete(
        &self,
        name: &str,
        grace_secs: u32,
        until: Option<Instant>,
    ) -> Result<Option<serde_json::Value>, K8sError> {
        let params = DeleteParams {
            grace_period_seconds: Some(grace_secs),
            ..DeleteParams::background()
        };
        let make = || self.request.delete(name, &params);
        match self.retried("delete", make, until).await {
            Ok(body) => Ok(serde_json::from_slice(&body).ok()),
            Err(K8sError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Watches one Pod from `version` on (by `fieldSelector`
    /// `metadata.name`, as the API documents a watch of one object). The
    /// server ends the stream after `timeout_secs` or sooner; the caller
    /// resumes it.
    pub(crate) async fn watch(
        &self,
        name: &str,
        version: &str,
        timeout_secs: u32,
    ) -> Result<impl Stream<Item = Result<WatchEvent<Pod>, K8sError>> + use<>, K8sError> {
        let mut params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(timeout_secs);
        params.bookmarks = true;
        let request = self
            .request
            .watch(&params, version)
            .map_err(|e| K8sError::Unexpected(e.to_string()))?;
        let opened = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request_events(request))
            .await
            .map_err(|_| K8sError::Timeout { verb: "watch" })?;
        let namespace = self.namespace.clone();
        match opened {
            Ok(stream) => Ok(
                stream.map(move |event: Result<WatchEvent<Pod>, kube::Error>| {
                    event.map_err(|e| from_kube(e, "watch", &namespace))
                }),
            ),
            Err(e) => Err(from_kube(e, "watch", &self.namespace)),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, body: Vec<u8>) -> Result<T, K8sError> {
        serde_json::from_slice(&body).map_err(|e| K8sError::Unexpected(e.to_string()))
    }

    /// Sends a request. Transient failures (429, 5xx, the API unreachable
    /// or silent) are retried with exponential backoff and jitter,
    /// honouring `Retry-After`, while a pause still ends before `until`;
    /// any other error is returned at once.
    async fn retried<F>(
        &self,
        verb: &'static str,
        make: F,
        until: Option<Instant>,
    ) -> Result<Vec<u8>, K8sError>
    where
        F: Fn() -> Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    {
        let mut attempt = 1;
        loop {
            let request = make().map_err(|e| K8sError::Unexpected(e.to_string()))?;
            let (error, retry_after) = match self.once(verb, request).await {
                Ok(body) => return Ok(body),
                Err(failed) => failed,
            };
            let wait = pause(attempt, retry_after);
            let in_time = until.is_none_or(|at| Instant::now() + wait < at);
            if !(error.is_transient() && attempt < ATTEMPTS && in_time) {
                return Err(error);
            }
            debug!(attempt, verb, "Kubernetes API asks to try again: {error}");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One request: the body when it succeeded, else the error with the
    /// `Retry-After` the API asked for.
    async fn once(
        &self,
        verb: &'static str,
        request: http::Request<Vec<u8>>,
    ) -> Result<Vec<u8>, Failed> {
        let exchange = async {
            let response = self
                .client
                .send(request.map(kube::client::Body::from))
                .await
                .map_err(|e| (K8sError::Transport(e), None))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response
                .into_body()
                .collect_bytes()
                .await
                .map_err(|e| (K8sError::Transport(e), None))?;
            if status.is_success() {
                return Ok(body.to_vec());
            }
            Err((self.api_error(status.as_u16(), &body, verb), retry_after))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or(Err((K8sError::Timeout { verb }, None)))
    }

    /// The error of an answer with `status`: from its `Status` object, or
    /// its text (the rate limiter and proxies answer in plain text).
    fn api_error(&self, status: u16, body: &[u8], verb: &'static str) -> K8sError {
        let (reason, message) = match serde_json::from_slice::<kube::core::Status>(body) {
            Ok(s) => (s.reason, s.message),
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                // A page from a proxy can be long: its start says enough.
                let text: String = text.trim().chars().take(300).collect();
                (String::new(), text)
            }
        };
        K8sError::Api {
            status,
            reason,
            message,
            verb,
            namespace: self.namespace.clone(),
        }
    }
}

/// A kube client error as a [`K8sError`].
pub(crate) fn from_kube(e: kube::Error, verb: &'static str, namespace: &str) -> K8sError {
    match e {
        kube::Error::Api(status) => K8sError::Api {
            status: status.code,
            reason: status.reason.clone(),
            message: status.message.clone(),
            verb,
            namespace: namespace.to_string(),
        },
        other => K8sError::Transport(other),
    }
}

/// The error of a watch's `ERROR` event.
pub(crate) fn from_status(status: &kube::core::Status, namespace: &str) -> K8sError {
    K8sError::Api {
        status: status.code,
        reason: status.reason.clone(),
        message: status.message.clone(),
        verb: "watch",
        namespace: namespace.to_string(),
    }
}

/// Drops the stream's items' type noise for callers that box it.
pub(crate) type PodEvents =
    std::pin::Pin<Box<dyn Stream<Item = Result<WatchEvent<Pod>, K8sError>> + Send>>;

/// Boxes a watch stream.
pub(crate) fn boxed(
    stream: impl Stream<Item = Result<WatchEvent<Pod>, K8sError>> + Send + 'static,
) -> PodEvents {
    stream.boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, reason: &str, message: &str, verb: &'static str) -> K8sError {
        K8sError::Api {
            status,
            reason: reason.into(),
            message: message.into(),
            verb,
            namespace: "apps".into(),
        }
    }

    #[test]
    fn permanent_and_transient_errors() {
        for status in [400, 401, 403, 404, 409, 410, 422] {
            assert!(!api(status, "", "", "create").is_transient(), "{status}");
        }
        for status in [429, 500, 502, 503, 504] {
            assert!(api(status, "", "", "create").is_transient(), "{status}");
        }
        let first = pause(1, None);
        assert!(first >= FIRST_PAUSE && first <= FIRST_PAUSE * 5 / 4);
        assert_eq!(
            pause(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn forbidden_names_the_missing_verb_and_resource() {
        let text = api(
            403,
            "Forbidden",
            "pods is forbidden: User \"system:serviceaccount:apps:web\" cannot create resource \"pods\"",
            "create",
        )
        .to_string();
        assert!(
            text.contains("403 forbidden")
                && text.contains("verb `create` on `pods` in namespace `apps`"),
            "{text}"
        );
        let text = api(401, "Unauthorized", "Unauthorized", "create").to_string();
        assert!(text.contains("401 unauthorized"), "{text}");
    }
}
