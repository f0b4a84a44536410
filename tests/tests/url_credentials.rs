//! Credentials written in the NATS URL (`nats://user:password@host`,
//! `nats://token@host`), the way the `nats` tools take them: the parent
//! connects with them, its runners get them without the secret appearing
//! in `FLAME_PARENT`, `Debug` output or errors, and a refusal says that
//! the credentials came from the URL.

use std::time::Duration;

use flame::embedded::NatsServer;
use flame::{Error, Flame, LocalBackend};
use flame_tests::funcs::add;
use flame_tests::harness::{builder, flame_cli, init_tracing, runner_backend, runner_pids};

const LONG: Duration = Duration::from_secs(30);

const PASSWORD: &str = "s3cret-pw";
const TOKEN: &str = "s3cret-token";

/// A server with one user, `app`, whose password is [`PASSWORD`].
fn with_user() -> NatsServer {
    init_tracing();
    NatsServer::builder()
        .arg("--user")
        .arg("app")
        .arg("--pass")
        .arg(PASSWORD)
        .start()
        .unwrap()
}

/// A server that wants the token [`TOKEN`].
fn with_token() -> NatsServer {
    init_tracing();
    NatsServer::builder()
        .arg("--auth")
        .arg(TOKEN)
        .start()
        .unwrap()
}

/// Runners with nothing of the parent's environment (no `NATS_*`
/// variable): only what the pool hands them.
fn bare_runners() -> LocalBackend {
    runner_backend().clear_env(true)
}

/// The `FLAME_PARENT` variables of the live runners of `pool`, and
/// everything else of their environment, as text.
fn runner_environments(pool: &str) -> Vec<String> {
    runner_pids(pool)
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok())
        .map(|e| String::from_utf8_lossy(&e).replace('\0', "\n"))
        .collect()
}

/// Starts a pool with one runner on `flame`, calls it, and checks that the
/// runner's `FLAME_PARENT` and every `Debug` output leave `secret` out.
async fn runs_a_call(flame: &Flame, pool: &str, secret: &str) {
    runs_a_call_in(flame, pool, secret, false).await
}

/// [`runs_a_call`], in a shared pool when `shared`.
async fn runs_a_call_in(flame: &Flame, pool: &str, secret: &str, shared: bool) {
    let pool_handle = flame
        .pool(pool)
        .shared(shared)
        .backend(bare_runners())
        .min(1)
        .max(1)
        .timeout(LONG)
        .boot_timeout(LONG)
        .start()
        .await
        .expect("the runner connects with the URL's credentials");
    assert_eq!(flame::call!(pool_handle, add(2, 3)).await.unwrap(), 5);
    let environments = runner_environments(pool);
    assert!(!environments.is_empty(), "no runner process of {pool}");
    for environment in environments {
        let parent = environment
            .lines()
            .find(|l| l.starts_with("FLAME_PARENT="))
            .expect("a runner has FLAME_PARENT");
        assert!(!parent.contains(secret), "{parent}");
    }
    let shown = format!("{flame:?} {pool_handle:?} {}", flame.nats_url());
    assert!(!shown.contains(secret), "{shown}");
    pool_handle.shutdown().await;
}

#[tokio::test]
async fn a_user_and_password_in_the_url_reach_parent_and_runners() {
    let server = with_user();
    let url = format!("nats://app:{PASSWORD}@127.0.0.1:{}", server.port());
    let flame = builder()
        .nats_url(&url)
        .connect_timeout(Duration::from_secs(5))
        .init()
        .await
        .expect("the parent connects with the URL's user and password");
    runs_a_call(&flame, "url-user", PASSWORD).await;
    flame.close().await;

    // A list of servers, each with the credentials.
    let list = format!(
        "nats://app:{PASSWORD}@127.0.0.1:{port}, nats://app:{PASSWORD}@localhost:{port}",
        port = server.port()
    );
    let flame = builder()
        .nats_url(&list)
        .connect_timeout(Duration::from_secs(5))
        .init()
        .await
        .expect("the parent connects with a list's credentials");
    runs_a_call(&flame, "url-list", PASSWORD).await;
    flame.close().await;
}

#[tokio::test]
async fn a_token_in_the_url_reaches_parent_and_runners() {
    let server = with_token();
    let url = format!("nats://{TOKEN}@127.0.0.1:{}", server.port());
    let flame = builder()
        .nats_url(&url)
        .connect_timeout(Duration::from_secs(5))
        .init()
        .await
        .expect("the parent connects with the URL's token");
    runs_a_call(&flame, "url-token", TOKEN).await;
    // A shared pool's runners, booted by its scaler, get them too.
    runs_a_call_in(&flame, "url-token-shared", TOKEN, true).await;
    flame.close().await;
}

/// `err`, a refusal, says the credentials came from the URL and shows no
/// secret.
fn says_the_url_gave_them(err: &Error, secret: &str) {
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(secret), "{shown}");
    assert!(err.to_string().contains("authorization violation"), "{err}");
    assert!(err.to_string().contains("came from the URL"), "{err}");
}

#[tokio::test]
async fn refused_url_credentials_are_said_to_come_from_the_url() {
    let server = with_user();
    let wrong = "wrong-pw-in-url";
    let started = std::time::Instant::now();
    let err = builder()
        .nats_url(format!("nats://app:{wrong}@127.0.0.1:{}", server.port()))
        .connect_timeout(Duration::from_secs(5))
        .init()
        .await
        .unwrap_err();
    println!(
        "wrong password in the URL: {err} after {:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::NatsUnreachable { .. }), "{err:?}");
    says_the_url_gave_them(&err, wrong);

    let server = with_token();
    let err = builder()
        .nats_url(format!("nats://{wrong}@127.0.0.1:{}", server.port()))
        .connect_timeout(Duration::from_secs(5))
        .init()
        .await
        .unwrap_err();
    println!("wrong token in the URL: {err}");
    says_the_url_gave_them(&err, wrong);
}

/// Runners told a URL with wrong credentials (`runner_nats_url`) fail
/// their boot saying where those came from, without the secret.
#[tokio::test]
async fn runners_refused_with_the_urls_credentials_say_so() {
    let server = with_user();
    let wrong = "wrong-runner-pw";
    let flame = builder()
        .nats_url(format!("nats://app:{PASSWORD}@127.0.0.1:{}", server.port()))
        .runner_nats_url(format!("nats://app:{wrong}@127.0.0.1:{}", server.port()))
        .init()
        .await
        .unwrap();
    let err = flame
        .pool("url-wrong-runner")
        .backend(bare_runners())
        .min(1)
        .max(1)
        .boot_timeout(LONG)
        .start()
        .await
        .unwrap_err();
    println!("runner with a wrong password in its URL: {err}");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(wrong) && !shown.contains(PASSWORD),
        "{shown}"
    );
    match &err {
        Error::BootFailed { reason, .. } => {
            assert!(reason.contains("authorization violation"), "{reason}");
            assert!(reason.contains("came from the URL"), "{reason}");
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
    flame.close().await;
}

/// The `flame` command takes credentials from its URL too (`--server` or
/// `NATS_URL`).
#[tokio::test]
async fn the_flame_command_uses_the_urls_credentials() {
    let server = with_user();
    let good = format!("nats://app:{PASSWORD}@127.0.0.1:{}", server.port());
    let bad = format!("nats://app:wrong-cli-pw@127.0.0.1:{}", server.port());
    let run = |url: String| async move {
        let out = tokio::process::Command::new(flame_cli())
            .args(["pools", "--wait", "100ms"])
            .env("NATS_URL", url)
            .env_remove("NATS_USER")
            .env_remove("NATS_PASSWORD")
            .env_remove("NATS_TOKEN")
            .env_remove("NATS_CREDS")
            .env_remove("NATS_NKEY")
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(LONG, out).await.unwrap().unwrap()
    };
    let out = run(good).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no pool answered"), "{stderr}");
    let out = run(bad).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("flame pools with a wrong password in NATS_URL: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("came from the URL"), "{stderr}");
    assert!(!stderr.contains("wrong-cli-pw"), "{stderr}");
}

/// `NATS_URL` with credentials, read by a parent process (the test app),
/// whose runners are copies of it: the pool boots, calls and closes, and
/// nothing the parent or its runners log shows the password.
#[tokio::test]
async fn nats_url_from_the_environment_with_credentials_and_logs_without_them() {
    let server = with_user();
    let url = format!("nats://app:{PASSWORD}@127.0.0.1:{}", server.port());
    let child = tokio::process::Command::new(flame_tests::harness::testapp())
        .arg("close-check")
        .env(flame::env::NATS_URL, &url)
        .env_remove(flame::env::PARENT)
        .env_remove("NATS_USER")
        .env_remove("NATS_PASSWORD")
        .env_remove("NATS_TOKEN")
        .env(flame::env::BUILD_ID, flame_tests::TEST_BUILD)
        .env(
            "RUST_LOG",
            "flame_nats=debug,flame_core=debug,async_nats=debug,warn",
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(LONG, child.wait_with_output())
        .await
        .expect("the test app exits")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("closed"), "{stdout}{stderr}");
    assert!(stderr.contains("connected to NATS"), "{stderr}");
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "{stdout}{stderr}"
    );
}
