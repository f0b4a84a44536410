//! The Docker backend on a real, private `dockerd` (`tests/src/docker.rs`),
//! beyond the conformance suite: what a runner container carries (labels,
//! limits, a real cgroup), runners made from the parent's own container,
//! a SIGKILLed parent's runner, a configuration Docker refuses, and the
//! boot time and API calls of a runner.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use flame::backend::{Backend, BootSpec};
use flame::Error;
use flame_tests::docker::{dockerd, Dockerd, IMAGE, IMAGE_STUCK};
use flame_tests::funcs::add;
use flame_tests::harness::{kill9, runner_pids, testapp, wait_for, HookLog, TestEnv};
use flame_tests::platform::docker_backend_builder;
use flame_tests::TEST_BUILD;
use serde_json::Value;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

async fn engine() -> &'static Dockerd {
    tokio::task::spawn_blocking(dockerd).await.unwrap()
}

fn inspect(engine: &Dockerd, id: &str) -> Value {
    let out = engine.docker(&["inspect", id]);
    let all: Value = serde_json::from_str(&out).unwrap();
    all[0].clone()
}

async fn nothing_left(engine: &Dockerd, pool: &str) {
    wait_for(&format!("no container of {pool}"), LONG, || async {
        engine
            .containers_labelled(&format!("flame.pool={pool}"))
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn runner_containers_carry_labels_and_limits() {
    let env = TestEnv::start().await;
    let engine = engine().await;
    let backend = docker_backend_builder(&engine.host)
        .image(IMAGE)
        .memory_mb(300)
        .cpus(0.5)
        .build()
        .unwrap();
    let pool = env
        .flame
        .pool("dk-labels")
        .max(1)
        .backend(backend)
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
    let ids = engine.containers_labelled("flame.pool=dk-labels");
    assert_eq!(ids.len(), 1, "{ids:?}");
    let c = inspect(engine, &ids[0]);
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["flame.pool"], "dk-labels");
    assert_eq!(labels["flame.parent"], env.flame.parent_id());
    assert_eq!(labels["flame.scope"], "flame-test");
    assert!(labels["flame.runner"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    let host = &c["HostConfig"];
    assert_eq!(host["Memory"], 300 * 1024 * 1024);
    assert_eq!(host["MemorySwap"], 300 * 1024 * 1024);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["AutoRemove"], true);
    assert_eq!(host["NetworkMode"], "host");
    // The limit is the kernel's, not only Docker's record of it.
    let limit = engine
        .cgroup_dir("memory")
        .join(&ids[0])
        .join("memory.limit_in_bytes");
    if limit.exists() {
        let bytes = std::fs::read_to_string(&limit).unwrap();
        assert_eq!(bytes.trim(), (300u64 * 1024 * 1024).to_string());
    }
    // The runner's environment: FLAME_PARENT and the backend's variables.
    let envs: Vec<String> = serde_json::from_value(c["Config"]["Env"].clone()).unwrap();
    assert!(envs.iter().any(|e| e.starts_with("FLAME_PARENT=")));
    assert!(envs.contains(&format!("{}={TEST_BUILD}", flame::env::BUILD_ID)));
    pool.shutdown().await;
    nothing_left(engine, "dk-labels").await;
}

#[tokio::test]
async fn runners_are_made_from_the_parents_own_container() {
    let env = TestEnv::start().await;
    let engine = engine().await;
    let name = format!("dk-own-parent-{}", std::process::id());
    let socket = engine.host.trim_start_matches("unix://").to_string();
    // The parent: the test app in a container of the runner image, with
    // the engine's socket where Docker's default is, and a variable of
    // its own that runners must get too.
    let mut parent = engine
        .docker_command(&[
            "run",
            "-i",
            "--rm",
            "--name",
            &name,
            "--network",
            "host",
            "-v",
            &format!("{socket}:/var/run/docker.sock"),
            "-v",
            "/tmp:/tmp",
            "-e",
            &format!("NATS_URL={}", env.server.url()),
            "-e",
            &format!("FLAME_RUNNER_NATS_URL={}", env.server.url()),
            "-e",
            &format!("{}={TEST_BUILD}", flame::env::BUILD_ID),
            "-e",
            "FLAME_TEST_MARKER=from-the-parent",
            IMAGE,
            "docker-parent",
            "dk-own",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = parent.stdin.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = parent.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = tokio::time::timeout(LONG, rx.recv()).await;
    assert_eq!(
        first.ok().flatten().as_deref(),
        Some("sum 5"),
        "the parent in a container did not get its call served"
    );
    let ids = engine.containers_labelled("flame.pool=dk-own");
    assert_eq!(ids.len(), 1, "{ids:?}");
    let runner = inspect(engine, &ids[0]);
    let own = inspect(engine, &name);
    assert_eq!(runner["Image"], own["Image"], "the very same image");
    assert_eq!(runner["HostConfig"]["NetworkMode"], "host");
    assert_eq!(runner["Config"]["Cmd"], own["Config"]["Cmd"]);
    assert_eq!(runner["Config"]["Labels"]["flame.scope"], own["Image"]);
    let envs: Vec<String> = serde_json::from_value(runner["Config"]["Env"].clone()).unwrap();
    assert!(
        envs.iter()
            .any(|e| e == "FLAME_TEST_MARKER=from-the-parent"),
        "{envs:?}"
    );
    // Its mounts are the backend's, not the parent's (no Docker socket).
    let mounts = runner["Mounts"].to_string();
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    writeln!(stdin).unwrap();
    let last = tokio::time::timeout(LONG, rx.recv()).await;
    assert_eq!(last.ok().flatten().as_deref(), Some("shut down"));
    let status = tokio::task::spawn_blocking(move || parent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    nothing_left(engine, "dk-own").await;
}

#[tokio::test]
async fn a_sigkilled_parents_runner_exits_by_itself() {
    let env = TestEnv::start().await;
    let engine = engine().await;
    let mut parent = tokio::process::Command::new(testapp())
        .args(["platform-parent", "dk-grace", "working", "hang"])
        .env(flame::env::NATS_URL, env.server.url())
        .env("FLAME_RUNNER_NATS_URL", env.server.url())
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .env("FLAME_TEST_DOCKER_HOST", &engine.host)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the runner process", LONG, || async {
        (!runner_pids("dk-grace").is_empty()).then_some(())
    })
    .await;
    kill9(parent.id().unwrap());
    let _ = parent.wait().await;
    let killed = Instant::now();
    // parent_grace is 2 s; the container goes with its runner
    // (AutoRemove), with no parent to stop it.
    nothing_left(engine, "dk-grace").await;
    println!(
        "a SIGKILLed parent's runner container was gone after {:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn a_configuration_docker_refuses_fails_the_boot_at_once() {
    let env = TestEnv::start().await;
    let engine = engine().await;
    let hooks = HookLog::default();
    let backend = docker_backend_builder(&engine.host)
        .image(IMAGE)
        .cpus(4096.0)
        .build()
        .unwrap();
    let asked = Instant::now();
    let err = hooks
        .attach(
            env.flame
                .pool("dk-refused")
                .min(1)
                .max(1)
                .boot_timeout(LONG)
                .backend(backend),
        )
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
        text.contains("status 400") && text.contains("CPUs"),
        "{text}"
    );
    assert_eq!(hooks.grow_starts(), 1, "a 400 is not retried");
    nothing_left(engine, "dk-refused").await;
}

/// A shared pool's runner that idles out removes its own lease, then
/// exits; Docker tells the exit later than the bucket tells the removal.
/// That exit is no failed boot: no cooldown holds the next call back.
#[tokio::test]
async fn a_shared_pools_runner_that_idles_out_is_no_failed_boot() {
    let env = TestEnv::start().await;
    let engine = engine().await;
    let hooks = HookLog::default();
    let backend = docker_backend_builder(&engine.host)
        .image(IMAGE)
        .build()
        .unwrap();
    let pool = hooks
        .attach(
            env.flame
                .pool("dk-shared")
                .shared(true)
                .max(1)
                .idle_shutdown_after(Duration::from_millis(500))
                .boot_cooldown(Duration::from_secs(30))
                .backend(backend),
        )
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    nothing_left(engine, "dk-shared").await;
    // (The exit's event comes after the container is gone.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed: Vec<_> = hooks
        .events()
        .into_iter()
        .filter(|e| matches!(e, flame::PoolChange::GrowEnd { result: Err(_), .. }))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(flame::call!(pool, add(2, 2)).await.unwrap(), 4);
    pool.shutdown().await;
    nothing_left(engine, "dk-shared").await;
}

fn p50(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Ten boots, one after the other: the backend's part (create and start),
/// and a pool's whole boot (until the runner is ready); and the API calls
/// of a boot and a retire.
#[tokio::test]
async fn boot_time_and_api_calls() {
    let env = TestEnv::start().await;
    let engine = engine().await;
    let backend = docker_backend_builder(&engine.host)
        .image(IMAGE_STUCK)
        .build()
        .unwrap();
    let mut started = Vec::new();
    for i in 0..10 {
        let spec = BootSpec::new("dk-time".into(), format!("r{i}"), Vec::new())
            .parent("test")
            .boot_timeout(LONG);
        let asked = Instant::now();
        let booted = backend.boot(spec).await.unwrap();
        started.push(asked.elapsed());
        booted.stopper.stop(Duration::ZERO).await;
    }
    nothing_left(engine, "dk-time").await;
    let mut ready = Vec::new();
    for _ in 0..10 {
        let working = docker_backend_builder(&engine.host)
            .image(IMAGE)
            .build()
            .unwrap();
        let asked = Instant::now();
        let pool = env
            .flame
            .pool("dk-ready")
            .min(1)
            .max(1)
            .backend(working)
            .start()
            .await
            .unwrap();
        ready.push(asked.elapsed());
        pool.shutdown().await;
    }
    println!(
        "Docker: a runner container started in {:?} (p50 of 10, create and start), ready in {:?} (p50 of 10, pool start with min 1)",
        p50(started),
        p50(ready)
    );
    // One boot and its retire, call by call.
    let working = docker_backend_builder(&engine.host)
        .image(IMAGE)
        .build()
        .unwrap();
    let pool = env
        .flame
        .pool("dk-calls")
        .min(1)
        .max(1)
        .shutdown_timeout(Duration::from_millis(500))
        .backend(working)
        .start()
        .await
        .unwrap();
    let id = engine.containers_labelled("flame.pool=dk-calls")[0].clone();
    let booted = engine.api_calls(&["dk-calls", &id]);
    pool.shutdown().await;
    nothing_left(engine, "dk-calls").await;
    let all = engine.api_calls(&["dk-calls", &id]);
    println!("boot: {booted:#?}\nretire: {:#?}", &all[booted.len()..]);
    let verbs: Vec<&str> = all
        .iter()
        .map(|c| c.split('?').next().unwrap_or(c))
        .collect();
    for wanted in [
        "POST /containers/create".to_string(),
        format!("POST /containers/{id}/start"),
        "GET /events".to_string(),
        format!("POST /containers/{id}/stop"),
        format!("POST /containers/{id}/wait"),
    ] {
        assert!(verbs.contains(&wanted.as_str()), "{wanted} not in {all:#?}");
    }
    // A boot Docker refuses (no such image).
    let missing = docker_backend_builder(&engine.host)
        .image(flame_tests::docker::IMAGE_MISSING)
        .build()
        .unwrap();
    let spec = BootSpec::new("dk-fail".into(), "r".into(), Vec::new()).parent("test");
    let err = missing.boot(spec).await.unwrap_err();
    assert!(flame::backend::BootError::is_permanent_error(err.as_ref()));
    println!("failed boot ({err}): {:#?}", engine.api_calls(&["dk-fail"]));
    // Reaping: a container whose parent is gone, listed and removed.
    let stuck = docker_backend_builder(&engine.host)
        .image(IMAGE_STUCK)
        .build()
        .unwrap();
    let spec = BootSpec::new("dk-reap".into(), "r".into(), Vec::new()).parent("gone");
    let left = stuck.boot(spec).await.unwrap();
    let listed = stuck.list("dk-reap").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].parent_id, "gone");
    assert_eq!(listed[0].handle, left.handle);
    stuck
        .terminate(&listed[0].handle, &listed[0].runner_id)
        .await
        .unwrap();
    assert!(engine.containers_labelled("flame.pool=dk-reap").is_empty());
    let calls = engine.api_calls(&["dk-reap", &left.handle]);
    println!("reap (after the boot's create, start): {:#?}", &calls[2..]);
}
