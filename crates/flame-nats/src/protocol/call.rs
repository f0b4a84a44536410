//! Calls and casts on the wire: the request a parent sends and the reply a
//! runner answers with.
//!
//! A call is one NATS request on the runner's subject. Its body is a small
//! binary envelope (function, build, deadline, cast flag) followed by the
//! encoding of the argument tuple ([`flame_core::codec`]): no headers, which
//! every hop (parent, server, runner) would parse into a map, so a call costs
//! little more than a raw request. A traced call adds one header, the W3C
//! `traceparent`, so that other NATS services can join its trace. A successful
//! reply's body is the encoding of the function's return value. A failed
//! reply follows the NATS micro convention (`Nats-Service-Error` and
//! `Nats-Service-Error-Code` headers, empty body) plus a `Flame-Error` header
//! naming the kind, so the caller can rebuild a typed [`Error`].

use crate::trace::TraceContext;
use std::time::Duration;

use super::sign::{now_ms, CallKey, SIGNED_HEAD};

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use bytes::Bytes;
use flame_core::Error;

/// Header with a build id: on `alive` requests (the runner's build).
pub(crate) const HEADER_BUILD: &str = "Flame-Build";

/// First byte of a request body: the envelope, version 1.
pub(crate) const ENVELOPE_V1: u8 = 0xF1;

/// Envelope flag: the work is a cast, whose failures are logged and counted
/// on the runner.
const FLAG_CAST: u8 = 0b0000_0001;
/// Header on error replies: the kind of error, see [`WireErrorKind`].
pub(crate) const HEADER_ERROR: &str = "Flame-Error";
/// Header on build-mismatch replies: the runner's own build id.
pub(crate) const HEADER_RUNNER_BUILD: &str = "Flame-Runner-Build";
/// Header on payload-too-large replies: encoded size of the result.
pub(crate) const HEADER_SIZE: &str = "Flame-Size";
/// Header on payload-too-large replies: the server's max_payload.
pub(crate) const HEADER_MAX: &str = "Flame-Max";
/// Micro-service error header (status text), set by async-nats.
pub(crate) const HEADER_SERVICE_ERROR: &str = "Nats-Service-Error";
/// Micro-service error header (status code), set by async-nats.
pub(crate) const HEADER_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// The kinds of error a runner can reply with, as the `Flame-Error` header
/// names them on the wire (PROTOCOL.md). Not `flame::ErrorKind`, the kind
/// of the error a caller gets, which the parent derives from this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum WireErrorKind {
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
    /// The call is not signed with the runner's key, or is a replay
    /// (`protocol/sign.rs`); nothing ran.
    Unauthenticated,
}

impl WireErrorKind {
    /// Token used in the `Flame-Error` header.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WireErrorKind::Malformed => "malformed",
            WireErrorKind::UnknownFunction => "unknown-function",
            WireErrorKind::BuildMismatch => "build-mismatch",
            WireErrorKind::DecodeArgs => "decode-args",
            WireErrorKind::EncodeResult => "encode-result",
            WireErrorKind::ResultTooLarge => "result-too-large",
            WireErrorKind::Panicked => "panicked",
            WireErrorKind::Timeout => "timeout",
            WireErrorKind::Draining => "draining",
            WireErrorKind::MissingState => "missing-state",
            WireErrorKind::Unauthenticated => "unauthenticated",
        }
    }

    /// Parses the `Flame-Error` header token.
    pub(crate) fn parse(s: &str) -> Option<WireErrorKind> {
        Some(match s {
            "malformed" => WireErrorKind::Malformed,
            "unknown-function" => WireErrorKind::UnknownFunction,
            "build-mismatch" => WireErrorKind::BuildMismatch,
            "decode-args" => WireErrorKind::DecodeArgs,
            "encode-result" => WireErrorKind::EncodeResult,
            "result-too-large" => WireErrorKind::ResultTooLarge,
            "panicked" => WireErrorKind::Panicked,
            "timeout" => WireErrorKind::Timeout,
            "draining" => WireErrorKind::Draining,
            "missing-state" => WireErrorKind::MissingState,
            "unauthenticated" => WireErrorKind::Unauthenticated,
            _ => return None,
        })
    }

    /// HTTP-like status code for `Nats-Service-Error-Code`, which
    /// `nats micro stats` shows as the last error.
    pub(crate) fn code(self) -> usize {
        match self {
            WireErrorKind::Malformed | WireErrorKind::DecodeArgs => 400,
            WireErrorKind::Unauthenticated => 401,
            WireErrorKind::UnknownFunction => 404,
            WireErrorKind::BuildMismatch => 409,
            WireErrorKind::ResultTooLarge => 413,
            WireErrorKind::Panicked | WireErrorKind::EncodeResult | WireErrorKind::MissingState => {
                500
            }
            WireErrorKind::Draining => 503,
            WireErrorKind::Timeout => 504,
        }
    }
}

// A static name: no validation or allocation per call.
const TRACEPARENT: HeaderName = HeaderName::from_static(crate::trace::HEADER_TRACEPARENT);

/// How to sign a request: the key, the runner's subject and the call's
/// reply subject (see `protocol/sign.rs`).
pub(crate) type Signing<'a> = Option<(&'a CallKey, &'a str, &'a str)>;

/// The body of a call request: the envelope, then the encoded arguments;
/// signed when `sign` is given.
///
/// ```text
/// F1                    envelope version 1
/// flags                 bit 0: cast
/// timeout_ms            unsigned LEB128, at least 1
/// build_len  build      1 byte, then that many bytes of UTF-8
/// fn_len     function   2 bytes big endian, then that many bytes of UTF-8
/// args                  the rest: the MessagePack argument tuple
/// ```
pub(crate) fn request_body(
    function: &str,
    build: &str,
    remaining: Duration,
    cast: bool,
    args: &[u8],
    sign: Signing<'_>,
) -> Bytes {
    let head = envelope_max_len(function, build);
    let mut buf = Vec::with_capacity(head + args.len());
    buf.resize(head, 0);
    buf.extend_from_slice(args);
    request_body_in_place(buf, head, function, build, remaining, cast, sign)
}

/// A request body from arguments encoded after `head` bytes of room
/// (`envelope_max_len`) in `buf`: the envelope (and the signature, when
/// `sign` is given) is written into the room, right before the arguments,
/// so they are not copied.
pub(crate) fn request_body_in_place(
    mut buf: Vec<u8>,
    head: usize,
    function: &str,
    build: &str,
    remaining: Duration,
    cast: bool,
    sign: Signing<'_>,
) -> Bytes {
    let mut envelope = Vec::with_capacity(head);
    write_envelope(&mut envelope, function, build, remaining, cast);
    let mut start = head - envelope.len();
    buf[start..head].copy_from_slice(&envelope);
    if let Some((key, subject, reply)) = sign {
        start -= SIGNED_HEAD;
        key.sign(&mut buf[start..], subject, reply, now_ms());
    }
    Bytes::from(buf).slice(start..)
}

/// Appends the envelope of a request (see [`request_body`]).
fn write_envelope(
    body: &mut Vec<u8>,
    function: &str,
    build: &str,
    remaining: Duration,
    cast: bool,
) {
    body.push(ENVELOPE_V1);
    body.push(if cast { FLAG_CAST } else { 0 });
    let ms = remaining.as_millis().clamp(1, u64::MAX as u128) as u64;
    super::batch::put_uvarint(body, ms);
    // Lengths were checked when the pool started (build) and when the
    // function was registered (its name); truncating would only refuse the
    // call on the runner.
    let build = &build.as_bytes()[..build.len().min(u8::MAX as usize)];
    body.push(build.len() as u8);
    body.extend_from_slice(build);
    let function = &function.as_bytes()[..function.len().min(u16::MAX as usize)];
    body.extend_from_slice(&(function.len() as u16).to_be_bytes());
    body.extend_from_slice(function);
}

/// Most bytes the envelope of [`request_body`] takes, with its signature.
pub(crate) fn envelope_max_len(function: &str, build: &str) -> usize {
    // version, flags, a u64 in LEB128 (10 bytes), two lengths; then the
    // signature's room (used or not).
    2 + 10 + 1 + build.len() + 2 + function.len() + SIGNED_HEAD
}

/// The headers of a call request: none, unless it is traced.
pub(crate) fn request_headers(trace: Option<&TraceContext>) -> Option<HeaderMap> {
    trace.map(|trace| {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, trace.traceparent());
        h
    })
}

/// Most bytes [`request_headers`] take on the wire (the server counts
/// headers and body together against max_payload).
pub(crate) fn request_headers_max_len() -> usize {
    // "NATS/1.0\r\n" + "traceparent: " + 55 + "\r\n" + "\r\n".
    12 + crate::trace::HEADER_TRACEPARENT.len() + 2 + 55 + 2
}

/// A request's envelope, as the runner reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope<'a> {
    pub(crate) function: &'a str,
    pub(crate) build: &'a str,
    pub(crate) timeout: Duration,
    pub(crate) cast: bool,
    /// Where the arguments start in the body.
    pub(crate) args_at: usize,
}

/// Reads the envelope at the start of a request body. The error says what
/// is wrong, for a `malformed` reply.
pub(crate) fn read_envelope(body: &[u8]) -> Result<Envelope<'_>, &'static str> {
    let mut at = 0;
    let mut take = |n: usize| -> Result<&[u8], &'static str> {
        let bytes = body
            .get(at..at + n)
            .ok_or("the request's envelope is cut short")?;
        at += n;
        Ok(bytes)
    };
    if take(1)?[0] != ENVELOPE_V1 {
        return Err("the request has no flame envelope (version 1, first byte 0xF1)");
    }
    let flags = take(1)?[0];
    let mut ms: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = take(1)?[0];
        ms |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        if shift >= 63 {
            return Err("the request's timeout is not a valid number");
        }
    }
    if ms == 0 {
        return Err("the request's timeout is zero");
    }
    let build_len = usize::from(take(1)?[0]);
    let build =
        std::str::from_utf8(take(build_len)?).map_err(|_| "the request's build id is not UTF-8")?;
    let fn_len = take(2)?;
    let fn_len = usize::from(u16::from_be_bytes([fn_len[0], fn_len[1]]));
    let function = std::str::from_utf8(take(fn_len)?)
        .map_err(|_| "the request's function name is not UTF-8")?;
    Ok(Envelope {
        function,
        build,
        timeout: Duration::from_millis(ms),
        cast: flags & FLAG_CAST != 0,
        args_at: at,
    })
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
    let kind = get(HEADER_ERROR).and_then(|k| WireErrorKind::parse(&k));
    let function = function.to_string();
    let runner = runner.to_string();
    let err = match kind {
        Some(WireErrorKind::Draining) => return Reply::Draining,
        Some(WireErrorKind::UnknownFunction) => Error::UnknownFunction { function, runner },
        Some(WireErrorKind::BuildMismatch) => Error::BuildMismatch {
            parent: parent_build.to_string(),
            runner_build: get(HEADER_RUNNER_BUILD).unwrap_or_default(),
            runner,
        },
        Some(WireErrorKind::DecodeArgs) => Error::Decode {
            function,
            what: "arguments",
            reason: message,
        },
        Some(WireErrorKind::EncodeResult) => Error::Encode {
            function,
            what: "result",
            reason: message,
        },
        Some(WireErrorKind::ResultTooLarge) => Error::PayloadTooLarge {
            function,
            what: "result",
            size: get(HEADER_SIZE).and_then(|s| s.parse().ok()).unwrap_or(0),
            max: get(HEADER_MAX).and_then(|s| s.parse().ok()).unwrap_or(0),
        },
        Some(WireErrorKind::Panicked) => Error::Panicked {
            function,
            runner,
            message,
        },
        Some(WireErrorKind::Timeout) => Error::Timeout { function, timeout },
        Some(WireErrorKind::MissingState) => Error::MissingState {
            function,
            state: message,
        },
        Some(WireErrorKind::Unauthenticated) => Error::Unauthenticated { runner, message },
        Some(_) | None => Error::Protocol { runner, message },
    };
    Reply::Failed(err)
}

/// Error-reply headers for a runner.
pub(crate) fn error_headers(kind: WireErrorKind, extra: &[(&str, String)]) -> HeaderMap {
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
mod tests;
