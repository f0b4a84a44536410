//! Checking a request before anything runs: its signature (and that it is
//! no replay), its envelope, the caller's build, and the function it names.
//! [`check`] takes the runner (its keys, its replay guard, its build and
//! registry, its counters).

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use flame_core::registry::Handler;

use super::request::{CallRequest, WireError};
use super::Runner;
use crate::protocol::call::{self as wire, WireErrorKind};
use crate::protocol::sign::{now_ms, Refused, Signed, SIGNED_HEAD, SIGNED_V1};
use crate::trace::{self, TraceContext};

/// A request that passed the checks.
pub(super) struct Checked {
    pub(super) function: &'static str,
    pub(super) handler: Handler,
    pub(super) timeout: Duration,
    pub(super) cast: bool,
    /// The caller's span, from `traceparent`.
    pub(super) trace: Option<TraceContext>,
    /// The encoded arguments (the body after the envelope).
    pub(super) args: Bytes,
}

/// Checks a call's signature (see `protocol/sign.rs`); returns where
/// its plain body (the envelope) starts.
fn authenticate(runner: &Runner, request: &CallRequest) -> Result<usize, WireError> {
    let body = &request.body;
    let signed = body.first() == Some(&SIGNED_V1);
    let Some(key) = &runner.call_key else {
        // No key to check with (a shared pool without a secret): a
        // signature is skipped.
        return Ok(if signed && body.len() >= SIGNED_HEAD {
            SIGNED_HEAD
        } else {
            0
        });
    };
    let refused = |why: Refused| {
        runner
            .counters
            .unauthenticated
            .fetch_add(1, Ordering::Relaxed);
        WireError::new(WireErrorKind::Unauthenticated, why.to_string())
    };
    if !signed {
        return Err(refused(Refused::Unsigned));
    }
    let call = Signed::read(body).map_err(refused)?;
    let reply = request.reply.as_deref().unwrap_or("");
    call.verify(key, &runner.call_subject, reply)
        .map_err(refused)?;
    // (Only a verified tag is remembered: nobody else can fill the
    // guard.)
    runner
        .replays
        .lock()
        .unwrap()
        .admit(&call, now_ms())
        .map_err(refused)?;
    Ok(SIGNED_HEAD)
}

pub(super) fn check(runner: &Runner, request: &CallRequest) -> Result<Checked, WireError> {
    let malformed = |m: &str| WireError::new(WireErrorKind::Malformed, m);
    let start = authenticate(runner, request)?;
    let body = &request.body;
    let envelope = wire::read_envelope(&body[start..]).map_err(malformed)?;
    if envelope.build != runner.build {
        let message = format!(
            "caller is build {}, this runner is build {}",
            envelope.build, runner.build
        );
        return Err(WireError::new(WireErrorKind::BuildMismatch, message)
            .header(wire::HEADER_RUNNER_BUILD, runner.build));
    }
    let (function, handler) = runner.registry.lookup(envelope.function).ok_or_else(|| {
        let message = format!("no function named `{}` is registered", envelope.function);
        WireError::new(WireErrorKind::UnknownFunction, message)
    })?;
    let trace = request
        .headers
        .as_ref()
        .and_then(|h| h.get(trace::HEADER_TRACEPARENT))
        .and_then(|v| TraceContext::parse(v.as_str()));
    Ok(Checked {
        function,
        handler,
        timeout: envelope.timeout,
        cast: envelope.cast,
        trace,
        args: body.slice(start + envelope.args_at..),
    })
}
