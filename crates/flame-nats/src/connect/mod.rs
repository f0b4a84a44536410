//! Connecting to NATS: server lists, timeouts, the connection events a
//! parent reacts to, and the private server used when there is no URL.
//! One concept a file:
//! - `urls.rs`: server lists, URLs without credentials;
//! - `credentials.rs`: credentials in a URL;
//! - `options.rs`: options from the environment;
//! - `dial.rs`: connecting;
//! - `pacing.rs`: reconnect pacing;
//! - `expiry.rs`: expired user JWTs;
//! - `watched.rs`: a parent's or runner's connection and its events;
//! - `outages.rs`: outages of that connection;
//! - `permissions.rs`: what the server refused;
//! - `embedded.rs`: a private nats-server child process (public as
//!   `flame_nats::embedded`).

mod credentials;
mod dial;
pub mod embedded;
mod expiry;
mod options;
mod outages;
mod pacing;
mod permissions;
mod urls;
mod watched;

pub use dial::{connect_tool, connect_tool_with};
pub use options::{options_from_env, ConnectHook};
pub use urls::without_credentials;

pub(crate) use credentials::UrlCredentials;
pub(crate) use options::options_from_env_and;
pub(crate) use outages::Outages;
pub(crate) use permissions::Mark;
// Named in the docs of other modules (`fleet/kv.rs`, `pool/builder.rs`) only.
#[allow(unused_imports)]
pub(crate) use permissions::Permissions;
pub(crate) use urls::only_loopback;
pub(crate) use watched::{connect_watched, ConnectionEvents};
