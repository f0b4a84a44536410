//! Coalesced calls on the wire: several calls to one runner in one NATS
//! message, and several replies to one parent in one message back.
//!
//! A batch request goes to the runner's call subject like a single call;
//! its first byte tells them apart (`0xF2` here, `0xF1` for one call). Each
//! call in it keeps its own envelope (deadline, cast flag, function) and its
//! own reply subject, so a batch is only a way to carry calls: the runner
//! answers each call as if it came alone, except that the replies of the
//! calls it finishes while reading the batch go back together, to the
//! parent's batch reply subject `<inbox>.0`.
//!
//! ```text
//! request:  F2  prefix_len prefix  count  (suffix_len suffix  trace_len trace  body_len body)*
//! reply:    F3  count  (suffix_len suffix  value_len value)*
//! ```
//!
//! Lengths and counts are unsigned LEB128. `prefix` + `suffix` is a call's
//! reply subject (`<inbox>.` and the call's token); `trace` its W3C
//! `traceparent` (empty when the call is not traced: a call alone carries
//! it as a header); `body` is the call's request body (section 4.1 of
//! PROTOCOL.md); `value` the body of its successful reply. Error replies
//! are never batched.

use bytes::{BufMut, Bytes, BytesMut};

/// First byte of a batch of calls.
pub(crate) const BATCH_V1: u8 = 0xF2;
/// First byte of a batch of replies.
pub(crate) const REPLY_BATCH_V1: u8 = 0xF3;
/// Last token of the subject batched replies go to (call tokens start at 1).
pub(crate) const BATCH_REPLY_TOKEN: &str = "0";

/// Appends `n` as unsigned LEB128 (7 bits a byte, low bits first, the
/// high bit set on every byte but the last).
pub(crate) fn put_uvarint(out: &mut impl BufMut, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

/// Reads bytes off the front of a body, saying what is wrong if it ends
/// early.
pub(crate) struct Reader<'a> {
    body: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(body: &'a Bytes) -> Reader<'a> {
        Reader { body, at: 0 }
    }

    pub(crate) fn byte(&mut self) -> Result<u8, &'static str> {
        let b = *self.body.get(self.at).ok_or("the batch is cut short")?;
        self.at += 1;
        Ok(b)
    }

    pub(crate) fn uvarint(&mut self) -> Result<u64, &'static str> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("a length in the batch is not a valid number")
    }

    /// A length-prefixed run of bytes, shared with the body (no copy).
    pub(crate) fn chunk(&mut self) -> Result<Bytes, &'static str> {
        let len = usize::try_from(self.uvarint()?).map_err(|_| "a length is too large")?;
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.body.len())
            .ok_or("the batch is cut short")?;
        let chunk = self.body.slice(self.at..end);
        self.at = end;
        Ok(chunk)
    }

    fn text(&mut self) -> Result<String, &'static str> {
        String::from_utf8(self.chunk()?.to_vec()).map_err(|_| "a subject in the batch is not UTF-8")
    }

    fn done(&self) -> bool {
        self.at == self.body.len()
    }
}

/// Bytes a call adds to a batch besides its body, reply suffix and trace.
pub(crate) const PER_CALL_OVERHEAD: usize = 3 * 10;

/// One call of a batch, to write.
#[derive(Clone, Copy)]
pub(crate) struct BatchedCall<'a> {
    /// Its reply subject.
    pub(crate) reply: &'a str,
    /// Its `traceparent`, if traced.
    pub(crate) trace: Option<&'a str>,
    /// Its request body.
    pub(crate) body: &'a Bytes,
}

/// One call of a batch, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadCall {
    pub(crate) reply: String,
    pub(crate) trace: Option<String>,
    pub(crate) body: Bytes,
}

/// The body of a batch of calls whose reply subjects all start with
/// `prefix`.
pub(crate) fn batch_body<'a>(
    prefix: &str,
    calls: impl ExactSizeIterator<Item = BatchedCall<'a>> + Clone,
) -> Bytes {
    let size: usize = calls
        .clone()
        .map(|c| c.reply.len() + c.trace.map_or(0, str::len) + c.body.len() + PER_CALL_OVERHEAD)
        .sum();
    let mut out = BytesMut::with_capacity(1 + 10 + prefix.len() + 10 + size);
    out.put_u8(BATCH_V1);
    put_uvarint(&mut out, prefix.len() as u64);
    out.put_slice(prefix.as_bytes());
    put_uvarint(&mut out, calls.len() as u64);
    for call in calls {
        let suffix = call.reply.strip_prefix(prefix).unwrap_or(call.reply);
        put_uvarint(&mut out, suffix.len() as u64);
        out.put_slice(suffix.as_bytes());
        let trace = call.trace.unwrap_or("");
        put_uvarint(&mut out, trace.len() as u64);
        out.put_slice(trace.as_bytes());
        put_uvarint(&mut out, call.body.len() as u64);
        out.put_slice(call.body);
    }
    out.freeze()
}

/// The calls of a batch, in order.
pub(crate) fn read_batch(body: &Bytes) -> Result<Vec<ReadCall>, &'static str> {
    let mut r = Reader::new(body);
    if r.byte()? != BATCH_V1 {
        return Err("not a batch of calls (first byte 0xF2)");
    }
    let prefix = r.text()?;
    let count = r.uvarint()?;
    // Each call takes at least two bytes: a count past that is a lie.
    if count > (body.len() as u64) / 2 {
        return Err("the batch counts more calls than it holds");
    }
    let mut calls = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let suffix = r.text()?;
        let trace = r.text()?;
        let call = r.chunk()?;
        calls.push(ReadCall {
            reply: format!("{prefix}{suffix}"),
            trace: (!trace.is_empty()).then_some(trace),
            body: call,
        });
    }
    if !r.done() {
        return Err("the batch has bytes after its last call");
    }
    Ok(calls)
}

/// The body of a batch of replies: `(reply subject suffix, value)` pairs.
pub(crate) fn reply_batch_body<'a>(
    replies: impl ExactSizeIterator<Item = (&'a str, &'a Bytes)> + Clone,
) -> Bytes {
    let size: usize = replies
        .clone()
        .map(|(suffix, value)| suffix.len() + value.len() + PER_CALL_OVERHEAD)
        .sum();
    let mut out = BytesMut::with_capacity(1 + 10 + size);
    out.put_u8(REPLY_BATCH_V1);
    put_uvarint(&mut out, replies.len() as u64);
    for (suffix, value) in replies {
        put_uvarint(&mut out, suffix.len() as u64);
        out.put_slice(suffix.as_bytes());
        put_uvarint(&mut out, value.len() as u64);
        out.put_slice(value);
    }
    out.freeze()
}

/// The replies of a batch: `(reply subject suffix, value)`, in order.
pub(crate) fn read_reply_batch(body: &Bytes) -> Result<Vec<(String, Bytes)>, &'static str> {
    let mut r = Reader::new(body);
    if r.byte()? != REPLY_BATCH_V1 {
        return Err("not a batch of replies (first byte 0xF3)");
    }
    let count = r.uvarint()?;
    if count > (body.len() as u64) / 2 {
        return Err("the batch counts more replies than it holds");
    }
    let mut replies = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let suffix = r.text()?;
        replies.push((suffix, r.chunk()?));
    }
    if !r.done() {
        return Err("the batch has bytes after its last reply");
    }
    Ok(replies)
}

/// Splits a reply subject into the part its parent shares with its other
/// calls (up to the last `.`, included) and the call's token.
pub(crate) fn split_reply(reply: &str) -> (&str, &str) {
    match reply.rfind('.') {
        Some(dot) => reply.split_at(dot + 1),
        None => ("", reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_bad_ones_are_refused() {
        let (a, b) = (Bytes::from_static(b"\xf1one"), Bytes::from_static(b""));
        let calls = [
            BatchedCall {
                reply: "_INBOX.x.1",
                trace: None,
                body: &a,
            },
            BatchedCall {
                reply: "_INBOX.x.22",
                trace: Some("00-ab-cd-01"),
                body: &b,
            },
        ];
        let body = batch_body("_INBOX.x.", calls.into_iter());
        let back = read_batch(&body).unwrap();
        assert_eq!(
            back,
            vec![
                ReadCall {
                    reply: "_INBOX.x.1".into(),
                    trace: None,
                    body: a.clone()
                },
                ReadCall {
                    reply: "_INBOX.x.22".into(),
                    trace: Some("00-ab-cd-01".into()),
                    body: b.clone()
                },
            ]
        );
        assert_eq!(
            &body[..],
            b"\xf2\x09_INBOX.x.\x02\x011\x00\x04\xf1one\x0222\x0b00-ab-cd-01\x00"
        );
        for cut in 0..body.len() {
            assert!(read_batch(&body.slice(..cut)).is_err(), "{cut}");
        }
        let mut long = body.to_vec();
        long.push(0);
        assert!(read_batch(&Bytes::from(long)).is_err());
        let lying = Bytes::from_static(b"\xf2\x00\xff\xff\xff\x0f");
        assert!(read_batch(&lying).is_err());

        let replies = [("1", &a), ("22", &b)];
        let body = reply_batch_body(replies.into_iter());
        assert_eq!(
            read_reply_batch(&body).unwrap(),
            vec![("1".to_string(), a), ("22".to_string(), b)]
        );
        for cut in 0..body.len() {
            assert!(read_reply_batch(&body.slice(..cut)).is_err(), "{cut}");
        }
        assert_eq!(split_reply("_INBOX.x.17"), ("_INBOX.x.", "17"));
        assert_eq!(split_reply("plain"), ("", "plain"));
    }
}
