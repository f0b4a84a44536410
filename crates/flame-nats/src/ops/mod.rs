//! Following pools from an app or a tool: the pool events parents publish
//! on `flame.<pool>.events.<kind>` and the answers to `flame.pools.info`
//! (section 11 of `PROTOCOL.md`). The `flame` command is built on it.
//!
//! Where the events come from, inside flame:
//! - `mod.rs`: the public types above (their wire format is
//!   `protocol/pool_events.rs`);
//! - `announce.rs`: a parent's publisher of pool events, off the calls'
//!   path (one task per parent).
//!
//! What to announce is decided where the change happens: a private pool's
//! `pool/info.rs` (its runners' events and the `flame.pools.info` answer),
//! a shared pool's scaler in `fleet/` (its runners' events, from the
//! bucket).

mod announce;

pub use crate::protocol::pool_events::{
    event_subject, events_wildcard, EventKind, PoolEventMessage, PoolInfo, Reason,
    EVENT_TYPE_PREFIX, POOLS_INFO_SUBJECT,
};

pub(crate) use announce::{Announcer, Counts, Outgoing, PoolAnnouncer};
