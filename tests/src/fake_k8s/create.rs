//! The stand-in's create of Pods: validation as the API does it (what the
//! backend could get wrong), `generateName`, the defaults it fills in, and
//! the kubelet started for the new Pod.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{admit, kubelet, status, PodRec, St};

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

pub(crate) async fn create(
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
