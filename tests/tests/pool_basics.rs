//! First-cut pool behaviour: growth on demand up to max, waiting at max, idle
//! shutdown, min runners kept.

use std::collections::HashSet;
use std::time::Duration;

use flame::{CallOptions, Error, RunnerState};
use flame_tests::funcs::*;
use flame_tests::harness::{
    process_alive, runner_pids, sigterm, start_marked_call, wait_for, wait_in_flight, MarkedCall,
    TestEnv,
};

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

/// Guards `Pool::runners()`: each runner with its state, this parent's load
/// on it, and its backend handle (`pid N` for local runners).
#[tokio::test]
async fn runners_lists_each_runner_with_state_load_and_handle() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("listed")
        .min(2)
        .max(2)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let runners = pool.runners();
    assert_eq!(runners.len(), 2, "min 2");
    let mut pids = Vec::new();
    for r in &runners {
        assert_eq!(r.state, RunnerState::Ready, "runner {}", r.id);
        assert_eq!(r.load, 0, "runner {}", r.id);
        let handle = r.handle.clone().expect("a ready runner has a handle");
        let pid: u32 = handle
            .strip_prefix("pid ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("not a local handle: {handle}"));
        assert!(process_alive(pid), "{handle} is not a live process");
        pids.push(pid);
    }
    assert_ne!(runners[0].id, runners[1].id);
    assert_ne!(pids[0], pids[1]);

    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "started", 120_000, CallOptions::new()).await;
    let busy = format!("pid {pid}");
    wait_for(
        "the busy runner to show load 1",
        Duration::from_secs(20),
        || async {
            let runners = pool.runners();
            let loads: Vec<usize> = runners.iter().map(|r| r.load).collect();
            let busy_loaded = runners
                .iter()
                .any(|r| r.load == 1 && r.handle.as_deref() == Some(busy.as_str()));
            (busy_loaded && loads.iter().sum::<usize>() == 1).then_some(())
        },
    )
    .await;
    call.abort();
}
