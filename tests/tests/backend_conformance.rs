//! The contract every backend keeps, written once and run against each
//! platform: the local backend (child processes), the Fly backend on its
//! stand-in (`tests/src/fake_fly.rs`, whose header says what it models),
//! the Kubernetes backend on its stand-in (`tests/src/fake_k8s.rs`; on a
//! real cluster with `scripts/test-k8s`) and the Docker backend on a real,
//! private `dockerd` (`tests/src/docker.rs`).
//! A new backend adds a [`Kind`] to `tests/src/platform.rs` and one line to
//! the `conformance!` list at the end of this file.
//!
//! What each scenario checks:
//! - `boot_and_call`: a runner boots, serves, and is gone after shutdown;
//! - `idle_exit`: an idle runner leaves by itself, and nothing stays;
//! - `retire_drains_for_exactly_shutdown_timeout`: with a shutdown timeout
//!   of 1.9 s, a call of 0.9 times that finishes and one of 1.1 times is
//!   cut;
//! - `killed_runner_fails_its_callers_at_once`: within a second, with the
//!   reason;
//! - `out_of_memory_is_reported_as_such`;
//! - `runner_that_cannot_start_fails_callers_at_once` and
//!   `runner_that_exits_before_ready_fails_callers_at_once`: waiting
//!   callers fail within a second or two (not at their deadline), one boot
//!   is made, a call during the cooldown fails without booting, one after
//!   it boots again, and nothing is left;
//! - `permanent_api_error_fails_fast` (platforms with an API): with the
//!   API's status and message, not retried;
//! - `transient_boot_failures_back_off`: boots retried after about 1 s,
//!   then 2 s (timestamps checked), and the waiting call is then served;
//! - `boot_cancelled_by_boot_timeout_leaves_nothing`;
//! - `parent_killed_mid_boot_leaves_nothing`: the parent is SIGKILLed while
//!   its runner boots; its runner exits by itself, or the next parent of
//!   the pool reaps it;
//! - `start_error_then_exit_leaves_nothing`: `start()` fails (boot
//!   timeout) and the process exits at once.

use std::time::Duration;

use flame::{CallOptions, Error, PoolChange};
use flame_tests::funcs::*;
use flame_tests::harness::{
    error_within, kill9, path_in, runner_pids, testapp, wait_for, wait_in_flight, FailingFirst,
    HookLog, TestEnv,
};
use flame_tests::platform::{Kind, Platform, Runners};
use flame_tests::TEST_BUILD;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

/// Waits until the platform runs nothing of `pool` any more.
async fn nothing_left(platform: &Platform, pool: &str, limit: Duration) {
    let what = format!("{:?} to leave nothing of pool {pool}", platform.kind);
    wait_for(&what, limit, || async {
        platform.leftovers(pool).is_empty().then_some(())
    })
    .await;
}

async fn boot_and_call(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let pool = env
        .flame
        .pool("conf-call")
        .max(1)
        .backend(platform.backend(Runners::Working).unwrap())
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
    assert_eq!(pool.status().ready, 1);
    pool.shutdown().await;
    nothing_left(&platform, "conf-call", Duration::from_secs(10)).await;
}

async fn idle_exit(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let pool = env
        .flame
        .pool("conf-idle")
        .max(1)
        .idle_shutdown_after(Duration::from_millis(300))
        .backend(platform.backend(Runners::Working).unwrap())
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(1, 1)).await.unwrap(), 2);
    nothing_left(&platform, "conf-idle", LONG).await;
    wait_for("the pool to count no runner", LONG, || async {
        let s = pool.status();
        (s.ready + s.booting + s.draining == 0).then_some(())
    })
    .await;
}

async fn retire_drains_for_exactly_shutdown_timeout(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let drain = Duration::from_millis(1900);
    let pool = env
        .flame
        .pool("conf-drain")
        .max(1)
        .max_concurrency(2)
        .timeout(LONG)
        .shutdown_timeout(drain)
        .backend(platform.backend(Runners::Working).unwrap())
        .start()
        .await
        .unwrap();
    // A runner up and answering first: the calls' run is timed from their
    // start, so the stop must follow it closely.
    assert_eq!(flame::call!(pool, add(1, 1)).await.unwrap(), 2);
    let dir = tempfile::tempdir().unwrap();
    let (short, long) = (path_in(&dir, "short"), path_in(&dir, "long"));
    let unlinked = CallOptions::new().link(false);
    for (ms, path) in [(drain * 9 / 10, &short), (drain * 11 / 10, &long)] {
        let (pool, path, options) = (pool.clone(), path.clone(), unlinked.clone());
        tokio::spawn(async move {
            pool.call_with::<sleep_then_mark>((ms.as_millis() as u64, path), options)
                .await
        });
    }
    wait_in_flight(&env, "conf-drain", 2, LONG).await;
    // The runner is stopped with the pool's shutdown timeout, and the
    // pool waits until it is gone.
    let asked = Instant::now();
    pool.shutdown().await;
    let took = asked.elapsed();
    println!("{kind:?}: the stop of a runner with shutdown_timeout {drain:?} took {took:?}");
    nothing_left(&platform, "conf-drain", Duration::from_secs(10)).await;
    assert!(
        std::path::Path::new(&short).exists(),
        "a call of 0.9 x shutdown_timeout was cut (the stop took {took:?})"
    );
    assert!(
        !std::path::Path::new(&long).exists(),
        "a call of 1.1 x shutdown_timeout ran to its end (the stop took {took:?})"
    );
}

async fn killed_runner_fails_its_callers_at_once(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let pool = env
        .flame
        .pool("conf-kill")
        .max(1)
        // Heartbeats would take 30 s: the backend must tell.
        .heartbeat(Duration::from_secs(15))
        .parent_grace(Duration::from_secs(45))
        .backend(platform.backend(Runners::Working).unwrap())
        .start()
        .await
        .unwrap();
    let call = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.call_with::<counted_sleep>((120_000,), CallOptions::new().timeout(LONG))
                .await
        })
    };
    wait_in_flight(&env, "conf-kill", 1, LONG).await;
    let pids = runner_pids("conf-kill");
    assert_eq!(pids.len(), 1, "{pids:?}");
    let killed = Instant::now();
    kill9(pids[0]);
    let err = error_within(call, Duration::from_secs(5)).await;
    let after = killed.elapsed();
    println!("{kind:?}: a caller on a killed runner learnt after {after:?}");
    assert!(
        after < Duration::from_secs(1),
        "the caller learnt after {after:?}"
    );
    match &err {
        Error::RunnerDown { reason, .. } => {
            assert!(
                reason.contains("signal 9") || reason.contains("code 137"),
                "{reason}"
            )
        }
        other => panic!("expected RunnerDown, got {other:?}"),
    }
    pool.shutdown().await;
    nothing_left(&platform, "conf-kill", Duration::from_secs(10)).await;
}

async fn out_of_memory_is_reported_as_such(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let pool = env
        .flame
        .pool("conf-oom")
        .max(1)
        .timeout(LONG)
        .heartbeat(Duration::from_secs(15))
        .parent_grace(Duration::from_secs(45))
        .backend(platform.backend(Runners::MemoryLimited(1024)).unwrap())
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, allocate_mb(16)).await.unwrap(), 16);
    let err = flame::call!(pool, allocate_mb(4096)).await.unwrap_err();
    match &err {
        Error::RunnerDown { reason, .. } => {
            assert!(reason.contains("ran out of memory"), "{reason}")
        }
        other => panic!("expected RunnerDown, got {other:?}"),
    }
    pool.shutdown().await;
    nothing_left(&platform, "conf-oom", Duration::from_secs(10)).await;
}

/// A boot that fails for good: the waiting caller fails at once, one boot
/// was made, a call during the cooldown fails without a boot, and the
/// first call after it boots again; nothing is left.
async fn fails_callers_at_once(kind: Kind, runners: Runners, pool_name: &str, words: &[&str]) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let hooks = HookLog::default();
    let cooldown = Duration::from_secs(2);
    let pool = hooks
        .attach(
            env.flame
                .pool(pool_name)
                .max(1)
                .timeout(Duration::from_secs(30))
                .boot_cooldown(cooldown)
                .backend(platform.backend(runners).unwrap()),
        )
        .start()
        .await
        .unwrap();
    let asked = Instant::now();
    let err = flame::call!(pool, add(1, 2)).await.unwrap_err();
    let took = asked.elapsed();
    println!("{kind:?} {runners:?}: the waiting caller learnt after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the caller learnt after {took:?} (its deadline is 30 s)"
    );
    match &err {
        Error::BootFailed { reason, .. } => {
            let text = err.to_string();
            assert!(
                words.iter().any(|w| text.contains(w)),
                "{reason} (wanted one of {words:?})"
            )
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
    assert_eq!(hooks.grow_starts(), 1, "booted again at once");
    // During the cooldown: the same error at once, and no boot.
    let again = Instant::now();
    let second = flame::call!(pool, add(1, 2)).await.unwrap_err();
    assert!(matches!(second, Error::BootFailed { .. }), "{second:?}");
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "{:?}",
        again.elapsed()
    );
    assert_eq!(hooks.grow_starts(), 1, "booted during the cooldown");
    nothing_left(&platform, pool_name, Duration::from_secs(10)).await;
    // After it: the first call boots again.
    tokio::time::sleep(cooldown).await;
    let third = flame::call!(pool, add(1, 2)).await.unwrap_err();
    assert!(matches!(third, Error::BootFailed { .. }), "{third:?}");
    assert_eq!(hooks.grow_starts(), 2, "no boot after the cooldown");
    pool.shutdown().await;
    nothing_left(&platform, pool_name, Duration::from_secs(10)).await;
}

async fn runner_that_cannot_start_fails_callers_at_once(kind: Kind) {
    fails_callers_at_once(
        kind,
        Runners::CannotStart,
        "conf-nostart",
        &["cannot start runner process", "failed"],
    )
    .await;
}

async fn runner_that_exits_before_ready_fails_callers_at_once(kind: Kind) {
    fails_callers_at_once(
        kind,
        Runners::ExitBeforeReady,
        "conf-exits",
        &["exited with code 3", "did not start"],
    )
    .await;
}

async fn permanent_api_error_fails_fast(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let Some(backend) = platform.backend(Runners::Unauthorized) else {
        return; // No API, no credentials to refuse.
    };
    let asked = Instant::now();
    let err = env
        .flame
        .pool("conf-401")
        .min(1)
        .max(1)
        .boot_timeout(LONG)
        .backend(backend)
        .start()
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, Error::BootFailed { .. }), "{err:?}");
    assert!(
        text.contains("401") && text.contains("unauthorized"),
        "{text}"
    );
    if let Some(creates) = platform.creates() {
        assert_eq!(creates.len(), 1, "a 401 is not retried");
    }
    nothing_left(&platform, "conf-401", Duration::from_secs(10)).await;
}

async fn transient_boot_failures_back_off(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let hooks = HookLog::default();
    let starts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = starts.clone();
    let pool = hooks
        .attach(
            env.flame
                .pool("conf-flaky")
                .max(1)
                .backend(FailingFirst::new(
                    2,
                    platform.backend(Runners::Working).unwrap(),
                )),
        )
        .on_grow_start(move |_| seen.lock().unwrap().push(Instant::now()))
        .start()
        .await
        .unwrap();
    let served = pool
        .call_with::<add>((2, 3), CallOptions::new().timeout(LONG))
        .await
        .unwrap();
    assert_eq!(served, 5, "the waiting call was served after the retries");
    let at = starts.lock().unwrap().clone();
    assert_eq!(at.len(), 3, "{:?}", hooks.events());
    let (first, second) = (at[1] - at[0], at[2] - at[1]);
    println!("{kind:?}: boots retried after {first:?}, then {second:?}");
    assert!(
        first >= Duration::from_secs(1) && second >= Duration::from_secs(2),
        "pauses {first:?}, {second:?}: expected about 1 s, then 2 s"
    );
    assert!(second > first, "{first:?} then {second:?}: no backoff");
    let failed = hooks
        .events()
        .iter()
        .filter(|e| matches!(e, PoolChange::GrowEnd { result: Err(_), .. }))
        .count();
    assert_eq!(failed, 2);
    // The API's own rate limit: the create is asked again after its
    // Retry-After, not given up.
    if platform.rate_limit_creates(2) {
        let more = env
            .flame
            .pool("conf-429")
            .max(1)
            .backend(platform.backend(Runners::Working).unwrap())
            .start()
            .await
            .unwrap();
        assert_eq!(flame::call!(more, add(1, 1)).await.unwrap(), 2);
        let posts = platform.creates().expect("a stand-in's requests");
        let last = &posts[posts.len() - 3..];
        assert!(
            last[1] - last[0] >= Duration::from_secs(1)
                && last[2] - last[1] >= Duration::from_secs(1),
            "creates after a 429 came sooner than its Retry-After: {:?}",
            [last[1] - last[0], last[2] - last[1]]
        );
        more.shutdown().await;
    }
    pool.shutdown().await;
    nothing_left(&platform, "conf-flaky", Duration::from_secs(10)).await;
}

async fn boot_cancelled_by_boot_timeout_leaves_nothing(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let asked = Instant::now();
    let err = env
        .flame
        .pool("conf-stuck")
        .min(1)
        .max(1)
        .boot_timeout(Duration::from_secs(2))
        .backend(platform.backend(Runners::Stuck).unwrap())
        .start()
        .await
        .unwrap_err();
    let took = asked.elapsed();
    println!("{kind:?}: start() with a stuck runner gave up after {took:?}");
    assert!(
        took < Duration::from_secs(8),
        "start() gave up after {took:?} (boot timeout 2 s)"
    );
    assert!(
        matches!(err, Error::BootTimeout { .. } | Error::BootFailed { .. }),
        "{err:?}"
    );
    // Nothing left the moment start() returned: the app may exit now.
    assert_eq!(platform.leftovers("conf-stuck"), Vec::<String>::new());
}

async fn parent_killed_mid_boot_leaves_nothing(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    // On Fly a Machine that never starts stays until it is deleted (a
    // Docker container that never becomes a runner, too); a local runner
    // process ends by itself once its parent is gone.
    let runners = match kind {
        Kind::Fly | Kind::K8s | Kind::Docker => "stuck",
        Kind::Local => "working",
    };
    let mut parent = tokio::process::Command::new(testapp())
        .args(["platform-parent", "conf-orphan", runners, "hang"])
        .env(flame::env::NATS_URL, env.server.url())
        // Said on purpose: the stand-in's Machines run on this machine.
        .env("FLAME_RUNNER_NATS_URL", env.runner_nats_url())
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .envs(platform.env())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the parent's runner to be booting", LONG, || async {
        (!platform.leftovers("conf-orphan").is_empty()).then_some(())
    })
    .await;
    kill9(parent.id().unwrap());
    let _ = parent.wait().await;
    if kind != Kind::Local {
        // The next parent of the pool reaps what the dead one left.
        let pool = env
            .flame
            .pool("conf-orphan")
            .max(1)
            .backend(platform.backend(Runners::Working).unwrap())
            .start()
            .await
            .unwrap();
        nothing_left(&platform, "conf-orphan", LONG).await;
        pool.shutdown().await;
    }
    nothing_left(&platform, "conf-orphan", LONG).await;
}

async fn start_error_then_exit_leaves_nothing(kind: Kind) {
    let env = TestEnv::start().await;
    let platform = Platform::start(kind).await;
    let out = tokio::process::Command::new(testapp())
        .args(["platform-parent", "conf-exit", "stuck", "start-fails"])
        .env(flame::env::NATS_URL, env.server.url())
        // Said on purpose: the stand-in's Machines run on this machine.
        .env("FLAME_RUNNER_NATS_URL", env.runner_nats_url())
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .envs(platform.env())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LONG, out).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("error: "), "{stdout}");
    assert_eq!(
        platform.leftovers("conf-exit"),
        Vec::<String>::new(),
        "{stdout}"
    );
}

/// One test per scenario and platform: `local::boot_and_call`,
/// `fly::boot_and_call`, ...
macro_rules! conformance {
    ($($platform:ident => $kind:expr),* $(,)?) => {$(
        mod $platform {
            use super::*;
            conformance!(@tests $kind;
                boot_and_call,
                idle_exit,
                retire_drains_for_exactly_shutdown_timeout,
                killed_runner_fails_its_callers_at_once,
                out_of_memory_is_reported_as_such,
                runner_that_cannot_start_fails_callers_at_once,
                runner_that_exits_before_ready_fails_callers_at_once,
                permanent_api_error_fails_fast,
                transient_boot_failures_back_off,
                boot_cancelled_by_boot_timeout_leaves_nothing,
                parent_killed_mid_boot_leaves_nothing,
                start_error_then_exit_leaves_nothing,
            );
        }
    )*};
    (@tests $kind:expr; $($scenario:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $scenario() {
            super::$scenario($kind).await;
        }
    )*};
}

conformance! {
    local => Kind::Local,
    fly => Kind::Fly,
    k8s => Kind::K8s,
    docker => Kind::Docker,
}
