//! The NATS runtime of flame: parents, pools, runners and the wire protocol
//! between them. Apps normally use the `flame` crate, which re-exports this
//! one; `PROTOCOL.md` at the repository root describes every message.
//!
//! Modules, by concept:
//! - [`flame`](crate::Flame): connecting as a parent, or serving as a runner;
//!   `connect`: reaching NATS (URLs, credentials, reconnects, outages,
//!   permissions); `replies`: the one reply inbox of all calls;
//! - `config`, `hooks`: a pool's settings and its grow/shrink callbacks
//!   (the in-process pool hooks, told a [`PoolChange`]);
//! - `pool`: the parent side of a pool (builder, calls, slots, runners,
//!   runner reports, placement model);
//! - `boot`: booting runners through a backend, for private and shared
//!   pools alike;
//! - `fleet`: shared pools over a JetStream KV bucket (mirror, election,
//!   scaler, and `fleet::kv`: reading and compare-and-set of that bucket);
//! - `runner`: the runner side (dispatch, checks, execution, lifecycle,
//!   lease);
//! - `stream_hub`: the transport of streams and channels, with flow control;
//! - `announce`: publishing pool events (for operators: [`ops`]);
//! - `trace`: the W3C trace context a call carries to its runner;
//! - `protocol`: subjects, headers, bodies and KV records;
//! - [`env`](mod@env): the environment variables flame reads;
//! - [`embedded`]: a private nats-server.
//!
//! Runs on Linux and macOS: the build id and tying child processes to
//! their parent use mechanisms both have (see [`build_id`] and
//! [`embedded::TiedChild`]); on Linux the parent-death signal backs up the
//! latter.

// On docs.rs: mark the items that need a feature or a system.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod announce;
mod boot;
mod build_id;
mod config;
mod connect;
pub mod embedded;
pub mod env;
mod flame;
mod fleet;
mod hooks;
#[cfg(feature = "otel")]
pub mod otel;
mod parent;
mod pool;
mod protocol;
mod replies;
mod runner;
mod stream_hub;
mod trace;

/// Following pools from an app or a tool: the pool events parents publish
/// on `flame.<pool>.events.<kind>` and the answers to `flame.pools.info`
/// (section 11 of `PROTOCOL.md`). The `flame` command is built on it.
pub mod ops {
    pub use crate::protocol::pool_events::{
        event_subject, events_wildcard, EventKind, PoolEventMessage, PoolInfo, Reason,
        EVENT_TYPE_PREFIX, POOLS_INFO_SUBJECT,
    };
}

/// Plumbing for operators' tools such as the `flame` command: connecting
/// to NATS the way parents and runners do (the same environment
/// variables), and showing a URL without its credentials. Apps do not
/// need it (the `flame` crate does not re-export it).
pub mod tool {
    pub use crate::connect::{
        connect_tool, connect_tool_with, options_from_env as connect_options_from_env,
        without_credentials,
    };
}

pub use build_id::build_id;
pub use config::PoolConfig;
pub use connect::ConnectHook;
pub use flame::{init, serve_if_runner, Flame, FlameBuilder};
pub use hooks::PoolChange;
pub use pool::builder::PoolBuilder;
pub use pool::call::CallOptions;
pub use pool::child::{Child, ChildExit, ChildOptions};
pub use pool::model::RunnerState;
pub use pool::{Pool, PoolStatus, RunnerInfo};
pub use protocol::bootstrap::{parent, ParentInfo};
pub use runner::logs::{runner_log_layer, RunnerLogLayer};
