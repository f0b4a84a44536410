//! Test harness: a real nats-server per test and pools whose runners are the
//! `flame-testapp` binary.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use flame::{Flame, LocalBackend, NatsServer, PoolBuilder};

use crate::TEST_BUILD;

/// Path of the runner binary, built by cargo beside the tests.
pub fn testapp() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/flame-testapp
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let app = dir.join("flame-testapp");
    assert!(
        app.exists(),
        "{} is missing: build it with `cargo build -p flame-tests --bins`",
        app.display()
    );
    app
}

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "flame_nats=debug,flame_core=debug,warn".into())
}

/// Logs to the test output (shown for failing tests), once per process.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_test_writer()
        .try_init();
}

/// Logs to stderr: for the test app, whose stdout tests may read.
pub fn init_tracing_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A private nats-server and a parent connected to it.
pub struct TestEnv {
    /// The server (killed on drop).
    pub server: NatsServer,
    /// The parent.
    pub flame: Flame,
}

impl TestEnv {
    /// Starts a server and connects a parent with the test build id.
    pub async fn start() -> TestEnv {
        init_tracing();
        let server = NatsServer::start().expect("start nats-server");
        let flame = flame::FlameBuilder::new()
            .nats_url(server.url())
            .build_id(TEST_BUILD)
            .init()
            .await
            .expect("connect to test nats-server");
        TestEnv { server, flame }
    }

    /// A pool whose runners are `flame-testapp` processes of the test build.
    pub fn pool(&self, name: &str) -> PoolBuilder {
        self.flame.pool(name).backend(runner_backend())
    }

    /// A plain NATS client on the same server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.server.url())
            .await
            .expect("connect")
    }
}

/// The custom data (`in_flight`, `max_in_flight`, ...) that a pool's runner
/// reports through `$SRV.STATS`; the first runner to answer. `None` while no
/// runner answers.
pub async fn runner_stats(env: &TestEnv, pool: &str) -> Option<serde_json::Value> {
    let reply = env
        .client()
        .await
        .request(format!("$SRV.STATS.flame-{pool}"), "".into())
        .await
        .ok()?;
    let stats: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    Some(stats["endpoints"][0]["data"].clone())
}

/// The local backend running `flame-testapp` with the test build id.
pub fn runner_backend() -> LocalBackend {
    LocalBackend::new()
        .program(testapp())
        .args(Vec::<String>::new())
        .env(flame::BUILD_ID_ENV, TEST_BUILD)
}

/// Waits until `check` returns `Some`, polling, or panics after `limit`
/// naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True while a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; Z is a zombie, X dead.
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// Sends SIGKILL to a process.
pub fn kill9(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}
