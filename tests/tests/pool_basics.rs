//! First-cut pool behaviour: growth on demand up to max, waiting at max, idle
//! shutdown, min runners kept.

use std::collections::HashSet;
use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::funcs::*;
use flame_tests::harness::{process_alive, wait_for, wait_in_flight, TestEnv};

#[tokio::test]
async fn grows_on_demand_up_to_max_and_no_further() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("grow")
        .max(2)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    assert_eq!(
        pool.status().ready + pool.status().booting,
        0,
        "starts empty"
    );
    // Four calls that each hold their runner for a while.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let at = flame::call!(pool, whereabouts()).await?;
                pool.call::<sleep_then_mark>((200, String::new())).await?;
                Ok::<_, Error>(at.pid)
            })
        })
        .collect();
    let mut pids = HashSet::new();
    for c in calls {
        pids.insert(c.await.unwrap().unwrap());
    }
    assert!(
        !pids.is_empty() && pids.len() <= 2,
        "runners used: {pids:?}"
    );
    let s = pool.status();
    assert!(s.ready + s.booting + s.draining <= 2, "{s:?}");
}

#[tokio::test]
async fn concurrent_callers_on_an_empty_pool_share_the_booting_runner() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("share")
        .max(1)
        .max_concurrency(10)
        .start()
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        flame::call!(pool, whereabouts()),
        flame::call!(pool, whereabouts())
    );
    assert_eq!(a.unwrap(), b.unwrap(), "both served by the one runner");
}

#[tokio::test]
async fn at_max_a_caller_waits_until_its_deadline() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("full")
        .max(1)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let busy = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call::<sleep_then_mark>((3_000, String::new())).await }
    });
    wait_in_flight(&env, "full", 1, Duration::from_secs(20)).await;
    let err = pool
        .call_with::<add>(
            (1, 1),
            CallOptions::new().timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { timeout, .. } if timeout == Duration::from_millis(200)),
        "{err:?}"
    );
    assert_eq!(
        pool.status().waiting,
        0,
        "the timed-out caller left the queue"
    );
    assert_eq!(
        pool.status().ready + pool.status().booting,
        1,
        "no runner beyond max"
    );
    assert_eq!(busy.await.unwrap().unwrap(), 3_000);
}

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
