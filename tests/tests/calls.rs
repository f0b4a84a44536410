//! The call path: named and inline calls, casts, and every error a caller can
//! see, against a real nats-server and real runner processes.

use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::funcs::*;
use flame_tests::harness::{
    error_within, kill9, run_testapp, runner_backend, runner_stats, wait_for, wait_in_flight,
    TestEnv,
};

#[tokio::test]
async fn named_call_runs_on_a_runner_process() {
    let env = TestEnv::start().await;
    let pool = env.pool("named").max(1).start().await.unwrap();

    assert_eq!(flame::call!(pool, add(40, 2)).await.unwrap(), 42);
    let out = flame::call!(pool, echo(b"hello".to_vec())).await.unwrap();
    assert_eq!(out, b"hello");
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(at.pid, std::process::id(), "ran in the test process");
    assert!(!at.runner.is_empty(), "runner did not see FLAME_PARENT");
    // The same through the method form.
    assert_eq!(pool.call::<add>((1, 2)).await.unwrap(), 3);
}

#[tokio::test]
async fn inline_block_ships_listed_captures() {
    let env = TestEnv::start().await;
    let pool = env.pool("inline").max(1).start().await.unwrap();
    let words = vec!["fleeting".to_string(), "lambda".to_string()];
    let (joined, pid) = inline::join_remotely(&pool, words, "+".into())
        .await
        .unwrap();
    assert_eq!(joined, "fleeting+lambda");
    assert_ne!(pid, std::process::id(), "ran in the test process");
    inline::nothing(&pool).await.unwrap();
    assert_eq!(inline::sleep_remotely(&pool, 5).await.unwrap(), 5);
    assert_eq!(inline::at_most_two(&pool, 2).await.unwrap(), Ok(2));
    assert_eq!(
        inline::at_most_two(&pool, 3).await.unwrap(),
        Err("3 is too many".to_string())
    );
}

#[tokio::test]
async fn function_error_is_carried_back_typed() {
    let env = TestEnv::start().await;
    let pool = env.pool("own-error").max(1).start().await.unwrap();
    assert_eq!(
        flame::call!(pool, checked_sqrt(9.0)).await.unwrap(),
        Ok(3.0)
    );
    assert_eq!(
        flame::call!(pool, checked_sqrt(-1.0)).await.unwrap(),
        Err(AppError::Invalid("-1 is negative".into()))
    );
}

#[tokio::test]
async fn cast_runs_without_waiting() {
    let env = TestEnv::start().await;
    let pool = env.pool("cast").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cast-ran");
    let p = path.to_string_lossy().into_owned();
    flame::cast!(pool, write_file(p, "from a cast".into())).unwrap();
    let contents = wait_for("the cast's file", Duration::from_secs(20), || {
        let path = path.clone();
        async move { std::fs::read_to_string(path).ok() }
    })
    .await;
    assert_eq!(contents, "from a cast");

    // Inline cast.
    let path2 = dir.path().join("inline-cast");
    inline::write_later(&pool, path2.to_string_lossy().into_owned()).unwrap();
    wait_for("the inline cast's file", Duration::from_secs(20), || {
        let path2 = path2.clone();
        async move { std::fs::read_to_string(path2).ok() }
    })
    .await;
}

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

/// Guards against a comma-separated server list in `nats_url` (and
/// `NATS_URL`) being refused with "invalid port number": the parent must
/// connect with it, and so must its runners, which get the same list.
#[tokio::test]
async fn nats_url_takes_a_comma_separated_server_list() {
    flame_tests::harness::init_tracing();
    let server = flame::embedded::NatsServer::start().unwrap();
    let p = server.port();
    let flame = flame_tests::harness::builder()
        .nats_url(format!("nats://127.0.0.1:{p}, nats://localhost:{p}"))
        .init()
        .await
        .expect("connect with a server list");
    let pool = flame
        .pool("urllist")
        .max(1)
        .backend(runner_backend())
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
}

/// Output of a test-app run as text.
fn texts(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Guards against a `Flame` that cannot be closed: `close()` must flush,
/// close the connection and stop the embedded nats-server, without the
/// parent logging that it lost its connection (`close-check` mode).
#[tokio::test]
async fn closing_a_flame_stops_its_embedded_server_quietly() {
    let out = run_testapp(&["close-check"], Duration::from_secs(120)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l == "closed"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "nats-servers 0"),
        "the embedded nats-server outlived close(): {stdout}"
    );
    assert!(!stderr.contains("lost the connection"), "{stderr}");
}

/// Guards against a dropped `Flame` logging that it lost the connection to
/// NATS (its embedded server stops with it) (`drop-check` mode).
#[tokio::test]
async fn dropping_a_flame_is_quiet() {
    let out = run_testapp(&["drop-check"], Duration::from_secs(120)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l == "closed"), "{stdout}");
    assert!(!stderr.contains("lost the connection"), "{stderr}");
}

/// Guards that a parent can start its own nats-server: with
/// `serve_if_runner()` first and `FlameBuilder::connect()` after, runners
/// (the same program, same arguments) serve before any server is started,
/// and only the parent's one nats-server runs (`own-server` mode).
#[tokio::test]
async fn parent_starts_its_own_server_after_serve_if_runner() {
    let out = run_testapp(&["own-server"], Duration::from_secs(120)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l == "ok 5"), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "nats-servers 1"),
        "one nats-server among the parent's descendants: {stdout}"
    );
}

/// Guards that `FlameBuilder::connect()` in a runner process (`FLAME_PARENT`
/// set) is a configuration error rather than serving or connecting
/// (`connect-in-runner` mode).
#[tokio::test]
async fn connect_in_a_runner_process_is_a_config_error() {
    let out = run_testapp(&["connect-in-runner"], Duration::from_secs(60)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(
        stdout.lines().any(|l| l.starts_with("config error")),
        "{stdout}"
    );
}

/// `Vec<u8>` arguments and results (alone or in a `Result`) travel as one
/// block of bytes (MessagePack bin), both ways, at any size.
#[tokio::test]
async fn byte_vectors_travel_whole_in_arguments_and_results() {
    let env = TestEnv::start().await;
    let pool = env.pool("bytevecs").max(1).start().await.unwrap();
    let data: Vec<u8> = (0..(512usize << 10)).map(|i| (i * 7 % 251) as u8).collect();
    let back = flame::call!(pool, reversed(data.clone(), 1)).await.unwrap();
    let mut expected = data.clone();
    expected.reverse();
    assert_eq!(back, Ok(expected));
    let empty = flame::call!(pool, reversed(Vec::new(), 2)).await.unwrap();
    assert_eq!(empty, Err("nothing to reverse (tag 2)".to_string()));
    let echoed = flame::call!(pool, echo(data.clone())).await.unwrap();
    assert_eq!(echoed, data);
}

/// A plain function that proved short runs inline on the runner; once it
/// blocks for long, it goes back to the blocking pool, so a long run does
/// not hold up other calls.
#[tokio::test]
async fn a_plain_function_that_starts_blocking_leaves_the_serve_loop() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("naps")
        .max(1)
        .timeout(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    // Short: trusted to run inline.
    for _ in 0..40 {
        assert_eq!(flame::call!(pool, nap(0)).await.unwrap(), 0);
    }
    // Long, inline, three times: back to the pool.
    for _ in 0..3 {
        assert_eq!(flame::call!(pool, nap(20)).await.unwrap(), 20);
    }
    // A long nap now runs on a thread of its own: another call is answered
    // while it sleeps.
    let long = tokio::spawn({
        let pool = pool.clone();
        async move { flame::call!(pool, nap(5_000)).await }
    });
    wait_in_flight(&env, "naps", 1, Duration::from_secs(30)).await;
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    assert!(!long.is_finished(), "the long nap held up the other call");
    assert_eq!(long.await.unwrap().unwrap(), 5_000);
}
