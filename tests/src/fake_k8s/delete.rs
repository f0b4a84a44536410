//! The stand-in's delete of Pods: graceful (SIGTERM, SIGKILL at the
//! period's end, gone once the process is), or at once; and the garbage
//! collection of the Pods a deleted Pod owns.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{admit, kubelet, not_found, Shared, St};
use crate::harness::{kill9, process_alive};

pub(crate) async fn delete(
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
