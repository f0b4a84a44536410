//! The stable core of flame, for backend authors: the [`Backend`] trait and
//! its types (with [`LocalBackend`], runners as child processes), the
//! [`Error`] type, the remote-function registry that `#[flame::remote]`
//! fills, and the app [`State`] remote functions receive. The runtime (pools, runners, the wire
//! protocol) lives in `flame-nats`; apps use the `flame` crate, which
//! re-exports both.

#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "flame runs on Linux only: it reads the GNU build id through dl_iterate_phdr, \
     stops orphaned runners with PR_SET_PDEATHSIG and inspects /proc"
);

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
