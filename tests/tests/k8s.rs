//! The Kubernetes backend, against a local stand-in of the API server
//! (`tests/src/fake_k8s.rs`, whose header says what it models) that starts
//! a real runner process for each Pod. The backend's contract shared with
//! the other platforms is in `backend_conformance.rs`; here are the
//! Kubernetes-specific parts.

use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::fake_k8s::{FakeK8s, READ_ONLY_TOKEN, TOKEN};
use flame_tests::funcs::*;
use flame_tests::harness::{error_within, kill9, runner_pids, wait_for, wait_in_flight, TestEnv};
use flame_tests::platform::{k8s_builder, K8S_NAMESPACE};
use serde_json::{json, Value};
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);
const PARENT: &str = "web-7d9f8-x2bqz";

/// A parent's Pod as a Deployment makes it: the selector's labels, a
/// secret in its env through a reference, the downward API, a probe.
fn add_parent(k8s: &FakeK8s, secret: &str) -> Value {
    k8s.add_pod(
        K8S_NAMESPACE,
        json!({
            "metadata": {"name": PARENT, "labels": {"app": "web", "pod-template-hash": "7d9f8"}},
            "spec": {
                "serviceAccountName": "web",
                "volumes": [{"name": "scratch", "emptyDir": {}}],
                "containers": [{
                    "name": "app",
                    "image": "registry.example/flame-test:1",
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "APP_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "api-key"}}},
                        {"name": "APP_MODE", "value": "batch"},
                    ],
                }],
            },
        }),
    )
}

/// The body of the backend's (only) create.
fn created_pod(k8s: &FakeK8s) -> Value {
    let creates: Vec<Value> = k8s
        .requests()
        .into_iter()
        .filter(|r| r.verb == "create")
        .map(|r| r.body)
        .collect();
    assert_eq!(creates.len(), 1, "{creates:?}");
    creates[0].clone()
}

#[tokio::test]
async fn runner_pod_is_made_from_the_parent_pod_and_keeps_secret_references() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    k8s.add_secret(K8S_NAMESPACE, "app-secrets", &[("api-key", "s3cret-value")]);
    let parent = add_parent(&k8s, "app-secrets");
    let backend = k8s_builder(&k8s.url, TOKEN)
        .parent_pod(PARENT)
        .build()
        .unwrap();
    let pool = env
        .flame
        .pool("k8s-parent")
        .max(1)
        .backend(backend)
        .start()
        .await
        .unwrap();
    // The runner has the secret (the kubelet resolved the reference), and
    // its own Pod name from the downward API.
    let key = flame::call!(pool, env_var("APP_API_KEY".to_string()))
        .await
        .unwrap();
    assert_eq!(key.as_deref(), Some("s3cret-value"));
    let mode = flame::call!(pool, env_var("APP_MODE".to_string()))
        .await
        .unwrap();
    assert_eq!(mode.as_deref(), Some("batch"));
    let own_name = flame::call!(pool, env_var("POD_NAME".to_string()))
        .await
        .unwrap();
    let pod = created_pod(&k8s);
    let text = pod.to_string();
    assert!(
        !text.contains("s3cret-value"),
        "a secret was copied in: {text}"
    );
    let spec = &pod["spec"];
    let c = &spec["containers"][0];
    let api_key = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "APP_API_KEY")
        .unwrap();
    assert_eq!(
        api_key["valueFrom"]["secretKeyRef"],
        json!({"name": "app-secrets", "key": "api-key"})
    );
    let flame_parent = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "FLAME_PARENT")
        .unwrap();
    assert!(flame_parent["value"].is_string());
    assert_eq!(c["image"], "registry.example/flame-test:1");
    assert!(c["ports"].is_null() && c["readinessProbe"].is_null(), "{c}");
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/scratch");
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["serviceAccountName"], "web");
    assert_eq!(spec["volumes"][0]["name"], "scratch");
    let meta = &pod["metadata"];
    assert_eq!(meta["generateName"], "flame-k8s-parent-");
    assert!(own_name
        .as_deref()
        .is_some_and(|n| n.starts_with("flame-k8s-parent-") && n.len() == 22));
    let labels = meta["labels"].as_object().unwrap();
    assert!(
        !labels.contains_key("app") && !labels.contains_key("pod-template-hash"),
        "the parent Deployment's selector labels: {labels:?}"
    );
    assert_eq!(labels["flame/pool"], "k8s-parent");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "flame");
    assert!(labels.contains_key("flame/parent") && labels.contains_key("flame/runner"));
    let owner = &meta["ownerReferences"][0];
    assert_eq!(owner["kind"], "Pod");
    assert_eq!(owner["name"], PARENT);
    assert_eq!(owner["uid"], parent["metadata"]["uid"]);
    // The garbage collector deletes the runners of a parent Pod that is
    // gone, and the pool learns of it from its watch.
    let before = Instant::now();
    k8s.delete_pod(K8S_NAMESPACE, PARENT);
    wait_for("the runner Pod to go with its parent", LONG, || async {
        (k8s.leftovers().is_empty() && pool.status().ready == 0).then_some(())
    })
    .await;
    println!(
        "the pool saw its runner go with the parent Pod after {:?}",
        before.elapsed()
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_missing_secret_fails_the_boot_with_kubernetes_reason() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    add_parent(&k8s, "absent-secret");
    let backend = k8s_builder(&k8s.url, TOKEN)
        .parent_pod(PARENT)
        .build()
        .unwrap();
    let asked = Instant::now();
    let err = env
        .flame
        .pool("k8s-nosecret")
        .min(1)
        .max(1)
        .boot_timeout(LONG)
        .backend(backend)
        .start()
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains("CreateContainerConfigError")
            && text.contains("secret \"absent-secret\" not found"),
        "{text}"
    );
    assert_eq!(k8s.leftovers(), Vec::<String>::new());
}

#[tokio::test]
async fn forbidden_names_the_missing_rbac_verb_and_is_not_retried() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    let backend = k8s_builder(&k8s.url, READ_ONLY_TOKEN)
        .image("registry.example/flame-test:1")
        .build()
        .unwrap();
    let asked = Instant::now();
    let err = env
        .flame
        .pool("k8s-403")
        .min(1)
        .max(1)
        .boot_timeout(LONG)
        .backend(backend)
        .start()
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert!(matches!(err, Error::BootFailed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("403 forbidden")
            && text.contains("cannot create resource \"pods\"")
            && text.contains("RBAC verb `create` on `pods` in namespace `flame-test`"),
        "{text}"
    );
    let creates = k8s.requests().iter().filter(|r| r.verb == "create").count();
    assert_eq!(creates, 1, "a 403 is not retried");
}

#[tokio::test]
async fn the_watch_resumes_when_closed_and_reads_afresh_after_410_gone() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    k8s.close_watches_after(Duration::from_millis(300));
    let backend = k8s_builder(&k8s.url, TOKEN)
        .image("registry.example/flame-test:1")
        .build()
        .unwrap();
    let pool = env
        .flame
        .pool("k8s-watch")
        .max(1)
        .heartbeat(Duration::from_secs(15))
        .parent_grace(Duration::from_secs(45))
        .backend(backend)
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    let watches = || k8s.requests().iter().filter(|r| r.verb == "watch").count();
    let first = watches();
    wait_for("the runner's watch to be resumed", LONG, || async {
        (watches() >= first + 2).then_some(())
    })
    .await;
    // All history forgotten: the next resume meets 410 Gone, lists the
    // Pod afresh and watches from the list's version.
    let lists = || {
        k8s.requests()
            .iter()
            .filter(|r| r.verb == "list" && r.query.contains_key("fieldSelector"))
            .count()
    };
    let lists_before = lists();
    k8s.compact();
    wait_for("a list of the Pod after 410 Gone", LONG, || async {
        (lists() > lists_before).then_some(())
    })
    .await;
    let watches_after_410 = watches();
    wait_for("a watch after the read", LONG, || async {
        (watches() > watches_after_410).then_some(())
    })
    .await;
    // The watch still sees the runner's end at once.
    let call = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.call_with::<counted_sleep>((120_000,), CallOptions::new().timeout(LONG))
                .await
        })
    };
    wait_in_flight(&env, "k8s-watch", 1, LONG).await;
    let pids = runner_pids("k8s-watch");
    assert_eq!(pids.len(), 1, "{pids:?}");
    let killed = Instant::now();
    kill9(pids[0]);
    let err = error_within(call, Duration::from_secs(5)).await;
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "{:?}",
        killed.elapsed()
    );
    assert!(
        matches!(&err, Error::RunnerDown { reason, .. } if reason.contains("exited with code 137")),
        "{err:?}"
    );
    pool.shutdown().await;
    wait_for("no Pod left", LONG, || async {
        k8s.leftovers().is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_unschedulable_pod_fails_its_boot_after_the_bound() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    let bound = Duration::from_secs(1);
    let backend = k8s_builder(&k8s.url, TOKEN)
        .image("registry.example/flame-test:1")
        .gpus(1)
        .unschedulable_timeout(bound)
        .build()
        .unwrap();
    let asked = Instant::now();
    let err = env
        .flame
        .pool("k8s-gpu")
        .min(1)
        .max(1)
        .boot_timeout(LONG)
        .backend(backend)
        .start()
        .await
        .unwrap_err();
    let took = asked.elapsed();
    assert!(
        took >= bound && took < bound + Duration::from_secs(4),
        "{took:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("Unschedulable") && text.contains("Insufficient nvidia.com/gpu"),
        "{text}"
    );
    let pod = created_pod(&k8s);
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert_eq!(k8s.leftovers(), Vec::<String>::new());
}

#[tokio::test]
async fn retire_deletes_with_a_grace_period_covering_the_drain() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    let backend = k8s_builder(&k8s.url, TOKEN)
        .image("registry.example/flame-test:1")
        .build()
        .unwrap();
    let pool = env
        .flame
        .pool("k8s-retire")
        .max(1)
        .shutdown_timeout(Duration::from_millis(1500))
        .backend(backend)
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(2, 2)).await.unwrap(), 4);
    pool.shutdown().await;
    assert_eq!(k8s.leftovers(), Vec::<String>::new());
    let deletes: Vec<Value> = k8s
        .requests()
        .into_iter()
        .filter(|r| r.verb == "delete")
        .map(|r| r.body)
        .collect();
    assert!(!deletes.is_empty());
    assert_eq!(deletes[0]["gracePeriodSeconds"], 2, "{deletes:?}");
}

#[tokio::test]
async fn the_backend_uses_only_the_pod_verbs_of_its_role() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    add_parent(&k8s, "app-secrets");
    k8s.add_secret(K8S_NAMESPACE, "app-secrets", &[("api-key", "k")]);
    let backend = || {
        k8s_builder(&k8s.url, TOKEN)
            .parent_pod(PARENT)
            .build()
            .unwrap()
    };
    // Boot, call, exit, retire, reap, terminate: everything it does.
    let pool = env
        .flame
        .pool("k8s-verbs")
        .max(1)
        .idle_shutdown_after(Duration::from_millis(300))
        .backend(backend())
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(1, 1)).await.unwrap(), 2);
    wait_for("the idle runner's Pod to go", LONG, || async {
        k8s.leftovers().is_empty().then_some(())
    })
    .await;
    assert_eq!(flame::call!(pool, add(1, 1)).await.unwrap(), 2);
    pool.shutdown().await;
    // A Pod left by a parent that is gone: listed with that parent, and
    // terminated by its handle.
    let b = k8s_builder(&k8s.url, TOKEN)
        .image("registry.example/stuck:1")
        .build()
        .unwrap();
    let boot = tokio::spawn(flame::Backend::boot(
        &b,
        flame::BootSpec::new("k8s-verbs".into(), "r-1".into(), Vec::new()).parent("gone"),
    ));
    wait_for("the stuck Pod", LONG, || async {
        (!k8s.leftovers().is_empty()).then_some(())
    })
    .await;
    let listed = flame::Backend::list(&b, "k8s-verbs").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].runner_id.as_str(), listed[0].parent_id.as_str()),
        ("r-1", "gone")
    );
    flame::Backend::terminate(&b, &listed[0].handle, "r-1")
        .await
        .unwrap();
    boot.abort();
    assert_eq!(k8s.leftovers(), Vec::<String>::new());
    // The calls, for the README and the closing note.
    for r in k8s.requests() {
        let mut query: Vec<String> = r
            .query
            .iter()
            .filter(|(k, _)| k.ends_with("Selector") || *k == "resourceVersion")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        query.sort();
        let grace = &r.body["gracePeriodSeconds"];
        println!(
            "{} {} {} {}{}",
            r.verb,
            r.resource,
            r.name.as_deref().unwrap_or(""),
            query.join("&"),
            if grace.is_null() {
                String::new()
            } else {
                format!(" gracePeriodSeconds={grace}")
            }
        );
    }
    let mut used: Vec<(&str, &str)> = k8s
        .requests()
        .iter()
        .map(|r| (r.verb, r.resource))
        .collect();
    used.sort();
    used.dedup();
    assert_eq!(
        used,
        [
            ("create", "pods"),
            ("delete", "pods"),
            ("get", "pods"),
            ("list", "pods"),
            ("watch", "pods")
        ]
    );
}

/// The time from a call on a pool with no runner to its answer (a Pod
/// created, started, its runner ready over NATS, the call served), 10
/// times in a row: the p50 goes into the README.
#[tokio::test]
async fn boot_time_on_the_stand_in() {
    let env = TestEnv::start().await;
    let k8s = FakeK8s::start().await;
    let mut took = Vec::new();
    for i in 0..10 {
        let backend = k8s_builder(&k8s.url, TOKEN)
            .image("registry.example/flame-test:1")
            .build()
            .unwrap();
        let pool = env
            .flame
            .pool(format!("k8s-boot-{i}"))
            .max(1)
            .backend(backend)
            .start()
            .await
            .unwrap();
        let asked = Instant::now();
        assert_eq!(flame::call!(pool, add(i, 1)).await.unwrap(), i + 1);
        took.push(asked.elapsed());
        pool.shutdown().await;
    }
    took.sort();
    println!(
        "k8s stand-in: first call on a new runner p50 {:?} (min {:?}, max {:?}, n=10)",
        took[4], took[0], took[9]
    );
    assert_eq!(k8s.leftovers(), Vec::<String>::new());
}
