//! The NATS runtime of flame: parents, pools, runners and the wire protocol
//! between them. Apps normally use the `flame` crate, which re-exports this
//! one; `PROTOCOL.md` at the repository root describes every message.
//!
//! Modules, by concept:
//! - [`flame`](crate::Flame): connecting as a parent, or serving as a runner;
//! - `config`, `hooks`: a pool's settings and its grow/shrink callbacks;
//! - `pool`: the parent side of a pool (builder, calls, runners, events,
//!   placement model);
//! - `boot`: booting runners through a backend, for private and shared
//!   pools alike;
//! - `fleet`: shared pools over a JetStream KV bucket (mirror, election,
//!   scaler), and `kv`: reading and compare-and-set of that bucket;
//! - `runner`: the runner side (dispatch, lifecycle, lease);
//! - `streams`: streams as arguments and results, with flow control;
//! - `trace`: the W3C trace context a call carries to its runner;
//! - `protocol`: subjects, headers, bodies and KV records;
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
mod flame;
mod fleet;
mod hooks;
mod kv;
#[cfg(feature = "otel")]
pub mod otel;
mod parent;
mod pool;
mod protocol;
mod replies;
mod runner;
mod streams;
mod trace;

/// What operators' tools use: the pool events parents publish on
/// `flame.<pool>.events.<kind>`, the answers to `flame.pools.info`, and
/// connecting the way parents and runners do (section 11 of
/// `PROTOCOL.md`). The `flame` command is built on it.
pub mod ops {
    pub use crate::connect::{
        connect_tool, connect_tool_with, options_from_env as connect_options_from_env,
        without_credentials,
    };
    pub use crate::protocol::pool_events::{
        classify_gone, event_subject, events_wildcard, format_time, gone_reason, EventKind,
        PoolEventMessage, PoolInfo, Reason, EVENT_TYPE_PREFIX, POOLS_INFO_SUBJECT,
    };
}

pub use build_id::{build_id, BUILD_ID_ENV};
pub use config::PoolConfig;
pub use connect::{ConnectHook, NATS_URL_ENV, RUNNER_NATS_URL_ENV, URL_CREDENTIALS_ENV};
pub use embedded::{NatsServer, NatsServerBuilder};
pub use flame::{init, serve_if_runner, Flame, FlameBuilder};
pub use hooks::PoolEvent;
pub use pool::builder::PoolBuilder;
pub use pool::call::CallOptions;
pub use pool::child::{Child, ChildExit, ChildOptions};
pub use pool::model::RunnerState;
pub use pool::{Pool, PoolStatus, RunnerInfo};
pub use protocol::bootstrap::{parent, ParentInfo, PARENT_ENV};
pub use protocol::sign::SECRET_ENV;
pub use runner::logs::{runner_log_layer, RunnerLogLayer};
