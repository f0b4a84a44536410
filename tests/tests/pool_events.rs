//! Pool events on `flame.<pool>.events.<kind>`, read by a plain NATS
//! subscription: every kind, published by the parent (private pools) or by
//! the scaler of the build (shared pools), once.

use std::time::Duration;

use flame::ops::{EventKind, PoolEventMessage, Reason};
use flame::{CallOptions, Flame};
use flame_tests::funcs::*;
use flame_tests::harness::{
    kill9, path_in, runner_backend, shared_pool, wait_for, EventLog, FailingFirst, NoExitNotice,
    TestEnv,
};
use flame_tests::TEST_BUILD;

const LONG: Duration = Duration::from_secs(60);

/// Index of the first event of `kind` about `runner` in `events`.
fn position(events: &[PoolEventMessage], kind: EventKind, runner: &str) -> usize {
    events
        .iter()
        .position(|e| e.kind() == Some(kind) && e.runner.as_deref() == Some(runner))
        .unwrap_or_else(|| panic!("no {} for {runner}", kind.as_str()))
}

/// Pid of the pool's one runner, from its backend handle (`pid 4242`).
async fn runner_pid(pool: &flame::Pool) -> u32 {
    wait_for("the runner's pid", LONG, || async {
        let runners = pool.runners();
        let handle = runners.first()?.handle.clone()?;
        handle.strip_prefix("pid ")?.parse().ok()
    })
    .await
}

/// Asserts that `runner`'s events in `all` tell its whole life in order:
/// booting, ready, busy, idle, retiring, gone.
fn assert_whole_life(all: &[PoolEventMessage], runner: &str, events: &EventLog) {
    let order: Vec<usize> = [
        EventKind::RunnerBooting,
        EventKind::RunnerReady,
        EventKind::RunnerBusy,
        EventKind::RunnerIdle,
        EventKind::RunnerRetiring,
        EventKind::RunnerGone,
    ]
    .into_iter()
    .map(|k| position(all, k, runner))
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{:?}",
        events.kinds()
    );
}

fn is_time(t: &str) -> bool {
    // 2026-11-22T08:00:00.123Z
    t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T" && &t[19..20] == "."
}

#[tokio::test]
async fn a_private_runner_is_followed_from_boot_to_idle_exit() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-life").await;
    let pool = env
        .pool("ev-life")
        .max(1)
        .max_concurrency(2)
        .idle_shutdown_after(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let at = pool
        .call_with::<counted_sleep>((200,), CallOptions::new().timeout(LONG))
        .await
        .unwrap();
    let gone = events
        .wait(EventKind::RunnerGone, LONG, |e| {
            e.reason == Some(Reason::Idle)
        })
        .await;
    let runner = gone
        .runner
        .clone()
        .expect("a runner event names its runner");
    let all = events.all();
    assert_whole_life(&all, &runner, &events);
    for e in &all {
        assert!(e.event_type.starts_with("io.flame.pool.v1."), "{e:?}");
        assert_eq!(e.id.len(), 32, "{e:?}");
        assert!(is_time(&e.time), "{e:?}");
        assert_eq!(
            (e.pool.as_str(), e.parent.as_str(), e.build.as_str()),
            ("ev-life", env.flame.parent_id(), TEST_BUILD)
        );
    }
    let ready = &all[position(&all, EventKind::RunnerReady, &runner)];
    assert_eq!((ready.runners, ready.ready), (1, 1), "{ready:?}");
    let busy = &all[position(&all, EventKind::RunnerBusy, &runner)];
    assert_eq!((busy.load, busy.runner_load), (1, Some(1)), "{busy:?}");
    let idle = &all[position(&all, EventKind::RunnerIdle, &runner)];
    assert_eq!((idle.load, idle.runner_load), (0, Some(0)), "{idle:?}");
    let retiring = &all[position(&all, EventKind::RunnerRetiring, &runner)];
    assert_eq!(retiring.reason, Some(Reason::Idle));
    assert_eq!(gone.runners, 0, "{gone:?}");
    assert_eq!(
        gone.detail.as_deref(),
        Some("runner process exited with code 0")
    );
    assert!(at.pid > 0);
    assert_eq!(events.of(EventKind::RunnerReady).len(), 1, "booted once");
}

/// Holds a call of `first` on the pool's one runner, then one of each of
/// `then`, until released, and checks that the runner's events tell its
/// load: 1, then all of them, then 0 (`runner_load`). Returns the event
/// that told all of them.
async fn assert_load_is_told(
    events: &EventLog,
    first: &flame::Pool,
    then: &[&flame::Pool],
) -> PoolEventMessage {
    let dir = tempfile::tempdir().unwrap();
    let release = path_in(&dir, "release");
    let hold = |pool: &flame::Pool| {
        let (pool, release) = (pool.clone(), release.clone());
        tokio::spawn(async move {
            pool.call_with::<wait_for_file>((release, 60_000), CallOptions::new().timeout(LONG))
                .await
        })
    };
    let mut held = vec![hold(first)];
    let one = events
        .wait(EventKind::RunnerBusy, LONG, |e| e.runner_load == Some(1))
        .await;
    held.extend(then.iter().map(|pool| hold(pool)));
    let all = 1 + then.len();
    let full = events
        .wait(EventKind::RunnerBusy, LONG, |e| e.runner_load == Some(all))
        .await;
    std::fs::write(&release, b"go").unwrap();
    for call in held {
        assert!(call.await.unwrap().unwrap(), "released, not timed out");
    }
    let idle = events
        .wait(EventKind::RunnerIdle, LONG, |e| e.runner == one.runner)
        .await;
    assert_eq!(idle.runner_load, Some(0), "{idle:?}");
    assert_eq!(full.runner, one.runner, "{:?}", events.kinds());
    for busy in events.of(EventKind::RunnerBusy) {
        let load = busy.runner_load.expect("runner_busy says how busy");
        assert!((1..=all).contains(&load), "{busy:?}");
    }
    full
}

#[tokio::test]
async fn a_busy_runners_changing_load_is_announced() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-load").await;
    let pool = env
        .pool("ev-load")
        .max(1)
        .max_concurrency(3)
        .start()
        .await
        .unwrap();
    assert_load_is_told(&events, &pool, &[&pool, &pool]).await;
}

#[tokio::test]
async fn a_shared_runners_load_counts_every_parent() {
    let env = TestEnv::start().await;
    let second = env.another_parent().await;
    let events = EventLog::subscribe(&env, "ev-shared-load").await;
    let build = |flame: &Flame| {
        shared_pool(flame, "ev-shared-load")
            .max(1)
            .max_concurrency(3)
    };
    let a = build(&env.flame).start().await.unwrap();
    events.wait(EventKind::ScalerElected, LONG, |_| true).await;
    let b = build(&second).start().await.unwrap();
    // A call of the parent that is not the scaler, then two of the
    // scaler's: the runner's lease counts all three.
    let full = assert_load_is_told(&events, &b, &[&a, &a]).await;
    assert_eq!(
        full.parent,
        env.flame.parent_id(),
        "published by the scaler"
    );
    drop((a, b));
}

#[tokio::test]
async fn a_failed_boot_is_announced_with_its_reason_and_retried() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-fail").await;
    let pool = env
        .flame
        .pool("ev-fail")
        .max(1)
        .backend(FailingFirst::new(1, runner_backend()))
        .start()
        .await
        .unwrap();
    flame::call!(pool, whereabouts()).await.unwrap();
    let failed = events
        .wait(EventKind::RunnerBootFailed, LONG, |_| true)
        .await;
    assert_eq!(failed.reason, Some(Reason::BackendError), "{failed:?}");
    let detail = failed.detail.as_deref().unwrap_or_default();
    assert!(detail.contains("injected boot failure"), "{detail}");
    assert_eq!(failed.runners, 0, "{failed:?}");
    let ready = events.wait(EventKind::RunnerReady, LONG, |_| true).await;
    assert_ne!(ready.runner, failed.runner, "a new runner after the retry");
    assert_eq!(events.of(EventKind::RunnerBooting).len(), 2);
}

#[tokio::test]
async fn a_killed_runner_is_announced_as_crashed() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-crash").await;
    let pool = env.pool("ev-crash").min(1).max(1).start().await.unwrap();
    let ready = events.wait(EventKind::RunnerReady, LONG, |_| true).await;
    kill9(runner_pid(&pool).await);
    let gone = events.wait(EventKind::RunnerGone, LONG, |_| true).await;
    assert_eq!(gone.runner, ready.runner);
    assert_eq!(gone.reason, Some(Reason::Crashed), "{gone:?}");
    assert_eq!(
        gone.detail.as_deref(),
        Some("runner process was killed by signal 9")
    );
    // min is kept: a replacement boots and is announced.
    events
        .wait(EventKind::RunnerReady, LONG, |e| e.runner != ready.runner)
        .await;
}

#[tokio::test]
async fn a_silent_runner_is_announced_as_heartbeat_lost() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-silent").await;
    let pool = env
        .flame
        .pool("ev-silent")
        .min(1)
        .max(1)
        .heartbeat(Duration::from_millis(300))
        .backend(NoExitNotice(runner_backend()))
        .start()
        .await
        .unwrap();
    let ready = events.wait(EventKind::RunnerReady, LONG, |_| true).await;
    kill9(runner_pid(&pool).await);
    let gone = events.wait(EventKind::RunnerGone, LONG, |_| true).await;
    assert_eq!(gone.runner, ready.runner);
    assert_eq!(gone.reason, Some(Reason::HeartbeatLost), "{gone:?}");
    assert!(
        gone.detail
            .as_deref()
            .unwrap_or_default()
            .starts_with("no heartbeat for"),
        "{gone:?}"
    );
}

#[tokio::test]
async fn new_limits_and_a_shutdown_are_announced() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-limits").await;
    let pool = env.pool("ev-limits").min(1).max(2).start().await.unwrap();
    let ready = events.wait(EventKind::RunnerReady, LONG, |_| true).await;
    pool.set_limits(0, 3).unwrap();
    let limits = events.wait(EventKind::LimitsChanged, LONG, |_| true).await;
    assert_eq!((limits.min, limits.max), (Some(0), Some(3)), "{limits:?}");
    assert_eq!(limits.runner, None);
    assert_eq!(limits.ready, 1, "{limits:?}");
    pool.shutdown().await;
    let retiring = events.wait(EventKind::RunnerRetiring, LONG, |_| true).await;
    assert_eq!(retiring.reason, Some(Reason::Shutdown));
    let gone = events.wait(EventKind::RunnerGone, LONG, |_| true).await;
    assert_eq!(
        (gone.runner.clone(), gone.reason),
        (ready.runner.clone(), Some(Reason::Shutdown))
    );
}

#[tokio::test]
async fn a_shared_pool_announces_each_change_once_from_its_scaler() {
    let env = TestEnv::start().await;
    let second = env.another_parent().await;
    let events = EventLog::subscribe(&env, "ev-shared").await;
    let build = |flame: &Flame| {
        shared_pool(flame, "ev-shared")
            .max(1)
            .idle_shutdown_after(Duration::from_millis(500))
    };
    let a = build(&env.flame).start().await.unwrap();
    let elected = events.wait(EventKind::ScalerElected, LONG, |_| true).await;
    assert_eq!(elected.parent, env.flame.parent_id(), "the first parent");
    let b = build(&second).start().await.unwrap();
    // A call of the parent that is not the scaler: the scaler boots.
    b.call_with::<counted_sleep>((1_500,), CallOptions::new().timeout(LONG))
        .await
        .unwrap();
    let gone = events
        .wait(EventKind::RunnerGone, LONG, |e| {
            e.reason == Some(Reason::Idle)
        })
        .await;
    let runner = gone.runner.clone().unwrap();
    let all = events.all();
    assert_whole_life(&all, &runner, &events);
    for e in all.iter().filter(|e| e.runner.is_some()) {
        assert_eq!(e.parent, env.flame.parent_id(), "only the scaler: {e:?}");
    }
    for kind in [EventKind::RunnerBooting, EventKind::RunnerReady] {
        assert_eq!(events.of(kind).len(), 1, "{:?}", events.kinds());
    }
    assert_eq!(
        all[position(&all, EventKind::RunnerRetiring, &runner)].reason,
        Some(Reason::Idle)
    );
    drop((a, b));
}

#[tokio::test]
async fn a_killed_shared_runner_is_announced_as_crashed() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-shared-crash").await;
    let pool = shared_pool(&env.flame, "ev-shared-crash")
        .min(1)
        .max(1)
        .start()
        .await
        .unwrap();
    let ready = events.wait(EventKind::RunnerReady, LONG, |_| true).await;
    kill9(runner_pid(&pool).await);
    let gone = events.wait(EventKind::RunnerGone, LONG, |_| true).await;
    assert_eq!(gone.runner, ready.runner);
    assert_eq!(gone.reason, Some(Reason::Crashed), "{gone:?}");
    assert_eq!(
        gone.detail.as_deref(),
        Some("runner process was killed by signal 9")
    );
}

#[tokio::test]
async fn the_last_parent_out_announces_the_end_of_runners_it_did_not_boot() {
    let env = TestEnv::start().await;
    let second = env.another_parent().await;
    let events = EventLog::subscribe(&env, "ev-last").await;
    let a = shared_pool(&env.flame, "ev-last")
        .min(1)
        .max(1)
        .start()
        .await
        .unwrap();
    let ready = events.wait(EventKind::RunnerReady, LONG, |_| true).await;
    let b = shared_pool(&second, "ev-last")
        .min(1)
        .max(1)
        .start()
        .await
        .unwrap();
    wait_for("the second parent to see the runner", LONG, || async {
        (b.status().ready == 1).then_some(())
    })
    .await;
    // The scaler that booted the runner leaves first: the runner stays
    // for the other parent, and nothing is announced of it.
    a.shutdown().await;
    assert!(
        events.of(EventKind::RunnerRetiring).is_empty(),
        "{:?}",
        events.kinds()
    );
    b.shutdown().await;
    let retiring = events.wait(EventKind::RunnerRetiring, LONG, |_| true).await;
    assert_eq!(
        (
            retiring.runner.clone(),
            retiring.reason,
            retiring.parent.as_str()
        ),
        (
            ready.runner.clone(),
            Some(Reason::Shutdown),
            second.parent_id()
        )
    );
    let gone = events.wait(EventKind::RunnerGone, LONG, |_| true).await;
    assert_eq!(
        (gone.runner, gone.reason),
        (ready.runner, Some(Reason::Shutdown))
    );
}

/// A runner that allocates past the memory limit set on it (`RLIMIT_AS`
/// through `LocalBackend::memory_limit_mb`) is reported as out of memory:
/// to the call it ran, and as `runner_gone` with reason `out_of_memory`.
/// The pool boots a new runner for the next call.
#[tokio::test]
async fn a_runner_out_of_memory_is_reported_as_such() {
    let env = TestEnv::start().await;
    let events = EventLog::subscribe(&env, "ev-oom").await;
    let pool = env
        .pool("ev-oom")
        .max(1)
        .timeout(LONG)
        .backend(runner_backend().memory_limit_mb(1024))
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, allocate_mb(16)).await.unwrap(), 16);
    let err = flame::call!(pool, allocate_mb(4096)).await.unwrap_err();
    match &err {
        flame::Error::RunnerDown { reason, .. } => {
            assert!(reason.contains("out of memory"), "{reason}");
            assert!(reason.contains("1024 MiB"), "{reason}");
        }
        other => panic!("expected RunnerDown, got {other:?}"),
    }
    let gone = events
        .wait(EventKind::RunnerGone, LONG, |e| {
            e.reason == Some(Reason::OutOfMemory)
        })
        .await;
    assert!(
        gone.detail
            .as_deref()
            .unwrap_or("")
            .contains("out of memory"),
        "{gone:?}"
    );
    assert_eq!(flame::call!(pool, allocate_mb(16)).await.unwrap(), 16);
}
