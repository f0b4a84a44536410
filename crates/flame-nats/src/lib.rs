//! The NATS runtime of flame: runners, pools, calls.
//!
//! Apps normally use the `flame` crate, which re-exports this one.

#![warn(missing_docs)]

mod connect;
pub mod embedded;
mod flame;
mod fleet;
mod kv;
mod pool;
mod protocol;
mod replies;
mod runner;

pub use connect::NATS_URL_ENV;
pub use embedded::{NatsServer, NatsServerBuilder};
pub use flame::{init, Flame, FlameBuilder};
pub use pool::{CallOptions, Pool, PoolBuilder, PoolStatus};
