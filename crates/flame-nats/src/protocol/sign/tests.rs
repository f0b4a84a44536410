//! Tests of signed calls, cancellations and retires, of the keys, and of
//! the test vector in `PROTOCOL.md`.

use super::*;

fn signed_body(key: &CallKey, subject: &str, reply: &str, at: u64, plain: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8; SIGNED_HEAD];
    body.extend_from_slice(plain);
    key.sign(&mut body, subject, reply, at);
    body
}

#[test]
fn only_the_key_signs_a_call_for_its_runner_and_reply() {
    let key = CallKey::of_runner(&ReportKey::random());
    let body = signed_body(&key, "flame.p.runner.r", "_INBOX.x.1", 1000, b"\xf1plain");
    let s = Signed::read(&body).unwrap();
    assert_eq!(s.sent_at_ms, 1000);
    assert_eq!(&s.covered[8..], b"\xf1plain");
    assert!(s.verify(&key, "flame.p.runner.r", "_INBOX.x.1").is_ok());
    let other = CallKey::of_runner(&ReportKey::random());
    assert_eq!(
        s.verify(&other, "flame.p.runner.r", "_INBOX.x.1"),
        Err(Refused::BadTag)
    );
    // Another runner, reply subject, time or body: refused.
    assert!(s.verify(&key, "flame.p.runner.q", "_INBOX.x.1").is_err());
    assert!(s.verify(&key, "flame.p.runner.r", "_INBOX.x.2").is_err());
    for at in [9, 1 + TAG_LEN, SIGNED_HEAD + 2] {
        let mut changed = body.clone();
        changed[at] ^= 1;
        let s = Signed::read(&changed).unwrap();
        assert!(s.verify(&key, "flame.p.runner.r", "_INBOX.x.1").is_err());
    }
    assert_eq!(
        Signed::read(&body[..SIGNED_HEAD - 1]),
        Err(Refused::Malformed)
    );
}

#[test]
fn replays_and_calls_out_of_the_window_are_refused() {
    let key = CallKey::of_runner(&ReportKey::random());
    let window = REPLAY_WINDOW.as_millis() as u64;
    let now = 1_000_000_000;
    let mut guard = ReplayGuard::default();
    let a = signed_body(&key, "s", "r.1", now - 5, b"\xf1");
    let b = signed_body(&key, "s", "r.2", now - 5, b"\xf1");
    let a = Signed::read(&a).unwrap();
    assert_eq!(guard.admit(&a, now), Ok(()));
    assert_eq!(guard.admit(&a, now + 10), Err(Refused::Replayed));
    assert_eq!(guard.admit(&Signed::read(&b).unwrap(), now), Ok(()));
    // Later than the window: refused by its age, and forgotten.
    assert!(matches!(
        guard.admit(&a, now + window),
        Err(Refused::OutOfWindow { .. })
    ));
    assert_eq!(guard.len(), 0);
    let early = signed_body(&key, "s", "r.3", now + window + 1, b"\xf1");
    let refused = guard
        .admit(&Signed::read(&early).unwrap(), now)
        .unwrap_err();
    assert!(
        refused.to_string().contains("after this runner's clock"),
        "{refused}"
    );
}

#[test]
fn cancellations_are_signed_and_checked() {
    let key = CallKey::of_runner(&ReportKey::random());
    let body = key.cancel_body("flame.p.runner.r.cancel", "_INBOX.x.1");
    assert_eq!(
        read_cancel(Some(&key), "flame.p.runner.r.cancel", body.as_bytes()),
        Ok("_INBOX.x.1")
    );
    assert_eq!(
        read_cancel(Some(&key), "flame.p.runner.q.cancel", body.as_bytes()),
        Err(Refused::BadTag)
    );
    assert_eq!(
        read_cancel(Some(&key), "flame.p.runner.r.cancel", b"_INBOX.x.1"),
        Err(Refused::Unsigned)
    );
    // Without a key (a shared pool without a secret): plain bodies.
    assert_eq!(read_cancel(None, "c", b"_INBOX.x.1"), Ok("_INBOX.x.1"));
    assert_eq!(read_cancel(None, "c", body.as_bytes()), Ok("_INBOX.x.1"));
}

#[test]
fn retires_are_signed_and_checked() {
    let key = CallKey::of_runner(&ReportKey::random());
    let body = key.retire_body("flame.p.runner.r.control");
    let subject = "flame.p.runner.r.control";
    assert_eq!(read_retire(Some(&key), subject, body.as_bytes()), Ok(true));
    assert_eq!(
        read_retire(Some(&key), "flame.p.runner.q.control", body.as_bytes()),
        Err(Refused::BadTag)
    );
    assert_eq!(
        read_retire(Some(&key), subject, b"retire"),
        Err(Refused::Unsigned)
    );
    // Probes (empty bodies) are no retire.
    assert_eq!(read_retire(Some(&key), subject, b""), Ok(false));
    assert_eq!(read_retire(None, subject, b"retire"), Ok(true));
    assert_eq!(read_retire(None, subject, body.as_bytes()), Ok(true));
    assert_eq!(read_retire(None, subject, b""), Ok(false));
}

#[test]
fn shared_keys_follow_the_secret_and_the_pool_and_never_print() {
    let a = CallKey::shared_event_key(b"s3cret", "thumbs");
    assert_eq!(a, CallKey::shared_event_key(b"s3cret", "thumbs"));
    assert_ne!(a, CallKey::shared_event_key(b"s3cret", "other"));
    assert_ne!(a, CallKey::shared_event_key(b"another", "thumbs"));
    let key = CallKey::of_runner(&a);
    assert_eq!(format!("{key:?}"), "CallKey(<redacted>)");
    for refused in [
        Refused::Unsigned,
        Refused::BadTag,
        Refused::Replayed,
        Refused::OutOfWindow { skew_ms: 40_000 },
    ] {
        assert!(!refused.to_string().contains(&a.to_hex()));
    }
}

#[test]
fn signatures_match_the_test_vector_of_protocol_md() {
    let event_key = ReportKey::from_bytes(std::array::from_fn(|i| i as u8));
    let key = CallKey::of_runner(&event_key);
    // The call of PROTOCOL.md 4.1, signed at 2026-12-07T12:00:00Z.
    let mut plain = b"\xf1\x00\xa3\xea\x01\x28".to_vec();
    plain
        .extend_from_slice(b"9c1b0e7d5a3f2e4d6c8b0a1f3e5d7c9b1a2f4e6d\x00\x08app::add\x92\x02\x03");
    let body = signed_body(
        &key,
        "flame.thumbs.runner.3f2a9c1e8b7d4f60a1c2d3e4f5061728",
        "_INBOX.Lq0dXxJ0a7Hq2cYbTzW1Rk.17",
        1_796_644_800_000,
        &plain,
    );
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(
        hex(&body[..SIGNED_HEAD]),
        "f40e16c866b138d0edb2f7ee23afef9a21df5fad737f40989e264933072d7d970c000001a250600600"
    );
    let cancel = key.cancel_body(
        "flame.thumbs.runner.3f2a9c1e8b7d4f60a1c2d3e4f5061728.cancel",
        "_INBOX.Lq0dXxJ0a7Hq2cYbTzW1Rk.17",
    );
    assert_eq!(
        cancel,
        "_INBOX.Lq0dXxJ0a7Hq2cYbTzW1Rk.17 57bf7bb4692ea0cc2895f961357f046d4808f0162245e085be10fd9f4ff25013"
    );
    let shared = CallKey::shared_event_key(b"correct horse battery staple", "thumbs");
    assert_eq!(
        shared.to_hex(),
        "860f8541846521b39c0339b2de7328a3159ce42c65f46221abea60517da28ea1"
    );
}
