//! The app the integration tests boot as runners (and, for some tests, as a
//! parent process).
//!
//! Modes, picked by the first argument when not a runner:
//! - `embedded-check`: init on the embedded default and print the outcome.
//! - `parent <dir>`: a parent on `NATS_URL` with a pool `orphans` of three
//!   runners, two of them busy with long calls (each writes a file in `<dir>`
//!   when it starts); prints `ready` and then waits to be killed.

use std::time::Duration;

use flame_tests::funcs::mark_then_sleep;

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
        other => {
            eprintln!("flame-testapp: unknown mode `{other}`");
            std::process::exit(64);
        }
    }
}
