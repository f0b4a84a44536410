//! Pools: their settings and the placement model.

mod config;
mod model;

pub use config::PoolConfig;
pub use model::{Checkout, PoolModel, RunnerId, RunnerState, WaiterId};
