//! The Fly Machines backend, against a local server that speaks the Machines
//! API and starts a real runner process for each Machine.

use std::time::Duration;

use flame::{CallOptions, Error};
use flame_fly::FlyBackend;
use flame_tests::fake_fly::FakeFly;
use flame_tests::funcs::*;
use flame_tests::harness::{
    error_within, kill9, process_alive, start_marked_call, wait_for, wait_in_flight, MarkedCall,
    TestEnv,
};
use flame_tests::TEST_BUILD;

const LONG: Duration = Duration::from_secs(60);

fn backend(fly: &FakeFly) -> FlyBackend {
    backend_with_token(fly, "test-token")
}

fn backend_with_token(fly: &FakeFly, token: &str) -> FlyBackend {
    backend_with(fly, token, "registry.example/flame-test:1")
}

fn backend_with(fly: &FakeFly, token: &str, image: &str) -> FlyBackend {
    flame_tests::platform::fly_backend(&fly.url, token, image, 512)
}

#[test]
fn fly_backend_refuses_missing_token_app_and_image() {
    let full = || FlyBackend::builder().token("t").app("a").image("i");
    for (builder, what, var) in [
        (full().token(""), "API token", "FLY_API_TOKEN"),
        (full().app(""), "app", "FLY_APP_NAME"),
        (full().image(""), "image", "FLY_IMAGE_REF"),
    ] {
        let err = builder.build().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("no {what}")) && msg.contains(var),
            "{msg}"
        );
    }
    assert!(full().build().is_ok());
}

#[tokio::test]
async fn runners_boot_as_machines_with_the_runner_env_and_are_destroyed() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    std::env::set_var("FLAME_TEST_FLY_FORWARDED", "across");
    let pool = env
        .flame
        .pool("onfly")
        .max(1)
        .forward_env("FLAME_TEST_FLY_FORWARDED")
        .shutdown_timeout(Duration::from_secs(5))
        .backend(backend(&fly))
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    assert_eq!(fly.live_pids(), vec![at.pid], "the call ran on the Machine");
    assert_eq!(
        flame::call!(pool, env_var("FLAME_TEST_FLY_FORWARDED".into()))
            .await
            .unwrap()
            .as_deref(),
        Some("across")
    );

    let create = fly
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.is_empty())
        .expect("a create request");
    assert_eq!(create.authorization, "Bearer test-token");
    let config = &create.body["config"];
    assert_eq!(config["image"], "registry.example/flame-test:1");
    assert_eq!(config["auto_destroy"], true);
    assert_eq!(config["restart"]["policy"], "no");
    assert_eq!(config["guest"]["memory_mb"], 512);
    assert_eq!(config["metadata"]["flame_pool"], "onfly");
    assert_eq!(create.body["region"], "local");
    let parent: flame::ParentInfo =
        flame::ParentInfo::from_env_value(config["env"]["FLAME_PARENT"].as_str().unwrap()).unwrap();
    assert_eq!(parent.pool, "onfly");

    pool.shutdown().await;
    assert!(!process_alive(at.pid), "the Machine still runs");
    let paths: Vec<String> = fly
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("POST /") && p.ends_with("/stop")),
        "{paths:?}"
    );
}

#[tokio::test]
async fn a_dead_machine_fails_its_calls_by_heartbeat() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    let pool = env
        .flame
        .pool("flydead")
        .max(1)
        .heartbeat(Duration::from_millis(300))
        .backend(backend(&fly))
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    let call = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.call_with::<sleep_then_mark>(
                (120_000, String::new()),
                CallOptions::new().timeout(LONG),
            )
            .await
        }
    });
    wait_in_flight(&env, "flydead", 1, LONG).await;
    kill9(at.pid);
    let err = error_within(call, Duration::from_secs(20)).await;
    assert!(matches!(err, Error::RunnerDown { .. }), "{err:?}");
    // The pool destroyed what was left of it through the API.
    wait_for("a destroy request", LONG, || async {
        fly.requests()
            .iter()
            .any(|r| r.method == "DELETE")
            .then_some(())
    })
    .await;
}

/// Guards against dropping a pool (no `shutdown`) leaving its Fly Machines
/// running: the stop futures were discarded on drop, so the Machines API
/// was never told to stop or destroy them.
#[tokio::test]
async fn dropping_the_pool_stops_its_machines() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    let pool = env
        .flame
        .pool("flydrop")
        .min(1)
        .max(1)
        // Long enough that the Machine does not leave on its own first.
        .parent_grace(Duration::from_secs(60))
        .backend(backend(&fly))
        .start()
        .await
        .unwrap();
    let id = flame::call!(pool, env_var("FLY_MACHINE_ID".into()))
        .await
        .unwrap()
        .expect("the runner runs on a Machine");
    drop(pool);
    let (stop, destroy) = (format!("/{id}/stop"), format!("/{id}"));
    wait_for(
        "a stop or destroy request for the Machine",
        Duration::from_secs(20),
        || async {
            fly.requests()
                .iter()
                .any(|r| {
                    (r.method == "POST" && r.path == stop)
                        || (r.method == "DELETE" && r.path == destroy)
                })
                .then_some(())
        },
    )
    .await;
}

/// Runners on other machines cannot reach a loopback NATS address: a pool
/// on the Fly backend that would tell them one refuses to start, saying
/// what to set; the same URL set on purpose for runners is taken.
#[tokio::test]
async fn a_remote_pool_refuses_a_loopback_url_it_was_not_given_on_purpose() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    let flame = flame_tests::harness::builder()
        .nats_url(env.server.url())
        .init()
        .await
        .unwrap();
    let err = flame
        .pool("unreachable")
        .backend(backend(&fly))
        .start()
        .await
        .unwrap_err();
    match &err {
        Error::Config(message) => {
            assert!(message.contains("FLAME_RUNNER_NATS_URL"), "{message}");
            assert!(message.contains("127.0.0.1"), "{message}");
        }
        other => panic!("expected Config, got {other:?}"),
    }
    assert!(fly.requests().is_empty(), "no machine was created");
    // The test env's parent set runner_nats_url on purpose: accepted.
    let pool = env
        .flame
        .pool("reachable")
        .backend(backend(&fly))
        .max(1)
        .start()
        .await
        .unwrap();
    pool.shutdown().await;
}

/// Permanent errors (an unknown token, a config Fly refuses) fail the boot
/// at once with the API's status, instead of being retried.
#[tokio::test]
async fn a_permanent_api_error_fails_the_boot_at_once() {
    let env = TestEnv::start().await;
    for (name, token, image, status) in [
        (
            "badtoken",
            "bad-token",
            "registry.example/flame-test:1",
            "401",
        ),
        (
            "badimage",
            "test-token",
            "registry.example/invalid:1",
            "422",
        ),
    ] {
        let fly = FakeFly::start("flame-test").await;
        let err = env
            .flame
            .pool(name)
            .min(1)
            .max(1)
            .boot_timeout(LONG)
            .backend(backend_with(&fly, token, image))
            .start()
            .await
            .unwrap_err();
        match &err {
            Error::BootFailed { reason, .. } => assert!(reason.contains(status), "{reason}"),
            other => panic!("expected BootFailed, got {other:?}"),
        }
        assert!(!format!("{err} {err:?}").contains(token), "{err:?}");
        let creates = fly.requests().iter().filter(|r| r.method == "POST").count();
        assert_eq!(creates, 1, "a {status} is not retried");
    }
}

/// Stopping a Machine that has already exited is done at once (the API
/// answers 409), not retried.
#[tokio::test]
async fn stopping_an_exited_machine_is_done_at_once() {
    use flame::Backend;
    let fly = FakeFly::start("flame-test").await;
    // No FLAME_PARENT: the test app exits at once, like a crashed runner.
    let spec = flame::BootSpec::new("exited".into(), "r1".into(), Vec::new());
    let booted = backend(&fly).boot(spec).await.unwrap();
    let exited = booted.exited.expect("the Fly backend reports exits");
    let reason = tokio::time::timeout(LONG, exited)
        .await
        .expect("the exit is reported");
    assert!(reason.contains("Fly Machine"), "{reason}");
    tokio::time::timeout(
        Duration::from_secs(5),
        booted.stopper.stop(Duration::from_secs(2)),
    )
    .await
    .expect("the stop of an exited Machine returns at once");
    let stops = fly
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/stop"))
        .count();
    assert_eq!(stops, 1, "a 409 for a stopped Machine is not retried");
}

/// A Machine that dies is reported by the API at once: calls on it fail
/// long before two of its (slow) heartbeats are missed.
#[tokio::test]
async fn a_dead_machine_is_reported_by_the_api_before_heartbeats_tell() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    let pool = env
        .flame
        .pool("flyexit")
        .max(1)
        .heartbeat(Duration::from_secs(15))
        .parent_grace(Duration::from_secs(45))
        .backend(backend(&fly))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "running", 120_000, CallOptions::new()).await;
    kill9(pid);
    // Heartbeats would take 30 s.
    let err = error_within(call, Duration::from_secs(10)).await;
    match &err {
        Error::RunnerDown { reason, .. } => assert!(reason.contains("Fly Machine"), "{reason}"),
        other => panic!("expected RunnerDown, got {other:?}"),
    }
}

/// Boots a Machine of pool `pool` for parent `gone`, which does not exist,
/// as a parent killed in the middle of a boot would leave it; returns its
/// handle once its runner process runs.
async fn left_behind(env: &TestEnv, fly: &FakeFly, pool: &str, runner: &str) -> String {
    use flame::Backend;
    // A runner of parent `gone`: it would wait two minutes for that parent
    // before giving up on its own.
    let info = serde_json::json!({
        "parent_id": "gone",
        "pool": pool,
        "runner_id": runner,
        "nats_url": env.server.url(),
        "max_concurrency": 1,
        "idle_shutdown_after_ms": 60_000,
        "shutdown_timeout_ms": 1_000,
        "failsafe_timeout_ms": 120_000,
        "parent_grace_ms": 120_000,
        "heartbeat_ms": 500,
        "event_key": "00".repeat(32),
    });
    let env_vars = vec![(flame::env::PARENT.to_string(), info.to_string())];
    let spec = flame::BootSpec::new(pool.into(), runner.into(), env_vars).parent("gone");
    let orphan = backend(fly).boot(spec).await.unwrap();
    let machine = orphan.handle.clone();
    orphan.stopper.detach();
    drop(orphan);
    assert_eq!(fly.live_pids().len(), 1, "the orphan runs");
    machine
}

/// Waits until `machine` was destroyed through the API and its process
/// ended.
async fn destroyed(fly: &FakeFly, machine: &str) {
    wait_for("the orphan to be destroyed", LONG, || async {
        fly.requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path == format!("/{machine}"))
            .then_some(())
    })
    .await;
    wait_for("the orphan's process to end", LONG, || async {
        fly.live_pids().is_empty().then_some(())
    })
    .await;
}

/// A Machine whose booting parent died before it got a lease in a shared
/// pool's bucket is found by the pool's scaler through its metadata, and
/// destroyed.
#[tokio::test]
async fn a_machine_without_a_lease_in_a_shared_pool_is_destroyed() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    let machine = left_behind(&env, &fly, "sharedleft", "orphan2").await;
    let pool = env
        .flame
        .pool("sharedleft")
        .shared(true)
        .max(1)
        .backend(backend(&fly))
        .start()
        .await
        .unwrap();
    destroyed(&fly, &machine).await;
    // The pool itself still works.
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    pool.shutdown().await;
}

/// A Machine whose parent died (in the middle of its boot, say) is found by
/// its metadata when a pool of the same name starts, and destroyed.
#[tokio::test]
async fn a_machine_left_by_a_dead_parent_is_destroyed() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    let machine = left_behind(&env, &fly, "leftover", "orphan1").await;

    let pool = env
        .flame
        .pool("leftover")
        .max(1)
        .backend(backend(&fly))
        .start()
        .await
        .unwrap();
    destroyed(&fly, &machine).await;
    pool.shutdown().await;
}

/// A Machine that cannot start fails its boot at once, saying so, and is
/// destroyed before the failure is reported; not at the boot timeout.
#[tokio::test]
async fn a_machine_that_cannot_start_fails_the_boot_at_once() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    let started = tokio::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        env.flame
            .pool("broken")
            .min(1)
            .max(1)
            .boot_timeout(Duration::from_secs(120))
            .backend(backend_with(
                &fly,
                "test-token",
                "registry.example/broken:1",
            ))
            .start(),
    )
    .await
    .expect("the boot fails long before its 120 s timeout")
    .unwrap_err();
    match &err {
        Error::BootFailed { reason, .. } => {
            assert!(
                reason.contains("did not start") && reason.contains("failed"),
                "{reason}"
            )
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let deleted = fly.requests().iter().any(|r| r.method == "DELETE");
    assert!(
        deleted,
        "the failed Machine was destroyed before the failure"
    );
}

/// A runner that runs out of its Machine's memory is reported as such,
/// from the Machine's `exit` event (`oom_killed`): to the call it ran, and
/// as `runner_gone` with reason `out_of_memory`.
#[tokio::test]
async fn a_machine_out_of_memory_is_reported_as_such() {
    let env = TestEnv::start().await;
    let events = flame_tests::harness::EventLog::subscribe(&env, "flyoom").await;
    let fly = FakeFly::start("flame-test").await;
    let backend = FlyBackend::builder()
        .api_url(&fly.url)
        .token("test-token")
        .app("flame-test")
        .image("registry.example/flame-test:memory-limited")
        .region("local")
        .cpu_kind("shared")
        .cpus(1)
        .memory_mb(1024)
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .build()
        .unwrap();
    let pool = env
        .flame
        .pool("flyoom")
        .max(1)
        .timeout(LONG)
        // Heartbeats would take 30 s: the API tells first.
        .heartbeat(Duration::from_secs(15))
        .parent_grace(Duration::from_secs(45))
        .backend(backend)
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, allocate_mb(16)).await.unwrap(), 16);
    let started = tokio::time::Instant::now();
    let err = flame::call!(pool, allocate_mb(4096)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    match &err {
        Error::RunnerDown { reason, .. } => {
            assert!(reason.contains("Fly Machine"), "{reason}");
            assert!(reason.contains("ran out of memory"), "{reason}");
        }
        other => panic!("expected RunnerDown, got {other:?}"),
    }
    let gone = events
        .wait(flame::ops::EventKind::RunnerGone, LONG, |e| {
            e.reason == Some(flame::ops::Reason::OutOfMemory)
        })
        .await;
    assert!(
        gone.detail.as_deref().unwrap_or("").contains("Fly Machine"),
        "{gone:?}"
    );
    pool.shutdown().await;
}

/// However the platform answers a wait for `started` on a Machine that
/// failed (Fly does not document it: an error at once, 412, or 408 once
/// the wait's own timeout ran out), the boot fails soon with the
/// Machine's state, long before the boot timeout, and the Machine is
/// destroyed.
#[tokio::test]
async fn a_failed_machine_fails_the_boot_soon_whatever_its_wait_answers() {
    use flame_tests::fake_fly::FailedWait;
    let env = TestEnv::start().await;
    for (i, answer) in [
        FailedWait::Error400,
        FailedWait::Status412,
        FailedWait::Timeout408,
    ]
    .into_iter()
    .enumerate()
    {
        let fly = FakeFly::start("flame-test").await;
        fly.failed_wait(answer);
        let started = tokio::time::Instant::now();
        let err = env
            .flame
            .pool(format!("failedwait{i}"))
            .min(1)
            .max(1)
            .boot_timeout(Duration::from_secs(40))
            .backend(backend_with(
                &fly,
                "test-token",
                "registry.example/broken:1",
            ))
            .start()
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(15), "{answer:?}: {took:?}");
        let text = err.to_string();
        assert!(text.contains("it is failed"), "{answer:?}: {text}");
        assert_eq!(fly.leftovers(), Vec::<String>::new(), "{answer:?}");
    }
}

/// A runner can report ready over NATS before the platform's wait for
/// `started` has answered: `shutdown()` in that window still stops its
/// Machine before it returns.
#[tokio::test]
async fn shutdown_stops_a_machine_whose_boot_is_still_completing() {
    let env = TestEnv::start().await;
    let fly = FakeFly::start("flame-test").await;
    fly.slow_started_wait(Duration::from_secs(3));
    let pool = env
        .flame
        .pool("flylate")
        .max(1)
        .backend(backend(&fly))
        .start()
        .await
        .unwrap();
    // Served by a runner whose boot has not returned yet.
    assert_eq!(flame::call!(pool, add(2, 2)).await.unwrap(), 4);
    let handles: Vec<_> = pool.runners().into_iter().map(|r| r.handle).collect();
    assert_eq!(handles, vec![None], "the boot had already returned");
    pool.shutdown().await;
    assert_eq!(fly.leftovers(), Vec::<String>::new());
}
