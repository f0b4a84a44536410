//! Traces across the hop: a call's `flame.call` span in the parent and the
//! `flame.run` span of its work in the runner process share the trace id,
//! and the runner's span names the caller's span as its parent (W3C
//! `traceparent` in the request).

use std::time::Duration;

use flame::embedded::NatsServer;
use flame_tests::funcs::{add, echo, explode};
use flame_tests::harness::{builder, init_tracing_with_spans, runner_backend, wait_for};
use flame_tests::spans::{CapturedSpan, SpanLog, SPAN_LOG_ENV};

const LONG: Duration = Duration::from_secs(30);

/// The parent's `flame.call` spans of pool `pool`.
fn calls_of(log: &SpanLog, pool: &str) -> Vec<CapturedSpan> {
    log.named("flame.call")
        .into_iter()
        .filter(|s| s.field("pool") == Some(pool))
        .collect()
}

#[tokio::test]
async fn a_runners_span_is_a_child_of_the_callers_span() {
    let log = init_tracing_with_spans();
    let server = NatsServer::start().unwrap();
    let flame = builder().nats_url(server.url()).init().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runner-spans.jsonl");
    let pool = flame
        .pool("traced")
        .max(1)
        .timeout(LONG)
        .backend(runner_backend().env(SPAN_LOG_ENV, path.to_string_lossy()))
        .start()
        .await
        .unwrap();
    // A plain function (run on a blocking thread), an async one, and one
    // that fails.
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
    assert_eq!(
        flame::call!(pool, echo(vec![1, 2])).await.unwrap(),
        vec![1, 2]
    );
    let err = flame::call!(pool, explode("boom".to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), flame::ErrorKind::Panicked);

    let calls = wait_for("the parent's three call spans", LONG, || async {
        let calls = calls_of(&log, "traced");
        (calls.len() == 3).then_some(calls)
    })
    .await;
    let runs = wait_for("the runner's three run spans", LONG, || async {
        let runs = SpanLog::read_file(&path, "flame.run");
        (runs.len() >= 3).then_some(runs)
    })
    .await;
    for call in &calls {
        let trace = call.field("trace_id").expect("a trace id");
        assert_eq!(trace.len(), 32, "{call:?}");
        let run = runs
            .iter()
            .find(|r| r.field("trace_id") == Some(trace))
            .unwrap_or_else(|| panic!("no runner span of trace {trace}: {runs:?}"));
        assert_eq!(
            run.field("parent_span_id"),
            call.field("span_id"),
            "{run:?}"
        );
        assert_ne!(run.field("span_id"), call.field("span_id"));
        assert_eq!(run.field("function"), call.field("function"));
        assert_eq!(run.field("runner"), call.field("runner"), "{call:?}");
        assert_eq!(run.field("pool"), Some("traced"));
        assert_eq!(run.field("outcome"), call.field("outcome"));
        assert!(call.field("wait_ms").is_some() && call.field("run_ms").is_some());
        // No parent of its own: each call starts a trace.
        assert_eq!(call.field("parent_span_id"), None);
    }
    let outcomes: Vec<_> = calls.iter().filter_map(|c| c.field("outcome")).collect();
    assert_eq!(outcomes, ["ok", "ok", "panicked"]);
    let traces: std::collections::HashSet<_> =
        calls.iter().filter_map(|c| c.field("trace_id")).collect();
    assert_eq!(traces.len(), 3, "each call has its own trace");
    pool.shutdown().await;
}
