//! A shared pool meets a JetStream that is not ready, or a KV bucket the
//! server refuses.
//!
//! - NATS and the app started together (`docker compose up`): the pool's
//!   `start()` retries until the cluster has elected its JetStream meta
//!   leader, and returns once it has;
//! - a JetStream that never becomes ready (one server of three: no meta
//!   leader): `start()` fails with `Error::JetStreamNotReady` after the
//!   pool's boot timeout, saying what it tried; a cluster that loses its
//!   majority after start fails the callers waiting for a runner with it;
//! - a parent without permission on the bucket: `start()` fails with
//!   `Error::PermissionDenied` naming the subject, every time; a permission
//!   taken away after start (the server's configuration reloaded) fails the
//!   waiting callers with `PermissionDenied`, not `Timeout`, and
//!   `shutdown()` stays bounded.

use std::time::{Duration, Instant};

use flame::embedded::NatsServer;
use flame::{Error, Flame};
use flame_tests::funcs::{add, nap};
use flame_tests::harness::{
    builder, error_within, init_tracing, runner_backend, shared_pool, wait_for, NatsCluster,
};
use flame_tests::nats_config::without_line;

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_shared_pool_started_with_its_cluster_starts_once_jetstream_is_ready() {
    // The three servers and the parent start at the same moment.
    let started = Instant::now();
    let cluster = NatsCluster::launch(3, 3);
    let flame = builder().nats_url(cluster.urls()).init().await.unwrap();
    let boot_timeout = Duration::from_secs(30);
    let pool = shared_pool(&flame, "together")
        .kv_replicas(3)
        .max(1)
        .timeout(LONG)
        .boot_timeout(boot_timeout)
        .start();
    // The bound: the boot timeout, and a margin for the last attempt.
    let limit = boot_timeout + Duration::from_secs(10);
    let pool = tokio::time::timeout(limit, pool)
        .await
        .unwrap_or_else(|_| panic!("start() did not return within {limit:?}"))
        .expect("start() succeeds once JetStream is ready");
    eprintln!(
        "start() returned {:?} after the servers were started",
        started.elapsed()
    );
    // The bucket has its three replicas, and the pool works.
    let client = async_nats::connect(cluster.nodes[1].url()).await.unwrap();
    let store = async_nats::jetstream::new(client)
        .get_key_value("flame-together")
        .await
        .unwrap();
    assert_eq!(store.status().await.unwrap().info.config.num_replicas, 3);
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    let shutdown = Instant::now();
    pool.shutdown().await;
    eprintln!("shutdown() took {:?}", shutdown.elapsed());
    flame.close().await;
}

#[tokio::test]
async fn a_jetstream_without_a_meta_leader_fails_start_after_the_boot_timeout() {
    // One server of three: it never elects a meta leader.
    let cluster = NatsCluster::launch(3, 1);
    let flame = builder().nats_url(cluster.urls()).init().await.unwrap();
    let boot_timeout = Duration::from_secs(4);
    let started = Instant::now();
    let pool = shared_pool(&flame, "alone")
        .kv_replicas(3)
        .boot_timeout(boot_timeout)
        .start();
    let limit = boot_timeout + Duration::from_secs(8);
    let err = tokio::time::timeout(limit, pool)
        .await
        .unwrap_or_else(|_| panic!("start() did not return within {limit:?}"))
        .expect_err("no JetStream, no shared pool");
    let took = started.elapsed();
    eprintln!("start() failed after {took:?}: {err}");
    assert!(took >= boot_timeout, "gave up after {took:?}: {err}");
    match &err {
        Error::JetStreamNotReady {
            pool,
            tried,
            waited,
            attempts,
            last,
        } => {
            assert!(tried.contains("KV bucket flame-alone"), "{err}");
            assert_eq!(pool, "alone");
            assert!(*waited >= boot_timeout, "{err}");
            assert!(*attempts >= 2, "retried: {err}");
            assert!(!last.is_empty(), "{err}");
        }
        other => panic!("expected JetStreamNotReady, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("JetStream is not ready"), "{text}");
    assert!(text.contains("KV bucket flame-alone"), "{text}");
    assert_eq!(err.kind(), flame::ErrorKind::JetStreamNotReady);
    flame.close().await;
}

#[tokio::test]
async fn a_shared_pool_on_a_server_without_jetstream_fails_at_once() {
    init_tracing();
    let server = NatsServer::builder().jetstream(false).start().unwrap();
    let flame = builder().nats_url(server.url()).init().await.unwrap();
    let started = Instant::now();
    let err = shared_pool(&flame, "nojs").start().await.unwrap_err();
    assert!(matches!(err, Error::JetStreamDisabled { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    flame.close().await;
}

/// The configuration under test, as shipped.
const CONFIG: &str = flame_tests::nats_config::LEAST_PRIVILEGE_CONFIG;

/// The pool that configuration is written for.
const POOL: &str = "thumbs";

/// How many times each permission case is tried.
const TRIES: usize = 8;

/// A nats-server started from a copy of the shipped configuration, which
/// the test may change and have the server reload.
struct Secured {
    server: NatsServer,
    config: std::path::PathBuf,
    parent_password: String,
    runner_password: String,
    _dir: tempfile::TempDir,
}

impl Secured {
    /// The shipped configuration without `line` in the parent's publish
    /// list (none: all of it).
    fn start(without: Option<&str>) -> Secured {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("least-privilege.conf");
        std::fs::write(&config, parent_config_without(without)).unwrap();
        let password = || uuid::Uuid::new_v4().simple().to_string();
        let (parent_password, runner_password) = (password(), password());
        let server = NatsServer::builder()
            .arg("-c")
            .arg(config.to_string_lossy())
            .env("FLAME_PARENT_PASSWORD", &parent_password)
            .env("FLAME_RUNNER_PASSWORD", &runner_password)
            .env("OUTSIDER_PASSWORD", password())
            .env("FLAME_OPERATOR_PASSWORD", password())
            .start()
            .expect("nats-server starts from the config");
        Secured {
            server,
            config,
            parent_password,
            runner_password,
            _dir: dir,
        }
    }

    /// Takes `line` out of the parent's publish permissions and has the
    /// server reload its configuration (SIGHUP); returns once the server
    /// refuses that subject to a parent.
    async fn take_away(&self, line: &str, probe: &str) {
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = refused.clone();
        let client = async_nats::ConnectOptions::with_user_and_password(
            "flame-parent".into(),
            self.parent_password.clone(),
        )
        .event_callback(move |event| {
            if let async_nats::Event::ServerError(e) = event {
                if e.to_string().contains("Permissions Violation") {
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            async {}
        })
        .connect(self.server.url())
        .await
        .unwrap();
        // (Connected before the reload: a connection made while the server
        // reloads its accounts can be refused.)
        std::fs::write(&self.config, parent_config_without(Some(line))).unwrap();
        let pid = self.server.pid().expect("the server runs");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGHUP);
        }
        wait_for("the server to reload", LONG, || async {
            let _ = client.publish(probe.to_string(), "".into()).await;
            let _ = client.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            refused
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        })
        .await;
    }

    async fn parent(&self) -> Flame {
        let password = self.parent_password.clone();
        builder()
            .nats_url(self.server.url())
            .nats_options(move |o| o.user_and_password("flame-parent".into(), password.clone()))
            .init()
            .await
            .expect("the parent connects as flame-parent")
    }

    fn runners(&self) -> flame::LocalBackend {
        runner_backend()
            .clear_env(true)
            .env("NATS_USER", "flame-runner")
            .env("NATS_PASSWORD", &self.runner_password)
    }
}

/// The shipped configuration without `line` in PARENT_PERMISSIONS.publish.
fn parent_config_without(line: Option<&str>) -> String {
    let config = std::fs::read_to_string(CONFIG).unwrap();
    match line {
        Some(line) => without_line(&config, "PARENT_PERMISSIONS", "publish", line),
        None => config,
    }
}

/// Starts a shared pool `TRIES` times, each with a new parent, without
/// the parent's publish permission `line`: each start fails at once with
/// `PermissionDenied` naming `names`.
async fn start_refused_every_time(line: &str, names: &str) {
    let secured = Secured::start(Some(line));
    let mut figures = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..TRIES {
        let flame = secured.parent().await;
        let started = Instant::now();
        let result = flame
            .pool(POOL)
            .shared(true)
            .backend(secured.runners())
            .max(1)
            .timeout(Duration::from_secs(5))
            .start()
            .await;
        let took = started.elapsed();
        match result {
            Err(Error::PermissionDenied { reason }) if reason.contains(names) => {
                figures.push(format!("PermissionDenied after {took:?}"));
            }
            Err(other) => {
                figures.push(format!("{} after {took:?}", other.kind()));
                failures.push(format!("start(): {other}"));
            }
            Ok(pool) => {
                // What a user then sees: a call, and the shutdown.
                let called = Instant::now();
                let call = flame::call!(pool, add(1, 1)).await;
                let call_took = called.elapsed();
                let closing = Instant::now();
                tokio::time::timeout(LONG, pool.shutdown())
                    .await
                    .expect("shutdown within a minute");
                let figure = format!(
                    "start() Ok after {took:?}; call {:?} after {call_took:?}; shutdown {:?}",
                    call.map_err(|e| e.kind()),
                    closing.elapsed()
                );
                failures.push(figure.clone());
                figures.push(figure);
            }
        }
        assert!(took < Duration::from_secs(10), "start() took {took:?}");
        flame.close().await;
    }
    eprintln!("without {line}: {figures:#?}");
    assert!(failures.is_empty(), "without {line}: {failures:#?}");
}

#[tokio::test]
async fn a_parent_that_may_not_write_the_bucket_fails_start_every_time() {
    start_refused_every_time("$KV.flame-thumbs.>", "Publish to \"$KV.flame-thumbs.").await;
}

#[tokio::test]
async fn a_parent_that_may_not_read_the_bucket_fails_start_every_time() {
    start_refused_every_time(
        "$JS.API.DIRECT.GET.KV_flame-thumbs.>",
        "Publish to \"$JS.API.DIRECT.GET.KV_flame-thumbs.",
    )
    .await;
}

#[tokio::test]
async fn a_parent_that_may_not_watch_the_bucket_fails_start_every_time() {
    start_refused_every_time(
        "$JS.API.CONSUMER.CREATE.KV_flame-thumbs",
        "Publish to \"$JS.API.CONSUMER.CREATE.KV_flame-thumbs",
    )
    .await;
}

/// The parent's right to write the bucket is taken away after the pool
/// started, while a caller waits for the only runner (busy with a long
/// call, at `max`): that caller fails with `PermissionDenied` naming the
/// subject, at once, not at its deadline with `Timeout`; a new call
/// fails the same way; `shutdown()` takes the drain of the busy runner
/// (here 1 s) and not more.
#[tokio::test]
async fn a_bucket_permission_taken_away_after_start_fails_waiting_callers() {
    let mut figures = Vec::new();
    for _ in 0..TRIES / 2 {
        let secured = Secured::start(None);
        let flame = secured.parent().await;
        let call_timeout = Duration::from_secs(20);
        let drain = Duration::from_secs(1);
        let pool = flame
            .pool(POOL)
            .shared(true)
            .backend(secured.runners())
            .max(1)
            .max_concurrency(1)
            .timeout(call_timeout)
            .shutdown_timeout(drain)
            .heartbeat(Duration::from_millis(500))
            .start()
            .await
            .expect("the pool starts with every permission");
        assert_eq!(flame::call!(pool, add(1, 1)).await.unwrap(), 2);
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move { flame::call!(pool, nap(15_000)).await })
        };
        wait_for("the runner to be busy", LONG, || async {
            pool.runners().iter().any(|r| r.load == 1).then_some(())
        })
        .await;
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { flame::call!(pool, add(2, 2)).await })
        };
        wait_for("a caller to wait", LONG, || async {
            (pool.status().waiting == 1).then_some(())
        })
        .await;
        let taken = Instant::now();
        secured
            .take_away("$KV.flame-thumbs.>", "$KV.flame-thumbs.probe")
            .await;
        let reloaded = taken.elapsed();
        let err = error_within(waiting, call_timeout + Duration::from_secs(5)).await;
        let failed = taken.elapsed();
        let later = flame::call!(pool, add(3, 3)).await.unwrap_err();
        let closing = Instant::now();
        tokio::time::timeout(LONG, pool.shutdown())
            .await
            .expect("shutdown within a minute");
        let shutdown_took = closing.elapsed();
        let _ = busy.await;
        figures.push(format!(
            "reload seen after {reloaded:?}; waiting call: {} after {failed:?}; new call: {}; shutdown {shutdown_took:?}",
            err.kind(),
            later.kind()
        ));
        for err in [&err, &later] {
            match err {
                Error::PermissionDenied { reason } => {
                    assert!(reason.contains("$KV.flame-thumbs."), "{reason}")
                }
                other => panic!("expected PermissionDenied, got {other:?} ({figures:#?})"),
            }
        }
        assert!(failed < Duration::from_secs(5), "{figures:#?}");
        assert!(
            shutdown_took < drain + Duration::from_secs(2),
            "{figures:#?}"
        );
        flame.close().await;
    }
    eprintln!("{figures:#?}");
}

/// After start, the cluster loses its majority (two servers of three):
/// the bucket cannot be written, so no runner can be booted. A caller
/// waiting for one fails with `JetStreamNotReady` once the bucket has been
/// unwritable for the boot timeout, not with `Timeout` at its deadline.
#[tokio::test]
async fn a_bucket_that_stays_unwritable_after_start_fails_waiting_callers() {
    let mut cluster = NatsCluster::start(3).await;
    let flame = builder().nats_url(cluster.urls()).init().await.unwrap();
    let boot_timeout = Duration::from_secs(3);
    let call_timeout = Duration::from_secs(30);
    let pool = shared_pool(&flame, "quorum")
        .kv_replicas(3)
        .max(1)
        .timeout(call_timeout)
        .boot_timeout(boot_timeout)
        .start()
        .await
        .unwrap();
    cluster.nodes[1].stop();
    cluster.nodes[2].stop();
    let called = Instant::now();
    let err = flame::call!(pool, add(1, 1)).await.unwrap_err();
    let took = called.elapsed();
    eprintln!("the call failed after {took:?}: {err}");
    assert!(
        matches!(err, Error::JetStreamNotReady { .. }),
        "expected JetStreamNotReady, got {err:?} after {took:?}"
    );
    assert!(took < call_timeout / 2, "{took:?}");
    let closing = Instant::now();
    pool.shutdown().await;
    let shutdown_took = closing.elapsed();
    eprintln!("shutdown() took {shutdown_took:?}");
    assert!(shutdown_took < Duration::from_secs(5), "{shutdown_took:?}");
}
