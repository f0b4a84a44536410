//! The parent process's side: the entry point an app calls, and what every
//! pool of one parent shares.
//!
//! - `flame.rs`: the entry point: [`init`], [`serve_if_runner`],
//!   [`FlameBuilder`] and [`Flame`] (become a runner, or connect as a
//!   parent and make pools);
//! - `context.rs`: [`ParentContext`], what every pool of one parent shares
//!   (its connection, identity, reply inbox, stream hub, event publisher);
//! - `replies.rs`: [`Replies`], the one reply subscription of all of a
//!   parent's calls;
//! - `build_id.rs`: [`build_id`], the build identity parent and runners
//!   must share (runners check theirs too).

mod build_id;
mod context;
mod flame;
mod replies;

pub use build_id::build_id;
pub(crate) use context::ParentContext;
pub use flame::{init, serve_if_runner, Flame, FlameBuilder};
pub(crate) use replies::Replies;
