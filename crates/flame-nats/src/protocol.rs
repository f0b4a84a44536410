//! Turning calls into NATS messages and replies back into results.

use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use bytes::Bytes;
use flame_core::wire::{self, ErrorKind};
use flame_core::Error;

// Static names: no validation or allocation per call.
const FUNCTION: HeaderName = HeaderName::from_static(wire::HEADER_FUNCTION);
const BUILD: HeaderName = HeaderName::from_static(wire::HEADER_BUILD);
const TIMEOUT_MS: HeaderName = HeaderName::from_static(wire::HEADER_TIMEOUT_MS);
const CAST: HeaderName = HeaderName::from_static(wire::HEADER_CAST);

/// Headers of a call request.
pub(crate) fn request_headers(
    function: &str,
    build: &str,
    remaining: Duration,
    cast: bool,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(FUNCTION, function);
    h.insert(BUILD, build);
    let ms = remaining.as_millis().max(1) as u64;
    h.insert(TIMEOUT_MS, ms.to_string());
    if cast {
        h.insert(CAST, "1");
    }
    h
}

/// Most bytes [`request_headers`] take on the wire; the server counts
/// headers and body together against max_payload.
pub(crate) fn request_headers_max_len(function: &str, build: &str, cast: bool) -> usize {
    let field = |name: &str, value_len: usize| name.len() + 2 + value_len + 2;
    // "NATS/1.0\r\n" + fields + "\r\n"; a u64 has at most 20 digits.
    12 + field(wire::HEADER_FUNCTION, function.len())
        + field(wire::HEADER_BUILD, build.len())
        + field(wire::HEADER_TIMEOUT_MS, 20)
        + if cast { field(wire::HEADER_CAST, 1) } else { 0 }
}

/// What a reply means.
pub(crate) enum Reply {
    /// The function ran; here is its encoded return value.
    Value(Bytes),
    /// The runner took no work (it is stopping); place the call elsewhere.
    Draining,
    /// The call failed.
    Failed(Error),
}

/// Reads a runner's reply.
pub(crate) fn read_reply(
    msg: async_nats::Message,
    function: &str,
    runner: &str,
    parent_build: &str,
    timeout: Duration,
) -> Reply {
    let Some(headers) = msg.headers.as_ref() else {
        return Reply::Value(msg.payload);
    };
    let Some(status) = headers.get(wire::HEADER_SERVICE_ERROR) else {
        return Reply::Value(msg.payload);
    };
    let message = status.as_str().to_string();
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
    let kind = get(wire::HEADER_ERROR).and_then(|k| ErrorKind::parse(&k));
    let function = function.to_string();
    let runner = runner.to_string();
    let err = match kind {
        Some(ErrorKind::Draining) => return Reply::Draining,
        Some(ErrorKind::UnknownFunction) => Error::UnknownFunction { function, runner },
        Some(ErrorKind::BuildMismatch) => Error::BuildMismatch {
            parent: parent_build.to_string(),
            runner_build: get(wire::HEADER_RUNNER_BUILD).unwrap_or_default(),
            runner,
        },
        Some(ErrorKind::DecodeArgs) => Error::Decode {
            function,
            what: "arguments",
            reason: message,
        },
        Some(ErrorKind::EncodeResult) => Error::Encode {
            function,
            what: "result",
            reason: message,
        },
        Some(ErrorKind::ResultTooLarge) => Error::PayloadTooLarge {
            function,
            what: "result",
            size: get(wire::HEADER_SIZE)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            max: get(wire::HEADER_MAX)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        },
        Some(ErrorKind::Panicked) => Error::Panicked {
            function,
            runner,
            message,
        },
        Some(ErrorKind::Timeout) => Error::Timeout { function, timeout },
        Some(_) | None => Error::Protocol { runner, message },
    };
    Reply::Failed(err)
}

/// Error-reply headers for a runner.
pub(crate) fn error_headers(kind: ErrorKind, extra: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(wire::HEADER_ERROR, kind.as_str());
    for (k, v) in extra {
        h.insert(*k, v.as_str());
    }
    h
}

/// JSON body of runner-to-parent control messages.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunnerEvent {
    pub runner: String,
    pub build: String,
    /// For `leave`: how long the runner has had no work, in milliseconds.
    #[serde(default)]
    pub idle_ms: u64,
}

/// JSON answer of the parent.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ParentAnswer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
