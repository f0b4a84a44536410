//! Callers that stop waiting: a linked call is cancelled on the runner, an
//! unlinked one runs on (and still reports its errors), and a cancelled
//! call stops a single-use runner.

use std::path::Path;
use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::funcs::*;
use flame_tests::harness::{
    file_exists, path_in, process_alive, start_marked_call, wait_for, wait_in_flight, MarkedCall,
    TestEnv,
};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn dropping_a_linked_call_cancels_the_remote_work() {
    let env = TestEnv::start().await;
    let pool = env.pool("cancel").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = path_in(&dir, "finished");
    let call = tokio::spawn({
        let pool = pool.clone();
        let marker = marker.clone();
        async move {
            pool.call_with::<sleep_then_mark>((60_000, marker), CallOptions::new().timeout(LONG))
                .await
        }
    });
    wait_in_flight(&env, "cancel", 1, LONG).await;
    call.abort();
    // The runner drops the work long before its 60 s sleep ends.
    wait_in_flight(&env, "cancel", 0, Duration::from_secs(20)).await;
    assert!(!Path::new(&marker).exists());
    // The runner keeps serving.
    assert_eq!(flame::call!(pool, add(2, 2)).await.unwrap(), 4);
}

#[tokio::test]
async fn unlinked_call_runs_on_after_its_caller_is_gone() {
    let env = TestEnv::start().await;
    let pool = env.pool("unlinked").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = path_in(&dir, "finished");
    let call = tokio::spawn({
        let pool = pool.clone();
        let marker = marker.clone();
        async move {
            pool.call_with::<sleep_then_mark>(
                (2_000, marker),
                CallOptions::new().timeout(LONG).link(false),
            )
            .await
        }
    });
    wait_in_flight(&env, "unlinked", 1, LONG).await;
    call.abort();
    wait_for("the work to finish anyway", LONG, || file_exists(&marker)).await;
}

#[tokio::test]
async fn unlinked_call_still_gets_remote_errors_and_the_runner_idles_down() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("unlinkederr")
        .max(1)
        .idle_shutdown_after(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    let err = pool
        .call_with::<explode>(("unlinked".into(),), CallOptions::new().link(false))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Panicked { message, .. } if message == "unlinked"),
        "{err:?}"
    );
    wait_for("the runner to idle down", LONG, || async {
        (!process_alive(at.pid)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn cancelled_call_stops_a_single_use_runner() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("oncecancel")
        .max(1)
        .single_use(true)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "started", 120_000, CallOptions::new()).await;
    call.abort();
    wait_for(
        "the single-use runner to stop",
        Duration::from_secs(20),
        || async { (!process_alive(pid)).then_some(()) },
    )
    .await;
}
