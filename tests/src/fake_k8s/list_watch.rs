//! The stand-in's list and watch of Pods, with label and field selectors
//! (see the module header of `fake_k8s` for what is modelled).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{admit, status, Shared, St};

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

pub(crate) async fn list(
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
