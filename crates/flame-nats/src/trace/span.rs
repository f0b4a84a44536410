//! A span's trace context: what a `flame.call` or `flame.run` span sends
//! on and records (apart from `mod.rs`, which OpenTelemetry's `otel.rs`
//! builds on, since this uses `otel.rs` in turn).

use super::TraceContext;

/// The trace context of the work in `span`, with its ids recorded on the
/// span (`trace_id`, `span_id`, and `parent_span_id` when there is a
/// parent): a child of `parent` when there is one, else a new trace if
/// anyone listens to the span. With OpenTelemetry, the context it gave the
/// span wins, after `parent` is made the span's remote parent when
/// `parent_is_remote` (a call that came over the wire; a local parent is
/// already the span's parent in OpenTelemetry's eyes). Untraced work (no
/// parent, nobody listening) gets `None`: it sends no `traceparent`.
pub(crate) fn start(
    span: &tracing::Span,
    parent: Option<TraceContext>,
    parent_is_remote: bool,
) -> Option<TraceContext> {
    #[allow(unused_mut)] // (changed only with OpenTelemetry)
    let mut ctx = match parent {
        Some(parent) => Some(parent.child()),
        None if !span.is_disabled() => Some(TraceContext::root()),
        None => None,
    };
    #[cfg(feature = "otel")]
    if !span.is_disabled() {
        let remote = if parent_is_remote { parent } else { None };
        if let Some(otel) = crate::otel::adopt(span, remote) {
            ctx = Some(otel);
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = parent_is_remote;
    if let (Some(ctx), false) = (&ctx, span.is_disabled()) {
        span.record("trace_id", ctx.trace_hex());
        span.record("span_id", ctx.span_hex());
        if let Some(parent) = parent {
            span.record("parent_span_id", parent.span_hex());
        }
    }
    ctx
}
