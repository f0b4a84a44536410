//! Runners as Docker containers.
//!
//! [`DockerBackend`] boots each runner as a new container of the parent's
//! image, through the Docker Engine API (`DOCKER_HOST`, else
//! `/var/run/docker.sock`). What a runner container is made of:
//!
//! - **Parent in a container** (no image configured): the backend finds
//!   its own container (see below) and inspects it once. Runners get its
//!   image (by id: the very same build), its entrypoint and command,
//!   working directory, `init`, network mode and every network it is
//!   attached to (a Compose stack's network, say), and its environment as
//!   configured: what the parent got as variables (secrets included) the
//!   runner gets too, as variables, never in labels or logs. Runners run
//!   as the image's user, not the parent's, and get none of its mounts
//!   (they may hold the Docker socket); add some with
//!   [`DockerBackendBuilder::bind`].
//! - **Parent on the host**: set [`DockerBackendBuilder::image`] (and
//!   [`DockerBackendBuilder::network`]; `host` lets runners reach a NATS
//!   server on the host's loopback address).
//!
//! On top come the backend's own variables ([`DockerBackendBuilder::env`])
//! and the runner's: `FLAME_PARENT` (which holds no secret) and the pool's
//! forwarded variables.
//!
//! The parent's container is found by its id, from the source paths of
//! the `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` mounts Docker
//! makes from `<data-root>/containers/<id>/` (`/proc/self/mountinfo`), else
//! from `/proc/self/cgroup` (`/docker/<id>`, `docker-<id>.scope`), else
//! from the hostname (Docker's default: the id's first 12 characters).
//!
//! Every runner container has:
//! - labels [`POOL_LABEL`], [`PARENT_LABEL`], [`RUNNER_LABEL`] and
//!   [`SCOPE_LABEL`] (`docker ps --filter label=flame.pool=thumbs` lists a
//!   pool's runners);
//! - `AutoRemove`: the Engine removes it once its runner exits;
//! - the pool's limits, if set: memory (no swap on top), CPUs, GPUs
//!   (device requests of the `gpu` capability).
//!
//! **Boot**: create, then start; the boot ends when Docker has started the
//! container (the runner then reports ready over NATS). A missing image,
//! an invalid configuration (400), a conflict (409) fail the boot at once
//! and for good ([`flame_core::backend::BootError::permanent`]), with
//! Docker's own message; the Engine's 5xx and an unreachable Engine are
//! retried with backoff (transient). A container that exits before its
//! runner is ready fails the boot at once with its exit code. A boot
//! given up (its timeout, a closed pool) removes its container.
//!
//! **Exit**: the Engine's events for the container tell its end: `oom`
//! (the kernel's OOM killer, at the memory limit) is reported to the pool
//! as "ran out of memory", else the exit code of `die`.
//!
//! **Retire**: a stop (SIGTERM, then SIGKILL) whose timeout covers the
//! pool's `shutdown_timeout` rounded up to whole seconds, plus one; then
//! the container's removal is awaited (forced after 10 s).
//!
//! **Reaping**: a pool lists its containers by label when it starts and
//! every 30 s, and removes those whose parent no longer answers. A parent
//! killed outright (SIGKILL) leaves its runners running: they exit by
//! themselves after the pool's `parent_grace` (and their containers are
//! removed), and the next parent of the pool removes whatever is left (a
//! container created but never started, say).
//!
//! API calls per runner: boot `POST /containers/create`, (`POST
//! /networks/{net}/connect` per extra network), `POST
//! /containers/{id}/start`, `GET /events` (its exit, open until then);
//! a failed boot `DELETE /containers/{id}?force=true`; retire `POST
//! /containers/{id}/stop?t=N`, `POST /containers/{id}/wait?condition=removed`;
//! reaping `GET /containers/json?all=true&filters=label...`, `DELETE
//! /containers/{id}?force=true`. Once per backend: `GET /version`, and in
//! a container `GET /containers/{own id}/json`.
//!
//! ```no_run
//! # async fn app(flame: flame_nats::Flame) -> Result<(), flame_core::Error> {
//! // In a container: image, networks and environment are the parent's own.
//! let backend = flame_docker::DockerBackend::builder()
//!     .memory_mb(2048)
//!     .cpus(1.0)
//!     .build()?;
//! let pool = flame.pool("thumbs").max(8).backend(backend).start().await?;
//! # Ok(()) }
//! ```
//!
//! Mounting the Docker socket into the parent's container gives the parent
//! full control of the Docker host (root on it, in effect): fine on a
//! developer's machine or a single-tenant host, not where the app must be
//! contained.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

mod api;
mod backend;
mod builder;
mod error;
mod exit;
mod own_container;
mod stop;

pub use backend::DockerBackend;
pub use builder::{DockerBackendBuilder, Gpus};
pub use error::DockerError;

/// Label with the runner's pool.
pub const POOL_LABEL: &str = "flame.pool";
/// Label with the id of the parent that booted the runner.
pub const PARENT_LABEL: &str = "flame.parent";
/// Label with the runner's id.
pub const RUNNER_LABEL: &str = "flame.runner";
/// Label with the backend's scope ([`DockerBackendBuilder::scope`]).
pub const SCOPE_LABEL: &str = "flame.scope";
