//! Trace context across the hop: the W3C `traceparent` a call carries, so
//! that the runner's work is a child of the caller's span (and other NATS
//! services that speak W3C trace context can join the trace).
//!
//! A parent's `flame.call` span gets a trace id (the caller's, when the
//! call is made from inside a traced remote call, else a new one) and a span
//! id of its own; the runner's `flame.run` span records the same trace id,
//! the caller's span id as its `parent_span_id`, and a new span id. Both are
//! plain `tracing` span fields, so any subscriber sees them.

use std::cell::Cell;
use std::fmt;

mod span;
pub(crate) use span::start;

/// The `traceparent` request header.
pub(crate) const HEADER_TRACEPARENT: &str = "traceparent";

/// A position in a trace: which trace, which span.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: u128,
    pub(crate) span_id: u64,
    /// W3C trace flags (bit 0: sampled).
    pub(crate) flags: u8,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

impl TraceContext {
    /// A new trace, sampled.
    pub(crate) fn root() -> TraceContext {
        TraceContext {
            trace_id: nonzero_u128(),
            span_id: nonzero_u64(),
            flags: 1,
        }
    }

    /// A new span in the same trace.
    pub(crate) fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: nonzero_u64(),
            flags: self.flags,
        }
    }

    /// `00-<trace id>-<span id>-<flags>`.
    pub(crate) fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    /// Reads a `traceparent` value; `None` if it is not one (version 00,
    /// or a later version read as 00 as the spec asks, ids not all zero).
    pub(crate) fn parse(value: &str) -> Option<TraceContext> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2)
            || version == "ff"
            || !hex(trace, 32)
            || !hex(span, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let ctx = TraceContext {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (ctx.trace_id != 0 && ctx.span_id != 0).then_some(ctx)
    }

    /// The trace id as 32 hex digits.
    pub(crate) fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 hex digits.
    pub(crate) fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let n = uuid::Uuid::new_v4().as_u128();
        if n != 0 {
            return n;
        }
    }
}

fn nonzero_u64() -> u64 {
    nonzero_u128() as u64 | 1
}

tokio::task_local! {
    /// The trace of the remote call this task runs, on a runner.
    static CURRENT: Option<TraceContext>;
}

thread_local! {
    /// The same for a plain (blocking) remote function's thread.
    static CURRENT_BLOCKING: Cell<Option<TraceContext>> = const { Cell::new(None) };
}

/// The trace of the remote call being run here, if any: calls made from
/// inside a remote function continue its trace.
pub(crate) fn current() -> Option<TraceContext> {
    CURRENT
        .try_with(|ctx| *ctx)
        .ok()
        .flatten()
        .or_else(|| CURRENT_BLOCKING.with(Cell::get))
}

/// Runs `fut` as part of the trace `ctx` (if any).
pub(crate) fn scope<F: std::future::Future>(
    ctx: Option<TraceContext>,
    fut: F,
) -> impl std::future::Future<Output = F::Output> {
    CURRENT.scope(ctx, fut)
}

/// Runs `f` (on a blocking thread) as part of the trace `ctx`.
pub(crate) fn blocking_scope<R>(ctx: Option<TraceContext>, f: impl FnOnce() -> R) -> R {
    let before = CURRENT_BLOCKING.with(|c| c.replace(ctx));
    let out = f();
    CURRENT_BLOCKING.with(|c| c.set(before));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        // The example of the W3C specification.
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(v).unwrap();
        assert_eq!(ctx.traceparent(), v);
        assert_eq!(ctx.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_hex(), "00f067aa0ba902b7");
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        // A later version with more fields is read as version 00.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(TraceContext::parse(later).unwrap().span_id, ctx.span_id);
        let root = TraceContext::root();
        assert!(TraceContext::parse(&root.traceparent()).is_some());
    }
}
