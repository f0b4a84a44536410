//! How a pool idles down: idle runners beyond `min` stop (and `min`
//! runners after `min_idle_shutdown_after`), the pool boots again on
//! demand, single-use runners stop after their call, and the idle check
//! can keep a runner.

use std::time::Duration;

use flame::Error;
use flame_tests::funcs::*;
use flame_tests::harness::{
    path_in, process_alive, runner_backend, wait_for, wait_in_flight, TestEnv,
};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn idle_runner_beyond_min_stops_and_min_runner_stays() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("idle")
        .min(1)
        .max(2)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    assert_eq!(pool.status().ready, 1, "min runner booted at start");
    let min_runner = flame::call!(pool, whereabouts()).await.unwrap();
    // Hold the min runner's only slot, so the next call needs a new runner.
    let hold = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call::<sleep_then_mark>((1_000, String::new())).await }
    });
    wait_in_flight(&env, "idle", 1, Duration::from_secs(20)).await;
    let extra = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(extra.pid, min_runner.pid, "a second runner was booted");
    hold.await.unwrap().unwrap();
    wait_for(
        "the extra runner to idle down",
        Duration::from_secs(20),
        || async { (!process_alive(extra.pid) && pool.status().ready == 1).then_some(()) },
    )
    .await;
    // The min runner outlived the idle timeout and still serves.
    assert!(process_alive(min_runner.pid));
    assert_eq!(flame::call!(pool, whereabouts()).await.unwrap(), min_runner);
}

#[tokio::test]
async fn idle_runner_stops_and_the_pool_boots_again_on_demand() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("idlezero")
        .max(1)
        .idle_shutdown_after(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let first = flame::call!(pool, whereabouts()).await.unwrap();
    wait_for(
        "the idle runner to exit",
        Duration::from_secs(20),
        || async { (!process_alive(first.pid) && pool.status().ready == 0).then_some(()) },
    )
    .await;
    let second = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(first.runner, second.runner, "a new runner was booted");
}

#[tokio::test]
async fn min_runner_idles_down_after_min_idle_shutdown_after() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("minidle")
        .min(1)
        .max(1)
        .idle_shutdown_after(Duration::from_millis(100))
        .min_idle_shutdown_after(Duration::from_millis(600))
        .start()
        .await
        .unwrap();
    let first = flame::call!(pool, whereabouts()).await.unwrap();
    wait_for("the min runner to idle down", LONG, || async {
        (!process_alive(first.pid)).then_some(())
    })
    .await;
    // Not replaced while there is no work ...
    assert_eq!(pool.status().ready + pool.status().booting, 0);
    // ... and booted again on demand.
    let second = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(first.pid, second.pid);
}

#[tokio::test]
async fn single_use_runner_stops_after_its_call() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("once")
        .max(2)
        .single_use(true)
        .start()
        .await
        .unwrap();
    let first = flame::call!(pool, whereabouts()).await.unwrap();
    wait_for("the single-use runner to stop", LONG, || async {
        (!process_alive(first.pid)).then_some(())
    })
    .await;
    let second = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(first.pid, second.pid, "a runner served twice");
    // A failing call uses the runner up just the same.
    let err = flame::call!(pool, explode("once".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Panicked { .. }), "{err:?}");
}

#[tokio::test]
async fn idle_shutdown_waits_for_the_idle_check() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keep = path_in(&dir, "keep");
    std::fs::write(&keep, "").unwrap();
    let pool = env
        .flame
        .pool("idlecheck")
        .max(1)
        .idle_shutdown_after(Duration::from_millis(100))
        .idle_shutdown_when::<may_idle_down>()
        .backend(runner_backend().env(KEEP_FILE_ENV, keep.clone()))
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    let asked = format!("{keep}.asked");
    // Idle, asked more than once, and refused each time: still up.
    wait_for("the idle check to be asked twice", LONG, || async {
        let n = std::fs::read_to_string(&asked).ok()?.lines().count();
        (n >= 2).then_some(())
    })
    .await;
    assert!(process_alive(at.pid), "stopped although the check said no");
    std::fs::remove_file(&keep).unwrap();
    wait_for("the runner to stop once the check agrees", LONG, || async {
        (!process_alive(at.pid)).then_some(())
    })
    .await;
}
