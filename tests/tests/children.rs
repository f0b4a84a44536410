//! Children placed on runners (the reference's place_child): messages both
//! ways, requests, slot holding, links, and how children end.

use std::time::Duration;

use flame::{ChildExit, ChildOptions, Error};
use flame_tests::funcs::children::*;
use flame_tests::harness::{file_exists, kill9, path_in, process_alive, wait_for, TestEnv};
use futures::StreamExt;

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_child_talks_both_ways_answers_requests_and_finishes() {
    let env = TestEnv::start().await;
    let pool = env.pool("counter").max(1).start().await.unwrap();
    let (to_child, inbox) = flame::channel::<CounterMsg>();
    let (events, mut from_child) = flame::channel::<String>();
    let child = flame::place_child!(pool, counter(inbox, events, 10)).unwrap();

    to_child.send(CounterMsg::Add(5)).await.unwrap();
    to_child.send(CounterMsg::Add(7)).await.unwrap();
    assert_eq!(
        from_child.next().await.unwrap().unwrap(),
        "added 5, total 15"
    );
    assert_eq!(
        from_child.next().await.unwrap().unwrap(),
        "added 7, total 22"
    );

    // A request: the reply channel travels inside the message.
    let (reply, mut answer) = flame::channel::<u64>();
    to_child.send(CounterMsg::Get(reply)).await.unwrap();
    assert_eq!(answer.next().await.unwrap().unwrap(), 22);

    to_child.send(CounterMsg::Stop).await.unwrap();
    match tokio::time::timeout(LONG, child.exit()).await.unwrap() {
        ChildExit::Finished(total) => assert_eq!(total, 22),
        other => panic!("expected Finished, got {other:?}"),
    }
}

/// Checklist item 9 and 10: a child holds its slot and keeps its runner up
/// while it lives; the runner idles down after it is stopped.
#[tokio::test]
async fn a_child_holds_its_slot_and_keeps_its_runner_up_until_stopped() {
    let env = TestEnv::start().await;
    let pool = env
        .pool("holder")
        .max(1)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = path_in(&dir, "stopped");
    let (ticks, mut from_child) = flame::channel::<u32>();
    let child = flame::place_child!(pool, ticker(ticks, marker.clone())).unwrap();
    let pid = from_child.next().await.unwrap().unwrap();
    // Its slot is taken: a call has nowhere to run (max 1, one call each).
    let call = pool
        .call_with::<flame_tests::funcs::whereabouts>(
            (),
            flame::CallOptions::new().timeout(Duration::from_secs(1)),
        )
        .await;
    assert!(matches!(call, Err(Error::Timeout { .. })), "{call:?}");
    // Well past idle_shutdown_after, the runner is still up.
    assert!(process_alive(pid), "the runner idled down under its child");
    assert_eq!(pool.status().ready, 1);

    assert!(matches!(child.stop().await, ChildExit::Stopped));
    wait_for("the child to be cancelled on the runner", LONG, || {
        file_exists(&marker)
    })
    .await;
    // The ticks it sent wait unread (at most 16), which keeps their stream,
    // and so the runner, busy: read to the channel's end, they let it go.
    tokio::time::timeout(LONG, async { while from_child.next().await.is_some() {} })
        .await
        .expect("the channel ends after its last tick");
    wait_for("the runner to idle down after its child", LONG, || async {
        (!process_alive(pid)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_linked_child_stops_with_its_handle_and_an_unlinked_one_runs_on() {
    let env = TestEnv::start().await;
    let pool = env.pool("links").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let linked_marker = path_in(&dir, "linked");
    let (ticks, mut linked_ticks) = flame::channel::<u32>();
    let linked = flame::place_child!(pool, ticker(ticks, linked_marker.clone())).unwrap();
    linked_ticks.next().await.unwrap().unwrap();
    drop(linked);
    wait_for("the linked child to stop", LONG, || {
        file_exists(&linked_marker)
    })
    .await;

    let unlinked_marker = path_in(&dir, "unlinked");
    let (ticks, mut unlinked_ticks) = flame::channel::<u32>();
    let unlinked = pool
        .place_child_with::<ticker>(
            (ticks, unlinked_marker.clone()),
            ChildOptions::new().link(false),
        )
        .unwrap();
    unlinked_ticks.next().await.unwrap().unwrap();
    drop(unlinked);
    // It goes on ticking after its handle is gone.
    let first = unlinked_ticks.next().await.unwrap().unwrap();
    for expected in first + 1..first + 5 {
        assert_eq!(unlinked_ticks.next().await.unwrap().unwrap(), expected);
    }
    assert!(
        file_exists(&unlinked_marker).await.is_none(),
        "the unlinked child was stopped"
    );
    // It ends when its receiver goes.
    drop(unlinked_ticks);
    wait_for("the unlinked child to end", LONG, || {
        file_exists(&unlinked_marker)
    })
    .await;
}

#[tokio::test]
async fn the_caller_learns_how_a_child_ended() {
    let env = TestEnv::start().await;
    let pool = env.pool("endings").max(1).start().await.unwrap();

    let child = flame::place_child!(pool, breaks_down()).unwrap();
    match tokio::time::timeout(LONG, child.exit()).await.unwrap() {
        ChildExit::Failed(Error::Panicked { message, .. }) => {
            assert!(message.contains("the child broke down"), "{message}")
        }
        other => panic!("expected a panic, got {other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let (ticks, mut from_child) = flame::channel::<u32>();
    let child = flame::place_child!(pool, ticker(ticks, path_in(&dir, "m"))).unwrap();
    let pid = from_child.next().await.unwrap().unwrap();
    kill9(pid);
    match tokio::time::timeout(LONG, child.exit()).await.unwrap() {
        ChildExit::RunnerDown(_) => {}
        other => panic!("expected RunnerDown, got {other:?}"),
    }
}

/// Issue 17: when the local backend sees a runner exit, a channel from a
/// child on it ends at once with `RunnerDown`, not after the keepalive's
/// 5 s of silence.
#[tokio::test]
async fn a_dead_runners_channels_end_at_once_with_runner_down() {
    let env = TestEnv::start().await;
    let pool = env.pool("deadchannels").max(1).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ticks, mut from_child) = flame::channel::<u32>();
    let _child = flame::place_child!(pool, ticker(ticks, path_in(&dir, "m"))).unwrap();
    let pid = from_child.next().await.unwrap().unwrap();
    kill9(pid);
    let killed = std::time::Instant::now();
    let last = loop {
        match tokio::time::timeout(LONG, from_child.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the channel did not end within {LONG:?}"),
        }
    };
    let took = killed.elapsed();
    eprintln!("the channel ended {took:?} after the kill: {last:?}");
    assert!(
        matches!(last, Some(Err(Error::RunnerDown { .. }))),
        "{last:?}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

/// Issue 17: `Sender::fail` reaches the reader with its message said once.
#[tokio::test]
async fn a_failed_sender_says_why_once() {
    let env = TestEnv::start().await;
    let pool = env.pool("givesup").max(1).start().await.unwrap();
    let (events, mut from_child) = flame::channel::<String>();
    let child = flame::place_child!(pool, gives_up(events)).unwrap();
    let got = tokio::time::timeout(LONG, from_child.next()).await.unwrap();
    match got {
        Some(Err(e)) => assert_eq!(e.to_string(), "stream ended with an error: child gave up"),
        other => panic!("expected the child's error, got {other:?}"),
    }
    assert!(matches!(child.exit().await, ChildExit::Finished(0)));
}

/// Sends on `tx` until one send waits for a second; how many completed.
async fn sends_before_one_waits(tx: &flame::Sender<u32>) -> u32 {
    let mut sent = 0;
    while sent < 1000 {
        match tokio::time::timeout(Duration::from_secs(1), tx.send(sent)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => panic!("send failed: {e}"),
            Err(_) => break,
        }
    }
    sent
}

/// Issue 17: at most 16 messages wait in a channel, as the README says,
/// wherever its ends are: here, sent to a runner, or sent from one.
#[tokio::test]
async fn at_most_16_messages_wait_in_a_channel() {
    // Both ends here.
    let (tx, _rx) = flame::channel::<u32>();
    assert_eq!(sends_before_one_waits(&tx).await, 16, "a local channel");

    let env = TestEnv::start().await;
    let pool = env
        .pool("bound")
        .max(1)
        .max_concurrency(4)
        .start()
        .await
        .unwrap();
    // The reading end on a runner that does not read.
    let (tx, inbox) = flame::channel::<u32>();
    let child = flame::place_child!(pool, never_reads(inbox, 60_000)).unwrap();
    let to_runner = sends_before_one_waits(&tx).await;
    drop(child);
    // The sending end on a runner, the reading end here, unread.
    let (out, _unread) = flame::channel::<u32>();
    let from_runner = flame::call!(pool, floods(out, 1000)).await.unwrap();
    eprintln!("sends before one waited: to a runner {to_runner}, from a runner {from_runner}");
    assert_eq!(to_runner, 16, "sends to a runner that does not read");
    assert_eq!(
        from_runner, 16,
        "sends from a runner to a parent that does not read"
    );
}
