//! The NATS runtime of flame: parents, pools, runners and the wire protocol
//! between them. Apps normally use the `flame` crate, which re-exports this
//! one; `PROTOCOL.md` at the repository root describes every message.
//!
//! Modules, by what they serve:
//! - `parent`: the parent process's side: the entry point
//!   ([`Flame`], [`init`], [`serve_if_runner`]), what every pool of one
//!   parent shares, the one reply inbox of all calls, and the build
//!   identity ([`build_id`]);
//! - `connect`: reaching NATS (URLs, credentials, reconnects, outages,
//!   permissions), and [`embedded`], a private nats-server;
//! - `config`: a pool's settings ([`PoolConfig`]);
//! - `pool`: the parent side of a pool (builder, calls, slots, runners,
//!   runner reports, placement model);
//! - `boot`: booting runners through a backend, for private and shared
//!   pools alike, and the grow/shrink callbacks (told a [`PoolChange`]);
//! - `fleet`: shared pools over a JetStream KV bucket (mirror, election,
//!   scaler, and `fleet::kv`: reading and compare-and-set of that bucket);
//! - `runner`: the runner side (dispatch, checks, execution, lifecycle,
//!   lease);
//! - `stream_hub`: the transport of streams and channels, with flow control;
//! - [`ops`]: pool events for operators, and their publishing;
//! - `trace`: the W3C trace context a call carries to its runner;
//! - `protocol`: subjects, headers, bodies and KV records;
//! - [`env`](mod@env): the environment variables flame reads;
//! - `otel`: OpenTelemetry export (feature `otel`).
//!
//! Runs on Linux and macOS: the build id and tying child processes to
//! their parent use mechanisms both have (see [`build_id`] and
//! [`embedded::TiedChild`]); on Linux the parent-death signal backs up the
//! latter.

// On docs.rs: mark the items that need a feature or a system.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod boot;
mod config;
mod connect;
pub mod env;
mod fleet;
pub mod ops;
#[cfg(feature = "otel")]
pub mod otel;
mod parent;
mod pool;
mod protocol;
mod runner;
mod stream_hub;
mod trace;

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

pub use boot::PoolChange;
pub use config::PoolConfig;
pub use connect::{embedded, ConnectHook};
pub use parent::{build_id, init, serve_if_runner, Flame, FlameBuilder};
pub use pool::builder::PoolBuilder;
pub use pool::call::CallOptions;
pub use pool::child::{Child, ChildExit, ChildOptions};
pub use pool::model::RunnerState;
pub use pool::{Pool, PoolStatus, RunnerInfo};
pub use protocol::bootstrap::{parent, ParentInfo};
pub use runner::logs::{runner_log_layer, RunnerLogLayer};
