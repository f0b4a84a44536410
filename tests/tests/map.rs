//! `Pool::map` and `Pool::map_unordered`: ordering, errors per item,
//! bounded work in flight, and cancellation when the stream is dropped.

use std::time::Duration;

use flame_tests::funcs::{counted_sleep, mark_then_sleep, square_unless_3_mod_7};
use flame_tests::harness::{file_exists, path_in, wait_for, wait_in_flight, TestEnv};
use futures::StreamExt;

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn map_keeps_the_order_of_the_items_and_fails_items_alone() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("mapped")
        .max(2)
        .max_concurrency(8)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    let results: Vec<_> = pool
        .map::<square_unless_3_mod_7, _>((0..200u64).map(|x| (x,)), 16)
        .collect()
        .await;
    assert_eq!(results.len(), 200);
    for (x, result) in results.iter().enumerate() {
        let x = x as u64;
        match result {
            Ok(square) => {
                assert_ne!(x % 7, 3);
                assert_eq!(*square, x * x);
            }
            Err(e) => {
                assert_eq!(x % 7, 3, "{e}");
                assert_eq!(e.kind(), flame::ErrorKind::Panicked);
            }
        }
    }
}

#[tokio::test]
async fn map_never_has_more_than_in_flight_calls_under_way() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("bounded")
        .max(1)
        .max_concurrency(50)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    let peaks: Vec<_> = pool
        .map::<counted_sleep, _>((0..30).map(|_| (30u64,)), 3)
        .map(|r| r.unwrap().peak)
        .collect()
        .await;
    // Counted on the runner: three at once at most, and more than one.
    let peak = peaks.into_iter().max().unwrap();
    assert!((2..=3).contains(&peak), "peak {peak}");
}

#[tokio::test]
async fn map_unordered_yields_results_as_calls_finish() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("unordered")
        .max(1)
        .max_concurrency(10)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    // The first item takes far longer than the others.
    let sleeps = [3_000u64, 10, 10, 10];
    let order: Vec<usize> = pool
        .map_unordered::<counted_sleep, _>(sleeps.map(|ms| (ms,)), 4)
        .map(|(i, r)| {
            r.unwrap();
            i
        })
        .collect()
        .await;
    assert_eq!(order.len(), 4);
    assert_eq!(*order.last().unwrap(), 0, "{order:?}");
}

#[tokio::test]
async fn dropping_a_map_cancels_its_calls_and_starts_no_more() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("dropmap")
        .max(1)
        .max_concurrency(10)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marks: Vec<String> = (0..5).map(|i| path_in(&dir, &format!("m{i}"))).collect();
    let items = marks.clone().into_iter().map(|p| (p, 60_000u64));
    let mut stream = Box::pin(pool.map::<mark_then_sleep, _>(items, 2));
    // Poll it until the first two calls run on the runner.
    let first = tokio::spawn(async move {
        let _ = stream.next().await;
        stream
    });
    for m in &marks[..2] {
        wait_for("a mapped call to start", LONG, || file_exists(m)).await;
    }
    wait_in_flight(&env, "dropmap", 2, LONG).await;
    first.abort();
    let _ = first.await;
    // Both calls were cancelled on the runner...
    wait_in_flight(&env, "dropmap", 0, LONG).await;
    // ... and no third one started.
    for m in &marks[2..] {
        assert!(file_exists(m).await.is_none(), "{m} started");
    }
}
