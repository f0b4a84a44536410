//! Booting runners: the one path private pools (`pool::booting`) and the
//! shared pools' scaler (`fleet::booting`) share. It builds the runner's
//! environment, fires the grow hooks, bounds the backend by the boot
//! timeout, tells permanent failures from transient ones, and paces
//! retries after a failure.
//!
//! - `booter.rs`: [`Booter`], one boot through the backend, and the hooks
//!   it fires;
//! - `retry.rs`: a failed boot ([`BootFailure`], its reason) and the pause
//!   before the next ([`RetryGate`]);
//! - `hooks.rs`: the app's grow and shrink callbacks, told a
//!   [`PoolChange`].

mod booter;
mod hooks;
mod retry;

pub(crate) use booter::{Booter, BOOT_CLEANUP_MARGIN};
pub(crate) use hooks::Hooks;
pub use hooks::PoolChange;
pub(crate) use retry::{boot_failure_reason, BootFailure, RetryGate, BOOT_RETRY_DEBOUNCE};
