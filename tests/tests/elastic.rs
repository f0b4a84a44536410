//! Elastic pool semantics: the reference's behaviour checklist (REFERENCE.md
//! §2) and the places where flame deliberately does better.

use std::collections::HashSet;
use std::time::Duration;

use flame::{CallOptions, Error, PoolEvent};
use flame_tests::funcs::*;
use flame_tests::harness::{
    file_exists, kill9, path_in, process_alive, runner_backend, sigterm, start_marked_call,
    wait_for, wait_in_flight, CountingBackend, FailingFirst, HookLog, MarkedCall, TestEnv,
};

const LONG: Duration = Duration::from_secs(60);

/// Takes the only slot of a pool (max 1, max_concurrency 1) with a call
/// that runs until the returned file is written.
async fn hold_the_only_slot(
    env: &TestEnv,
    pool: &flame::Pool,
    dir: &tempfile::TempDir,
) -> (tokio::task::JoinHandle<Result<bool, Error>>, String) {
    let release = path_in(dir, "release");
    let holder = tokio::spawn({
        let pool = pool.clone();
        let release = release.clone();
        async move {
            pool.call_with::<wait_for_file>((release, 60_000), CallOptions::new().timeout(LONG))
                .await
        }
    });
    let name = pool.config().name.clone();
    wait_in_flight(env, &name, 1, LONG).await;
    (holder, release)
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
            .any(|e| matches!(e, PoolEvent::Shrink { runners: 1, .. }));
        let regrown = events
            .iter()
            .filter(|e| matches!(e, PoolEvent::GrowEnd { result: Ok(()), .. }))
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
async fn queued_callers_are_served_in_fifo_order() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("fifo")
        .max(1)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (holder, release) = hold_the_only_slot(&env, &pool, &dir).await;
    // Queue five callers, one after the other.
    let mut queued = Vec::new();
    for i in 0..5 {
        let pool2 = pool.clone();
        queued.push(tokio::spawn(async move {
            pool2
                .call_with::<next_seq>((), CallOptions::new().timeout(LONG))
                .await
        }));
        wait_for("the caller to queue", LONG, || async {
            (pool.status().waiting == i + 1).then_some(())
        })
        .await;
    }
    std::fs::write(&release, "").unwrap();
    assert!(holder.await.unwrap().unwrap());
    let mut seqs = Vec::new();
    for q in queued {
        seqs.push(q.await.unwrap().unwrap());
    }
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "served out of order");
}

#[tokio::test]
async fn a_call_never_takes_longer_than_its_timeout_in_total() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("budget")
        .max(1)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (holder, release) = hold_the_only_slot(&env, &pool, &dir).await;
    // This call may take 2 s in all. It waits for the slot about 1.2 s and
    // then needs 1.5 s of work: 2.7 s. The reference would let it run to the
    // end (its timeout only starts once a runner is found); flame stops it
    // at 2 s.
    let timeout = Duration::from_secs(2);
    let started = tokio::time::Instant::now();
    let late = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.call_with::<sleep_then_mark>(
                (1_500, String::new()),
                CallOptions::new().timeout(timeout),
            )
            .await
        }
    });
    wait_for("the caller to queue", LONG, || async {
        (pool.status().waiting == 1).then_some(())
    })
    .await;
    tokio::time::sleep_until(started + Duration::from_millis(1_200)).await;
    std::fs::write(&release, "").unwrap();
    let err = late.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Timeout { timeout: t, .. } if t == timeout),
        "{err:?}"
    );
    assert!(holder.await.unwrap().unwrap());
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
            PoolEvent::GrowStart { .. } => "start".to_string(),
            PoolEvent::GrowEnd { result: Ok(()), .. } => "ready".to_string(),
            PoolEvent::GrowEnd { result: Err(e), .. } => format!("failed: {e}"),
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
            .any(|e| matches!(e, PoolEvent::Shrink { .. }));
        (shrunk && !process_alive(at.pid)).then_some(())
    })
    .await;
    let events = hooks.events();
    assert!(
        matches!(&events[0], PoolEvent::GrowStart { pool, runners: 1 } if pool == "hooks"),
        "{events:?}"
    );
    assert!(
        matches!(
            &events[1],
            PoolEvent::GrowEnd {
                runners: 1,
                result: Ok(()),
                ..
            }
        ),
        "{events:?}"
    );
    assert!(
        matches!(&events[2], PoolEvent::Shrink { runners: 0, .. }),
        "{events:?}"
    );
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
