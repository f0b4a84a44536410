//! The call path: named and inline calls, casts, a function's own errors
//! carried back, byte vectors, and plain functions that block, against a
//! real nats-server and real runner processes.

use std::time::Duration;

use flame_tests::funcs::*;
use flame_tests::harness::{wait_for, wait_in_flight, TestEnv};

#[tokio::test]
async fn named_call_runs_on_a_runner_process() {
    let env = TestEnv::start().await;
    let pool = env.pool("named").max(1).start().await.unwrap();

    assert_eq!(flame::call!(pool, add(40, 2)).await.unwrap(), 42);
    let out = flame::call!(pool, echo(b"hello".to_vec())).await.unwrap();
    assert_eq!(out, b"hello");
    let at = flame::call!(pool, whereabouts()).await.unwrap();
    assert_ne!(at.pid, std::process::id(), "ran in the test process");
    assert!(!at.runner.is_empty(), "runner did not see FLAME_PARENT");
    // The same through the method form.
    assert_eq!(pool.call::<add>((1, 2)).await.unwrap(), 3);
}

#[tokio::test]
async fn inline_block_ships_listed_captures() {
    let env = TestEnv::start().await;
    let pool = env.pool("inline").max(1).start().await.unwrap();
    let words = vec!["fleeting".to_string(), "lambda".to_string()];
    let (joined, pid) = inline::join_remotely(&pool, words, "+".into())
        .await
        .unwrap();
    assert_eq!(joined, "fleeting+lambda");
    assert_ne!(pid, std::process::id(), "ran in the test process");
    inline::nothing(&pool).await.unwrap();
    assert_eq!(inline::sleep_remotely(&pool, 5).await.unwrap(), 5);
    assert_eq!(inline::at_most_two(&pool, 2).await.unwrap(), Ok(2));
    assert_eq!(
        inline::at_most_two(&pool, 3).await.unwrap(),
        Err("3 is too many".to_string())
    );
}

#[tokio::test]
async fn function_error_is_carried_back_typed() {
    let env = TestEnv::start().await;
    let pool = env.pool("own-error").max(1).start().await.unwrap();
    assert_eq!(
        flame::call!(pool, checked_sqrt(9.0)).await.unwrap(),
        Ok(3.0)
    );
    assert_eq!(
        flame::call!(pool, checked_sqrt(-1.0)).await.unwrap(),
        Err(AppError::Invalid("-1 is negative".into()))
    );
}

#[tokio::test]
async fn cast_runs_without_waiting() {
    let env = TestEnv::start().await;
    let pool = env.pool("cast").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cast-ran");
    let p = path.to_string_lossy().into_owned();
    flame::cast!(pool, write_file(p, "from a cast".into())).unwrap();
    let contents = wait_for("the cast's file", Duration::from_secs(20), || {
        let path = path.clone();
        async move { std::fs::read_to_string(path).ok() }
    })
    .await;
    assert_eq!(contents, "from a cast");

    // Inline cast.
    let path2 = dir.path().join("inline-cast");
    inline::write_later(&pool, path2.to_string_lossy().into_owned()).unwrap();
    wait_for("the inline cast's file", Duration::from_secs(20), || {
        let path2 = path2.clone();
        async move { std::fs::read_to_string(path2).ok() }
    })
    .await;
}

/// `Vec<u8>` arguments and results (alone or in a `Result`) travel as one
/// block of bytes (MessagePack bin), both ways, at any size.
#[tokio::test]
async fn byte_vectors_travel_whole_in_arguments_and_results() {
    let env = TestEnv::start().await;
    let pool = env.pool("bytevecs").max(1).start().await.unwrap();
    let data: Vec<u8> = (0..(512usize << 10)).map(|i| (i * 7 % 251) as u8).collect();
    let back = flame::call!(pool, reversed(data.clone(), 1)).await.unwrap();
    let mut expected = data.clone();
    expected.reverse();
    assert_eq!(back, Ok(expected));
    let empty = flame::call!(pool, reversed(Vec::new(), 2)).await.unwrap();
    assert_eq!(empty, Err("nothing to reverse (tag 2)".to_string()));
    let echoed = flame::call!(pool, echo(data.clone())).await.unwrap();
    assert_eq!(echoed, data);
}

/// `Bytes` arguments and results (alone or in a `Result`) arrive whole,
/// at any size (each a slice of its message, see `crates/flame/tests`).
#[tokio::test]
async fn bytes_travel_whole_in_arguments_and_results() {
    let env = TestEnv::start().await;
    let pool = env.pool("bytes").max(1).start().await.unwrap();
    let data: Vec<u8> = (0..(512usize << 10)).map(|i| (i * 7 % 251) as u8).collect();
    let data = bytes::Bytes::from(data);
    let back = flame::call!(pool, tail(data.clone(), 3)).await.unwrap();
    assert_eq!(back, Ok(data.slice(3..)));
    let empty = flame::call!(pool, tail(data.clone(), data.len()))
        .await
        .unwrap();
    assert_eq!(empty, Ok(bytes::Bytes::new()));
    let past = flame::call!(pool, tail(bytes::Bytes::new(), 1))
        .await
        .unwrap();
    assert_eq!(past, Err("1 is past the end (0)".to_string()));
}

/// A plain function that proved short runs inline on the runner; once it
/// blocks for long, it goes back to the blocking pool, so a long run does
/// not hold up other calls.
#[tokio::test]
async fn a_plain_function_that_starts_blocking_leaves_the_serve_loop() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("naps")
        .max(1)
        .timeout(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    // Short: trusted to run inline.
    for _ in 0..40 {
        assert_eq!(flame::call!(pool, nap(0)).await.unwrap(), 0);
    }
    // Long, inline, three times: back to the pool.
    for _ in 0..3 {
        assert_eq!(flame::call!(pool, nap(20)).await.unwrap(), 20);
    }
    // A long nap now runs on a thread of its own: another call is answered
    // while it sleeps.
    let long = tokio::spawn({
        let pool = pool.clone();
        async move { flame::call!(pool, nap(5_000)).await }
    });
    wait_in_flight(&env, "naps", 1, Duration::from_secs(30)).await;
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    assert!(!long.is_finished(), "the long nap held up the other call");
    assert_eq!(long.await.unwrap().unwrap(), 5_000);
}
