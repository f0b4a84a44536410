//! Test harness: a real nats-server per test and pools whose runners are the
//! `flame-testapp` binary.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::embedded::NatsServer;
use flame::{Backend, BootSpec, Booted, BoxError, Flame, LocalBackend, PoolBuilder, PoolChange};
use futures::future::BoxFuture;

use crate::TEST_BUILD;

/// Path of the runner binary, built by cargo beside the tests.
pub fn testapp() -> PathBuf {
    // (The test app itself, when it is a parent of its own.)
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "flame-testapp") {
            return exe;
        }
    }
    binary_beside_tests("flame-testapp", "flame-tests")
}

/// Path of an example binary (`web_thumbnails`, ...), built beside the
/// tests (`cargo build -p flame-examples --bins`).
pub fn example(name: &str) -> PathBuf {
    binary_beside_tests(name, "flame-examples")
}

/// Path of a cargo example of `flame-examples` (`file_flame`, ...), built
/// beside the tests (`cargo build -p flame-examples --examples`).
pub fn example_program(name: &str) -> PathBuf {
    binary_beside_tests(&format!("examples/{name}"), "flame-examples --examples")
}

/// A binary of `package` in the test's own target directory; panics, saying
/// how to build it, when it is missing.
fn binary_beside_tests(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p {package} --bins`",
        path.display()
    );
    path
}

/// Path of the `flame` command, built by cargo beside the tests (by
/// `cargo build -p flame-cli`).
pub fn flame_cli() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let cli = dir.join("flame");
    assert!(
        cli.exists(),
        "{} is missing: build it with `cargo build -p flame-cli`",
        cli.display()
    );
    cli
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

/// Logs to stderr: for the test app, whose stdout tests may read. Closed
/// spans also go to the file `FLAME_TEST_SPAN_LOG` names, if set.
pub fn init_tracing_stderr() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Spans go over OTLP too when a collector is named (tests/tests/otel.rs).
    let otel = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").map(|_| {
        let (layer, guard) = flame::otel::layer().expect("OpenTelemetry export");
        // Runners end with `exit`; flame flushes the spans before it.
        std::mem::forget(guard);
        layer
    });
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(log_filter())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(crate::spans::SpanLog::from_env())
        // Lines go to the parent too when the pool asks for them.
        .with(flame::runner_log_layer())
        .try_init();
}

/// Logs to the test output and keeps the spans that close, once per
/// process: the log of spans is the same for every caller.
pub fn init_tracing_with_spans() -> crate::spans::SpanLog {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    static LOG: std::sync::OnceLock<crate::spans::SpanLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = crate::spans::SpanLog::in_memory();
        let _ = tracing_subscriber::registry()
            .with(log_filter())
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .with(log.clone())
            .try_init();
        log
    })
    .clone()
}

/// The state every process of the tests gives flame, parent and runner
/// alike: the remote functions in [`crate::funcs`] take these.
pub fn with_test_state(builder: flame::FlameBuilder) -> flame::FlameBuilder {
    builder
        .state(crate::funcs::Db::from_env())
        .state(crate::funcs::Greeting("hello".into()))
}

/// A parent's builder with the test build id and the test state.
pub fn builder() -> flame::FlameBuilder {
    with_test_state(flame::FlameBuilder::new().build_id(TEST_BUILD))
}

/// A private nats-server and a parent connected to it.
pub struct TestEnv {
    /// The server (killed on drop).
    pub server: NatsServer,
    /// The parent.
    pub flame: Flame,
    /// The URL runners are told (see [`TestEnv::runner_nats_url`]).
    runner_url: String,
}

impl TestEnv {
    /// Starts a server and connects a parent with the test build id.
    pub async fn start() -> TestEnv {
        init_tracing();
        let (server, runner_url) = crate::real_k8s::nats_server();
        // Said on purpose: the stand-ins' runners run on this machine (on
        // a real cluster, the address its Pods reach).
        let runner_url = runner_url.unwrap_or_else(|| server.url());
        let flame = builder()
            .nats_url(server.url())
            .runner_nats_url(&runner_url)
            .init()
            .await
            .expect("connect to test nats-server");
        TestEnv {
            server,
            flame,
            runner_url,
        }
    }

    /// The NATS URL the parent tells its runners: the server's, but for
    /// the conformance suite on a real cluster (`tests/src/real_k8s.rs`).
    pub fn runner_nats_url(&self) -> String {
        self.runner_url.clone()
    }

    /// A pool whose runners are `flame-testapp` processes of the test build.
    pub fn pool(&self, name: &str) -> PoolBuilder {
        self.flame.pool(name).backend(runner_backend())
    }

    /// A second parent on the same server.
    pub async fn another_parent(&self) -> Flame {
        builder().nats_url(self.server.url()).init().await.unwrap()
    }

    /// A plain NATS client on the same server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.server.url())
            .await
            .expect("connect")
    }
}

/// A JetStream cluster of nats-servers on this machine, each killed on drop.
pub struct NatsCluster {
    /// The servers; `nodes[i]` is named `n<i>`.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other (cluster `flame-test`,
    /// JetStream on, each with its own store) and waits until JetStream
    /// answers through every one of them.
    pub async fn start(size: usize) -> NatsCluster {
        let cluster = NatsCluster::launch(size, size);
        cluster.wait_until_ready().await;
        cluster
    }

    /// Starts `running` of the `size` servers of a cluster (the others
    /// are routed to but never started) without waiting for JetStream: as
    /// `docker compose up` starts them next to the app. With fewer than a
    /// majority running, the cluster never elects a JetStream meta leader.
    pub fn launch(size: usize, running: usize) -> NatsCluster {
        init_tracing();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = |me: usize| {
            route_ports
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != me)
                .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let nodes = (0..running)
            .map(|i| {
                NatsServer::builder()
                    .server_name(format!("n{i}"))
                    .arg("--cluster_name")
                    .arg("flame-test")
                    .arg("--cluster")
                    .arg(format!("nats://127.0.0.1:{}", route_ports[i]))
                    .arg("--routes")
                    .arg(routes(i))
                    .start()
                    .expect("start a cluster node")
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Waits until JetStream answers through every node.
    pub async fn wait_until_ready(&self) {
        let cluster = self;
        let size = self.nodes.len();
        // Ready when a stream with a replica on every node can be placed:
        // JetStream answers before all peers have joined.
        let client = async_nats::connect(cluster.nodes[0].url())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        wait_for(
            "a JetStream stream to be placed on every node",
            Duration::from_secs(60),
            || async {
                let config = async_nats::jetstream::stream::Config {
                    name: "cluster-ready".into(),
                    subjects: vec!["cluster-ready".into()],
                    num_replicas: size,
                    ..Default::default()
                };
                js.create_stream(config).await.ok().map(|_| ())
            },
        )
        .await;
        js.delete_stream("cluster-ready")
            .await
            .expect("delete the readiness stream");
    }

    /// Waits until every replica of `stream` is current (after a node came
    /// back), so that losing another node keeps a quorum.
    pub async fn wait_for_replicas(&self, stream: &str) {
        let client = async_nats::connect(self.nodes[0].url())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        wait_for(
            "every replica of the stream to be current",
            Duration::from_secs(60),
            || async {
                let mut s = js.get_stream(stream).await.ok()?;
                let info = s.info().await.ok()?;
                let cluster = info.cluster.as_ref()?;
                cluster.leader.as_ref()?;
                let replicas = &cluster.replicas;
                (replicas.len() + 1 == self.nodes.len()
                    && replicas.iter().all(|r| r.current && !r.offline))
                .then_some(())
            },
        )
        .await;
    }

    /// Every node's URL, comma-separated, as `NATS_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The custom data (`in_flight`, `max_in_flight`, ...) that a pool's runner
/// reports through `$SRV.STATS`; the first runner to answer. `None` while no
/// runner answers.
pub async fn runner_stats(env: &TestEnv, pool: &str) -> Option<serde_json::Value> {
    // A short limit: a runner checks its permissions on a first connection
    // that it then drops, and a request that reached that one is never
    // answered (nor refused as having no responders).
    let request = async_nats::Request::new()
        .payload("".into())
        .timeout(Some(Duration::from_millis(500)));
    let reply = env
        .client()
        .await
        .send_request(format!("$SRV.STATS.flame-{pool}"), request)
        .await
        .ok()?;
    let stats: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    Some(stats["endpoints"][0]["data"].clone())
}

/// A shared pool of test runners on `flame`, with 500 ms heartbeats.
pub fn shared_pool(flame: &Flame, name: &str) -> PoolBuilder {
    flame
        .pool(name)
        .shared(true)
        .heartbeat(Duration::from_millis(500))
        .backend(runner_backend())
}

/// The local backend running `flame-testapp` with the test build id.
pub fn runner_backend() -> LocalBackend {
    LocalBackend::new()
        .program(testapp())
        .args(Vec::<String>::new())
        .env(flame::env::BUILD_ID, TEST_BUILD)
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

/// Sends SIGKILL to a process (never to a process group: pid 0 is
/// ignored).
pub fn kill9(pid: u32) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Sends SIGTERM to a process (pid 0 is ignored).
pub fn sigterm(pid: u32) {
    if pid == 0 {
        return;
    }
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
pub struct HookLog(Arc<Mutex<Vec<PoolChange>>>);

impl HookLog {
    /// Installs itself as all three hooks of a pool.
    pub fn attach(&self, pool: PoolBuilder) -> PoolBuilder {
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        pool.on_grow_start(move |e| a.0.lock().unwrap().push(e.clone()))
            .on_grow_end(move |e| b.0.lock().unwrap().push(e.clone()))
            .on_shrink(move |e| c.0.lock().unwrap().push(e.clone()))
    }

    /// Everything so far.
    pub fn events(&self) -> Vec<PoolChange> {
        self.0.lock().unwrap().clone()
    }

    /// How many grow starts so far.
    pub fn grow_starts(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, PoolChange::GrowStart { .. }))
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
    fn runners_are_local(&self) -> bool {
        self.inner.runners_are_local()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
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
    fn runners_are_local(&self) -> bool {
        self.0.runners_are_local()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
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
    fn runners_are_local(&self) -> bool {
        self.inner.runners_are_local()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let fail = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err("injected boot failure".into()) });
        }
        self.inner.boot(spec)
    }
}

/// Pids of the live runner processes of a pool, found by the pool name in
/// their `FLAME_PARENT` variable.
pub fn runner_pids(pool: &str) -> Vec<u32> {
    let needle = format!("\"pool\":\"{pool}\"");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            environ.split(|b| *b == 0).any(|var| {
                var.starts_with(b"FLAME_PARENT=")
                    && var.windows(needle.len()).any(|w| w == needle.as_bytes())
            })
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// Watches a pool's runner processes from a thread and keeps the most seen
/// alive at once.
pub struct RunnerSampler {
    peak: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunnerSampler {
    /// Starts sampling the runners of `pool`.
    pub fn start(pool: &str) -> RunnerSampler {
        let peak = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s, pool) = (peak.clone(), stop.clone(), pool.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                p.fetch_max(runner_pids(&pool).len(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        RunnerSampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Most runners seen alive at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RunnerSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a `shared-parent` test app printed when its calls were done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentReport {
    /// Calls that succeeded.
    pub ok: usize,
    /// Calls that failed.
    pub failed: usize,
    /// Highest runner-side concurrency any call reported.
    pub peak: usize,
    /// Runner pids that served its calls.
    pub pids: Vec<u32>,
    /// The kinds (`flame::Error` variant names) of the failed calls, each
    /// once.
    pub failure_kinds: Vec<String>,
}

/// A parent process of a shared pool (`flame-testapp shared-parent`),
/// killed on drop.
pub struct SharedParent {
    /// The process.
    pub child: tokio::process::Child,
    /// Its parent id.
    pub parent_id: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Calls done so far, from its progress lines.
    pub progress: usize,
    pool: String,
}

impl Drop for SharedParent {
    /// Kills the parent and the pool's runners, rather than leave them to
    /// exit on their own after their grace period.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        for pid in runner_pids(&self.pool) {
            kill9(pid);
        }
    }
}

impl SharedParent {
    /// Starts a parent of `pool` on the server at `url` and waits until it is
    /// ready. `calls` 0 runs until killed.
    pub async fn start(
        url: &str,
        pool: &str,
        (max, max_concurrency): (usize, usize),
        (callers, calls, ms): (usize, usize, u64),
        extra_env: &[(&str, &str)],
    ) -> SharedParent {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new(testapp());
        cmd.arg("shared-parent")
            .arg(pool)
            .args([max, max_concurrency, callers, calls].map(|n| n.to_string()))
            .arg(ms.to_string())
            .env(flame::env::NATS_URL, url)
            .env(flame::env::BUILD_ID, crate::TEST_BUILD)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn shared parent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .expect("parent ready in time")
            .expect("parent printed nothing");
        let parent_id = first
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_string();
        SharedParent {
            child,
            parent_id,
            lines,
            progress: 0,
            pool: pool.to_string(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Reads output until the calls are done (or `limit` passes).
    pub async fn done(&mut self, limit: Duration) -> ParentReport {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .expect("parent finished in time")
                .expect("parent exited before it was done");
            if let Some(rest) = line.strip_prefix("done ") {
                let f: Vec<&str> = rest.split(' ').collect();
                return ParentReport {
                    ok: f[0].parse().unwrap(),
                    failed: f[1].parse().unwrap(),
                    peak: f[2].parse().unwrap(),
                    pids: f
                        .get(3)
                        .map(|p| p.split(',').filter_map(|x| x.parse().ok()).collect())
                        .unwrap_or_default(),
                    failure_kinds: f
                        .get(4)
                        .map(|k| {
                            k.split(',')
                                .filter(|x| !x.is_empty() && *x != "-")
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                };
            }
            self.note(&line);
        }
    }

    /// Waits until the parent has completed `n` calls in all.
    pub async fn progressed_to(&mut self, n: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.progress < n {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("parent stuck at {} calls, waiting for {n}", self.progress)
                })
                .expect("parent exited");
            self.note(&line);
        }
    }

    fn note(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("progress ") {
            if let Some(ok) = rest.split(' ').next().and_then(|n| n.parse().ok()) {
                self.progress = self.progress.max(ok);
            }
        }
    }
}

/// A path in `dir`, as a string for remote functions.
pub fn path_in(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_string_lossy().into_owned()
}

/// `Some(())` once `path` exists.
pub async fn file_exists(path: &str) -> Option<()> {
    std::path::Path::new(path).exists().then_some(())
}

/// A long call holding a slot on a runner (`mark_then_sleep`).
pub struct MarkedCall {
    /// The call; its result is the runner's pid.
    pub call: tokio::task::JoinHandle<Result<u32, flame::Error>>,
    /// Pid of the runner it runs on.
    pub pid: u32,
}

/// Starts `mark_then_sleep(<dir>/<name>, ms)` on `pool` with `options`
/// (60 s timeout unless set) and waits until it runs on a runner.
pub async fn start_marked_call(
    pool: &flame::Pool,
    dir: &tempfile::TempDir,
    name: &str,
    ms: u64,
    options: flame::CallOptions,
) -> MarkedCall {
    let marker = path_in(dir, name);
    let options = match options.timeout {
        Some(_) => options,
        None => options.timeout(Duration::from_secs(60)),
    };
    let call = tokio::spawn({
        let (pool, marker) = (pool.clone(), marker.clone());
        async move {
            pool.call_with::<crate::funcs::mark_then_sleep>((marker, ms), options)
                .await
        }
    });
    wait_for("the call to start", Duration::from_secs(60), || {
        file_exists(&marker)
    })
    .await;
    let pid = std::fs::read_to_string(&marker)
        .expect("marker")
        .parse()
        .expect("pid in marker");
    MarkedCall { call, pid }
}

/// Waits (at most `limit`) until the runner of `pool` reports `n` calls in
/// flight, counted on the runner.
pub async fn wait_in_flight(env: &TestEnv, pool: &str, n: u64, limit: Duration) {
    let what = format!("{n} calls in flight on a runner of pool `{pool}`");
    wait_for(&what, limit, || async {
        (runner_stats(env, pool).await?["in_flight"] == n).then_some(())
    })
    .await;
}

/// The error a spawned call ends with, which must come within `limit`.
pub async fn error_within<T: std::fmt::Debug>(
    call: tokio::task::JoinHandle<Result<T, flame::Error>>,
    limit: Duration,
) -> flame::Error {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| panic!("the call did not end within {limit:?}"))
        .expect("the call's task panicked")
        .expect_err("the call succeeded")
}

impl SharedParent {
    /// Closes the parent's stdin: once its calls are done it shuts its pool
    /// down, prints `shut down` and exits.
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits (at most `limit`) for a line starting with `prefix`, reading
    /// past other lines; panics if the parent exits first.
    pub async fn line_starting(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no `{prefix}` line within {limit:?}"))
                .unwrap_or_else(|| panic!("parent exited before printing `{prefix}`"));
            if line.starts_with(prefix) {
                return line;
            }
            self.note(&line);
        }
    }
}

/// Runs the test app with `args`, without `NATS_URL` (so a parent starts
/// its own nats-server) and with the test build id; returns its output
/// once it exits, which must be within `limit`.
pub async fn run_testapp(args: &[&str], limit: Duration) -> std::process::Output {
    let child = tokio::process::Command::new(testapp())
        .args(args)
        .env_remove(flame::env::NATS_URL)
        .env_remove(flame::env::PARENT)
        .env(flame::env::BUILD_ID, crate::TEST_BUILD)
        .env("RUST_LOG", "flame_nats=debug,flame_core=debug,warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn test app");
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("flame-testapp {args:?} did not exit within {limit:?}"))
        .expect("test app output")
}

/// Returns once the server has processed everything `client` sent so far
/// (a flush only writes it out): a message to a fresh inbox of its own
/// has come back.
pub async fn round_trip(client: &async_nats::Client) {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(30), echo.next())
        .await
        .expect("the server echoes within 30 s")
        .expect("an echo");
}

/// Every pool event published on `flame.<pool>.events.>` (`*` for every
/// pool) since it was made, read by a plain NATS subscription.
pub struct EventLog {
    events: Arc<Mutex<Vec<(String, flame::ops::PoolEventMessage)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventLog {
    /// Subscribes (and flushes, so nothing published after this returns
    /// is missed).
    pub async fn subscribe(env: &TestEnv, pool: &str) -> EventLog {
        use futures::StreamExt;
        let client = env.client().await;
        let mut sub = client
            .subscribe(flame::ops::events_wildcard(pool))
            .await
            .expect("subscribe to pool events");
        round_trip(&client).await;
        let events: Arc<Mutex<Vec<_>>> = Arc::default();
        let log = events.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                let event: flame::ops::PoolEventMessage = serde_json::from_slice(&msg.payload)
                    .unwrap_or_else(|e| {
                        panic!(
                            "not a pool event on {}: {e}: {}",
                            msg.subject,
                            String::from_utf8_lossy(&msg.payload)
                        )
                    });
                log.lock().unwrap().push((msg.subject.to_string(), event));
            }
        });
        EventLog { events, task }
    }

    /// Everything so far, in order of arrival.
    pub fn all(&self) -> Vec<flame::ops::PoolEventMessage> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Events of `kind` so far, checking each came on its kind's subject.
    pub fn of(&self, kind: flame::ops::EventKind) -> Vec<flame::ops::PoolEventMessage> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.kind() == Some(kind))
            .inspect(|(subject, e)| {
                assert_eq!(*subject, flame::ops::event_subject(&e.pool, kind));
            })
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Waits (at most `limit`) for an event of `kind` that `matches`.
    pub async fn wait(
        &self,
        kind: flame::ops::EventKind,
        limit: Duration,
        matches: impl Fn(&flame::ops::PoolEventMessage) -> bool,
    ) -> flame::ops::PoolEventMessage {
        let found = tokio::time::timeout(limit, async {
            loop {
                if let Some(e) = self.of(kind).into_iter().find(|e| matches(e)) {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "timed out after {limit:?} waiting for a {} event; seen: {:?}",
                kind.as_str(),
                self.kinds()
            )
        })
    }

    /// The kinds seen so far, with their runner and reason, for messages.
    pub fn kinds(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|e| {
                let kind = e.event_type.rsplit('.').next().unwrap_or("?");
                let runner = e.runner.as_deref().map_or("", |r| &r[..8.min(r.len())]);
                match e.reason {
                    Some(reason) => format!("{kind} {runner} {}", reason.as_str()),
                    None => format!("{kind} {runner}"),
                }
            })
            .collect()
    }
}
