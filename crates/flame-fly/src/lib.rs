//! Runners as Fly Machines.
//!
//! [`FlyBackend`] boots each runner as a new Machine of your app, running the
//! same image as the parent (`FLY_IMAGE_REF`), with the runner's environment
//! (`FLAME_PARENT` plus the pool's forwarded variables). Machines are created
//! with `auto_destroy: true` and restart policy `no`, so a runner that exits
//! is destroyed by the platform; a runner that stops answering is destroyed
//! through the API.
//!
//! ```no_run
//! # async fn app(flame: flame_nats::Flame) -> Result<(), flame_core::Error> {
//! // Inside a Machine, app, image, region and token come from the environment.
//! let backend = flame_fly::FlyBackend::builder().cpus(1).memory_mb(2048).build()?;
//! let pool = flame.pool("thumbs").max(8).backend(backend).start().await?;
//! # Ok(()) }
//! ```
//!
//! The parent's NATS URL must be reachable from the runners (for instance
//! over Fly's private network).

#![warn(missing_docs)]

mod api;
mod backend;
mod env;
mod error;
mod guest;
mod retry;
mod stop;

pub use backend::{FlyBackend, FlyBackendBuilder};
pub use env::{API_HOST_ENV, APP_ENV, DEFAULT_API_URL, IMAGE_ENV, REGION_ENV, TOKEN_ENV};
pub use error::FlyError;
pub use guest::Guest;
