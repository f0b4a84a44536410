//! OpenTelemetry export (cargo feature `otel`): a `tracing` layer that sends
//! spans over OTLP, set up the same way in the parent and in every runner
//! (both run `main`), and trace context that follows OpenTelemetry's.
//!
//! With the layer installed, a call's `flame.call` span is a child of
//! whatever span the caller is in (an HTTP request's, say), the
//! `traceparent` it sends carries that span's OpenTelemetry ids, and the
//! runner's `flame.run` span takes the caller's span as its remote parent:
//! one trace from the request through the runner and back.
//!
//! The exporter reads the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`http/protobuf`, the default, or `http/json`),
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES` and the batch settings (`OTEL_BSP_*`).
//! Runners get them like any variable: the local backend passes the
//! parent's environment on; on Fly, forward them with
//! `PoolBuilder::forward_env` or set them as app secrets.

use std::sync::OnceLock;

use flame_core::Error;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

use crate::trace::TraceContext;

/// The provider of this process, flushed before a runner exits (a runner
/// ends with `std::process::exit`, which runs no destructor).
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Flushes the spans still buffered when dropped (keep it alive in `main`).
#[must_use = "dropping the guard flushes and stops the export"]
pub struct OtelGuard {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for OtelGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtelGuard").finish_non_exhaustive()
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// A `tracing` layer exporting spans over OTLP/HTTP, and the guard that
/// flushes them. Add the layer to the app's subscriber; the app calls this
/// in `main`, so parent and runners alike export.
///
/// The resource says `service.name` (`OTEL_SERVICE_NAME`, else the
/// executable's name), `flame.role` (`parent` or `runner`) and, in a
/// runner, `flame.pool` and `flame.runner`.
///
/// ```no_run
/// use tracing_subscriber::prelude::*;
///
/// # fn main() -> Result<(), flame_core::Error> {
/// let (otel, _guard) = flame_nats::otel::layer()?; // flame::otel::layer in an app
/// tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer())
///     .with(otel)
///     .init();
/// # Ok(()) }
/// ```
///
/// Fails with [`Error::Config`] when the exporter cannot be set up (an
/// unknown `OTEL_EXPORTER_OTLP_PROTOCOL`, say).
pub fn layer<S>() -> Result<(OpenTelemetryLayer<S, SdkTracer>, OtelGuard), Error>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok().as_deref() {
        None | Some("") | Some("http/protobuf") => Protocol::HttpBinary,
        Some("http/json") => Protocol::HttpJson,
        Some(other) => {
            return Err(Error::Config(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL is `{other}`; flame exports `http/protobuf` or `http/json`"
            )))
        }
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| Error::Config(format!("cannot set up OpenTelemetry export: {e}")))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    let tracer = provider.tracer("flame");
    let _ = PROVIDER.set(provider.clone());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok((layer, OtelGuard { provider }))
}

fn resource() -> Resource {
    let mut builder = Resource::builder();
    // The executable's name, unless the standard variables name the
    // service (later attributes win in the SDK: it would override them).
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| {
            a.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    if !named {
        let exe = std::env::current_exe().ok();
        let name = exe
            .as_deref()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "flame-app".into());
        builder = builder.with_service_name(name);
    }
    let runner = std::env::var(crate::env::PARENT)
        .ok()
        .and_then(|v| crate::protocol::bootstrap::ParentInfo::from_env_value(&v).ok());
    match runner {
        Some(info) => builder.with_attributes([
            KeyValue::new("flame.role", "runner"),
            KeyValue::new("flame.pool", info.pool),
            KeyValue::new("flame.runner", info.runner_id),
        ]),
        None => builder.with_attribute(KeyValue::new("flame.role", "parent")),
    }
    .build()
}

/// Sends what is buffered (a runner, before it exits).
pub(crate) fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

/// The trace context of `span` as OpenTelemetry sees it, after making
/// `remote_parent` (a caller's, from its `traceparent`) its parent; `None`
/// when no OpenTelemetry layer follows the span.
pub(crate) fn adopt(span: &Span, remote_parent: Option<TraceContext>) -> Option<TraceContext> {
    if let Some(caller) = remote_parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(caller.trace_id.to_be_bytes()),
            SpanId::from_bytes(caller.span_id.to_be_bytes()),
            TraceFlags::new(caller.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let cx = span.context();
    let ours = cx.span().span_context().clone();
    ours.is_valid().then(|| TraceContext {
        trace_id: u128::from_be_bytes(ours.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(ours.span_id().to_bytes()),
        flags: ours.trace_flags().to_u8(),
    })
}
