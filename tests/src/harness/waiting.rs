//! Waiting for things with a deadline (never sleeping to assert): a
//! condition, a file a remote call writes, calls in flight, an error.

use std::future::Future;
use std::time::Duration;

use super::{runner_stats, TestEnv};

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
