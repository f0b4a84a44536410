//! Runner reports: what a runner of a private pool tells its parent
//! (ready, leave, ping, stopping), and the parent's answers: request/reply
//! on `flame.<pool>.parent.<parent_id>.<report>` with JSON bodies. (Not
//! pool events, which parents publish for operators: `pool_events.rs`;
//! nor the in-process pool hooks: `boot/hooks.rs`.)
//!
//! Every report is signed: the parent gives each runner a secret
//! [`ReportKey`] in `FLAME_PARENT` (the field `event_key`, its name on the
//! wire), and the runner sends, with each report, a sequence number and a
//! keyed BLAKE3 hash of the report under that key.
//! Any client on the NATS account can publish to the parent's subjects;
//! without the key it cannot make an event the parent accepts, and it
//! cannot replay one (the sequence must grow).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a runner tells its parent; the last token of the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReportKind {
    /// Subscribed and flushed: route calls here.
    Ready,
    /// Idle past the idle timeout: asks leave to stop.
    Leave,
    /// Liveness check.
    Ping,
    /// The runner is stopping (SIGTERM, single-use, idle): place nothing new
    /// on it.
    Stopping,
}

impl ReportKind {
    /// Last subject token.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReportKind::Ready => "ready",
            ReportKind::Leave => "leave",
            ReportKind::Ping => "ping",
            ReportKind::Stopping => "stopping",
        }
    }

    /// Parses the last token of a parent-event subject.
    pub(crate) fn from_subject(subject: &str) -> Option<ReportKind> {
        match subject.rsplit('.').next()? {
            "ready" => Some(ReportKind::Ready),
            "leave" => Some(ReportKind::Leave),
            "ping" => Some(ReportKind::Ping),
            "stopping" => Some(ReportKind::Stopping),
            _ => None,
        }
    }
}

/// The secret a runner signs its events with: 32 random bytes, written as
/// 64 hex digits in `FLAME_PARENT`. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ReportKey([u8; 32]);

impl ReportKey {
    /// A new random key.
    pub(crate) fn random() -> ReportKey {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        ReportKey(key)
    }

    /// Parses 64 hex digits.
    pub(crate) fn from_hex(hex: &str) -> Option<ReportKey> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| ReportKey(*h.as_bytes()))
    }

    /// A key of these bytes.
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> ReportKey {
        ReportKey(bytes)
    }

    /// The key's bytes (secret: to derive other keys from).
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 hex digits.
    pub(crate) fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    fn proof(&self, event: ReportKind, body: &RunnerReport) -> blake3::Hash {
        let text = format!(
            "{}|{}|{}|{}|{}",
            event.as_str(),
            body.runner,
            body.build,
            body.idle_ms,
            body.seq
        );
        self.keyed(text.as_bytes())
    }

    /// The keyed BLAKE3 hash of `bytes`.
    pub(super) fn keyed(&self, bytes: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.0, bytes)
    }
}

impl fmt::Debug for ReportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReportKey(<redacted>)")
    }
}

/// JSON body of a runner event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunnerReport {
    /// The runner's id.
    pub(crate) runner: String,
    /// Its build id.
    pub(crate) build: String,
    /// For `leave`: how long the runner has had no work, in milliseconds.
    #[serde(default)]
    pub(crate) idle_ms: u64,
    /// Counts the runner's events, from 1; the parent accepts each number
    /// once (see [`ReplayWindow`]), so an event cannot be replayed.
    #[serde(default)]
    pub(crate) seq: u64,
    /// Keyed BLAKE3 hash, as 64 hex digits, of
    /// `"<event>|<runner>|<build>|<idle_ms>|<seq>"` under the runner's key.
    #[serde(default)]
    pub(crate) proof: String,
}

impl RunnerReport {
    /// A signed event.
    pub(crate) fn signed(
        key: &ReportKey,
        event: ReportKind,
        runner: &str,
        build: &str,
        idle_ms: u64,
        seq: u64,
    ) -> RunnerReport {
        let mut body = RunnerReport {
            runner: runner.to_string(),
            build: build.to_string(),
            idle_ms,
            seq,
            proof: String::new(),
        };
        body.proof = key.proof(event, &body).to_hex().to_string();
        body
    }

    /// True when the proof is the key's (compared in constant time).
    pub(crate) fn verify(&self, key: &ReportKey, event: ReportKind) -> bool {
        match blake3::Hash::from_hex(&self.proof) {
            Ok(proof) => proof == key.proof(event, self),
            Err(_) => false,
        }
    }
}

/// Which sequence numbers of a runner's events were accepted: the highest,
/// and the 63 below it. Events may arrive out of order (pings go out on
/// their own tasks), so an older number is still accepted once; a number
/// seen before, or older than the window, is a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReplayWindow {
    highest: u64,
    /// Bit `i` set: `highest - i` was accepted.
    seen: u64,
}

impl ReplayWindow {
    /// Accepts `seq` if it is new; false for a replay.
    pub(crate) fn accept(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = seq;
            return true;
        }
        let age = self.highest - seq;
        if age >= 64 || self.seen & (1 << age) != 0 {
            return false;
        }
        self.seen |= 1 << age;
        true
    }
}

/// JSON answer of the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ParentAnswer {
    /// Yes (ready acknowledged, leave granted, still known) or no.
    pub(crate) ok: bool,
    /// Why not, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

impl ParentAnswer {
    /// Yes or no, without a reason.
    pub(crate) fn answer(ok: bool) -> ParentAnswer {
        ParentAnswer { ok, reason: None }
    }

    /// No, because of `reason`.
    pub(crate) fn refuse(reason: impl Into<String>) -> ParentAnswer {
        ParentAnswer {
            ok: false,
            reason: Some(reason.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_only_the_key_signs_them() {
        let key = ReportKey::random();
        let ev = RunnerReport::signed(&key, ReportKind::Stopping, "r1", "b1", 0, 7);
        let json = serde_json::to_string(&ev).unwrap();
        let back: RunnerReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ev);
        assert!(back.verify(&key, ReportKind::Stopping));
        // Another event, key, runner or sequence does not verify.
        assert!(!back.verify(&key, ReportKind::Leave));
        assert!(!back.verify(&ReportKey::random(), ReportKind::Stopping));
        let mut forged = back.clone();
        forged.seq = 8;
        assert!(!forged.verify(&key, ReportKind::Stopping));
        // An unsigned event (what a foreign client would send) fails.
        let unsigned: RunnerReport =
            serde_json::from_str(r#"{"runner":"r1","build":"b1","idle_ms":0}"#).unwrap();
        assert!(!unsigned.verify(&key, ReportKind::Stopping));
    }

    #[test]
    fn proofs_match_the_test_vector_of_protocol_md() {
        let key: Vec<u8> = (0u8..32).collect();
        let key = ReportKey(key.try_into().unwrap());
        let ev = RunnerReport::signed(
            &key,
            ReportKind::Ready,
            "3f2a9c1e8b7d4f60a1c2d3e4f5061728",
            "9c1b0e7d5a3f2e4d6c8b0a1f3e5d7c9b1a2f4e6d",
            0,
            1,
        );
        assert_eq!(
            ev.proof,
            "84b01deb541b12ac2ff6d1522c97a6255a6657119de2eaf56ca0efab4c44139f"
        );
    }

    #[test]
    fn replays_are_refused_and_late_events_accepted_once() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0));
        assert!(w.accept(1));
        assert!(w.accept(3));
        assert!(w.accept(2), "late but new");
        assert!(!w.accept(2), "replay");
        assert!(!w.accept(3), "replay");
        assert!(w.accept(100));
        assert!(!w.accept(30), "older than the window");
        assert!(w.accept(60));
        assert!(!w.accept(60));
    }

    #[test]
    fn keys_round_trip_as_hex_and_never_print() {
        let key = ReportKey::random();
        assert_eq!(ReportKey::from_hex(&key.to_hex()), Some(key.clone()));
        assert_eq!(key.to_hex().len(), 64);
        assert!(ReportKey::from_hex("zz").is_none());
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }

    #[test]
    fn event_names_round_trip() {
        for e in [
            ReportKind::Ready,
            ReportKind::Leave,
            ReportKind::Ping,
            ReportKind::Stopping,
        ] {
            assert_eq!(
                ReportKind::from_subject(&format!("a.b.{}", e.as_str())),
                Some(e)
            );
        }
        assert_eq!(ReportKind::from_subject("a.b.nope"), None);
        let answer = ParentAnswer::refuse("gone");
        let json = serde_json::to_string(&answer).unwrap();
        assert_eq!(serde_json::from_str::<ParentAnswer>(&json).unwrap(), answer);
        assert_eq!(
            serde_json::to_string(&ParentAnswer::answer(true)).unwrap(),
            r#"{"ok":true}"#
        );
    }
}
