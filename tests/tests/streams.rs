//! Streams as arguments and results: both directions, errors, cancellation
//! and a dead runner, with real runners over a real nats-server.

use std::time::Duration;

use bytes::Bytes;
use flame::{Error, Stream};
use flame_tests::funcs::streams::*;
use flame_tests::harness::{file_exists, kill9, path_in, wait_for, TestEnv};
use futures::StreamExt;

const LONG: Duration = Duration::from_secs(30);

fn chunks(count: usize, size: usize) -> Vec<Bytes> {
    (0..count)
        .map(|i| Bytes::from(vec![(i % 251) as u8; size]))
        .collect()
}

fn sum(chunks: &[Bytes]) -> u64 {
    chunks
        .iter()
        .flat_map(|c| c.iter())
        .fold(0u64, |s, b| s.wrapping_add(*b as u64))
}

async fn pool(env: &TestEnv, name: &str) -> flame::Pool {
    env.pool(name).max(1).timeout(LONG).start().await.unwrap()
}

#[tokio::test]
async fn a_parent_streams_bytes_to_a_runner() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "upload").await;
    // 32 MiB in 128 KiB chunks: far past max_payload (1 MiB).
    let data = chunks(256, 128 * 1024);
    let expected = (32 * 1024 * 1024, sum(&data));
    let stream = Stream::new(futures::stream::iter(data));
    let got = flame::call!(pool, count_bytes(stream))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, expected);

    // From a file, through an AsyncRead.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("video.bin");
    let file_data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 256) as u8).collect();
    std::fs::write(&path, &file_data).unwrap();
    let file = tokio::fs::File::open(&path).await.unwrap();
    let got = flame::call!(pool, count_bytes(Stream::from_reader(file)))
        .await
        .unwrap()
        .unwrap();
    let file_sum = file_data
        .iter()
        .fold(0u64, |s, b| s.wrapping_add(*b as u64));
    assert_eq!(got, (3_000_000, file_sum));
}

/// A remote function reads a stream as an `AsyncRead` and returns io
/// errors with `?`: they reach the caller with their message and kind.
#[tokio::test]
async fn a_stream_is_read_as_an_async_read_and_io_errors_come_back_typed() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "save-to").await;
    let dir = tempfile::tempdir().unwrap();
    let data = chunks(24, 100_000);
    let total = sum(&data);
    let stream = Stream::new(futures::stream::iter(data));
    let dir_name = dir.path().to_string_lossy().into_owned();
    let size = flame::call!(pool, save_to(stream, dir_name, "out.bin".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(size, 2_400_000);
    let written = std::fs::read(dir.path().join("out.bin")).unwrap();
    let written_sum = written.iter().fold(0u64, |s, b| s.wrapping_add(*b as u64));
    assert_eq!((written.len(), written_sum), (2_400_000, total));

    // A directory that is not there: the runner's io::Error, typed.
    let stream = Stream::new(futures::stream::iter(chunks(1, 10)));
    let missing = dir.path().join("missing").to_string_lossy().into_owned();
    let error = flame::call!(pool, save_to(stream, missing, "out.bin".into()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error.io_kind(),
        Some(std::io::ErrorKind::NotFound),
        "{error:?}"
    );
    assert!(error.message().contains("No such file"), "{error:?}");
    let boxed: Box<dyn std::error::Error + Send + Sync> = error.into();
    assert!(boxed.to_string().contains("No such file"));
}

#[tokio::test]
async fn a_runner_streams_results_back_as_they_are_made() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "results").await;
    let numbers: Vec<u32> = flame::call!(pool, numbers(5000))
        .await
        .unwrap()
        .map(|n| n.unwrap())
        .collect()
        .await;
    assert_eq!(numbers, (1..=5000).collect::<Vec<_>>());

    // Both ways in one call.
    let input = Stream::new(futures::stream::iter(vec![
        Bytes::from_static(b"thumb"),
        Bytes::from_static(b"nails"),
    ]));
    let output: Vec<Bytes> = flame::call!(pool, upper(input))
        .await
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
        .await;
    assert_eq!(
        output,
        vec![Bytes::from_static(b"THUMB"), Bytes::from_static(b"NAILS")]
    );
}

#[tokio::test]
async fn an_error_on_either_side_ends_the_stream_with_it() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "errors").await;
    // The runner's stream fails after 4 items.
    let items: Vec<Result<u32, Error>> = flame::call!(pool, numbers_then_error(4))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 5, "{items:?}");
    assert!(items[..4].iter().all(|i| i.is_ok()));
    assert!(
        matches!(&items[4], Err(Error::Stream(m)) if m.contains("gave up after 4")),
        "{items:?}"
    );
    // The parent's stream fails: the runner sees the parent's error.
    let failing = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"abc")),
        Err("the upload was interrupted"),
    ]);
    let got = flame::call!(pool, count_bytes(Stream::try_new(failing)))
        .await
        .unwrap();
    assert!(
        matches!(&got, Err(m) if m.contains("the upload was interrupted")),
        "{got:?}"
    );
    // An item larger than the server takes is refused with a hint.
    let items: Vec<Result<Bytes, Error>> = flame::call!(pool, one_big_item(2 * 1024 * 1024))
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        matches!(&items[..], [Err(Error::Stream(m))] if m.contains("max_payload") && m.contains("smaller")),
        "{items:?}"
    );
}

#[tokio::test]
async fn dropping_a_result_stream_stops_it_on_the_runner() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "cancel").await;
    let dir = tempfile::tempdir().unwrap();
    let marker = path_in(&dir, "dropped");
    let mut stream = flame::call!(pool, endless(marker.clone())).await.unwrap();
    for expected in 0..3u64 {
        assert_eq!(stream.next().await.unwrap().unwrap(), expected);
    }
    drop(stream);
    wait_for("the runner to drop the stream", LONG, || {
        file_exists(&marker)
    })
    .await;
}

#[tokio::test]
async fn a_runner_dying_mid_stream_ends_it_with_an_error() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "diestream").await;
    let stream = flame::call!(pool, numbers_then_die(3)).await.unwrap();
    let items: Vec<Result<u32, Error>> = tokio::time::timeout(LONG, stream.collect())
        .await
        .expect("the stream ends, not hangs");
    assert!(items.len() <= 4, "{items:?}");
    assert!(
        matches!(items.last(), Some(Err(Error::RunnerDown { .. }))),
        "{items:?}"
    );
}

/// Checklist item 10: a stream returned by a call holds the call's slot
/// until it ends, on the runner and in the parent.
#[tokio::test]
async fn a_result_stream_holds_its_slot_until_it_ends() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("holdslot")
        .max(1)
        .max_concurrency(1)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = path_in(&dir, "dropped");
    let mut stream = flame::call!(pool, endless(marker.clone())).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), 0);
    // The only slot is the stream's: a call cannot be placed.
    let short = flame::CallOptions::new().timeout(Duration::from_secs(1));
    let call = pool.call_with::<numbers>((3,), short).await;
    assert!(matches!(call, Err(Error::Timeout { .. })), "{call:?}");
    // Released with the stream.
    drop(stream);
    wait_for("the runner to drop the stream", LONG, || {
        file_exists(&marker)
    })
    .await;
    let items: Vec<u32> = flame::call!(pool, numbers(3))
        .await
        .unwrap()
        .map(|n| n.unwrap())
        .collect()
        .await;
    assert_eq!(items, vec![1, 2, 3]);
}

/// A runner that stops reading an argument stream stops its sender in the
/// parent.
#[tokio::test]
async fn a_runner_that_stops_reading_stops_the_parents_stream() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct OnDrop(Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let env = TestEnv::start().await;
    let pool = pool(&env, "stopreading").await;
    let dropped = Arc::new(AtomicBool::new(false));
    let guard = OnDrop(dropped.clone());
    let endless = futures::stream::repeat(Bytes::from_static(b"frame")).map(move |chunk| {
        let _ = &guard;
        chunk
    });
    let n = flame::call!(pool, read_two(Stream::new(endless)))
        .await
        .unwrap();
    assert_eq!(n, 10);
    wait_for("the parent's stream to be stopped", LONG, || {
        let dropped = dropped.clone();
        async move { dropped.load(Ordering::SeqCst).then_some(()) }
    })
    .await;
}

/// A remote function reports progress on a `Sender` it was given; the
/// caller sees the reports while the call still runs.
#[tokio::test]
async fn a_call_reports_progress_while_it_runs() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "progress").await;
    let (progress, mut reports) = flame::channel::<String>();
    let call = flame::call!(pool, with_progress(3, 300, progress));
    tokio::pin!(call);
    let mut seen = Vec::new();
    let result = loop {
        tokio::select! {
            report = reports.next() => match report {
                Some(report) => seen.push(report.expect("no error")),
                // The stream's end (the function returned and dropped its
                // sender) may come before the call's result.
                None => break call.await,
            },
            result = &mut call => break result,
        }
    };
    // Steps 1 and 2 were reported a step (300 ms) before the call ended;
    // the last report may come just after the result.
    assert!(seen.len() >= 2, "{seen:?}");
    assert_eq!(result.unwrap(), 3);
    while let Some(report) = reports.next().await {
        seen.push(report.expect("no error"));
    }
    assert_eq!(seen, ["step 1 of 3", "step 2 of 3", "step 3 of 3"]);
}

/// Issue 17: when the local backend sees a runner exit, its result stream
/// ends at once with `RunnerDown`, as its calls do, not after the
/// keepalive's 5 s of silence.
#[tokio::test]
async fn a_dead_runners_result_stream_ends_at_once_with_runner_down() {
    let env = TestEnv::start().await;
    let pool = pool(&env, "deadresult").await;
    let stream = flame::call!(pool, numbers_then_die(3)).await.unwrap();
    let returned = std::time::Instant::now();
    let items: Vec<Result<u32, Error>> = tokio::time::timeout(LONG, stream.collect())
        .await
        .expect("the stream ends, not hangs");
    let took = returned.elapsed();
    eprintln!(
        "the result stream ended {took:?} after the call returned: {:?}",
        items.last()
    );
    assert!(
        matches!(items.last(), Some(Err(Error::RunnerDown { .. }))),
        "{items:?}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

/// Issue 17: the parent's stream feeding a call that failed (its runner
/// died) is dropped at once, and a channel from that call ends at once.
#[tokio::test]
async fn a_failed_calls_argument_stream_is_dropped_at_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct OnDrop(Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let env = TestEnv::start().await;
    let pool = pool(&env, "deadfeed").await;
    let dropped = Arc::new(AtomicBool::new(false));
    let guard = OnDrop(dropped.clone());
    let endless = futures::stream::repeat(Bytes::from_static(b"frame")).map(move |chunk| {
        let _ = &guard;
        chunk
    });
    let (pid, mut pids) = flame::channel::<u32>();
    let call = tokio::spawn({
        let pool = pool.clone();
        async move { flame::call!(pool, hold_stream(Stream::new(endless), pid)).await }
    });
    let runner = pids.next().await.unwrap().unwrap();
    kill9(runner);
    let killed = std::time::Instant::now();
    let result = tokio::time::timeout(LONG, call).await.unwrap().unwrap();
    assert!(
        matches!(result, Err(Error::RunnerDown { .. })),
        "{result:?}"
    );
    wait_for("the argument stream to be dropped", LONG, || {
        let dropped = dropped.clone();
        async move { dropped.load(Ordering::SeqCst).then_some(()) }
    })
    .await;
    let took = killed.elapsed();
    let ended = tokio::time::timeout(LONG, pids.next()).await.unwrap();
    let ended_after = killed.elapsed();
    eprintln!("after the kill: argument stream dropped after {took:?}, channel ended after {ended_after:?} with {ended:?}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(
        matches!(ended, Some(Err(Error::RunnerDown { .. }))),
        "{ended:?}"
    );
    assert!(
        ended_after < Duration::from_millis(1500),
        "took {ended_after:?}"
    );
}

/// Issue 17: a call's timeout bounds the call until its result arrives; a
/// stream in the result flows on past it for as long as it is read (the
/// README says so).
#[tokio::test]
async fn a_result_stream_flows_past_the_calls_timeout() {
    let env = TestEnv::start().await;
    let pool = env.pool("pasttimeout").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(700);
    let started = std::time::Instant::now();
    let options = flame::CallOptions::new().timeout(timeout);
    let mut stream = pool
        .call_with::<endless>((path_in(&dir, "m"),), options)
        .await
        .unwrap();
    let mut last = 0;
    while started.elapsed() < timeout * 3 {
        last = stream.next().await.unwrap().expect("still flowing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(last > 0);
    assert_eq!(stream.next().await.unwrap().unwrap(), last + 1);
}
