//! Call coalescing: calls to one busy runner travel together in one NATS
//! message (and their replies come back together), while each keeps its own
//! deadline, cancellation, error and result.
//!
//! That calls were batched is read from the runner's own stats: `calls`
//! counts every call it answered, the micro service's `num_requests` only
//! the calls that came alone.

use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::funcs::*;
use flame_tests::harness::{kill9, wait_in_flight, TestEnv};
use futures::future::join_all;

const LONG: Duration = Duration::from_secs(60);

/// A server, and a pool `name` of one runner whose calls time out after
/// [`LONG`].
async fn one_runner(name: &str) -> (TestEnv, flame::Pool) {
    let env = TestEnv::start().await;
    let pool = env.pool(name).max(1).timeout(LONG).start().await.unwrap();
    (env, pool)
}

/// Calls answered by the pool's runner (`calls`), and those that came alone
/// (`num_requests`).
async fn counts(env: &TestEnv, pool: &str) -> (u64, u64) {
    let reply = env
        .client()
        .await
        .request(format!("$SRV.STATS.flame-{pool}"), "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let endpoint = &stats["endpoints"][0];
    (
        endpoint["data"]["calls"].as_u64().unwrap(),
        endpoint["num_requests"].as_u64().unwrap(),
    )
}

/// Rounds of `n` concurrent calls of `make(i)` until the runner has taken
/// some of them in batches (or 50 rounds); returns every outcome, in order.
async fn until_batched<T, F, Fut>(env: &TestEnv, pool: &str, n: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut all = Vec::new();
    for _ in 0..50 {
        all.extend(join_all((0..n).map(&make)).await);
        let (calls, alone) = counts(env, pool).await;
        if calls > alone {
            return all;
        }
    }
    panic!("no call was ever batched");
}

/// Warms `pool` up until its calls batch, then starts 64 calls that sleep
/// 30 s and waits until all run on the runner.
async fn long_batched_calls(
    env: &TestEnv,
    pool: &flame::Pool,
    name: &str,
) -> Vec<tokio::task::JoinHandle<Result<u64, Error>>> {
    until_batched(env, name, 64, |i| {
        let pool = pool.clone();
        async move { flame::call!(pool, add(i as i64, 1)).await.unwrap() }
    })
    .await;
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.call_with::<sleep_then_mark>((30_000, String::new()), CallOptions::new())
                    .await
            })
        })
        .collect();
    wait_in_flight(env, name, 64, LONG).await;
    calls
}

#[tokio::test]
async fn batched_calls_each_get_their_own_result_and_error() {
    let (env, pool) = one_runner("coalesce").await;
    // Every seventh item panics on the runner.
    let outcomes = until_batched(&env, "coalesce", 64, |i| {
        let pool = pool.clone();
        async move {
            (
                i as u64,
                flame::call!(pool, square_unless_3_mod_7(i as u64)).await,
            )
        }
    })
    .await;
    for (x, outcome) in outcomes {
        match outcome {
            Ok(y) => assert_eq!((x % 7 != 3, y), (true, x * x)),
            Err(Error::Panicked { message, .. }) => {
                assert_eq!(x % 7, 3, "{message}");
                assert!(message.contains(&format!("{x} is 3 mod 7")), "{message}");
            }
            Err(other) => panic!("{x}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_batched_call_keeps_its_own_deadline_and_is_cancelled_at_it() {
    let (env, pool) = one_runner("coalesce-deadline").await;
    // Every eighth call sleeps 30 s with a 300 ms deadline; the others are
    // quick. They share batches.
    let outcomes = until_batched(&env, "coalesce-deadline", 48, |i| {
        let pool = pool.clone();
        async move {
            let slow = i % 8 == 0;
            let (ms, timeout) = if slow { (30_000, 300) } else { (1, 30_000) };
            let options = CallOptions::new().timeout(Duration::from_millis(timeout));
            let outcome = pool
                .call_with::<sleep_then_mark>((ms, String::new()), options)
                .await;
            (slow, outcome)
        }
    })
    .await;
    for (slow, outcome) in outcomes {
        match (slow, outcome) {
            (false, Ok(1)) => {}
            (true, Err(Error::Timeout { timeout, .. })) => {
                assert_eq!(timeout, Duration::from_millis(300))
            }
            other => panic!("{other:?}"),
        }
    }
    // The runner dropped the slow calls at their deadlines.
    wait_in_flight(&env, "coalesce-deadline", 0, LONG).await;
}

#[tokio::test]
async fn a_dropped_caller_cancels_its_batched_call() {
    let (env, pool) = one_runner("coalesce-cancel").await;
    // 64 long calls at once (batched); all but one are dropped as soon
    // as they run.
    let calls = long_batched_calls(&env, &pool, "coalesce-cancel").await;
    for call in &calls[1..] {
        call.abort();
    }
    // 63 calls cancelled on the runner.
    wait_in_flight(&env, "coalesce-cancel", 1, LONG).await;
    calls[0].abort();
}

#[tokio::test]
async fn a_runner_dying_under_batched_calls_fails_each_of_them_at_once() {
    let (env, pool) = one_runner("coalesce-kill").await;
    let pid = flame::call!(pool, whereabouts()).await.unwrap().pid;
    let calls = long_batched_calls(&env, &pool, "coalesce-kill").await;
    let killed = tokio::time::Instant::now();
    kill9(pid);
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::RunnerDown { .. }), "{err:?}");
    }
    // Long before their 60 s deadline.
    assert!(killed.elapsed() < Duration::from_secs(20));
}

/// A batch a runner cannot read (forged, cut short) is refused on its reply
/// subject, and the runner serves on.
#[tokio::test]
async fn a_malformed_batch_is_refused_and_the_runner_serves_on() {
    let (env, pool) = one_runner("coalesce-bad").await;
    assert_eq!(flame::call!(pool, add(1, 1)).await.unwrap(), 2);
    let runner = pool.runners()[0].id.clone();
    let client = env.client().await;
    for body in [
        &b"\xf2"[..],
        b"\xf2\x02_I\x05\x011\xff",
        b"\xf2\x00\x01\x011\x01\xf1junk",
    ] {
        let reply = client
            .request(
                format!("flame.coalesce-bad.runner.{runner}"),
                body.to_vec().into(),
            )
            .await
            .unwrap();
        let headers = reply.headers.expect("an error reply");
        let kind = headers.get("Flame-Error").map(|v| v.to_string());
        assert_eq!(kind.as_deref(), Some("malformed"), "{body:?}");
    }
    assert_eq!(flame::call!(pool, add(2, 2)).await.unwrap(), 4);
}
