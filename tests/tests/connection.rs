//! A parent's connection: a list of NATS servers, closing and dropping a
//! `Flame` (and its private nats-server), a parent that starts its own
//! server after `serve_if_runner`, and `connect` refused in a runner.

use std::time::Duration;

use flame_tests::funcs::*;
use flame_tests::harness::{run_testapp, runner_backend};

/// Output of a test-app run as text.
fn texts(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Guards against a comma-separated server list in `nats_url` (and
/// `NATS_URL`) being refused with "invalid port number": the parent must
/// connect with it, and so must its runners, which get the same list.
#[tokio::test]
async fn nats_url_takes_a_comma_separated_server_list() {
    flame_tests::harness::init_tracing();
    let server = flame::embedded::NatsServer::start().unwrap();
    let p = server.port();
    let flame = flame_tests::harness::builder()
        .nats_url(format!("nats://127.0.0.1:{p}, nats://localhost:{p}"))
        .init()
        .await
        .expect("connect with a server list");
    let pool = flame
        .pool("urllist")
        .max(1)
        .backend(runner_backend())
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
}

/// Guards against a `Flame` that cannot be closed: `close()` must flush,
/// close the connection and stop the embedded nats-server, without the
/// parent logging that it lost its connection (`close-check` mode).
#[tokio::test]
async fn closing_a_flame_stops_its_embedded_server_quietly() {
    let out = run_testapp(&["close-check"], Duration::from_secs(120)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l == "closed"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "nats-servers 0"),
        "the embedded nats-server outlived close(): {stdout}"
    );
    assert!(!stderr.contains("lost the connection"), "{stderr}");
}

/// Guards against a dropped `Flame` logging that it lost the connection to
/// NATS (its embedded server stops with it) (`drop-check` mode).
#[tokio::test]
async fn dropping_a_flame_is_quiet() {
    let out = run_testapp(&["drop-check"], Duration::from_secs(120)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l == "closed"), "{stdout}");
    assert!(!stderr.contains("lost the connection"), "{stderr}");
}

/// Guards that a parent can start its own nats-server: with
/// `serve_if_runner()` first and `FlameBuilder::connect()` after, runners
/// (the same program, same arguments) serve before any server is started,
/// and only the parent's one nats-server runs (`own-server` mode).
#[tokio::test]
async fn parent_starts_its_own_server_after_serve_if_runner() {
    let out = run_testapp(&["own-server"], Duration::from_secs(120)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l == "ok 5"), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l == "nats-servers 1"),
        "one nats-server among the parent's descendants: {stdout}"
    );
}

/// Guards that `FlameBuilder::connect()` in a runner process (`FLAME_PARENT`
/// set) is a configuration error rather than serving or connecting
/// (`connect-in-runner` mode).
#[tokio::test]
async fn connect_in_a_runner_process_is_a_config_error() {
    let out = run_testapp(&["connect-in-runner"], Duration::from_secs(60)).await;
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(
        stdout.lines().any(|l| l.starts_with("config error")),
        "{stdout}"
    );
}
