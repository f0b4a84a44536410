//! The app the integration tests boot as runners (and, for some tests, as a
//! parent process).
//!
//! Modes, picked by the first argument when not a runner:
//! - `embedded-check`: init on the embedded default and print the outcome.

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
        other => {
            eprintln!("flame-testapp: unknown mode `{other}`");
            std::process::exit(64);
        }
    }
}
