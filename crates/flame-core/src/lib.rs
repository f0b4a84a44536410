//! The stable core of flame, for backend authors: the [`Backend`] trait and
//! its types (with [`LocalBackend`], runners as child processes), the
//! [`Error`] type, the remote-function registry that `#[flame::remote]`
//! fills, and the app [`State`] remote functions receive. The runtime (pools, runners, the wire
//! protocol) lives in `flame-nats`; apps use the `flame` crate, which
//! re-exports both.

//!
//! Runs on Linux and macOS. Linux-only extras are marked as such: a
//! runner's memory limit ([`LocalBackend::memory_limit_mb`]) and telling
//! the kernel's OOM kills apart.

#![warn(missing_docs)]
// On docs.rs: mark the items that need a feature or a system.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod backoff;
pub mod codec;
mod error;
pub mod registry;
mod remote_error;
pub mod state;
pub mod stream;

pub use backend::{
    Backend, BootError, BootSpec, Booted, Listed, LocalBackend, StopRunner, RUNNER_FAILURE_PREFIX,
};
pub use error::{BoxError, Error, ErrorKind, Result, Source};
pub use registry::{Registration, Registry, RemoteFn};
pub use remote_error::RemoteError;
pub use state::{State, States};
pub use stream::{channel, Reader, Sender, Stream};

#[doc(hidden)]
pub use inventory;
