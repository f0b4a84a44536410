//! Pools: their settings, hooks, the placement model, and for shared pools
//! the leases and the scaler's rules.

mod config;
mod hooks;
pub mod lease;
mod model;
pub mod scaling;

pub use config::{validate_limits, PoolConfig};
pub use hooks::{Hook, Hooks, PoolEvent};
pub use model::{Checkout, PoolModel, RunnerId, RunnerState, WaiterId};
