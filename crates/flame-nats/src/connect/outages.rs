//! A connection's outages ([`Outages`]): how many, and the last one.

use std::time::Instant;

/// A connection's outages: how many, and the last one.
///
/// An outage ends when the connection's owner says the server has its
/// subscriptions again ([`Outages::resubscribed`]), not when the
/// connection is back: the client sends its subscriptions after
/// reconnecting, and messages published to them before the server has
/// them are dropped. A connection whose owner never says so (a parent's)
/// counts no outage.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Outages {
    /// Outages that ended.
    pub(crate) count: u64,
    /// The last one that ended: when it started and when it ended.
    pub(crate) last: Option<(Instant, Instant)>,
    /// When the current one started, while it lasts.
    pub(crate) down_since: Option<Instant>,
    /// Whether the connection is back (its subscriptions on their way).
    back: bool,
}

impl Outages {
    pub(super) fn disconnected(&mut self) {
        self.back = false;
        self.down_since.get_or_insert_with(Instant::now);
    }

    pub(super) fn reconnected(&mut self) {
        self.back = self.down_since.is_some();
    }

    /// The server has this connection's subscriptions (a flush after the
    /// reconnection came back): the current outage, if any, ends `at`.
    pub(crate) fn resubscribed(&mut self, at: Instant) {
        if !std::mem::take(&mut self.back) {
            return;
        }
        if let Some(since) = self.down_since.take() {
            self.count += 1;
            self.last = Some((since, at));
        }
    }

    /// Whether an outage is over but for its subscriptions.
    pub(crate) fn awaiting_subscriptions(&self) -> bool {
        self.back
    }

    /// Which stretch of connection this is: the same number before and
    /// after a round trip means no outage began or ended meanwhile; `None`
    /// during one.
    pub(crate) fn stretch(&self) -> Option<u64> {
        (self.down_since.is_none() && !self.back).then_some(self.count)
    }
}
