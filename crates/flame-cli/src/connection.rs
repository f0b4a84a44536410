//! Connecting to NATS: which server (`--server`, `NATS_URL`, the default),
//! and the [`Connection`] with what the server refuses it.

use std::time::Duration;

use crate::error::CliError;
use crate::refusals::Refusals;

/// Default NATS server, as the `nats` tools assume.
const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The server to use: `--server`, `NATS_URL`, or the default.
pub(crate) fn server_url(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("NATS_URL").ok())
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// The inbox prefix of the command's connection: its user may be allowed
/// to read its own replies and no others (PROTOCOL.md, section 9.1).
pub(crate) const INBOX_PREFIX: &str = "_INBOX.flame-cli";

/// A connection, and what the server refuses it.
pub(crate) struct Connection {
    pub(crate) client: async_nats::Client,
    pub(crate) refusals: Refusals,
}

/// Connects as the `flame` command, recording what the server refuses.
pub(crate) async fn connect(url: &str) -> Result<Connection, CliError> {
    let refusals = Refusals::default();
    let client =
        flame_nats::tool::connect_tool_with(url, "flame cli", Duration::from_secs(3), |o| {
            refusals.watch(o.custom_inbox_prefix(INBOX_PREFIX))
        })
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    Ok(Connection { client, refusals })
}
