//! Pools: their settings, hooks and the placement model.

mod config;
mod hooks;
mod model;

pub use config::validate_limits;
pub use config::PoolConfig;
pub use hooks::{Hook, Hooks, PoolEvent};
pub use model::{Checkout, PoolModel, RunnerId, RunnerState, WaiterId};
