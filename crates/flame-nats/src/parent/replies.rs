//! Replies to a parent's calls: one subscription (`<inbox>.*`) for all of
//! them, each call waiting on its own token.
//!
//! async-nats multiplexes requests the same way internally, but keeps the
//! reply subject to itself. Owning it gives flame two things for free: a
//! caller that stops waiting can name its call to the runner by its reply
//! subject (no extra header), and a runner that dies or a lost connection
//! fails exactly the calls waiting on it by sending them the error, so a
//! call waits on one channel only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{Message, StatusCode};
use flame_core::Error;
use futures::StreamExt;
use tokio::sync::oneshot;
use tracing::debug;

use crate::protocol::batch::{read_reply_batch, BATCH_REPLY_TOKEN};

/// What a waiting call receives: the runner's reply, or why none will come.
pub(crate) type Outcome = Result<Message, Error>;

struct Waiting {
    tx: oneshot::Sender<Outcome>,
    function: &'static str,
    /// When the call was sent (about).
    at: Instant,
    /// The runner the call went to, so that its failure reaches the call.
    runner: Arc<str>,
    /// The other calls of the batch this call's reply subject carried: a
    /// no-responders status for this call is theirs too.
    followers: Vec<u64>,
}

/// The reply multiplexer of one parent connection.
pub(crate) struct Replies {
    /// `<inbox>.`; a call's reply subject is this plus its token.
    prefix: String,
    waiting: Mutex<HashMap<u64, Waiting>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Replies {
    /// Subscribes to the parent's reply inbox and starts delivering.
    pub(crate) async fn start(
        client: &async_nats::Client,
        url: String,
        mut disconnects: tokio::sync::watch::Receiver<u64>,
    ) -> Result<Arc<Replies>, Error> {
        let inbox = client.new_inbox();
        let mut sub = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| Error::nats("cannot subscribe to replies", e))?;
        let replies = Arc::new(Replies {
            prefix: format!("{inbox}."),
            waiting: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        });
        // Deliver replies; the loop awaits only the subscription, so each
        // reply costs one channel receive and nothing else.
        let weak = Arc::downgrade(&replies);
        let closed_url = url.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(replies) = weak.upgrade() else {
                    return;
                };
                replies.deliver(msg);
            }
            if let Some(replies) = weak.upgrade() {
                replies.fail_all(|| Error::NatsUnreachable {
                    url: closed_url.clone(),
                    reason: "the connection to NATS was closed".into(),
                    source: None,
                });
            }
        });
        // Replies to calls in flight are lost with the connection: fail
        // those calls now, not at their deadline.
        let weak = Arc::downgrade(&replies);
        tokio::spawn(async move {
            while disconnects.changed().await.is_ok() {
                let Some(replies) = weak.upgrade() else {
                    return;
                };
                replies.fail_all(|| Error::NatsUnreachable {
                    url: url.clone(),
                    reason: "the connection was lost while the call ran; its result is lost".into(),
                    source: None,
                });
            }
        });
        Ok(replies)
    }

    /// Registers a call; returns its reply subject and where the outcome
    /// arrives.
    pub(crate) fn register(
        &self,
        function: &'static str,
        runner: Arc<str>,
    ) -> (u64, async_nats::Subject, oneshot::Receiver<Outcome>) {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(
            token,
            Waiting {
                tx,
                function,
                at: Instant::now(),
                runner,
                followers: Vec::new(),
            },
        );
        let mut reply = String::with_capacity(self.prefix.len() + 20);
        reply.push_str(&self.prefix);
        push_decimal(&mut reply, token);
        (token, reply.into(), rx)
    }

    /// Forgets a call (answered, timed out or dropped). True if it was
    /// still waiting.
    pub(crate) fn forget(&self, token: u64) -> bool {
        self.waiting.lock().unwrap().remove(&token).is_some()
    }

    /// A batch goes out with the reply subject of call `first`; `others`
    /// are the tokens of the other calls in it.
    pub(crate) fn batch_sent(&self, first: u64, others: Vec<u64>) {
        if let Some(w) = self.waiting.lock().unwrap().get_mut(&first) {
            w.followers = others;
        }
    }

    fn deliver(&self, msg: Message) {
        let Some(token) = msg.subject.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        if token == BATCH_REPLY_TOKEN {
            return self.deliver_batch(&msg);
        }
        let Some(token) = token.parse::<u64>().ok() else {
            debug!(subject = %msg.subject, "reply for a call nobody waits for");
            return;
        };
        let Some(waiting) = self.waiting.lock().unwrap().remove(&token) else {
            debug!("reply for a call nobody waits for");
            return;
        };
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            // Nobody took the batch: none of its calls was received.
            for &other in &waiting.followers {
                self.deliver_to(other, msg.clone());
            }
        }
        let _ = waiting.tx.send(Ok(msg));
    }

    /// Hands `msg` to call `token`; false if nobody waits for it.
    fn deliver_to(&self, token: u64, msg: Message) -> bool {
        let Some(waiting) = self.waiting.lock().unwrap().remove(&token) else {
            return false;
        };
        let _ = waiting.tx.send(Ok(msg));
        true
    }

    /// The replies of a batch (see `protocol/batch.rs`), each to its call
    /// as if it came alone.
    fn deliver_batch(&self, msg: &Message) {
        let replies = match read_reply_batch(&msg.payload) {
            Ok(replies) => replies,
            Err(e) => {
                debug!("ignoring a batch of replies: {e}");
                return;
            }
        };
        for (suffix, value) in replies {
            let Ok(token) = suffix.parse::<u64>() else {
                continue;
            };
            let reply = Message {
                // (The batch's: nobody reads a reply's subject, and a
                // subject per call would cost an allocation each.)
                subject: msg.subject.clone(),
                reply: None,
                length: value.len(),
                payload: value,
                headers: None,
                status: None,
                description: None,
            };
            self.deliver_to(token, reply);
        }
    }

    /// Fails the calls `tokens` that still wait, with `error`.
    pub(crate) fn fail_tokens(&self, tokens: &[u64], error: impl Fn() -> Error) {
        let failed: Vec<Waiting> = {
            let mut waiting = self.waiting.lock().unwrap();
            tokens.iter().filter_map(|t| waiting.remove(t)).collect()
        };
        for w in failed {
            let _ = w.tx.send(Err(error()));
        }
    }

    /// Fails the calls waiting on `runner`, now or, with `grace`, after
    /// giving replies already on their way that long to arrive.
    pub(crate) fn fail_runner(self: &Arc<Self>, runner: &str, reason: String, grace: Duration) {
        if grace.is_zero() {
            self.fail_runner_now(runner, &reason);
            return;
        }
        // Called from drop paths too, which may run outside any runtime:
        // then there is nobody left to wait for a trailing reply.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.fail_runner_now(runner, &reason);
            return;
        };
        let (me, runner) = (self.clone(), runner.to_string());
        rt.spawn(async move {
            tokio::time::sleep(grace).await;
            me.fail_runner_now(&runner, &reason);
        });
    }

    fn fail_runner_now(&self, runner: &str, reason: &str) {
        self.fail_where(
            |w| &*w.runner == runner,
            |w| Error::RunnerDown {
                function: w.function.to_string(),
                runner: runner.to_string(),
                reason: reason.to_string(),
            },
        );
    }

    /// Fails the waiting calls `which` picks, each with its `error`;
    /// returns how many.
    fn fail_where(
        &self,
        which: impl Fn(&Waiting) -> bool,
        error: impl Fn(&Waiting) -> Error,
    ) -> usize {
        let failed: Vec<Waiting> = {
            let mut waiting = self.waiting.lock().unwrap();
            let tokens: Vec<u64> = waiting
                .iter()
                .filter(|(_, w)| which(w))
                .map(|(t, _)| *t)
                .collect();
            tokens
                .into_iter()
                .filter_map(|t| waiting.remove(&t))
                .collect()
        };
        let n = failed.len();
        for w in failed {
            let e = error(&w);
            let _ = w.tx.send(Err(e));
        }
        n
    }

    /// Fails the calls sent to `runner` between `from` and `to` with
    /// `error`: they went to it while its connection to NATS was down, so
    /// they never reached it.
    pub(crate) fn fail_sent_between(
        &self,
        runner: &str,
        from: Instant,
        to: Instant,
        error: impl Fn() -> Error,
    ) -> usize {
        self.fail_where(
            |w| &*w.runner == runner && w.at >= from && w.at <= to,
            |_| error(),
        )
    }

    /// The server refused a publish (`-ERR 'Permissions Violation for
    /// Publish to "<subject>"'`): when the subject is a runner's call
    /// subject, the calls waiting on that runner were refused too (the
    /// permission does not change), so they fail now with
    /// [`Error::PermissionDenied`] instead of at their deadline.
    pub(crate) fn publish_refused(&self, violation: &str) {
        let Some(runner) = refused_runner(violation) else {
            return;
        };
        self.fail_where(
            |w| &*w.runner == runner,
            |_| Error::PermissionDenied {
                reason: violation.to_string(),
            },
        );
    }

    fn fail_all(&self, error: impl Fn() -> Error) {
        let all: Vec<Waiting> = self
            .waiting
            .lock()
            .unwrap()
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in all {
            let _ = w.tx.send(Err(error()));
        }
    }
}

/// The runner whose call subject (`flame.<pool>.runner.<id>`) a publish
/// violation names, if it names one.
fn refused_runner(violation: &str) -> Option<&str> {
    let (_, rest) = violation.split_once("Publish to \"")?;
    let subject = rest.split('"').next()?;
    match subject.split('.').collect::<Vec<_>>()[..] {
        [root, _pool, "runner", id] if root == crate::protocol::subjects::ROOT => Some(id),
        _ => None,
    }
}

/// Appends `n` in decimal (without the formatting machinery: once per call).
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // (ASCII digits.)
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_call_subject_names_its_runner() {
        let v = r#"Permissions Violation for Publish to "flame.thumbs.runner.3f2a""#;
        assert_eq!(refused_runner(v), Some("3f2a"));
        let cancel = r#"Permissions Violation for Publish to "flame.thumbs.runner.3f2a.cancel""#;
        assert_eq!(refused_runner(cancel), None);
        let sub = r#"Permissions Violation for Subscription to "flame.thumbs.runner.3f2a""#;
        assert_eq!(refused_runner(sub), None);
        let other = r#"Permissions Violation for Publish to "$KV.flame-thumbs.parents.x""#;
        assert_eq!(refused_runner(other), None);
    }

    #[test]
    fn decimals() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut s = String::from("x.");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x.{n}"));
        }
    }
}
