//! Tracing for tests: log lines to the test's output, or spans to a log
//! the test reads.

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "flame_nats=debug,flame_core=debug,warn".into())
}

/// Logs to the test output (shown for failing tests), once per process.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_test_writer()
        .try_init();
}

/// Logs to stderr: for the test app, whose stdout tests may read. Closed
/// spans also go to the file `FLAME_TEST_SPAN_LOG` names, if set.
pub fn init_tracing_stderr() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Spans go over OTLP too when a collector is named (tests/tests/otel.rs).
    let otel = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").map(|_| {
        let (layer, guard) = flame::otel::layer().expect("OpenTelemetry export");
        // Runners end with `exit`; flame flushes the spans before it.
        std::mem::forget(guard);
        layer
    });
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(log_filter())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(crate::spans::SpanLog::from_env())
        // Lines go to the parent too when the pool asks for them.
        .with(flame::runner_log_layer())
        .try_init();
}

/// Logs to the test output and keeps the spans that close, once per
/// process: the log of spans is the same for every caller.
pub fn init_tracing_with_spans() -> crate::spans::SpanLog {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    static LOG: std::sync::OnceLock<crate::spans::SpanLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = crate::spans::SpanLog::in_memory();
        let _ = tracing_subscriber::registry()
            .with(log_filter())
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .with(log.clone())
            .try_init();
        log
    })
    .clone()
}
