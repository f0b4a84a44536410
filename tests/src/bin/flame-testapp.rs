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
//!   <pids>` (the highest runner-side concurrency seen, and the runner pids
//!   used, comma-separated). `FLAME_TEST_HEARTBEAT_MS` sets the pool's
//!   heartbeat (default 500), `FLAME_TEST_MIN` its min (default 0).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::CallOptions;
use flame_tests::funcs::{counted_sleep, mark_then_sleep};

#[tokio::main]
async fn main() {
    flame_tests::harness::init_tracing_stderr();
    // In a runner this serves calls and exits the process.
    let result = flame::init().await;
    let mode = std::env::args().nth(1).unwrap_or_default();
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
        .parent_grace(heartbeat * 6)
        .idle_shutdown_after(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .start()
        .await
        .expect("start pool");
    println!("ready {}", flame.parent_id());
    let issued = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let pids = Arc::new(Mutex::new(BTreeSet::new()));
    let loops: Vec<_> = (0..callers)
        .map(|_| {
            let (pool, issued, ok, failed, peak, pids) = (
                pool.clone(),
                issued.clone(),
                ok.clone(),
                failed.clone(),
                peak.clone(),
                pids.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let n = issued.fetch_add(1, Ordering::SeqCst);
                    if calls > 0 && n >= calls {
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
                            eprintln!("call failed: {e}");
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
    println!(
        "done {} {} {} {}",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        peak.load(Ordering::SeqCst),
        pids.join(",")
    );
    // Stay a parent of the pool until killed (or stdin closes).
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
}
