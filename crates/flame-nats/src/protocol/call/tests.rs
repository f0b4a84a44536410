//! Tests of the call encoding: error kinds, header values, and requests
//! and replies that round trip.

use super::*;

#[test]
fn error_kinds_round_trip() {
    for kind in [
        WireErrorKind::Malformed,
        WireErrorKind::UnknownFunction,
        WireErrorKind::BuildMismatch,
        WireErrorKind::DecodeArgs,
        WireErrorKind::EncodeResult,
        WireErrorKind::ResultTooLarge,
        WireErrorKind::Panicked,
        WireErrorKind::Timeout,
        WireErrorKind::Draining,
        WireErrorKind::MissingState,
        WireErrorKind::Unauthenticated,
    ] {
        assert_eq!(WireErrorKind::parse(kind.as_str()), Some(kind));
    }
    assert_eq!(WireErrorKind::parse("nonsense"), None);
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
    let h = request_headers(Some(&trace)).unwrap();
    assert_eq!(
        h.get(crate::trace::HEADER_TRACEPARENT).unwrap().as_str(),
        trace.traceparent()
    );
    assert!(request_headers(None).is_none());
    let wire_len: usize = 12
        + h.iter()
            .map(|(k, vs)| {
                vs.iter()
                    .map(|v| k.to_string().len() + 4 + v.as_str().len())
                    .sum::<usize>()
            })
            .sum::<usize>();
    assert!(wire_len <= request_headers_max_len());

    // The envelope round trips, and its bound holds for the longest
    // timeout.
    for (ms, cast) in [(1500u64, true), (1, false), (u64::MAX, false)] {
        let body = request_body(
            "m::f",
            "b1",
            Duration::from_millis(ms),
            cast,
            b"\x92\x01\x02",
            None,
        );
        assert!(body.len() <= envelope_max_len("m::f", "b1") + 3);
        let env = read_envelope(&body).unwrap();
        assert_eq!(
            (env.function, env.build, env.timeout, env.cast),
            ("m::f", "b1", Duration::from_millis(ms), cast)
        );
        assert_eq!(&body[env.args_at..], b"\x92\x01\x02");
    }
    // 1500 ms in LEB128 is dc 0b.
    let body = request_body("f", "b", Duration::from_millis(1500), false, b"", None);
    assert_eq!(&body[..], b"\xf1\x00\xdc\x0b\x01b\x00\x01f");
    for bad in [
        &b""[..],
        b"\x00",
        b"\xf1",
        b"\xf1\x00\x00\x01b\x00\x01f",
        b"\xf1\x00\x80",
        b"\xf1\x00\x05\x05b",
        b"\xf1\x00\x05\x01b\x00\x09f",
        b"\xf1\x00\x05\x01\xff\x00\x01f",
        b"\xf1\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    ] {
        assert!(read_envelope(bad).is_err(), "{bad:?}");
    }

    let t = Duration::from_secs(1);
    let ok = read_reply(message(None, b"\x01"), "f", "r", "b", t);
    assert!(matches!(ok, Reply::Value(b) if &b[..] == b"\x01"));
    for (kind, extra) in [
        (WireErrorKind::UnknownFunction, vec![]),
        (
            WireErrorKind::BuildMismatch,
            vec![(HEADER_RUNNER_BUILD, "b2".to_string())],
        ),
        (WireErrorKind::DecodeArgs, vec![]),
        (WireErrorKind::EncodeResult, vec![]),
        (
            WireErrorKind::ResultTooLarge,
            vec![
                (HEADER_SIZE, "10".to_string()),
                (HEADER_MAX, "5".to_string()),
            ],
        ),
        (WireErrorKind::Panicked, vec![]),
        (WireErrorKind::Timeout, vec![]),
        (WireErrorKind::Malformed, vec![]),
        (WireErrorKind::Draining, vec![]),
        (WireErrorKind::MissingState, vec![]),
        (WireErrorKind::Unauthenticated, vec![]),
    ] {
        let mut h = error_headers(kind, &extra);
        h.insert(HEADER_SERVICE_ERROR, "what happened");
        let reply = read_reply(message(Some(h), b""), "f", "r", "b", t);
        let ok = match (kind, reply) {
            (WireErrorKind::Draining, Reply::Draining) => true,
            (WireErrorKind::UnknownFunction, Reply::Failed(Error::UnknownFunction { .. })) => true,
            (
                WireErrorKind::BuildMismatch,
                Reply::Failed(Error::BuildMismatch { runner_build, .. }),
            ) => runner_build == "b2",
            (WireErrorKind::DecodeArgs, Reply::Failed(Error::Decode { reason, .. })) => {
                reason == "what happened"
            }
            (WireErrorKind::EncodeResult, Reply::Failed(Error::Encode { .. })) => true,
            (
                WireErrorKind::ResultTooLarge,
                Reply::Failed(Error::PayloadTooLarge { size, max, .. }),
            ) => (size, max) == (10, 5),
            (WireErrorKind::Panicked, Reply::Failed(Error::Panicked { message, .. })) => {
                message == "what happened"
            }
            (WireErrorKind::Timeout, Reply::Failed(Error::Timeout { timeout, .. })) => timeout == t,
            (WireErrorKind::Malformed, Reply::Failed(Error::Protocol { .. })) => true,
            (WireErrorKind::MissingState, Reply::Failed(Error::MissingState { state, .. })) => {
                state == "what happened"
            }
            (
                WireErrorKind::Unauthenticated,
                Reply::Failed(Error::Unauthenticated { message, .. }),
            ) => message == "what happened",
            _ => false,
        };
        assert!(ok, "{kind:?}");
    }
}
