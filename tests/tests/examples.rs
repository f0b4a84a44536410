//! The examples run end to end, as a user would run them.

use std::time::Duration;

use flame_tests::harness::example;

/// Runs an example on the embedded defaults (no NATS URL, no database
/// URL given), killed if the test ends first; asserts it exits 0 within
/// 3 minutes and returns its standard output.
async fn run_to_success(command: &mut tokio::process::Command) -> String {
    let child = command
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .env_remove(flame::PARENT_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the example");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the example finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// The seed's flow: a video streamed to a runner, thumbnails back as they
/// are made, a row per thumbnail in PostgreSQL (a private server the
/// example starts), on a private nats-server.
#[tokio::test]
async fn video_thumbnails_streams_a_video_and_stores_a_row_per_thumbnail() {
    let mut command = tokio::process::Command::new(example("video_thumbnails"));
    let stdout = run_to_success(&mut command).await;
    // A 20 s test video, a thumbnail every 2 s.
    let thumbs = stdout
        .lines()
        .filter(|l| l.contains("thumbnail at"))
        .count();
    assert_eq!(thumbs, 10, "{stdout}");
    assert!(stdout.contains("10 thumbnails in"), "{stdout}");
    let rows = stdout
        .lines()
        .filter(|l| l.contains("testsrc.ts  at"))
        .count();
    assert_eq!(rows, 10, "one row per thumbnail: {stdout}");
}

/// The web demo's `--once`: two generated samples uploaded over HTTP at
/// once, thumbnails relayed to the page's event stream, a row per
/// thumbnail, and the pool back to zero runners, on a private nats-server
/// and PostgreSQL.
#[tokio::test]
async fn web_thumbnails_once_runs_two_uploads_end_to_end() {
    let mut command = tokio::process::Command::new(example("web_thumbnails"));
    command
        .arg("--once")
        .env_remove("LISTEN")
        .env("THUMBS_IDLE_SECS", "2");
    let stdout = run_to_success(&mut command).await;
    let thumbs = stdout
        .lines()
        .filter(|l| l.contains("thumbnail at"))
        .count();
    assert_eq!(thumbs, 20, "{stdout}");
    assert!(
        stdout.contains("ok: 2 uploads, 20 thumbnails, 20 rows"),
        "{stdout}"
    );
    assert!(stdout.contains("pool back to 0 runners"), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": 10 rows")).count(),
        2,
        "{stdout}"
    );
}
