//! Replies the server may not have got: those published since the last
//! round trip to the server that came back.
//!
//! When a runner's connection drops, the bytes it wrote last can be lost
//! with the server (killed, or cut off): a reply among them would leave its
//! call waiting until its deadline, however long ago the call was sent. So
//! the runner keeps each reply until a later round trip on the same
//! connection (a flush, every heartbeat, and sooner when many replies are
//! kept) proves the server read it, and publishes what it still keeps
//! again once it is back. A parent drops a reply for a call that is no
//! longer waiting, so a reply that did arrive the first time costs nothing
//! more.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::Notify;
use tracing::debug;

/// Replies kept at most, in bytes of payload: past this the oldest go
/// (their calls are then covered only as before, by the outage window).
const MAX_KEPT_BYTES: usize = 32 << 20;

/// This many replies kept (or [`CONFIRM_AFTER_BYTES`]) ask for a round trip
/// before the next heartbeat, so that a busy runner keeps a few thousand
/// replies, not a heartbeat's worth.
const CONFIRM_AFTER: usize = 2048;

/// See [`CONFIRM_AFTER`]. Small, so that large replies are let go of
/// soon: a reply held until the next heartbeat keeps its memory from the
/// next reply, which then lands in fresh pages (one page fault every 4 KiB:
/// at 512 KiB a call, a third more time than the call itself). A round
/// trip costs less than a copy of 256 KiB.
const CONFIRM_AFTER_BYTES: usize = 256 << 10;

/// The replies published since the last confirmed round trip.
#[derive(Default)]
pub(super) struct Unconfirmed {
    inner: Mutex<Kept>,
    /// Woken when enough replies are kept to confirm them early.
    filled: Notify,
}

#[derive(Default)]
struct Kept {
    /// How many replies were ever kept: the numbers of those still kept
    /// run up to this (the oldest is `next - replies.len()`).
    next: u64,
    bytes: usize,
    replies: VecDeque<Reply>,
    /// An early round trip was asked for and has not run yet.
    asked: bool,
}

#[derive(Clone)]
struct Reply {
    subject: Subject,
    headers: Option<HeaderMap>,
    payload: Bytes,
}

impl Kept {
    /// Forgets the `n` oldest replies.
    fn forget_oldest(&mut self, n: usize) {
        for old in self.replies.drain(..n.min(self.replies.len())) {
            self.bytes -= old.payload.len();
        }
    }
}

impl Unconfirmed {
    /// Keeps a reply about to be published.
    pub(super) fn keep(&self, subject: &Subject, headers: Option<&HeaderMap>, payload: &Bytes) {
        let mut kept = self.inner.lock().unwrap();
        kept.next += 1;
        kept.bytes += payload.len();
        kept.replies.push_back(Reply {
            subject: subject.clone(),
            headers: headers.cloned(),
            payload: payload.clone(),
        });
        while kept.bytes > MAX_KEPT_BYTES && kept.replies.len() > 1 {
            kept.forget_oldest(1);
        }
        let full = kept.replies.len() >= CONFIRM_AFTER || kept.bytes >= CONFIRM_AFTER_BYTES;
        if full && !kept.asked {
            kept.asked = true;
            self.filled.notify_one();
        }
    }

    /// Waits until enough replies are kept to confirm them before the next
    /// heartbeat.
    pub(super) async fn filled(&self) {
        self.filled.notified().await;
    }

    /// Where the replies stand now: pass it to [`Unconfirmed::confirm`]
    /// once a round trip started after this call comes back. (The round
    /// trip it is for also answers an early ask, so the next fill may ask
    /// again.)
    pub(super) fn mark(&self) -> u64 {
        let mut kept = self.inner.lock().unwrap();
        kept.asked = false;
        kept.next
    }

    /// The server has every reply published before `mark`: forget them.
    pub(super) fn confirm(&self, mark: u64) {
        let mut kept = self.inner.lock().unwrap();
        let oldest = kept.next - kept.replies.len() as u64;
        kept.forget_oldest(mark.saturating_sub(oldest) as usize);
    }

    /// How many replies are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().replies.len()
    }

    /// Publishes every kept reply again (they stay kept until confirmed).
    pub(super) async fn send_again(&self, client: &async_nats::Client) {
        let again: Vec<Reply> = self.inner.lock().unwrap().replies.iter().cloned().collect();
        if again.is_empty() {
            return;
        }
        debug!(
            replies = again.len(),
            "publishing again the replies the server may have lost"
        );
        for Reply {
            subject,
            headers,
            payload,
        } in again
        {
            let sent = match headers {
                Some(headers) => client.publish_with_headers(subject, headers, payload).await,
                None => client.publish(subject, payload).await,
            };
            if let Err(e) = sent {
                debug!("cannot publish a reply again: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmed_round_trip_forgets_the_replies_before_it() {
        let u = Unconfirmed::default();
        let subject = Subject::from("_INBOX.x.1");
        u.keep(&subject, None, &Bytes::from_static(b"a"));
        let mark = u.mark();
        u.keep(&subject, None, &Bytes::from_static(b"b"));
        u.confirm(mark);
        assert_eq!(u.len(), 1);
        u.confirm(u.mark());
        assert_eq!(u.len(), 0);
    }

    #[tokio::test]
    async fn many_kept_replies_ask_for_a_round_trip_once() {
        let u = Unconfirmed::default();
        let subject = Subject::from("_INBOX.x.1");
        for _ in 0..CONFIRM_AFTER {
            u.keep(&subject, None, &Bytes::from_static(b"a"));
        }
        let quick = std::time::Duration::from_millis(100);
        assert!(tokio::time::timeout(quick, u.filled()).await.is_ok());
        // Asked once until the round trip starts.
        u.keep(&subject, None, &Bytes::from_static(b"a"));
        assert!(tokio::time::timeout(quick, u.filled()).await.is_err());
        let mark = u.mark();
        u.keep(&subject, None, &Bytes::from_static(b"a"));
        assert!(tokio::time::timeout(quick, u.filled()).await.is_ok());
        u.confirm(mark);
        assert_eq!(u.len(), 1);
    }

    #[tokio::test]
    async fn a_large_reply_asks_for_a_round_trip_at_once() {
        let u = Unconfirmed::default();
        let subject = Subject::from("_INBOX.x.1");
        let quick = std::time::Duration::from_millis(100);
        u.keep(
            &subject,
            None,
            &Bytes::from(vec![0u8; CONFIRM_AFTER_BYTES - 1]),
        );
        assert!(tokio::time::timeout(quick, u.filled()).await.is_err());
        u.keep(&subject, None, &Bytes::from_static(b"a"));
        assert!(tokio::time::timeout(quick, u.filled()).await.is_ok());
        // Confirmed, the replies (and their memory) are let go.
        u.confirm(u.mark());
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn the_oldest_replies_go_past_the_limit() {
        let u = Unconfirmed::default();
        let subject = Subject::from("_INBOX.x.1");
        let big = Bytes::from(vec![0u8; MAX_KEPT_BYTES / 2 + 1]);
        u.keep(&subject, None, &big);
        u.keep(&subject, None, &big);
        assert_eq!(u.len(), 1);
        // One reply alone is kept whatever its size.
        let huge = Bytes::from(vec![0u8; MAX_KEPT_BYTES + 1]);
        u.keep(&subject, None, &huge);
        assert_eq!(u.len(), 1);
    }
}
