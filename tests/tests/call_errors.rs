//! Every error a caller can see from flame: panics, timeouts, dead
//! runners (seen at once, or by heartbeat), unknown functions, oversize and
//! unencodable payloads, an unreachable NATS, failed casts.

use std::path::Path;
use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::funcs::*;
use flame_tests::harness::{
    error_within, file_exists, kill9, path_in, runner_backend, runner_stats, start_marked_call,
    wait_for, wait_in_flight, MarkedCall, NoExitNotice, TestEnv,
};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn panic_is_reported_and_runner_keeps_serving() {
    let env = TestEnv::start().await;
    let pool = env.pool("panics").max(1).start().await.unwrap();
    let before = flame::call!(pool, whereabouts()).await.unwrap();
    let err = flame::call!(pool, explode("kaboom".into()))
        .await
        .unwrap_err();
    match &err {
        Error::Panicked {
            function, message, ..
        } => {
            assert!(function.ends_with("::explode"), "{function}");
            assert_eq!(message, "kaboom");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert!(err.to_string().contains("kaboom"));
    let err = flame::call!(pool, explode_blocking("on a thread".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Panicked { message, .. } if message == "on a thread"),
        "{err:?}"
    );
    let after = flame::call!(pool, whereabouts()).await.unwrap();
    assert_eq!(before, after, "the same runner must keep serving");
}

#[tokio::test]
async fn timeout_cancels_the_work_on_the_runner() {
    let env = TestEnv::start().await;
    let pool = env.pool("timeouts").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("finished");
    let m = marker.to_string_lossy().into_owned();
    let err = pool
        .call_with::<sleep_then_mark>(
            (3_000, m.clone()),
            CallOptions::new().timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { timeout, .. } if timeout == Duration::from_millis(300)),
        "{err:?}"
    );
    // The runner cancelled the work at its deadline: a call queued behind
    // it on the same runner finishes well before the 3 s sleep would have, and
    // the sleeping call never wrote its marker.
    let next = pool
        .call_with::<sleep_then_mark>(
            (0, String::new()),
            CallOptions::new().timeout(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    assert_eq!(next, 0);
    let stats = runner_stats(&env, "timeouts").await.unwrap();
    assert_eq!(
        stats["in_flight"], 0,
        "cancelled work still counted: {stats}"
    );
    assert!(!marker.exists(), "the timed-out work ran to the end");
}

#[tokio::test]
async fn pool_timeout_kills_the_work_and_a_call_timeout_overrides_it() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("pooltimeout")
        .max(1)
        .timeout(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = path_in(&dir, "finished");
    // Boot first, so the pool's 500 ms are not spent booting.
    flame::call!(pool, whereabouts()).await.unwrap();
    let err = flame::call!(pool, sleep_then_mark(30_000, marker.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { timeout, .. } if timeout == Duration::from_millis(500)),
        "{err:?}"
    );
    wait_in_flight(&env, "pooltimeout", 0, LONG).await;
    assert!(!Path::new(&marker).exists());
    let ok = pool
        .call_with::<sleep_then_mark>(
            (800, String::new()),
            CallOptions::new().timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!(ok, 800);
}

#[tokio::test]
async fn runner_killed_mid_call_fails_the_call_at_once() {
    let env = TestEnv::start().await;
    let pool = env.pool("killed").max(1).start().await.unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    let call = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.call_with::<sleep_then_mark>(
                (60_000, String::new()),
                CallOptions::new().timeout(Duration::from_secs(60)),
            )
            .await
        }
    });
    // Wait until the runner holds the call, then kill it.
    wait_in_flight(&env, "killed", 1, Duration::from_secs(20)).await;
    kill9(at.pid);
    let err = error_within(call, Duration::from_secs(20)).await;
    match err {
        Error::RunnerDown { runner, reason, .. } => {
            assert_eq!(runner, at.runner);
            assert!(reason.contains("signal 9"), "{reason}");
        }
        other => panic!("expected RunnerDown, got {other:?}"),
    }
}

#[tokio::test]
async fn every_caller_on_a_killed_runner_fails_at_once() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("killall")
        .max(1)
        .max_concurrency(5)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marks: Vec<String> = (0..3).map(|i| path_in(&dir, &format!("m{i}"))).collect();
    let calls: Vec<_> = marks
        .iter()
        .map(|m| {
            let pool = pool.clone();
            let m = m.clone();
            tokio::spawn(async move {
                pool.call_with::<mark_then_sleep>((m, 120_000), CallOptions::new().timeout(LONG))
                    .await
            })
        })
        .collect();
    for m in &marks {
        wait_for("the calls to start", LONG, || file_exists(m)).await;
    }
    let pid: u32 = std::fs::read_to_string(&marks[0]).unwrap().parse().unwrap();
    kill9(pid);
    for call in calls {
        let err = error_within(call, Duration::from_secs(20)).await;
        assert!(matches!(err, Error::RunnerDown { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn runner_down_is_noticed_by_heartbeat_when_the_backend_cannot_see_exits() {
    let env = TestEnv::start().await;
    let pool = env
        .flame
        .pool("heartbeat")
        .max(1)
        .heartbeat(Duration::from_millis(300))
        .backend(NoExitNotice(runner_backend()))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "started", 120_000, CallOptions::new()).await;
    kill9(pid);
    let err = error_within(call, Duration::from_secs(20)).await;
    match err {
        Error::RunnerDown { reason, .. } => {
            assert!(reason.contains("no heartbeat"), "{reason}")
        }
        other => panic!("expected RunnerDown, got {other:?}"),
    }
    // The pool boots a new runner for the next call.
    let next = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(next.pid, pid);
}

#[tokio::test]
async fn unknown_function_is_named() {
    // Registered in this test binary only, so the runner does not have it.
    #[flame::remote]
    async fn only_in_the_parent() -> u8 {
        1
    }
    let env = TestEnv::start().await;
    let pool = env.pool("unknown").max(1).start().await.unwrap();
    let err = flame::call!(pool, only_in_the_parent()).await.unwrap_err();
    match &err {
        Error::UnknownFunction { function, .. } => {
            assert!(function.ends_with("::only_in_the_parent"), "{function}")
        }
        other => panic!("expected UnknownFunction, got {other:?}"),
    }
    assert!(err.to_string().contains("only_in_the_parent"));
}

#[tokio::test]
async fn oversize_arguments_are_refused_before_sending() {
    let env = TestEnv::start().await;
    let pool = env.pool("oversize").max(1).start().await.unwrap();
    let max = env.flame.client().max_payload();
    let err = flame::call!(pool, echo(vec![1u8; max + 10]))
        .await
        .unwrap_err();
    match &err {
        Error::PayloadTooLarge {
            what, size, max: m, ..
        } => {
            assert_eq!(*what, "arguments");
            assert!(*size > max);
            assert_eq!(*m, max);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&max.to_string()), "{text}");
}

#[tokio::test]
async fn oversize_result_is_refused_by_the_runner() {
    let env = TestEnv::start().await;
    let pool = env.pool("bigresult").max(1).start().await.unwrap();
    let max = env.flame.client().max_payload();
    let err = flame::call!(pool, bytes_of(max + 100)).await.unwrap_err();
    match err {
        Error::PayloadTooLarge {
            what, size, max: m, ..
        } => {
            assert_eq!(what, "result");
            assert!(size > max);
            assert_eq!(m, max);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // Still serving.
    assert_eq!(flame::call!(pool, bytes_of(3)).await.unwrap(), vec![7; 3]);
}

#[tokio::test]
async fn encode_failures_are_typed() {
    let env = TestEnv::start().await;
    let pool = env.pool("encode").max(1).start().await.unwrap();
    let err = flame::call!(pool, takes_unserializable(Unserializable))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Encode { what: "arguments", reason, .. } if reason.contains("refuses")),
        "{err:?}"
    );
    let err = flame::call!(pool, unencodable()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Encode { what: "result", reason, .. } if reason.contains("refuses")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unreachable_nats_is_reported() {
    flame_tests::harness::init_tracing();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let err = flame_tests::harness::with_test_state(flame::FlameBuilder::new())
        .nats_url(&url)
        .connect_timeout(Duration::from_secs(2))
        .init()
        .await
        .unwrap_err();
    match err {
        Error::NatsUnreachable { url: u, .. } => assert_eq!(u, url),
        other => panic!("expected NatsUnreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn cast_failure_does_not_affect_the_caller() {
    let env = TestEnv::start().await;
    let pool = env.pool("castfail").max(1).start().await.unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    pool.cast::<explode>(("in a cast".into(),))
        .expect("a cast returns at once");
    wait_for("the failure to be counted", LONG, || async {
        (runner_stats(&env, "castfail").await?["casts_failed"] == 1).then_some(())
    })
    .await;
    assert_eq!(flame::call!(pool, whereabouts()).await.unwrap(), at);
}
