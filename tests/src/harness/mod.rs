//! Test harness: a real nats-server per test and pools whose runners are the
//! `flame-testapp` binary, in one module a concern; every item is here at
//! `flame_tests::harness::NAME`.

mod backends;
mod binaries;
mod cluster;
mod env;
mod logs;
mod observed;
mod processes;
mod shared_parent;
mod waiting;

pub use backends::*;
pub use binaries::*;
pub use cluster::*;
pub use env::*;
pub use logs::*;
pub use observed::*;
pub use processes::*;
pub use shared_parent::*;
pub use waiting::*;
