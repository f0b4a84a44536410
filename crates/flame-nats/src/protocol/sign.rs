//! Signed calls: a keyed BLAKE3 tag over each call (and cancellation), so
//! that a client of the NATS account that may publish to a runner's subject
//! but does not hold the pool's key cannot make the runner run anything.
//!
//! A signed call's body wraps the plain one (`0xF1` envelope and
//! arguments, `call.rs`):
//!
//! ```text
//! F4  tag (32 bytes)  sent_at (8 bytes, big endian: Unix time in ms)  <F1 body>
//! tag = BLAKE3 keyed_hash(call key, "C" | u16 len | subject | u16 len | reply | sent_at | F1 body)
//! ```
//!
//! The tag binds the call to its runner (the subject) and its reply subject
//! (a call id that a parent never reuses), and its time: a runner refuses a
//! call whose `sent_at` is more than [`REPLAY_WINDOW`] from its own clock,
//! and a tag it accepted before. The parent writes the wrapper into room
//! left in front of the envelope, so the arguments are neither copied nor
//! hashed twice.
//!
//! The call key is derived from the runner's `event_key` (from
//! `FLAME_PARENT`): each runner of a private pool has its own; the runners
//! of a shared pool are given the same one, derived from the pool's secret
//! (`FLAME_SECRET`) and name, which every parent of the pool derives too.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::reports::ReportKey;

/// First byte of a signed call's body.
pub(crate) const SIGNED_V1: u8 = 0xF4;

/// The control message that tells a runner to drain and exit.
pub(crate) const RETIRE: &str = super::subjects::CONTROL_RETIRE;

/// Bytes of a tag.
pub(crate) const TAG_LEN: usize = 32;

/// Bytes the signature adds in front of a call's body.
pub(crate) const SIGNED_HEAD: usize = 1 + TAG_LEN + 8;

/// A runner refuses a call signed more than this long before (or after)
/// its own clock says now: a captured call cannot be replayed later, and
/// within the window the runner remembers the tags it accepted.
pub(crate) const REPLAY_WINDOW: Duration = Duration::from_secs(30);

/// BLAKE3 `derive_key` context of a runner's call key.
const CALL_KEY_CONTEXT: &str = "flame 2026-12 call key v1";

/// BLAKE3 `derive_key` context of a shared pool's runner key.
const SHARED_KEY_CONTEXT: &str = "flame 2026-12 shared pool key v1";

/// The key calls to one runner are signed with. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct CallKey([u8; 32]);

impl fmt::Debug for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallKey(<redacted>)")
    }
}

/// Why a call's signature was refused: for the error reply and the log
/// (never the key or the tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No signature, where one is required.
    Unsigned,
    /// A signature the key does not make: another key (another secret),
    /// or bytes changed on the way.
    BadTag,
    /// Signed too long ago, or too far ahead, by this runner's clock.
    OutOfWindow { skew_ms: i64 },
    /// This very call was accepted before.
    Replayed,
    /// The signed wrapper is cut short.
    Malformed,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = REPLAY_WINDOW.as_secs();
        match self {
            Refused::Unsigned => f.write_str(
                "not signed; this runner takes only calls and cancellations signed with its pool's key",
            ),
            Refused::BadTag => f.write_str(
                "the call's signature does not match this runner's key (a parent of a shared pool with another FLAME_SECRET, or a forged call)",
            ),
            Refused::OutOfWindow { skew_ms } => write!(
                f,
                "the call was signed {:.1} s {} this runner's clock, more than the {window} s a signed call is valid (replay protection); are the clocks of parent and runner apart?",
                skew_ms.unsigned_abs() as f64 / 1000.0,
                if *skew_ms >= 0 { "before" } else { "after" },
            ),
            Refused::Replayed => f.write_str(
                "the call was accepted before: a replayed call is refused",
            ),
            Refused::Malformed => f.write_str("the call's signature is cut short"),
        }
    }
}

impl CallKey {
    /// The call key of a runner whose `event_key` is `key`.
    pub(crate) fn of_runner(key: &ReportKey) -> CallKey {
        CallKey(blake3::derive_key(CALL_KEY_CONTEXT, key.as_bytes()))
    }

    /// The `event_key` every runner of the shared pool `pool` gets from a
    /// parent whose secret is `secret`: the same for every parent with that
    /// secret, and nothing that tells the secret.
    pub(crate) fn shared_event_key(secret: &[u8], pool: &str) -> ReportKey {
        let mut material = Vec::with_capacity(4 + secret.len() + pool.len());
        material.extend_from_slice(&(secret.len() as u32).to_be_bytes());
        material.extend_from_slice(secret);
        material.extend_from_slice(pool.as_bytes());
        ReportKey::from_bytes(blake3::derive_key(SHARED_KEY_CONTEXT, &material))
    }

    fn hasher(&self, domain: u8, subject: &str, reply: &str) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&[domain]);
        h.update(&(subject.len() as u16).to_be_bytes());
        h.update(subject.as_bytes());
        h.update(&(reply.len() as u16).to_be_bytes());
        h.update(reply.as_bytes());
        h
    }

    /// The tag of a call: `signed` is `sent_at` and the plain body.
    fn call_tag(&self, subject: &str, reply: &str, signed: &[u8]) -> blake3::Hash {
        let mut h = self.hasher(b'C', subject, reply);
        h.update(signed);
        h.finalize()
    }

    /// The tag of a cancellation of the call answered on `reply`, sent on
    /// the runner's cancel subject.
    pub(crate) fn cancel_tag(&self, cancel_subject: &str, reply: &str) -> blake3::Hash {
        self.hasher(b'X', cancel_subject, reply).finalize()
    }

    /// Signs a call in place: `body` is [`SIGNED_HEAD`] bytes of room,
    /// then the plain body (`0xF1` envelope and arguments).
    pub(crate) fn sign(&self, body: &mut [u8], subject: &str, reply: &str, sent_at_ms: u64) {
        body[0] = SIGNED_V1;
        body[1 + TAG_LEN..SIGNED_HEAD].copy_from_slice(&sent_at_ms.to_be_bytes());
        let tag = self.call_tag(subject, reply, &body[1 + TAG_LEN..]);
        body[1..1 + TAG_LEN].copy_from_slice(tag.as_bytes());
    }

    /// The body of a `retire` on the runner's control subject: `retire`, a
    /// space, and the tag in hex.
    pub(crate) fn retire_body(&self, control_subject: &str) -> String {
        format!(
            "{RETIRE} {}",
            self.hasher(b'R', control_subject, "").finalize().to_hex()
        )
    }

    /// The body of a cancellation: the call's reply subject, a space, and
    /// the tag in hex.
    pub(crate) fn cancel_body(&self, cancel_subject: &str, reply: &str) -> String {
        format!(
            "{reply} {}",
            self.cancel_tag(cancel_subject, reply).to_hex()
        )
    }
}

/// A signed call's parts, as the runner reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Signed<'a> {
    tag: &'a [u8; TAG_LEN],
    /// `sent_at` and the plain body: what the tag covers after the subjects.
    covered: &'a [u8],
    pub(crate) sent_at_ms: u64,
}

impl<'a> Signed<'a> {
    /// Reads the wrapper of a body that starts with [`SIGNED_V1`].
    pub(crate) fn read(body: &'a [u8]) -> Result<Signed<'a>, Refused> {
        if body.len() < SIGNED_HEAD || body[0] != SIGNED_V1 {
            return Err(Refused::Malformed);
        }
        let tag = body[1..1 + TAG_LEN].try_into().expect("32 bytes");
        let sent_at_ms =
            u64::from_be_bytes(body[1 + TAG_LEN..SIGNED_HEAD].try_into().expect("8 bytes"));
        Ok(Signed {
            tag,
            covered: &body[1 + TAG_LEN..],
            sent_at_ms,
        })
    }

    /// Checks the tag (in constant time).
    pub(crate) fn verify(&self, key: &CallKey, subject: &str, reply: &str) -> Result<(), Refused> {
        let expected = key.call_tag(subject, reply, self.covered);
        if expected == blake3::Hash::from_bytes(*self.tag) {
            Ok(())
        } else {
            Err(Refused::BadTag)
        }
    }

    /// The tag, as the key a runner remembers the call by: 64 of its bits
    /// (a new call's chance to be taken for one of a million remembered
    /// ones is 1 in 10^13; a runner remembers fewer unless it takes 30000
    /// calls a second).
    pub(crate) fn id(&self) -> u64 {
        u64::from_le_bytes(self.tag[..8].try_into().expect("8 bytes"))
    }
}

/// Checks a cancellation's body (`<reply> <hex tag>`) and returns the reply
/// subject of the call to cancel. Without a key, a body without a tag is
/// taken as it is.
pub(crate) fn read_cancel<'a>(
    key: Option<&CallKey>,
    cancel_subject: &str,
    body: &'a [u8],
) -> Result<&'a str, Refused> {
    let text = std::str::from_utf8(body).map_err(|_| Refused::Malformed)?;
    let (reply, tag) = match text.split_once(' ') {
        Some((reply, tag)) => (reply, Some(tag)),
        None => (text, None),
    };
    let Some(key) = key else {
        return Ok(reply);
    };
    let tag = tag.ok_or(Refused::Unsigned)?;
    let tag = blake3::Hash::from_hex(tag).map_err(|_| Refused::Malformed)?;
    if tag == key.cancel_tag(cancel_subject, reply) {
        Ok(reply)
    } else {
        Err(Refused::BadTag)
    }
}

/// What a runner makes of a message on its control subject: `Ok(true)`
/// for a `retire` it must obey (signed with its key, or plain when it has
/// none), `Ok(false)` for anything else (probes have an empty body), and
/// the refusal for a `retire` without a valid tag.
pub(crate) fn read_retire(
    key: Option<&CallKey>,
    control_subject: &str,
    body: &[u8],
) -> Result<bool, Refused> {
    let Some(rest) = body.strip_prefix(RETIRE.as_bytes()) else {
        return Ok(false);
    };
    let Some(key) = key else {
        return Ok(rest.is_empty() || rest.first() == Some(&b' '));
    };
    let tag = match rest.strip_prefix(b" ") {
        Some(tag) => tag,
        None if rest.is_empty() => return Err(Refused::Unsigned),
        None => return Ok(false),
    };
    let tag = std::str::from_utf8(tag).map_err(|_| Refused::Malformed)?;
    let tag = blake3::Hash::from_hex(tag).map_err(|_| Refused::Malformed)?;
    if tag == key.hasher(b'R', control_subject, "").finalize() {
        Ok(true)
    } else {
        Err(Refused::BadTag)
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The signed calls a runner accepted within the last [`REPLAY_WINDOW`],
/// by tag: a call whose tag is here is a replay. Older ones need not be
/// kept: the window refuses them anyway.
#[derive(Debug, Default)]
pub(crate) struct ReplayGuard {
    seen: HashSet<u64, BuildHasherDefault<TagHasher>>,
    /// `(forget after, tag)`, in the order they came.
    order: VecDeque<(u64, u64)>,
}

impl ReplayGuard {
    /// Accepts a call whose tag was verified, unless it is out of the
    /// window or was accepted before.
    pub(crate) fn admit(&mut self, signed: &Signed<'_>, now_ms: u64) -> Result<(), Refused> {
        let window = REPLAY_WINDOW.as_millis() as u64;
        while let Some(&(until, tag)) = self.order.front() {
            if until > now_ms {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&tag);
        }
        // After a burst, give the memory back.
        if self.seen.capacity() > 4 * self.seen.len() + 4096 {
            self.seen.shrink_to_fit();
            self.order.shrink_to_fit();
        }
        let skew_ms = now_ms as i64 - signed.sent_at_ms as i64;
        if skew_ms.unsigned_abs() > window {
            return Err(Refused::OutOfWindow { skew_ms });
        }
        let id = signed.id();
        if !self.seen.insert(id) {
            return Err(Refused::Replayed);
        }
        self.order.push_back((signed.sent_at_ms + window, id));
        Ok(())
    }

    /// Tags remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// Tags are uniformly random already: their first 8 bytes are a good hash.
#[derive(Default)]
pub(crate) struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests;
