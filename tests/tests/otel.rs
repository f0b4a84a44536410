//! OpenTelemetry export (feature `otel`): the spans of a call, from the
//! parent and from the runner process, reach an OTLP/HTTP collector as one
//! trace that continues the caller's own span.
//!
//! The collector is a small HTTP server here that takes OTLP/JSON
//! (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`), so the test reads what a real
//! collector would receive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use flame::embedded::NatsServer;
use flame_tests::funcs::add;
use flame_tests::harness::{builder, runner_backend, wait_for};
use serde_json::Value;
use tracing::Instrument;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// The resource's attributes, `key=value`.
    resource: Vec<String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

impl Collector {
    /// Serves `POST /v1/traces` on a free port; returns its base URL.
    async fn start(&self) -> String {
        let seen = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let seen = seen.clone();
                async move {
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        seen.take(&v);
                    }
                    ([("content-type", "application/json")], "{}")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn take(&self, export: &Value) {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        for rs in export["resourceSpans"].as_array().into_iter().flatten() {
            let resource: Vec<String> = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|kv| format!("{}={}", text(&kv["key"]), text(&kv["value"]["stringValue"])))
                .collect();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    self.0.lock().unwrap().push(Received {
                        name: text(&span["name"]),
                        trace_id: text(&span["traceId"]),
                        span_id: text(&span["spanId"]),
                        parent_span_id: text(&span["parentSpanId"]),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }

    fn named(&self, name: &str) -> Option<Received> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }
}

#[tokio::test]
async fn a_calls_spans_reach_an_otlp_collector_as_one_trace_with_the_callers_span() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let collector = Collector::default();
    let url = collector.start().await;
    // Read by the exporter here and, through the environment the local
    // backend passes on, in the runner (the only test of this binary).
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &url);
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json");
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let (otel, guard) = flame::otel::layer().unwrap();
    tracing_subscriber::registry()
        .with(otel)
        .with(tracing_subscriber::EnvFilter::new(
            "otel=info,flame_nats=info,warn",
        ))
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .init();

    let server = NatsServer::start().unwrap();
    let flame = builder().nats_url(server.url()).init().await.unwrap();
    let pool = flame
        .pool("otel")
        .backend(runner_backend())
        .max(1)
        .timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let request = tracing::info_span!("http.request");
    let sum = async { flame::call!(pool, add(1, 2)).await }
        .instrument(request)
        .await
        .unwrap();
    assert_eq!(sum, 3);

    let long = Duration::from_secs(30);
    let (req, call, run) = wait_for("the three spans at the collector", long, || {
        let found = (
            collector.named("http.request"),
            collector.named("flame.call"),
            collector.named("flame.run"),
        );
        async move {
            match found {
                (Some(a), Some(b), Some(c)) => Some((a, b, c)),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(req.trace_id.len(), 32, "{req:?}");
    assert_eq!(call.trace_id, req.trace_id, "{call:?} {req:?}");
    assert_eq!(run.trace_id, req.trace_id, "{run:?} {req:?}");
    assert_eq!(call.parent_span_id, req.span_id, "{call:?} {req:?}");
    assert_eq!(run.parent_span_id, call.span_id, "{run:?} {call:?}");
    assert!(
        call.resource.contains(&"flame.role=parent".to_string()),
        "{call:?}"
    );
    assert!(
        run.resource.contains(&"flame.role=runner".to_string()),
        "{run:?}"
    );
    assert!(
        run.resource.contains(&"flame.pool=otel".to_string()),
        "{run:?}"
    );
    pool.shutdown().await;
    drop(guard);
}
