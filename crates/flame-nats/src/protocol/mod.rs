//! The wire protocol, in one place: subjects and KV keys, the bootstrap
//! variable, calls and replies, runner reports and forwarded logs, streams,
//! and the records of a shared pool's KV bucket. `PROTOCOL.md` at the
//! repository root describes all of it for implementers in other languages.

pub(crate) mod batch;
pub(crate) mod bootstrap;
pub(crate) mod call;
pub(crate) mod lease;
pub(crate) mod logs;
pub(crate) mod pool_events;
pub(crate) mod reports;
pub(crate) mod sign;
pub(crate) mod stream;
pub(crate) mod subjects;
