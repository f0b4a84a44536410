//! Test harness: a real nats-server per test and pools whose runners are the
//! `flame-testapp` binary.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::{Backend, BootSpec, Booted, Flame, LocalBackend, NatsServer, PoolBuilder, PoolEvent};
use futures::future::BoxFuture;

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

/// Sends SIGTERM to a process.
pub fn sigterm(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// Pids of the live children of a process.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the command: state, ppid, ...
                    let rest = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
                    rest.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .filter(|child| process_alive(*child))
        .collect()
}

/// Records what a pool's hooks are told.
#[derive(Debug, Clone, Default)]
pub struct HookLog(Arc<Mutex<Vec<PoolEvent>>>);

impl HookLog {
    /// Installs itself as all three hooks of a pool.
    pub fn attach(&self, pool: PoolBuilder) -> PoolBuilder {
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        pool.on_grow_start(move |e| a.0.lock().unwrap().push(e.clone()))
            .on_grow_end(move |e| b.0.lock().unwrap().push(e.clone()))
            .on_shrink(move |e| c.0.lock().unwrap().push(e.clone()))
    }

    /// Everything so far.
    pub fn events(&self) -> Vec<PoolEvent> {
        self.0.lock().unwrap().clone()
    }

    /// How many grow starts so far.
    pub fn grow_starts(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, PoolEvent::GrowStart { .. }))
            .count()
    }
}

/// Wraps a backend and counts its runner processes from the boot request to
/// the process exit: what really runs, whatever the pool believes.
#[derive(Debug, Clone)]
pub struct CountingBackend {
    inner: Arc<dyn Backend>,
    live: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    boots: Arc<AtomicUsize>,
}

impl CountingBackend {
    /// Counts the runners of `inner`.
    pub fn new(inner: impl Backend) -> CountingBackend {
        CountingBackend {
            inner: Arc::new(inner),
            live: Arc::default(),
            peak: Arc::default(),
            boots: Arc::default(),
        }
    }

    /// Runner processes booting or running now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Most runner processes booting or running at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Boots asked for so far.
    pub fn boots(&self) -> usize {
        self.boots.load(Ordering::SeqCst)
    }
}

impl Backend for CountingBackend {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, String>> {
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.boots.fetch_add(1, Ordering::SeqCst);
        let live = self.live.clone();
        let boot = self.inner.boot(spec);
        Box::pin(async move {
            match boot.await {
                Ok(mut booted) => {
                    let exited = booted.exited.take().expect("local backend reports exits");
                    booted.exited = Some(Box::pin(async move {
                        let reason = exited.await;
                        live.fetch_sub(1, Ordering::SeqCst);
                        reason
                    }));
                    Ok(booted)
                }
                Err(e) => {
                    live.fetch_sub(1, Ordering::SeqCst);
                    Err(e)
                }
            }
        })
    }
}

/// Wraps a backend and hides runner exits from the pool, like a backend of
/// remote machines: the pool must rely on heartbeats.
#[derive(Debug)]
pub struct NoExitNotice<B>(pub B);

impl<B: Backend> Backend for NoExitNotice<B> {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, String>> {
        let boot = self.0.boot(spec);
        Box::pin(async move {
            let mut booted = boot.await?;
            if let Some(exited) = booted.exited.take() {
                // Still reap the child; just do not tell the pool.
                tokio::spawn(exited);
            }
            Ok(booted)
        })
    }
}

/// Wraps a backend and fails its first `n` boots.
#[derive(Debug)]
pub struct FailingFirst<B> {
    inner: B,
    left: AtomicUsize,
}

impl<B> FailingFirst<B> {
    /// Fails the first `n` boots of `inner`.
    pub fn new(n: usize, inner: B) -> FailingFirst<B> {
        FailingFirst {
            inner,
            left: AtomicUsize::new(n),
        }
    }
}

impl<B: Backend> Backend for FailingFirst<B> {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, String>> {
        let fail = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err("injected boot failure".to_string()) });
        }
        self.inner.boot(spec)
    }
}
