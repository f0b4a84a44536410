//! Paths of the binaries the tests run (the test app, the examples, the
//! `flame` command), and running the test app to its end.

use std::path::PathBuf;
use std::time::Duration;

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
