//! A runner's life apart from its calls: it exits when it cannot reach
//! NATS, when no parent acknowledges it, after losing NATS (or its parent)
//! for the grace period, and leaves no orphans; it survives a short outage
//! (sending lost replies again), keeps its heartbeat during a slow idle
//! check, and gets only the environment it needs.

use std::process::Stdio;
use std::time::Duration;

use flame::ParentInfo;
use flame_tests::funcs::*;
use flame_tests::harness::{
    children_of, file_exists, kill9, path_in, process_alive, runner_backend, testapp, wait_for,
    HookLog, TestEnv,
};
use flame_tests::nats_proxy::NatsProxy;
use flame_tests::TEST_BUILD;

const LONG: Duration = Duration::from_secs(60);

/// Starts the test app as a runner by hand, with `info` in its environment.
fn spawn_runner(info: &ParentInfo) -> tokio::process::Child {
    tokio::process::Command::new(testapp())
        .env(flame::env::PARENT, info.to_env_value())
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn test app")
}

fn runner_info(nats_url: String, failsafe_ms: u64) -> ParentInfo {
    serde_json::from_value(serde_json::json!({
        "parent_id": "nobody",
        "pool": "failsafe",
        "runner_id": "r1",
        "nats_url": nats_url,
        "max_concurrency": 1,
        "idle_shutdown_after_ms": 60_000,
        "shutdown_timeout_ms": 1_000,
        "failsafe_timeout_ms": failsafe_ms,
        "parent_grace_ms": 2_000,
        "heartbeat_ms": 500,
        // Any key: nobody is there to check what the runner signs.
        "event_key": "00".repeat(32),
    }))
    .unwrap()
}

#[tokio::test]
async fn runner_exits_when_it_cannot_reach_nats_at_boot() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = spawn_runner(&runner_info(format!("nats://127.0.0.1:{port}"), 1_000));
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the runner must give up after its failsafe timeout")
        .unwrap();
    assert!(!status.success(), "{status}");
}

#[tokio::test]
async fn runner_exits_when_no_parent_acknowledges_it() {
    let env = TestEnv::start().await;
    let mut child = spawn_runner(&runner_info(env.server.url(), 1_000));
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the runner must give up after its failsafe timeout")
        .unwrap();
    assert!(!status.success(), "{status}");
}

#[tokio::test]
async fn runner_exits_after_losing_nats_for_the_grace_period() {
    let mut env = TestEnv::start().await;
    let pool = env
        .pool("lostnats")
        .max(1)
        .parent_grace(Duration::from_secs(1))
        .heartbeat(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    env.server.stop();
    wait_for(
        "the cut-off runner to exit",
        Duration::from_secs(30),
        || async { (!process_alive(at.pid)).then_some(()) },
    )
    .await;
}

/// A reply the runner wrote just as its server died is lost with the
/// server; the runner publishes it again once it is back, so the call ends
/// with its result rather than at its deadline, however long before the
/// outage it was sent.
#[tokio::test]
async fn a_reply_lost_with_the_runners_connection_is_sent_again() {
    flame_tests::harness::init_tracing();
    let server = flame::embedded::NatsServer::start().expect("start nats-server");
    let proxy = NatsProxy::start(format!("127.0.0.1:{}", server.port())).await;
    let flame = flame_tests::harness::builder()
        .nats_url(server.url())
        .runner_nats_url(proxy.url())
        .init()
        .await
        .unwrap();
    let pool = flame
        .pool("resent")
        .backend(runner_backend())
        .max(1)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    // The runner is up and serving before anything is lost.
    flame::call!(pool, add(1, 2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let go = path_in(&dir, "go");
    let call = tokio::spawn({
        let (pool, go) = (pool.clone(), go.clone());
        async move { flame::call!(pool, wait_for_file(go, 60_000)).await }
    });
    wait_for("the call on its runner", LONG, || async {
        pool.runners().iter().any(|r| r.load == 1).then_some(())
    })
    .await;
    // Whatever the runner writes now is lost, the reply included.
    proxy.lose_writes();
    std::fs::write(&go, "go").unwrap();
    wait_for("the reply to be lost", LONG, || async {
        proxy.lost().contains("PUB _INBOX.").then_some(())
    })
    .await;
    assert!(!call.is_finished(), "the lost reply reached the parent");
    proxy.cut();
    let answer = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call ended long before its deadline")
        .unwrap();
    assert!(answer.unwrap(), "the runner saw the file");
}

#[tokio::test]
async fn no_orphans_when_the_parent_is_killed() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut parent = tokio::process::Command::new(testapp())
        .arg("parent")
        .arg(dir.path())
        .env(flame::env::NATS_URL, env.server.url())
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn parent");
    let parent_pid = parent.id().unwrap();
    for i in 0..2 {
        let busy = path_in(&dir, &format!("busy-{i}"));
        wait_for("two busy runners", LONG, || file_exists(&busy)).await;
    }
    let runners = children_of(parent_pid);
    assert_eq!(runners.len(), 3, "two busy and one idle: {runners:?}");
    kill9(parent_pid);
    parent.wait().await.unwrap();
    // The pool's parent_grace is 2 s: every runner is gone 2 s after that.
    let grace = Duration::from_secs(2);
    wait_for(
        "every runner to exit",
        grace + Duration::from_secs(2),
        || async { runners.iter().all(|p| !process_alive(*p)).then_some(()) },
    )
    .await;
}

/// The portable tie alone, as on macOS: with `PR_SET_PDEATHSIG` left out
/// (`FLAME_TEST_NO_PDEATHSIG`), a parent killed outright still takes its
/// private nats-server with it (its watchdog sees the pipe from the parent
/// close), and the runners, who lose the server and hear nothing from the
/// parent, exit within the pool's parent_grace.
#[tokio::test]
async fn no_orphans_when_the_parent_is_killed_without_pdeathsig() {
    let dir = tempfile::tempdir().unwrap();
    let mut parent = tokio::process::Command::new(testapp())
        .arg("parent")
        .arg(dir.path())
        // No NATS URL: the parent starts a private nats-server.
        .env_remove(flame::env::NATS_URL)
        .env(flame::embedded::NO_PDEATHSIG_ENV, "1")
        .env(flame::env::BUILD_ID, TEST_BUILD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn parent");
    let parent_pid = parent.id().unwrap();
    for i in 0..2 {
        let busy = path_in(&dir, &format!("busy-{i}"));
        wait_for("two busy runners", LONG, || file_exists(&busy)).await;
    }
    let children = children_of(parent_pid);
    let cmdline = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default()
    };
    let (servers, rest): (Vec<u32>, Vec<u32>) = children
        .iter()
        .partition(|p| cmdline(**p).contains("nats-server"));
    let (watchdogs, runners): (Vec<u32>, Vec<u32>) = rest
        .iter()
        .partition(|p| cmdline(**p).contains("flame-watchdog"));
    assert_eq!(servers.len(), 1, "one private nats-server: {children:?}");
    assert_eq!(watchdogs.len(), 1, "its watchdog: {children:?}");
    assert_eq!(runners.len(), 3, "two busy and one idle: {children:?}");
    kill9(parent_pid);
    parent.wait().await.unwrap();
    // At once, give or take a loaded machine.
    wait_for(
        "the private nats-server to exit",
        Duration::from_secs(10),
        || async { (!process_alive(servers[0]) && !process_alive(watchdogs[0])).then_some(()) },
    )
    .await;
    // The pool's parent_grace is 2 s: every runner is gone 2 s after that.
    let grace = Duration::from_secs(2);
    wait_for(
        "every runner to exit",
        grace + Duration::from_secs(2),
        || async { runners.iter().all(|p| !process_alive(*p)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn runner_env_holds_parent_info_and_forwarded_vars_only() {
    let env = TestEnv::start().await;
    // SAFETY (edition 2021: safe fn): set once, before any runner starts.
    std::env::set_var("FLAME_TEST_FORWARDED", "forwarded value");
    let pool = env
        .flame
        .pool("envvars")
        .max(1)
        .forward_env("FLAME_TEST_FORWARDED")
        .backend(runner_backend().clear_env(true))
        .start()
        .await
        .unwrap();
    let get = |name: &str| {
        let pool = pool.clone();
        let name = name.to_string();
        async move { flame::call!(pool, env_var(name)).await.unwrap() }
    };
    let info = ParentInfo::from_env_value(&get(flame::env::PARENT).await.unwrap()).unwrap();
    assert_eq!(info.pool, "envvars");
    assert_eq!(info.nats_url, env.server.url());
    assert_eq!(
        get("FLAME_TEST_FORWARDED").await.as_deref(),
        Some("forwarded value")
    );
    assert_eq!(get("CARGO_MANIFEST_DIR").await, None, "not forwarded");
}

/// Guards against a slow idle check silencing a runner's heartbeats: the
/// runner's lifecycle loop awaited the check inline, so a check slower than
/// two heartbeat intervals made the parent count a healthy runner as down.
/// (The check itself is bounded to max(heartbeat, 1 s); this one takes
/// 900 ms with 200 ms heartbeats.)
#[tokio::test]
async fn slow_idle_check_does_not_delay_heartbeats() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let checks = path_in(&dir, "checks");
    let hooks = HookLog::default();
    let pool = hooks
        .attach(
            env.flame
                .pool("slowcheck")
                .max(1)
                .heartbeat(Duration::from_millis(200))
                .parent_grace(Duration::from_secs(3))
                .idle_shutdown_after(Duration::from_millis(200))
                .idle_shutdown_when::<slow_idle_check>()
                .backend(runner_backend().env(SLOW_CHECK_FILE_ENV, checks.clone())),
        )
        .start()
        .await
        .unwrap();
    let shrank = |hooks: &HookLog| {
        hooks
            .events()
            .iter()
            .any(|e| matches!(e, flame::PoolChange::Shrink { .. }))
    };
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    // Two whole checks, unless the runner is counted out first.
    wait_for("two idle checks to finish", LONG, || async {
        let ends = std::fs::read_to_string(&checks)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "end")
            .count();
        (ends >= 2 || shrank(&hooks)).then_some(())
    })
    .await;
    assert!(
        !shrank(&hooks),
        "the runner was counted out during its idle check: {:?}",
        hooks.events()
    );
    assert_eq!(pool.status().ready, 1, "{:?}", pool.status());
    let again = flame::call!(pool, whereabouts()).await.unwrap();
    assert_eq!(again.pid, at.pid, "the runner was replaced");
}

/// Guards against a short nats-server restart (about 2 s) taking a private
/// pool's healthy runner down: the parent must not count the runner as down
/// while NATS itself is away, and a call made during the outage must be
/// served by the same runner once NATS is back.
#[tokio::test]
async fn short_nats_outage_keeps_the_runner_and_serves_calls_made_during_it() {
    let mut env = TestEnv::start().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(
            env.pool("outage")
                .min(1)
                .max(1)
                .heartbeat(Duration::from_millis(500))
                .parent_grace(Duration::from_secs(10))
                .timeout(Duration::from_secs(30)),
        )
        .start()
        .await
        .unwrap();
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    env.server.stop();
    // A call made once the parent knows NATS is away (one made while the
    // connection dies may be lost with it, and fails at once).
    wait_for("the parent to see NATS go", LONG, || async {
        (env.flame.client().connection_state() != async_nats::connection::State::Connected)
            .then_some(())
    })
    .await;
    let call = tokio::spawn({
        let pool = pool.clone();
        async move { flame::call!(pool, whereabouts()).await }
    });
    // The outage.
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.server.restart().expect("restart nats-server");
    let served = tokio::time::timeout(LONG, call)
        .await
        .expect("the call made during the outage ended in time")
        .unwrap()
        .expect("the call made during the outage succeeds");
    assert_eq!(served.pid, at.pid, "served by the same runner");
    let shrinks: Vec<_> = hooks
        .events()
        .into_iter()
        .filter(|e| matches!(e, flame::PoolChange::Shrink { .. }))
        .collect();
    assert!(shrinks.is_empty(), "{shrinks:?}");
    assert!(process_alive(at.pid), "the runner exited");
}
