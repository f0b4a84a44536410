//! The app the integration tests boot as runners (and, for some tests, as a
//! parent process).
//!
//! Modes, picked by the first argument when not a runner:
//! - `embedded-check`: init on the embedded default and print the outcome.
//! - `parent <dir>`: a parent on `NATS_URL` with a pool `orphans` of three
//!   runners, two of them busy with long calls (each writes a file in `<dir>`
//!   when it starts); prints `ready` and then waits to be killed.
//! - `shared-parent <pool> <max> <max_concurrency> <callers> <calls> <ms>`: a
//!   parent of the shared pool `<pool>` on `NATS_URL`. Prints `ready <parent
//!   id>`, then runs `<callers>` concurrent loops of `counted_sleep(<ms>)`,
//!   `<calls>` calls in all (0: until killed), printing `progress <ok>
//!   <failed>` every 50 calls and, at the end, `done <ok> <failed> <peak>
//!   <pids> <kinds>` (the highest runner-side concurrency seen, the runner
//!   pids used, comma-separated, and the `flame::Error` variants of the
//!   failed calls, comma-separated, `-` for none). `FLAME_TEST_HEARTBEAT_MS`
//!   sets the pool's heartbeat (default 500), `FLAME_TEST_KV_REPLICAS` its
//!   `kv_replicas` (default 1), `FLAME_TEST_MIN` its min (default 0),
//!   `FLAME_TEST_GRACE_MS` its parent grace (default 6 heartbeats). A line
//!   on stdin or its end stops the calls (no new ones start), then, after
//!   `done`, shuts the pool down (`pool.shutdown()`), prints `shut down` and
//!   exits 0.
//! - `close-check` / `drop-check`: init on the embedded default (no
//!   `NATS_URL`: starts its own nats-server), a pool `closecheck` with the
//!   default `LocalBackend` (runners are this program with the same
//!   arguments), calls `add(2, 3)`, shuts the pool down, then closes the
//!   `Flame` (`flame.close().await`) or just drops it; waits a second for
//!   any late log line, prints `nats-servers <n>` (live nats-server
//!   descendants of this process) and `closed`, and exits 0.
//! - `own-server`: `flame::serve_if_runner()` first (runners, the same
//!   program with the same arguments, serve there), then starts a
//!   `NatsServer` and connects with `FlameBuilder::connect()`; a pool
//!   `ownserver` with the default `LocalBackend` calls `add(2, 3)`; prints
//!   `nats-servers <n>` (as above, while the runner is up) and `ok <sum>`.
//! - `connect-in-runner`: sets `FLAME_PARENT` in its own environment, then
//!   calls `FlameBuilder::connect()`: prints `config error: <message>` and
//!   exits 0 on `Error::Config`, else prints what happened and exits 1.
//! - `no-state`: `flame::init()` without the test state the remote functions
//!   take; prints `error: <message>` (or that it started) and exits 3.
//!
//! - `platform-parent <pool> <working|stuck> <hang|start-fails>`: a parent
//!   on `NATS_URL` of a private pool `<pool>` with `min(1)` on the platform
//!   of the conformance suite (the Fly stand-in at `FLAME_TEST_FLY_URL`, the
//!   Docker Engine at `FLAME_TEST_DOCKER_HOST`, else the local backend), whose runners work or never become ready. `hang`:
//!   starts the pool in the background (boot timeout 120 s, failsafe 3 s,
//!   parent grace 2 s), prints `booting` and waits to be killed.
//!   `start-fails`: starts it with a boot timeout of 2 s, prints `error:
//!   <message>` (or `started`) and exits at once with `process::exit(0)`.
//!
//! - `docker-parent <pool>`: a parent on `NATS_URL`, in a container, of a
//!   private pool `<pool>` on the Docker backend with nothing configured but
//!   `/tmp` (runners are made from this container); calls `add(2, 3)`,
//!   prints `sum <n>`, then waits for a line on stdin (or its end), shuts
//!   the pool down, prints `shut down` and exits 0.
//!
//! Every other mode, and every runner, gives flame the test state first
//! (`harness::with_test_state`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::CallOptions;
use flame_tests::funcs::{add, counted_sleep, mark_then_sleep};
use flame_tests::harness::with_test_state;

#[tokio::main]
async fn main() {
    flame_tests::harness::init_tracing_stderr();
    let mode = std::env::args().nth(1).unwrap_or_default();
    // Modes that must not init (connect or start a server) first.
    match mode.as_str() {
        "own-server" => return own_server().await,
        "connect-in-runner" => return connect_in_runner().await,
        "no-state" => {
            // The test functions take state; without it init must refuse.
            match flame::init().await {
                Ok(_) => println!("started without state"),
                Err(e) => println!("error: {e}"),
            }
            std::process::exit(3);
        }
        _ => {}
    }
    // In a runner this serves calls and exits the process.
    let result = with_test_state(flame::FlameBuilder::new()).init().await;
    match mode.as_str() {
        "embedded-check" => match result {
            Ok(flame) => println!("ok {} build {}", flame.nats_url(), flame.build_id()),
            Err(e) => {
                println!("error: {e}");
                std::process::exit(2);
            }
        },
        "parent" => {
            let dir = std::env::args().nth(2).expect("parent <dir>");
            let flame = result.expect("init");
            let pool = flame
                .pool("orphans")
                .min(3)
                .max(3)
                .max_concurrency(1)
                .parent_grace(Duration::from_secs(2))
                .heartbeat(Duration::from_millis(500))
                .shutdown_timeout(Duration::from_secs(60))
                .start()
                .await
                .expect("start pool");
            for i in 0..2 {
                let pool = pool.clone();
                let path = format!("{dir}/busy-{i}");
                tokio::spawn(async move {
                    let _ = pool.call::<mark_then_sleep>((path, 120_000)).await;
                });
            }
            println!("ready");
            std::future::pending::<()>().await;
        }
        "shared-parent" => shared_parent(result.expect("init")).await,
        "platform-parent" => platform_parent(result.expect("init")).await,
        "docker-parent" => docker_parent(result.expect("init")).await,
        "close-check" | "drop-check" => {
            let flame = result.expect("init");
            let pool = flame
                .pool("closecheck")
                .max(1)
                .start()
                .await
                .expect("start pool");
            let sum = pool.call::<add>((2, 3)).await.expect("call add");
            assert_eq!(sum, 5);
            pool.shutdown().await;
            drop(pool);
            if mode == "close-check" {
                flame.close().await;
                // Idempotent.
                flame.close().await;
            }
            drop(flame);
            // Time for a late "lost the connection" line, if one comes.
            tokio::time::sleep(Duration::from_secs(1)).await;
            println!("nats-servers {}", descendants_named("nats-server"));
            println!("closed");
        }
        other => {
            eprintln!("flame-testapp: unknown mode `{other}`");
            std::process::exit(64);
        }
    }
}

fn arg<T: std::str::FromStr>(i: usize) -> T {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} missing or invalid"))
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn shared_parent(flame: flame::Flame) {
    let pool_name: String = arg(2);
    let (max, mc, callers, calls, ms): (usize, usize, usize, usize, u64) =
        (arg(3), arg(4), arg(5), arg(6), arg(7));
    let heartbeat = Duration::from_millis(env_or("FLAME_TEST_HEARTBEAT_MS", 500));
    let pool = flame
        .pool(pool_name)
        .shared(true)
        .min(env_or("FLAME_TEST_MIN", 0) as usize)
        .max(max)
        .max_concurrency(mc)
        .heartbeat(heartbeat)
        .kv_replicas(env_or("FLAME_TEST_KV_REPLICAS", 1) as usize)
        .parent_grace(Duration::from_millis(env_or(
            "FLAME_TEST_GRACE_MS",
            heartbeat.as_millis() as u64 * 6,
        )))
        .idle_shutdown_after(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .start()
        .await
        .expect("start pool");
    println!("ready {}", flame.parent_id());
    // A line on stdin, or its end: stop calling, then shut down.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stdin_done = Arc::new(tokio::sync::Notify::new());
    {
        let (stop, stdin_done) = (stop.clone(), stdin_done.clone());
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            stop.store(true, Ordering::SeqCst);
            stdin_done.notify_one();
        });
    }
    let issued = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let pids = Arc::new(Mutex::new(BTreeSet::new()));
    let kinds = Arc::new(Mutex::new(BTreeSet::new()));
    let loops: Vec<_> = (0..callers)
        .map(|_| {
            let (pool, issued, ok, failed, peak, pids, stop, kinds) = (
                pool.clone(),
                issued.clone(),
                ok.clone(),
                failed.clone(),
                peak.clone(),
                pids.clone(),
                stop.clone(),
                kinds.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let n = issued.fetch_add(1, Ordering::SeqCst);
                    if (calls > 0 && n >= calls) || stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let result = pool
                        .call_with::<counted_sleep>((ms,), CallOptions::new())
                        .await;
                    let done = match result {
                        Ok(report) => {
                            peak.fetch_max(report.peak, Ordering::SeqCst);
                            pids.lock().unwrap().insert(report.pid);
                            ok.fetch_add(1, Ordering::SeqCst) + 1
                        }
                        Err(e) => {
                            tracing::warn!("call failed: {e}");
                            let debug = format!("{e:?}");
                            let kind: String = debug
                                .chars()
                                .take_while(|c| c.is_ascii_alphanumeric())
                                .collect();
                            kinds.lock().unwrap().insert(kind);
                            failed.fetch_add(1, Ordering::SeqCst);
                            ok.load(Ordering::SeqCst)
                        }
                    };
                    if done % 50 == 0 {
                        println!("progress {} {}", done, failed.load(Ordering::SeqCst));
                    }
                }
            })
        })
        .collect();
    for l in loops {
        let _ = l.await;
    }
    let pids: Vec<String> = pids.lock().unwrap().iter().map(|p| p.to_string()).collect();
    let kinds: Vec<String> = kinds.lock().unwrap().iter().cloned().collect();
    println!(
        "done {} {} {} {} {}",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        peak.load(Ordering::SeqCst),
        pids.join(","),
        if kinds.is_empty() {
            "-".to_string()
        } else {
            kinds.join(",")
        }
    );
    // Stay a parent of the pool until killed, or until stdin has a line or
    // closes: then leave the pool properly.
    stdin_done.notified().await;
    pool.shutdown().await;
    println!("shut down");
    std::process::exit(0);
}

/// Live descendants of this process whose command name is `name`.
fn descendants_named(name: &str) -> usize {
    let mut todo = vec![std::process::id()];
    let mut found = 0;
    while let Some(pid) = todo.pop() {
        for child in flame_tests::harness::children_of(pid) {
            let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if comm.trim() == name {
                found += 1;
            }
            todo.push(child);
        }
    }
    found
}

/// `own-server` mode: a parent that starts its own nats-server.
async fn own_server() {
    // In a runner this serves calls and exits the process; in the parent it
    // returns at once, before any server is started.
    with_test_state(flame::FlameBuilder::new())
        .serve_if_runner()
        .await
        .expect("serve_if_runner");
    let server = tokio::task::spawn_blocking(flame::embedded::NatsServer::start)
        .await
        .expect("join")
        .expect("start nats-server");
    let flame = with_test_state(flame::FlameBuilder::new())
        .nats_url(server.url())
        .connect()
        .await
        .expect("connect");
    let pool = flame
        .pool("ownserver")
        .max(1)
        .start()
        .await
        .expect("start pool");
    let sum = pool.call::<add>((2, 3)).await.expect("call add");
    println!("nats-servers {}", descendants_named("nats-server"));
    println!("ok {sum}");
    pool.shutdown().await;
    flame.close().await;
    drop(server);
}

/// `connect-in-runner` mode: `connect()` where `FLAME_PARENT` is set.
async fn connect_in_runner() {
    // Runner info pointing at a port nobody listens on, with a short
    // failsafe: a process that wrongly turns into a runner exits non-zero.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let info: flame::ParentInfo = serde_json::from_value(serde_json::json!({
        "parent_id": "nobody",
        "pool": "connectcheck",
        "runner_id": "r1",
        "nats_url": format!("nats://127.0.0.1:{port}"),
        "max_concurrency": 1,
        "idle_shutdown_after_ms": 60_000,
        "shutdown_timeout_ms": 1_000,
        "failsafe_timeout_ms": 1_000,
        "parent_grace_ms": 2_000,
        "heartbeat_ms": 500,
    }))
    .expect("runner info");
    std::env::set_var(flame::env::PARENT, info.to_env_value());
    match with_test_state(flame::FlameBuilder::new()).connect().await {
        Err(flame::Error::Config(message)) => println!("config error: {message}"),
        Err(other) => {
            println!("other error: {other:?}");
            std::process::exit(1);
        }
        Ok(_) => {
            println!("connected");
            std::process::exit(1);
        }
    }
}

async fn platform_parent(flame: flame::Flame) {
    use flame_tests::platform::{backend_for, Platform, Runners};
    let pool_name: String = arg(2);
    let runners = match arg::<String>(3).as_str() {
        "working" => Runners::Working,
        "stuck" => Runners::Stuck,
        other => panic!("unknown runners `{other}`"),
    };
    let then: String = arg(4);
    let (kind, url) = Platform::from_env();
    let backend = backend_for(kind, url.as_deref(), runners).expect("a backend");
    let pool = flame
        .pool(pool_name)
        .min(1)
        .max(1)
        .failsafe_timeout(Duration::from_secs(3))
        .parent_grace(Duration::from_secs(2))
        .backend(backend);
    match then.as_str() {
        "hang" => {
            let start = pool.boot_timeout(Duration::from_secs(120)).start();
            tokio::spawn(async move {
                if let Err(e) = start.await {
                    eprintln!("cannot start the pool: {e}");
                }
            });
            println!("booting");
            std::future::pending::<()>().await;
        }
        "start-fails" => {
            match pool.boot_timeout(Duration::from_secs(2)).start().await {
                Ok(_) => println!("started"),
                Err(e) => println!("error: {e}"),
            }
            std::process::exit(0);
        }
        other => panic!("unknown step `{other}`"),
    }
}

async fn docker_parent(flame: flame::Flame) {
    let backend = flame_docker::DockerBackend::builder()
        .bind("/tmp:/tmp")
        .build()
        .expect("a Docker backend");
    let pool = flame
        .pool(arg::<String>(2))
        .max(1)
        .backend(backend)
        .start()
        .await
        .expect("start the pool");
    match flame::call!(pool, add(2, 3)).await {
        Ok(sum) => println!("sum {sum}"),
        Err(e) => println!("error: {e}"),
    }
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await;
    pool.shutdown().await;
    println!("shut down");
}
