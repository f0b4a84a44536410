//! Core of flame: the pool model, backends, the remote-function registry,
//! wire types and errors. Independent of NATS; the runtime lives in
//! `flame-nats`, and apps use the `flame` crate, which re-exports both.

#![warn(missing_docs)]

pub mod backend;
mod build_id;
mod error;
pub mod pool;
pub mod registry;
pub mod subject;
pub mod wire;

pub use backend::{Backend, BootSpec, Booted, LocalBackend, StopRunner};
pub use build_id::{build_id, BUILD_ID_ENV};
pub use error::{Error, Result};
pub use pool::PoolConfig;
pub use registry::{Registration, Registry, RemoteFn};
pub use wire::{parent, ParentInfo, PARENT_ENV};

#[doc(hidden)]
pub use inventory;
