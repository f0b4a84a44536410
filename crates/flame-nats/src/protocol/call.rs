//! Calls and casts on the wire: the request a parent sends and the reply a
//! runner answers with.
//!
//! A call is one NATS request on the runner's subject. Metadata rides in
//! headers so that `nats sub 'flame.>'` shows it legibly; the body is the
//! encoding of the argument tuple ([`flame_core::codec`]). A successful
//! reply's body is the encoding of the function's return value. A failed
//! reply follows the NATS micro convention (`Nats-Service-Error` and
//! `Nats-Service-Error-Code` headers, empty body) plus a `Flame-Error` header
//! naming the kind, so the caller can rebuild a typed [`Error`].

use crate::trace::TraceContext;
use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use bytes::Bytes;
use flame_core::Error;

/// Header: registered name of the function to run.
pub(crate) const HEADER_FUNCTION: &str = "Flame-Fn";
/// Header: build id of the caller; the runner refuses other builds.
pub(crate) const HEADER_BUILD: &str = "Flame-Build";
/// Header: milliseconds the runner has left to finish the call.
pub(crate) const HEADER_TIMEOUT_MS: &str = "Flame-Timeout-Ms";
/// Header: present (value `1`) when the work is a cast, whose failures are
/// logged and counted on the runner.
pub(crate) const HEADER_CAST: &str = "Flame-Cast";
/// Header on error replies: the kind of error, see [`ErrorKind`].
pub(crate) const HEADER_ERROR: &str = "Flame-Error";
/// Header on build-mismatch replies: the runner's own build id.
pub(crate) const HEADER_RUNNER_BUILD: &str = "Flame-Runner-Build";
/// Header on payload-too-large replies: encoded size of the result.
pub(crate) const HEADER_SIZE: &str = "Flame-Size";
/// Header on payload-too-large replies: the server's max_payload.
pub(crate) const HEADER_MAX: &str = "Flame-Max";
/// Micro-service error header (status text), set by async-nats.
pub(crate) const HEADER_SERVICE_ERROR: &str = "Nats-Service-Error";

/// The kinds of error a runner can reply with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum ErrorKind {
    /// The request lacked required headers or had unreadable ones.
    Malformed,
    /// No function with that name.
    UnknownFunction,
    /// Different build.
    BuildMismatch,
    /// Arguments could not be decoded into the function's parameter types.
    DecodeArgs,
    /// The result could not be encoded.
    EncodeResult,
    /// The result is larger than the server's max_payload.
    ResultTooLarge,
    /// The function panicked.
    Panicked,
    /// The deadline passed on the runner; the work was cancelled.
    Timeout,
    /// The runner is stopping and takes no new work; nothing ran, so the
    /// caller may place the call elsewhere.
    Draining,
    /// The function takes a type of state the runner's app did not give
    /// flame; the message names the type.
    MissingState,
}

impl ErrorKind {
    /// Token used in the `Flame-Error` header.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::UnknownFunction => "unknown-function",
            ErrorKind::BuildMismatch => "build-mismatch",
            ErrorKind::DecodeArgs => "decode-args",
            ErrorKind::EncodeResult => "encode-result",
            ErrorKind::ResultTooLarge => "result-too-large",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Draining => "draining",
            ErrorKind::MissingState => "missing-state",
        }
    }

    /// Parses the `Flame-Error` header token.
    pub(crate) fn parse(s: &str) -> Option<ErrorKind> {
        Some(match s {
            "malformed" => ErrorKind::Malformed,
            "unknown-function" => ErrorKind::UnknownFunction,
            "build-mismatch" => ErrorKind::BuildMismatch,
            "decode-args" => ErrorKind::DecodeArgs,
            "encode-result" => ErrorKind::EncodeResult,
            "result-too-large" => ErrorKind::ResultTooLarge,
            "panicked" => ErrorKind::Panicked,
            "timeout" => ErrorKind::Timeout,
            "draining" => ErrorKind::Draining,
            "missing-state" => ErrorKind::MissingState,
            _ => return None,
        })
    }

    /// HTTP-like status code for `Nats-Service-Error-Code`, which
    /// `nats micro stats` shows as the last error.
    pub(crate) fn code(self) -> usize {
        match self {
            ErrorKind::Malformed | ErrorKind::DecodeArgs => 400,
            ErrorKind::UnknownFunction => 404,
            ErrorKind::BuildMismatch => 409,
            ErrorKind::ResultTooLarge => 413,
            ErrorKind::Panicked | ErrorKind::EncodeResult | ErrorKind::MissingState => 500,
            ErrorKind::Draining => 503,
            ErrorKind::Timeout => 504,
        }
    }
}

// Static names: no validation or allocation per call.
const FUNCTION: HeaderName = HeaderName::from_static(HEADER_FUNCTION);
const BUILD: HeaderName = HeaderName::from_static(HEADER_BUILD);
const TIMEOUT_MS: HeaderName = HeaderName::from_static(HEADER_TIMEOUT_MS);
const CAST: HeaderName = HeaderName::from_static(HEADER_CAST);
const TRACEPARENT: HeaderName = HeaderName::from_static(crate::trace::HEADER_TRACEPARENT);

/// Headers of a call request; `trace` is the caller's span, when traced.
pub(crate) fn request_headers(
    function: &str,
    build: &str,
    remaining: Duration,
    cast: bool,
    trace: Option<&TraceContext>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(FUNCTION, function);
    h.insert(BUILD, build);
    let ms = remaining.as_millis().max(1) as u64;
    h.insert(TIMEOUT_MS, ms.to_string());
    if cast {
        h.insert(CAST, "1");
    }
    if let Some(trace) = trace {
        h.insert(TRACEPARENT, trace.traceparent());
    }
    h
}

/// Most bytes [`request_headers`] take on the wire; the server counts
/// headers and body together against max_payload.
pub(crate) fn request_headers_max_len(function: &str, build: &str, cast: bool) -> usize {
    let field = |name: &str, value_len: usize| name.len() + 2 + value_len + 2;
    // "NATS/1.0\r\n" + fields + "\r\n"; a u64 has at most 20 digits.
    12 + field(HEADER_FUNCTION, function.len())
        + field(HEADER_BUILD, build.len())
        + field(HEADER_TIMEOUT_MS, 20)
        + if cast { field(HEADER_CAST, 1) } else { 0 }
        + field(crate::trace::HEADER_TRACEPARENT, 55)
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
    let Some(status) = headers.get(HEADER_SERVICE_ERROR) else {
        return Reply::Value(msg.payload);
    };
    let message = status.as_str().to_string();
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
    let kind = get(HEADER_ERROR).and_then(|k| ErrorKind::parse(&k));
    let function = function.to_string();
    let runner = runner.to_string();
    let err = match kind {
        Some(ErrorKind::Draining) => return Reply::Draining,
        Some(ErrorKind::UnknownFunction) => Error::UnknownFunction { function, runner },
        Some(ErrorKind::BuildMismatch) => Error::BuildMismatch {
            parent: parent_build.to_string(),
            runner_build: get(HEADER_RUNNER_BUILD).unwrap_or_default(),
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
            size: get(HEADER_SIZE).and_then(|s| s.parse().ok()).unwrap_or(0),
            max: get(HEADER_MAX).and_then(|s| s.parse().ok()).unwrap_or(0),
        },
        Some(ErrorKind::Panicked) => Error::Panicked {
            function,
            runner,
            message,
        },
        Some(ErrorKind::Timeout) => Error::Timeout { function, timeout },
        Some(ErrorKind::MissingState) => Error::MissingState {
            function,
            state: message,
        },
        Some(_) | None => Error::Protocol { runner, message },
    };
    Reply::Failed(err)
}

/// Error-reply headers for a runner.
pub(crate) fn error_headers(kind: ErrorKind, extra: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_ERROR, kind.as_str());
    for (k, v) in extra {
        h.insert(*k, v.as_str());
    }
    h
}

/// Makes text safe for a NATS header value (no line breaks, bounded length).
pub(crate) fn header_safe(text: &str) -> String {
    const MAX: usize = 1024;
    let mut out: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_round_trip() {
        for kind in [
            ErrorKind::Malformed,
            ErrorKind::UnknownFunction,
            ErrorKind::BuildMismatch,
            ErrorKind::DecodeArgs,
            ErrorKind::EncodeResult,
            ErrorKind::ResultTooLarge,
            ErrorKind::Panicked,
            ErrorKind::Timeout,
            ErrorKind::Draining,
            ErrorKind::MissingState,
        ] {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("nonsense"), None);
    }

    #[test]
    fn header_safe_strips_newlines_and_bounds_length() {
        assert_eq!(header_safe("a\nb\r\nc"), "a b  c");
        let long = "é".repeat(2000);
        let safe = header_safe(&long);
        assert!(safe.len() <= 1024 + '…'.len_utf8());
        assert!(safe.ends_with('…'));
    }

    fn message(headers: Option<HeaderMap>, payload: &'static [u8]) -> async_nats::Message {
        async_nats::Message {
            subject: "r".into(),
            reply: None,
            payload: Bytes::from_static(payload),
            headers,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let trace = TraceContext::root();
        let h = request_headers(
            "m::f",
            "b1",
            Duration::from_millis(1500),
            true,
            Some(&trace),
        );
        assert_eq!(
            h.get(crate::trace::HEADER_TRACEPARENT).unwrap().as_str(),
            trace.traceparent()
        );
        assert_eq!(h.get(HEADER_FUNCTION).unwrap().as_str(), "m::f");
        assert_eq!(h.get(HEADER_BUILD).unwrap().as_str(), "b1");
        assert_eq!(h.get(HEADER_TIMEOUT_MS).unwrap().as_str(), "1500");
        assert!(h.get(HEADER_CAST).is_some());
        // The bound on the headers' size holds for the longest timeout.
        let longest = request_headers(
            "m::f",
            "b1",
            Duration::from_millis(u64::MAX),
            true,
            Some(&trace),
        );
        let wire_len: usize = 12
            + longest
                .iter()
                .map(|(k, vs)| {
                    vs.iter()
                        .map(|v| k.to_string().len() + 4 + v.as_str().len())
                        .sum::<usize>()
                })
                .sum::<usize>();
        assert!(wire_len <= request_headers_max_len("m::f", "b1", true));

        let t = Duration::from_secs(1);
        let ok = read_reply(message(None, b"\x01"), "f", "r", "b", t);
        assert!(matches!(ok, Reply::Value(b) if &b[..] == b"\x01"));
        for (kind, extra) in [
            (ErrorKind::UnknownFunction, vec![]),
            (
                ErrorKind::BuildMismatch,
                vec![(HEADER_RUNNER_BUILD, "b2".to_string())],
            ),
            (ErrorKind::DecodeArgs, vec![]),
            (ErrorKind::EncodeResult, vec![]),
            (
                ErrorKind::ResultTooLarge,
                vec![
                    (HEADER_SIZE, "10".to_string()),
                    (HEADER_MAX, "5".to_string()),
                ],
            ),
            (ErrorKind::Panicked, vec![]),
            (ErrorKind::Timeout, vec![]),
            (ErrorKind::Malformed, vec![]),
            (ErrorKind::Draining, vec![]),
            (ErrorKind::MissingState, vec![]),
        ] {
            let mut h = error_headers(kind, &extra);
            h.insert(HEADER_SERVICE_ERROR, "what happened");
            let reply = read_reply(message(Some(h), b""), "f", "r", "b", t);
            let ok = match (kind, reply) {
                (ErrorKind::Draining, Reply::Draining) => true,
                (ErrorKind::UnknownFunction, Reply::Failed(Error::UnknownFunction { .. })) => true,
                (
                    ErrorKind::BuildMismatch,
                    Reply::Failed(Error::BuildMismatch { runner_build, .. }),
                ) => runner_build == "b2",
                (ErrorKind::DecodeArgs, Reply::Failed(Error::Decode { reason, .. })) => {
                    reason == "what happened"
                }
                (ErrorKind::EncodeResult, Reply::Failed(Error::Encode { .. })) => true,
                (
                    ErrorKind::ResultTooLarge,
                    Reply::Failed(Error::PayloadTooLarge { size, max, .. }),
                ) => (size, max) == (10, 5),
                (ErrorKind::Panicked, Reply::Failed(Error::Panicked { message, .. })) => {
                    message == "what happened"
                }
                (ErrorKind::Timeout, Reply::Failed(Error::Timeout { timeout, .. })) => timeout == t,
                (ErrorKind::Malformed, Reply::Failed(Error::Protocol { .. })) => true,
                (ErrorKind::MissingState, Reply::Failed(Error::MissingState { state, .. })) => {
                    state == "what happened"
                }
                _ => false,
            };
            assert!(ok, "{kind:?}");
        }
    }
}
