//! How a pool and its runners stop: `shutdown` and dropping the pool stop
//! the runners, a SIGTERMed runner drains its calls, a long drain is not
//! taken for a dead runner, and `shutdown_timeout` cuts work that runs
//! too long.

use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::funcs::*;
use flame_tests::harness::{
    process_alive, runner_pids, sigterm, start_marked_call, wait_for, MarkedCall, TestEnv,
};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn shutdown_stops_runners_and_refuses_new_calls() {
    let env = TestEnv::start().await;
    let pool = env.pool("closing").min(1).max(1).start().await.unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    pool.shutdown().await;
    assert!(
        !process_alive(at.pid),
        "runner still running after shutdown"
    );
    let err = flame::call!(pool, add(1, 2)).await.unwrap_err();
    assert!(
        matches!(err, Error::PoolClosed(ref p) if p == "closing"),
        "{err:?}"
    );
}

#[tokio::test]
async fn dropping_the_pool_stops_its_runners() {
    let env = TestEnv::start().await;
    let pool = env.pool("dropped").min(1).max(1).start().await.unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    drop(pool);
    wait_for("the runner to stop", Duration::from_secs(20), || async {
        (!process_alive(at.pid)).then_some(())
    })
    .await;
}

/// Guards against a panic when a `Pool` is dropped outside a tokio runtime
/// while one of its runners has said it is stopping: the drop path
/// (`Replies::fail_runner`) spawned a task, which needs a runtime.
#[test]
fn dropping_a_pool_with_a_draining_runner_outside_a_runtime_does_not_panic() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (env, pool, pid) = rt.block_on(async {
        let env = TestEnv::start().await;
        let pool = env
            .pool("dropdraining")
            .max(1)
            .shutdown_timeout(Duration::from_secs(120))
            .start()
            .await
            .unwrap();
        // Unlinked, so that aborting its caller below leaves the work
        // running: the runner keeps draining.
        let MarkedCall { call, pid } = start_marked_call(
            &pool,
            &dir,
            "started",
            120_000,
            CallOptions::new().link(false),
        )
        .await;
        sigterm(pid);
        wait_for(
            "the runner to say it is stopping",
            Duration::from_secs(30),
            || async { (pool.status().draining == 1).then_some(()) },
        )
        .await;
        // The caller's task holds a clone of the pool: end it, so that
        // `pool` is the last handle.
        call.abort();
        let _ = call.await;
        assert!(process_alive(pid), "the runner is still draining its work");
        (env, pool, pid)
    });
    let dropped = std::thread::spawn(move || drop(pool)).join();
    assert!(
        dropped.is_ok(),
        "dropping the pool on a thread without a tokio runtime panicked"
    );
    rt.block_on(async move {
        wait_for(
            "the runner of the dropped pool to be gone",
            Duration::from_secs(30),
            || async { (!process_alive(pid)).then_some(()) },
        )
        .await;
        drop(env);
    });
}

/// Guards against `Pool::shutdown` taking about one heartbeat instead of
/// milliseconds: the parent stopped listening before it answered the
/// runner's `stopping` message, so the runner waited out its request timeout
/// (one heartbeat) before exiting. With a 10 s heartbeat every one of 25
/// shutdowns must end well within 5 s.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_heartbeat() {
    let env = TestEnv::start().await;
    for round in 0..25 {
        let name = format!("quickstop{round}");
        let pool = env
            .pool(&name)
            .min(1)
            .max(1)
            .heartbeat(Duration::from_secs(10))
            .parent_grace(Duration::from_secs(30))
            .start()
            .await
            .unwrap();
        let pids = runner_pids(&name);
        assert_eq!(pids.len(), 1, "round {round}: one runner: {pids:?}");
        tokio::time::timeout(Duration::from_secs(5), pool.shutdown())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: shutdown took more than 5 s (heartbeat is 10 s)")
            });
        wait_for(
            &format!("round {round}: the runner to be gone after shutdown"),
            Duration::from_secs(2),
            || async { (!process_alive(pids[0])).then_some(()) },
        )
        .await;
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_work_and_takes_no_new_calls() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("drain")
        .max(2)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "started", 1_000, CallOptions::new()).await;
    sigterm(pid);
    // In-flight work finishes and its result arrives ...
    assert_eq!(call.await.unwrap().unwrap(), pid);
    wait_for("the runner to exit", LONG, || async {
        (!process_alive(pid)).then_some(())
    })
    .await;
    // ... and new calls go to another runner.
    let next = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(next.pid, pid);
}

/// A drain longer than two heartbeats: the draining runner keeps beating,
/// so its parent does not count it down and fail the call it finishes.
#[tokio::test]
async fn a_long_drain_is_not_mistaken_for_a_dead_runner() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("longdrain")
        .max(1)
        .heartbeat(Duration::from_millis(200))
        .parent_grace(Duration::from_secs(5))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Ten heartbeats of draining.
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "started", 2_000, CallOptions::new()).await;
    sigterm(pid);
    assert_eq!(
        call.await.unwrap().unwrap(),
        pid,
        "the drained call's result"
    );
}

#[tokio::test]
async fn shutdown_timeout_cuts_off_work_that_runs_too_long() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("cutoff")
        .max(1)
        .shutdown_timeout(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "started", 60_000, CallOptions::new()).await;
    sigterm(pid);
    let err = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call must end with the runner, long before its 60 s")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::RunnerDown { .. }), "{err:?}");
    assert!(!process_alive(pid));
}
