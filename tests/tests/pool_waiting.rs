//! Callers waiting for a slot: at `max` a caller waits until its deadline,
//! queued callers are served first come first served, and a call never
//! takes longer than its timeout in total.

use std::time::Duration;

use flame::{CallOptions, Error};
use flame_tests::funcs::*;
use flame_tests::harness::{path_in, wait_for, wait_in_flight, TestEnv};

const LONG: Duration = Duration::from_secs(60);

/// Takes the only slot of a pool (max 1, max_concurrency 1) with a call
/// that runs until the returned file is written.
async fn hold_the_only_slot(
    env: &TestEnv,
    pool: &flame::Pool,
    dir: &tempfile::TempDir,
) -> (tokio::task::JoinHandle<Result<bool, Error>>, String) {
    let release = path_in(dir, "release");
    let holder = tokio::spawn({
        let pool = pool.clone();
        let release = release.clone();
        async move {
            pool.call_with::<wait_for_file>((release, 60_000), CallOptions::new().timeout(LONG))
                .await
        }
    });
    let name = pool.config().name.clone();
    wait_in_flight(env, &name, 1, LONG).await;
    (holder, release)
}

#[tokio::test]
async fn at_max_a_caller_waits_until_its_deadline() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("full")
        .max(1)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let busy = tokio::spawn({
        let pool = pool.clone();
        async move { pool.call::<sleep_then_mark>((3_000, String::new())).await }
    });
    wait_in_flight(&env, "full", 1, Duration::from_secs(20)).await;
    let err = pool
        .call_with::<add>(
            (1, 1),
            CallOptions::new().timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { timeout, .. } if timeout == Duration::from_millis(200)),
        "{err:?}"
    );
    assert_eq!(
        pool.status().waiting,
        0,
        "the timed-out caller left the queue"
    );
    assert_eq!(
        pool.status().ready + pool.status().booting,
        1,
        "no runner beyond max"
    );
    assert_eq!(busy.await.unwrap().unwrap(), 3_000);
}

#[tokio::test]
async fn queued_callers_are_served_in_fifo_order() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("fifo")
        .max(1)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (holder, release) = hold_the_only_slot(&env, &pool, &dir).await;
    // Queue five callers, one after the other.
    let mut queued = Vec::new();
    for i in 0..5 {
        let pool2 = pool.clone();
        queued.push(tokio::spawn(async move {
            pool2
                .call_with::<next_seq>((), CallOptions::new().timeout(LONG))
                .await
        }));
        wait_for("the caller to queue", LONG, || async {
            (pool.status().waiting == i + 1).then_some(())
        })
        .await;
    }
    std::fs::write(&release, "").unwrap();
    assert!(holder.await.unwrap().unwrap());
    let mut seqs = Vec::new();
    for q in queued {
        seqs.push(q.await.unwrap().unwrap());
    }
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "served out of order");
}

#[tokio::test]
async fn a_call_never_takes_longer_than_its_timeout_in_total() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("budget")
        .max(1)
        .max_concurrency(1)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (holder, release) = hold_the_only_slot(&env, &pool, &dir).await;
    // This call may take 2 s in all. It waits for the slot about 1.2 s and
    // then needs 1.5 s of work: 2.7 s. The reference would let it run to the
    // end (its timeout only starts once a runner is found); flame stops it
    // at 2 s.
    let timeout = Duration::from_secs(2);
    let started = tokio::time::Instant::now();
    let late = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.call_with::<sleep_then_mark>(
                (1_500, String::new()),
                CallOptions::new().timeout(timeout),
            )
            .await
        }
    });
    wait_for("the caller to queue", LONG, || async {
        (pool.status().waiting == 1).then_some(())
    })
    .await;
    tokio::time::sleep_until(started + Duration::from_millis(1_200)).await;
    std::fs::write(&release, "").unwrap();
    let err = late.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Timeout { timeout: t, .. } if t == timeout),
        "{err:?}"
    );
    assert!(holder.await.unwrap().unwrap());
}
