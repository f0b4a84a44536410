//! How a pool grows: on demand up to `max` (and only when every runner is
//! at `max_concurrency`), `min` runners kept and replaced, casts counted
//! exactly, hot start, limits changed on a live pool, failed boots, the
//! grow/shrink hooks, and `Pool::runners`. (The behaviour the Elixir
//! reference documents for its pools, and where flame does better.)

use std::collections::HashSet;
use std::time::Duration;

use flame::{CallOptions, Error, PoolChange, RunnerState};
use flame_tests::funcs::*;
use flame_tests::harness::{
    file_exists, kill9, path_in, process_alive, runner_backend, start_marked_call, wait_for,
    wait_in_flight, CountingBackend, FailingFirst, HookLog, MarkedCall, TestEnv,
};

const LONG: Duration = Duration::from_secs(60);

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
async fn pool_grows_only_when_every_runner_is_at_max_concurrency() {
    let env = TestEnv::start().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(env.pool("growfull").max(3).max_concurrency(2))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let release = path_in(&dir, "release");
    let hold = |pool: flame::Pool, release: String| {
        tokio::spawn(async move {
            pool.call_with::<wait_for_file>((release, 60_000), CallOptions::new().timeout(LONG))
                .await
        })
    };
    // Two calls fit on one runner (max_concurrency 2): one boot.
    let a = hold(pool.clone(), release.clone());
    let b = hold(pool.clone(), release.clone());
    wait_in_flight(&env, "growfull", 2, LONG).await;
    assert_eq!(hooks.grow_starts(), 1, "{:?}", hooks.events());
    // The third finds the runner full: a second boot.
    let c = hold(pool.clone(), release.clone());
    wait_for("a second runner", LONG, || async {
        (pool.status().ready == 2).then_some(())
    })
    .await;
    assert_eq!(hooks.grow_starts(), 2, "{:?}", hooks.events());
    std::fs::write(&release, "").unwrap();
    for call in [a, b, c] {
        assert!(call.await.unwrap().unwrap());
    }
}

#[tokio::test]
async fn min_runners_are_booted_at_start_and_replaced_when_they_die() {
    let env = TestEnv::start().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(env.pool("keepmin").min(2).max(2))
        .start()
        .await
        .unwrap();
    assert_eq!(
        pool.status().ready,
        2,
        "min runners ready when start returns"
    );
    let victim = flame::call!(pool, whereabouts()).await.unwrap();
    kill9(victim.pid);
    // The reference boots min only once; flame replaces the dead runner.
    wait_for("a replacement runner", LONG, || async {
        let events = hooks.events();
        let shrunk = events
            .iter()
            .any(|e| matches!(e, PoolChange::Shrink { runners: 1, .. }));
        let regrown = events
            .iter()
            .filter(|e| matches!(e, PoolChange::GrowEnd { result: Ok(()), .. }))
            .count()
            == 3;
        (shrunk && regrown && pool.status().ready == 2).then_some(())
    })
    .await;
    for _ in 0..4 {
        let at = flame::call!(pool, whereabouts()).await.unwrap();
        assert_ne!(at.pid, victim.pid, "the dead runner served a call");
    }
}

#[tokio::test]
async fn cast_grows_the_pool_exactly_as_needed() {
    let env = TestEnv::start().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(env.pool("castgrow").max(2).max_concurrency(1))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marks: Vec<String> = (0..3).map(|i| path_in(&dir, &format!("m{i}"))).collect();
    for m in &marks {
        pool.cast::<mark_then_sleep>((m.clone(), 200)).unwrap();
    }
    wait_for("all three casts to run", LONG, || async {
        for m in &marks {
            file_exists(m).await?;
        }
        Some(())
    })
    .await;
    assert_eq!(hooks.grow_starts(), 2, "{:?}", hooks.events());
    let pids: HashSet<String> = marks
        .iter()
        .map(|m| std::fs::read_to_string(m).unwrap())
        .collect();
    assert!(pids.len() <= 2, "more than max runners: {pids:?}");
}

#[tokio::test]
async fn exact_counting_under_1000_concurrent_callers() {
    let env = TestEnv::start().await;
    let counting = CountingBackend::new(runner_backend());
    let (max, max_concurrency) = (4, 5);
    let pool = env
        .flame
        .pool("exact")
        .max(max)
        .max_concurrency(max_concurrency)
        .timeout(Duration::from_secs(120))
        .backend(counting.clone())
        .start()
        .await
        .unwrap();
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { flame::call!(pool, counted_sleep(10)).await })
        })
        .collect();
    let mut pids = HashSet::new();
    let mut peak = 0;
    for c in calls {
        let report = c.await.unwrap().unwrap();
        pids.insert(report.pid);
        peak = peak.max(report.peak);
    }
    // Counted on the runners: never more than max_concurrency at once.
    assert!(peak <= max_concurrency, "a runner ran {peak} calls at once");
    assert!(
        peak >= 2,
        "calls never overlapped (peak {peak}): test is void"
    );
    // Counted as processes: never more than max booting or running.
    assert!(
        counting.peak() <= max,
        "{} runner processes at once",
        counting.peak()
    );
    assert!(pids.len() <= counting.boots());
}

/// Hot start: once the ready runner is half busy, a second one boots
/// although no caller waits; without it the pool stays at one runner.
#[tokio::test]
async fn hot_start_boots_a_runner_before_anyone_waits() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, hot) in [("cold", false), ("hot", true)] {
        let mut builder = env.pool(name).max(2).max_concurrency(4).timeout(LONG);
        if hot {
            builder = builder.hot_start(0.5);
        }
        let pool = builder.start().await.unwrap();
        // Two long calls on the first runner: half its capacity.
        let release = path_in(&dir, &format!("release-{name}"));
        let calls: Vec<_> = (0..2)
            .map(|_| {
                let (pool, release) = (pool.clone(), release.clone());
                tokio::spawn(async move {
                    pool.call_with::<wait_for_file>((release, 60_000), CallOptions::new())
                        .await
                })
            })
            .collect();
        wait_in_flight(&env, name, 2, LONG).await;
        let status = pool.status();
        assert_eq!(status.waiting, 0, "{status:?}");
        if hot {
            wait_for("a second runner, booted ahead", LONG, || async {
                (pool.status().ready == 2).then_some(())
            })
            .await;
        } else {
            // Nothing waits, so nothing boots.
            assert_eq!(status.ready + status.booting, 1, "{status:?}");
        }
        std::fs::write(&release, "go").unwrap();
        for c in calls {
            assert!(c.await.unwrap().unwrap());
        }
        let status = pool.status();
        if !hot {
            assert_eq!(status.ready + status.booting, 1, "{status:?}");
        }
        pool.shutdown().await;
    }
}

#[tokio::test]
async fn min_and_max_change_on_a_live_pool() {
    let env = TestEnv::start().await;
    let counting = CountingBackend::new(runner_backend());
    let pool = env
        .flame
        .pool("resize")
        .max(1)
        .backend(counting.clone())
        .start()
        .await
        .unwrap();
    assert_eq!(pool.limits(), (0, 1));
    pool.set_limits(3, 4).unwrap();
    wait_for("three runners", LONG, || async {
        (pool.status().ready == 3 && counting.live() == 3).then_some(())
    })
    .await;
    pool.set_limits(0, 1).unwrap();
    assert_eq!(pool.limits(), (0, 1));
    wait_for("the surplus to be retired", LONG, || async {
        (counting.live() == 1 && pool.status().ready == 1).then_some(())
    })
    .await;
    let err = pool.set_limits(3, 2).unwrap_err();
    assert!(
        err.to_string().contains("min (3) is larger than max (2)"),
        "{err}"
    );
    assert_eq!(flame::call!(pool, add(1, 1)).await.unwrap(), 2);
}

#[tokio::test]
async fn failed_boot_is_reported_to_grow_end_retried_and_queued_work_served() {
    let env = TestEnv::start().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(
            env.flame
                .pool("flaky")
                .max(1)
                .backend(FailingFirst::new(1, runner_backend())),
        )
        .start()
        .await
        .unwrap();
    let served = pool
        .call_with::<add>((2, 3), CallOptions::new().timeout(LONG))
        .await
        .unwrap();
    assert_eq!(served, 5, "the queued call was served after the retry");
    let events = hooks.events();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            PoolChange::GrowStart { .. } => "start".to_string(),
            PoolChange::GrowEnd { result: Ok(()), .. } => "ready".to_string(),
            PoolChange::GrowEnd { result: Err(e), .. } => format!("failed: {e}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    assert_eq!(kinds[0], "start");
    assert!(
        kinds[1].starts_with("failed") && kinds[1].contains("injected boot failure"),
        "{kinds:?}"
    );
    assert_eq!(&kinds[2..], ["start", "ready"]);
    assert!(events.iter().all(|e| e.pool() == "flaky"));
}

#[tokio::test]
async fn hooks_report_grow_and_shrink_with_runner_counts() {
    let env = TestEnv::start().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(
            env.pool("hooks")
                .max(1)
                .idle_shutdown_after(Duration::from_millis(100)),
        )
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    wait_for("the runner to idle down", LONG, || async {
        let shrunk = hooks
            .events()
            .iter()
            .any(|e| matches!(e, PoolChange::Shrink { .. }));
        (shrunk && !process_alive(at.pid)).then_some(())
    })
    .await;
    let events = hooks.events();
    assert!(
        matches!(&events[0], PoolChange::GrowStart { pool, runners: 1 } if pool == "hooks"),
        "{events:?}"
    );
    assert!(
        matches!(
            &events[1],
            PoolChange::GrowEnd {
                runners: 1,
                result: Ok(()),
                ..
            }
        ),
        "{events:?}"
    );
    assert!(
        matches!(&events[2], PoolChange::Shrink { runners: 0, .. }),
        "{events:?}"
    );
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
