//! Shared pools: many parents, one pool, coordinated through JetStream KV.

use std::collections::HashSet;
use std::time::Duration;

use flame::{CallOptions, Flame};
use flame_tests::funcs::*;
use flame_tests::harness::{
    error_within, kill9, process_alive, runner_backend, runner_pids, shared_pool,
    start_marked_call, wait_for, MarkedCall, NoExitNotice, RunnerSampler, SharedParent, TestEnv,
};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn two_parents_share_one_pool() {
    let env = TestEnv::start().await;
    let second = env.another_parent().await;
    let a = shared_pool(&env.flame, "together")
        .max(2)
        .max_concurrency(2)
        .start()
        .await
        .unwrap();
    let b = shared_pool(&second, "together")
        .max(2)
        .max_concurrency(2)
        .start()
        .await
        .unwrap();
    let mut pids = HashSet::new();
    for i in 0..20 {
        let pool = if i % 2 == 0 { &a } else { &b };
        let at = pool
            .call_with::<counted_sleep>((20,), CallOptions::new().timeout(LONG))
            .await
            .unwrap();
        assert!(at.peak <= 2, "{at:?}");
        pids.insert(at.pid);
    }
    assert!(pids.len() <= 2, "{pids:?}");
    wait_for("both parents to see the same runners", LONG, || async {
        let (sa, sb) = (a.status(), b.status());
        (sa.ready >= 1 && sa.ready == sb.ready).then_some(())
    })
    .await;
}

async fn bucket(env: &TestEnv, pool: &str) -> async_nats::jetstream::kv::Store {
    async_nats::jetstream::new(env.client().await)
        .get_key_value(format!("flame-{pool}"))
        .await
        .expect("the pool's bucket")
}

/// The parent id the scaler key of the test build names, if any.
async fn scaler_of(store: &async_nats::jetstream::kv::Store) -> Option<String> {
    scaler_of_build(store, flame_tests::TEST_BUILD).await
}

/// The parent id the `scalers.<build>` key names, if any.
async fn scaler_of_build(store: &async_nats::jetstream::kv::Store, build: &str) -> Option<String> {
    let entry = store.entry(format!("scalers.{build}")).await.ok()??;
    if entry.operation != async_nats::jetstream::kv::Operation::Put {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&entry.value).ok()?;
    v["parent"].as_str().map(str::to_string)
}

/// Runner leases in the bucket.
async fn lease_count(store: &async_nats::jetstream::kv::Store) -> usize {
    use futures::StreamExt;
    let Ok(keys) = store.keys().await else {
        return 0;
    };
    keys.filter_map(|k| async move { k.ok() })
        .filter(|k| futures::future::ready(k.starts_with("runners.")))
        .count()
        .await
}

#[tokio::test]
async fn four_parent_processes_never_exceed_max_runners_or_max_concurrency() {
    let env = TestEnv::start().await;
    let sampler = RunnerSampler::start("caps");
    let (max, mc) = (3, 4);
    let mut parents = Vec::new();
    for _ in 0..4 {
        parents.push(
            SharedParent::start(&env.server.url(), "caps", (max, mc), (24, 240, 5), &[]).await,
        );
    }
    let mut served = 0;
    let mut peaks = Vec::new();
    for p in &mut parents {
        let report = p.done(Duration::from_secs(120)).await;
        assert_eq!(report.failed, 0, "{report:?}");
        // Counted on the runners: never more than max_concurrency at once.
        assert!(
            report.peak <= mc,
            "a runner ran {} calls at once",
            report.peak
        );
        assert!(report.pids.len() <= max, "{report:?}");
        served += report.ok;
        peaks.push(report.peak);
    }
    assert_eq!(served, 4 * 240);
    eprintln!(
        "caps: runner processes at once {} (max {max}), runner-side concurrency at most {} (max_concurrency {mc})",
        sampler.peak(),
        peaks.iter().max().unwrap()
    );
    // Counted as processes: never more than max alive at once.
    assert!(
        sampler.peak() <= max,
        "{} runner processes at once",
        sampler.peak()
    );
    assert!(sampler.peak() >= 1);
}

#[tokio::test]
async fn scaler_failover_after_sigkill_keeps_calls_served() {
    let env = TestEnv::start().await;
    let url = env.server.url();
    let mut parents = Vec::new();
    for _ in 0..3 {
        parents.push(SharedParent::start(&url, "failover", (2, 4), (4, 0, 20), &[]).await);
    }
    let store = bucket(&env, "failover").await;
    let old = wait_for("a scaler", LONG, || scaler_of(&store)).await;
    for p in &mut parents {
        p.progressed_to(50, LONG).await;
    }
    let at = parents
        .iter()
        .position(|p| p.parent_id == old)
        .expect("the scaler is one of the parents");
    let mut victim = parents.remove(at);
    let killed = tokio::time::Instant::now();
    kill9(victim.pid());
    victim.child.wait().await.unwrap();
    // Another parent takes over within one lease period (3 heartbeats of
    // 500 ms), with slack for a loaded machine.
    let new = wait_for("a new scaler", Duration::from_secs(20), || async {
        scaler_of(&store).await.filter(|s| *s != old)
    })
    .await;
    eprintln!("failover took {:?}", killed.elapsed());
    assert!(parents.iter().any(|p| p.parent_id == new));
    // The survivors keep being served.
    for p in &mut parents {
        let target = p.progress + 100;
        p.progressed_to(target, LONG).await;
    }
    // And the pool is within its limits.
    assert!(runner_pids("failover").len() <= 2);
}

#[tokio::test]
async fn runner_outlives_its_booting_parent_while_another_parent_lives() {
    let env = TestEnv::start().await;
    let url = env.server.url();
    // The process parent starts first: it becomes the scaler and boots the
    // runner.
    let mut first = SharedParent::start(
        &url,
        "outlive",
        (1, 4),
        (1, 50, 1),
        &[("FLAME_TEST_MIN", "1")],
    )
    .await;
    let report = first.done(LONG).await;
    assert_eq!(report.pids.len(), 1, "{report:?}");
    let runner = report.pids[0];
    let heartbeat = Duration::from_millis(500);
    let pool = shared_pool(&env.flame, "outlive")
        .min(1)
        .max(1)
        .max_concurrency(4)
        .heartbeat(heartbeat)
        .parent_grace(heartbeat * 6)
        .start()
        .await
        .unwrap();
    kill9(first.pid());
    first.child.wait().await.unwrap();
    // Well past the runner's grace period, it still serves this parent.
    for _ in 0..10 {
        let at = pool
            .call_with::<counted_sleep>((100,), CallOptions::new().timeout(LONG))
            .await
            .unwrap();
        assert_eq!(at.pid, runner, "served by the first runner");
    }
    assert!(process_alive(runner));
    // Once no parent is left, it exits after its grace period.
    drop(pool);
    drop(env);
    wait_for("the runner to exit", Duration::from_secs(20), || async {
        (!process_alive(runner)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn dead_runner_fails_calls_in_every_parent_and_its_lease_is_reaped() {
    let env = TestEnv::start().await;
    let second = env.another_parent().await;
    let build = |flame: &Flame| shared_pool(flame, "reap").min(1).max(1);
    let a = build(&env.flame).start().await.unwrap();
    let b = build(&second).start().await.unwrap();
    let store = bucket(&env, "reap").await;
    let dir = tempfile::tempdir().unwrap();
    let marks: Vec<String> = (0..2)
        .map(|i| {
            dir.path()
                .join(format!("m{i}"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let calls: Vec<_> = [&a, &b]
        .into_iter()
        .zip(&marks)
        .map(|(pool, m)| {
            let (pool, m) = (pool.clone(), m.clone());
            tokio::spawn(async move {
                pool.call_with::<mark_then_sleep>((m, 120_000), CallOptions::new().timeout(LONG))
                    .await
            })
        })
        .collect();
    for m in &marks {
        wait_for("both calls to run", LONG, || async {
            std::path::Path::new(m).exists().then_some(())
        })
        .await;
    }
    let pid: u32 = std::fs::read_to_string(&marks[0]).unwrap().parse().unwrap();
    kill9(pid);
    for call in calls {
        let err = error_within(call, Duration::from_secs(20)).await;
        assert!(matches!(err, flame::Error::RunnerDown { .. }), "{err:?}");
    }
    // The lease is gone and min is restored by a new runner.
    let next = flame::call!(a, whereabouts()).await.unwrap();
    assert_ne!(next.pid, pid);
    wait_for("one lease", LONG, || async {
        (lease_count(&store).await == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn idle_runners_beyond_min_are_retired_and_their_leases_removed() {
    let env = TestEnv::start().await;
    let pool = shared_pool(&env.flame, "retire")
        .min(1)
        .max(3)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let store = bucket(&env, "retire").await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.call_with::<counted_sleep>((500,), CallOptions::new().timeout(LONG))
                    .await
            })
        })
        .collect();
    let mut pids = HashSet::new();
    for c in calls {
        pids.insert(c.await.unwrap().unwrap().pid);
    }
    assert_eq!(pids.len(), 3, "grew to three runners");
    wait_for("the pool back at min", LONG, || async {
        let alive = pids.iter().filter(|p| process_alive(**p)).count();
        (alive == 1 && lease_count(&store).await == 1 && pool.status().ready == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn nats_restart_fails_in_flight_calls_and_the_pool_recovers() {
    let mut env = TestEnv::start().await;
    let pool = shared_pool(&env.flame, "restart")
        .min(1)
        .max(2)
        .parent_grace(Duration::from_secs(5))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, .. } =
        start_marked_call(&pool, &dir, "m", 120_000, CallOptions::new()).await;
    env.server.restart().expect("restart nats-server");
    let err = error_within(call, Duration::from_secs(20)).await;
    assert!(
        matches!(err, flame::Error::NatsUnreachable { .. }),
        "{err:?}"
    );
    // New calls succeed once the server is back.
    wait_for("calls to succeed again", LONG, || async {
        pool.call_with::<add>((1, 2), CallOptions::new().timeout(Duration::from_secs(2)))
            .await
            .ok()
    })
    .await;
    // The KV watch resumed: a second runner booted now is seen and used.
    pool.set_limits(2, 2).unwrap();
    wait_for("a second runner, seen through the watch", LONG, || async {
        (pool.status().ready == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn runner_without_exit_notice_loses_its_lease_within_a_few_heartbeats() {
    let env = TestEnv::start().await;
    let pool = shared_pool(&env.flame, "silent")
        .max(1)
        .backend(NoExitNotice(runner_backend()))
        .start()
        .await
        .unwrap();
    let store = bucket(&env, "silent").await;
    let dir = tempfile::tempdir().unwrap();
    let MarkedCall { call, pid } =
        start_marked_call(&pool, &dir, "m", 120_000, CallOptions::new()).await;
    kill9(pid);
    let err = error_within(call, Duration::from_secs(20)).await;
    match err {
        flame::Error::RunnerDown { reason, .. } => {
            assert!(reason.contains("lease"), "{reason}")
        }
        other => panic!("expected RunnerDown, got {other:?}"),
    }
    wait_for("the lease to be gone", LONG, || async {
        (lease_count(&store).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn frozen_runner_is_reaped_and_terminated() {
    let env = TestEnv::start().await;
    let pool = shared_pool(&env.flame, "frozen")
        .min(1)
        .max(1)
        .start()
        .await
        .unwrap();
    let store = bucket(&env, "frozen").await;
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    // Stopped, not dead: its process exists but its lease stops changing.
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(at.pid as libc::pid_t, libc::SIGSTOP);
    }
    wait_for("the frozen runner to be terminated", LONG, || async {
        (!process_alive(at.pid)).then_some(())
    })
    .await;
    // A replacement keeps min, under a new lease.
    let next = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(next.pid, at.pid);
    wait_for("one lease", LONG, || async {
        (lease_count(&store).await == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn demand_of_a_parent_that_is_not_the_scaler_boots_runners() {
    let env = TestEnv::start().await;
    // A parent process with no calls of its own: it becomes the scaler.
    let mut scaler = SharedParent::start(&env.server.url(), "demand", (2, 1), (0, 0, 0), &[]).await;
    scaler.done(LONG).await;
    let store = bucket(&env, "demand").await;
    wait_for("the scaler", LONG, || async {
        scaler_of(&store).await.filter(|s| *s == scaler.parent_id)
    })
    .await;
    // This parent only has callers; their demand reaches the scaler through
    // its parent lease, and the scaler boots two runners for them.
    let pool = shared_pool(&env.flame, "demand")
        .max(2)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.call_with::<counted_sleep>((300,), CallOptions::new().timeout(LONG))
                    .await
            })
        })
        .collect();
    let mut pids = HashSet::new();
    for c in calls {
        pids.insert(c.await.unwrap().unwrap().pid);
    }
    assert_eq!(pids.len(), 2, "two runners booted for two waiting callers");
    assert_eq!(scaler_of(&store).await, Some(scaler.parent_id.clone()));
}

#[tokio::test]
async fn nats_restart_under_load_with_parent_processes() {
    let mut env = TestEnv::start().await;
    let url = env.server.url();
    let mut parents = Vec::new();
    for _ in 0..2 {
        parents.push(SharedParent::start(&url, "restartload", (2, 4), (8, 0, 20), &[]).await);
    }
    for p in &mut parents {
        p.progressed_to(100, LONG).await;
    }
    env.server.restart().expect("restart nats-server");
    // Calls succeed again once it is back ...
    for p in &mut parents {
        let target = p.progress + 200;
        p.progressed_to(target, LONG).await;
    }
    // ... and the KV watches resumed: a runner that dies now is replaced and
    // both parents go on.
    let victim = *runner_pids("restartload").first().expect("a runner");
    kill9(victim);
    for p in &mut parents {
        let target = p.progress + 200;
        p.progressed_to(target, LONG).await;
    }
}

/// Guards against runners outliving the last parents of a shared pool when
/// those parents shut down together: each saw the other still there, so
/// neither retired the runners, which then waited out their parent grace
/// (60 s here) before exiting.
#[tokio::test]
async fn last_parents_shutting_down_together_retire_the_runners() {
    let env = TestEnv::start().await;
    let url = env.server.url();
    let extra = [("FLAME_TEST_MIN", "1"), ("FLAME_TEST_GRACE_MS", "60000")];
    let mut parents = Vec::new();
    for _ in 0..2 {
        parents.push(SharedParent::start(&url, "lastleave", (2, 2), (2, 20, 20), &extra).await);
    }
    for p in &mut parents {
        let report = p.done(LONG).await;
        assert_eq!(report.failed, 0, "{report:?}");
    }
    let runners = runner_pids("lastleave");
    assert!(!runners.is_empty(), "the pool's min runner is up");
    // Both parents shut their pool down at the same moment.
    for p in &mut parents {
        p.close_stdin();
    }
    wait_for(
        "every runner of the pool to be gone",
        Duration::from_secs(15),
        || async {
            (runners.iter().all(|p| !process_alive(*p)) && runner_pids("lastleave").is_empty())
                .then_some(())
        },
    )
    .await;
    for p in &mut parents {
        p.line_starting("shut down", LONG).await;
        let status = tokio::time::timeout(LONG, p.child.wait())
            .await
            .expect("the parent exited")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

/// Guards against an unclear error when a shared pool is started on a
/// server without JetStream: the error must say JetStream is not enabled
/// (mention JetStream and "enable"), not that a resource does not exist.
#[tokio::test]
async fn shared_pool_without_jetstream_says_so() {
    flame_tests::harness::init_tracing();
    let server = flame::embedded::NatsServer::builder()
        .jetstream(false)
        .start()
        .unwrap();
    let flame = flame_tests::harness::builder()
        .nats_url(server.url())
        .init()
        .await
        .unwrap();
    let err = tokio::time::timeout(LONG, shared_pool(&flame, "nojetstream").max(1).start())
        .await
        .expect("start returned in time")
        .unwrap_err();
    // Naming JetStream is not enough (the old error did: "requested
    // JetStream resource does not exist"); it must say it is not enabled.
    let msg = err.to_string();
    assert!(
        msg.contains("JetStream") && msg.to_lowercase().contains("enable"),
        "{msg}"
    );
}

/// A rolling deploy: parents of build A use a shared pool under load, then
/// parents of build B join, then the A parents go (one shuts down, the
/// other is killed). No call fails; each build's calls run only on runners
/// of that build; each build has its own scaler; `max` and
/// `max_concurrency` hold across both builds; and the runners of A are
/// retired once no A parent is left, while B goes on.
#[tokio::test]
async fn rolling_deploy_from_build_a_to_build_b_fails_no_call() {
    let env = TestEnv::start().await;
    let url = env.server.url();
    let sampler = RunnerSampler::start("roll");
    let (max, mc) = (4, 2);
    let build_a = [("FLAME_BUILD_ID", "roll-a")];
    let build_b = [("FLAME_BUILD_ID", "roll-b")];
    let mut a1 = SharedParent::start(&url, "roll", (max, mc), (2, 150, 20), &build_a).await;
    let mut a2 = SharedParent::start(&url, "roll", (max, mc), (2, 150, 20), &build_a).await;
    a1.progressed_to(50, LONG).await;
    // B arrives while A is under load; B keeps calling after A has gone.
    let mut b1 = SharedParent::start(&url, "roll", (max, mc), (2, 0, 20), &build_b).await;
    let mut b2 = SharedParent::start(&url, "roll", (max, mc), (2, 0, 20), &build_b).await;
    let store = bucket(&env, "roll").await;
    wait_for("a scaler for each build", LONG, || async {
        let a = scaler_of_build(&store, "roll-a").await?;
        let b = scaler_of_build(&store, "roll-b").await?;
        ([&a1.parent_id, &a2.parent_id].contains(&&a)
            && [&b1.parent_id, &b2.parent_id].contains(&&b))
        .then_some(())
    })
    .await;
    b1.progressed_to(50, LONG).await;
    b2.progressed_to(50, LONG).await;

    let mut a_pids = HashSet::new();
    for p in [&mut a1, &mut a2] {
        let report = p.done(Duration::from_secs(120)).await;
        assert_eq!(report.failed, 0, "{report:?}");
        assert!(report.peak <= mc, "{report:?}");
        a_pids.extend(report.pids);
    }
    assert!(!a_pids.is_empty());
    // A goes: one parent leaves properly, the last one is killed, so the
    // B scaler must find A's runners abandoned and retire them.
    a1.close_stdin();
    a1.line_starting("shut down", LONG).await;
    kill9(a2.pid());
    wait_for(
        "the runners of build A to be retired",
        Duration::from_secs(30),
        || async { a_pids.iter().all(|p| !process_alive(*p)).then_some(()) },
    )
    .await;
    // B goes on, on its own runners only.
    let (b1_at, b2_at) = (b1.progress, b2.progress);
    b1.progressed_to(b1_at + 100, LONG).await;
    b2.progressed_to(b2_at + 100, LONG).await;
    for p in [&mut b1, &mut b2] {
        p.close_stdin();
    }
    let mut b_pids = HashSet::new();
    for p in [&mut b1, &mut b2] {
        let report = p.done(LONG).await;
        assert_eq!(report.failed, 0, "{report:?}");
        assert!(report.peak <= mc, "{report:?}");
        b_pids.extend(report.pids);
    }
    assert!(!b_pids.is_empty());
    assert!(
        a_pids.is_disjoint(&b_pids),
        "a runner served both builds: A {a_pids:?}, B {b_pids:?}"
    );
    assert!(
        sampler.peak() <= max,
        "{} runners at once, max {max}",
        sampler.peak()
    );
}

/// A rolling deploy where the old build's runner holds the only slot and
/// the old build's last parent leaves: the new build's waiting caller gets
/// a runner as soon as the old one has drained and gone (its removed lease
/// frees its slot at once), not after the wait for a slot whose runner is
/// unknown (three heartbeats: 4.5 s here).
#[tokio::test]
async fn a_new_builds_caller_gets_a_runner_as_soon_as_the_old_build_frees_its_slot() {
    let env = TestEnv::start().await;
    let url = env.server.url();
    let old = [
        ("FLAME_BUILD_ID", "gap-a"),
        ("FLAME_TEST_HEARTBEAT_MS", "1500"),
    ];
    // One call: its runner holds the only slot.
    let mut a = SharedParent::start(&url, "gap", (1, 1), (1, 1, 10), &old).await;
    let report = a.done(LONG).await;
    assert_eq!((report.ok, report.pids.len()), (1, 1), "{report:?}");
    let old_runner = report.pids[0];
    let pool = shared_pool(&env.flame, "gap")
        .max(1)
        .heartbeat(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let call = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.call_with::<whereabouts>((), CallOptions::new().timeout(LONG))
                .await
        })
    };
    // The old build's last parent leaves: its runner is retired and
    // nobody of that build is left to see it exit.
    a.close_stdin();
    a.line_starting("shut down", LONG).await;
    wait_for("the old build's runner to be gone", LONG, || async {
        (!process_alive(old_runner)).then_some(())
    })
    .await;
    let gone = tokio::time::Instant::now();
    let served = tokio::time::timeout(LONG, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let waited = gone.elapsed();
    println!("the new build's caller waited {waited:?} after the old runner was gone");
    assert_ne!(served.pid, old_runner);
    assert!(
        waited < Duration::from_millis(2500),
        "the new build's caller waited {waited:?} after the old runner was gone"
    );
    pool.shutdown().await;
}
