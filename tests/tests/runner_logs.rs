//! Runner logs forwarded to the parent (`PoolBuilder::forward_runner_logs`
//! with `flame::runner_log_layer` in the app's subscriber): a runner's
//! line shows in the parent's subscriber with its pool, runner and level;
//! forged lines are dropped; shared pools refuse the option.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::embedded::NatsServer;
use flame::Error;
use flame_tests::funcs::log_line;
use flame_tests::harness::{builder, round_trip, runner_backend, wait_for};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// An event of target `flame::runner` (or of the parent's log forwarding
/// itself), as the parent's subscriber saw it.
#[derive(Debug, Clone, Default)]
struct Seen {
    level: String,
    pool: String,
    runner: String,
    from: String,
    message: String,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Seen>>>);

impl Visit for Seen {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "pool" => self.pool = value.into(),
            "runner" => self.runner = value.into(),
            "from" => self.from = value.into(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // (`runner = %id` comes here: a Display value's Debug is its Display.)
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            _ => self.record_str(field, &format!("{value:?}")),
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let target = event.metadata().target();
        if target != "flame::runner" && target != "flame_nats::pool::logs" {
            return;
        }
        let mut seen = Seen {
            level: event.metadata().level().to_string(),
            ..Seen::default()
        };
        event.record(&mut seen);
        self.0.lock().unwrap().push(seen);
    }
}

impl Capture {
    fn with(&self, text: &str) -> Option<Seen> {
        let seen = self.0.lock().unwrap();
        seen.iter().find(|s| s.message.contains(text)).cloned()
    }
}

#[tokio::test]
async fn a_runners_log_lines_reach_the_parents_subscriber_and_forged_ones_do_not() {
    let capture = Capture::default();
    tracing_subscriber::registry()
        .with(capture.clone())
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .init();
    let server = NatsServer::start().unwrap();
    let flame = builder().nats_url(server.url()).init().await.unwrap();
    let pool = flame
        .pool("logs")
        .backend(runner_backend())
        .forward_runner_logs(true)
        .max(1)
        .timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let long = Duration::from_secs(30);

    flame::call!(pool, log_line("hello from the runner".to_string()))
        .await
        .unwrap();
    let seen = wait_for("the runner's line in the parent", long, || {
        let seen = capture.with("hello from the runner");
        async move { seen }
    })
    .await;
    let runner = pool.runners().first().map(|r| r.id.clone()).unwrap();
    assert_eq!(seen.level, "WARN", "{seen:?}");
    assert_eq!(seen.pool, "logs", "{seen:?}");
    assert_eq!(seen.runner, runner, "{seen:?}");
    assert_eq!(seen.from, "flame_tests::funcs", "{seen:?}");
    assert!(
        seen.message.ends_with("hello from the runner n=7"),
        "{seen:?}"
    );

    // A batch nobody signed, published before the runner's next line: the
    // parent gets both in that order and logs only the runner's.
    let forged = serde_json::json!({
        "runner": runner,
        "seq": 1000,
        "lines": [{"level": "ERROR", "target": "x", "message": "forged line"}],
    });
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Flame-Proof", "00".repeat(32).as_str());
    client
        .publish_with_headers(
            format!("flame.logs.parent.{}.logs", flame.parent_id()),
            headers,
            forged.to_string().into(),
        )
        .await
        .unwrap();
    // The server has it (and sent it on to the parent) before the runner
    // logs its next line.
    round_trip(&client).await;
    flame::call!(pool, log_line("second line".to_string()))
        .await
        .unwrap();
    wait_for("the runner's second line", long, || {
        let seen = capture.with("second line");
        async move { seen }
    })
    .await;
    assert!(capture.with("forged line").is_none());
    // It did reach the parent, which dropped it.
    wait_for("the parent to drop the forged batch", long, || {
        let seen = capture.with("not signed by the runner");
        async move { seen }
    })
    .await;
    pool.shutdown().await;

    let err = flame
        .pool("logs-shared")
        .shared(true)
        .backend(runner_backend())
        .forward_runner_logs(true)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("private pools only"), "{err}");
}
