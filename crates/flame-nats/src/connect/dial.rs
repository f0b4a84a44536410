//! Making a connection: the one way parents, runners and tools connect
//! (server list without credentials, name, timeouts, reconnect pacing), and
//! its errors, which say where refused credentials came from.

use std::time::Duration;

use flame_core::{Error, Source};

use crate::connect::credentials::UrlCredentials;
use crate::connect::expiry::expired_credentials;
use crate::connect::options::options_from_env_and;
use crate::connect::pacing::reconnect_delay;
use crate::connect::urls::{server_list, without_credentials};

/// `url_credentials`: those `options` hold, if they came from a URL (to
/// say so when the server refuses them).
pub(super) async fn connect_with(
    url: &str,
    name: String,
    timeout: Duration,
    options: async_nats::ConnectOptions,
    url_credentials: Option<&UrlCredentials>,
) -> Result<async_nats::Client, Error> {
    let unreachable = |reason: String, source: Option<Source>| Error::NatsUnreachable {
        url: without_credentials(url),
        reason,
        source,
    };
    // The client ignores a URL's credentials (they are in `options`):
    // keep them out of everything it logs.
    let servers = server_list(&without_credentials(url));
    if servers.is_empty() {
        return Err(Error::Config(format!(
            "no NATS server in `{url}`; give one URL or a comma-separated list"
        )));
    }
    let options = options
        .name(name)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(timeout)
        // Keep requests bounded by our own deadlines, not the client's 10 s.
        .request_timeout(None);
    tokio::time::timeout(timeout, options.connect(servers))
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}"), None))?
        .map_err(|e| {
            let mut reason = e.to_string();
            if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation {
                // The server does not say why; where the credentials came
                // from, or an expired user, the client can say.
                if let Some(credentials) = url_credentials {
                    reason = format!("{reason} ({})", credentials.origin());
                } else if let Some(expired) = expired_credentials(std::time::SystemTime::now()) {
                    reason = format!("{reason} ({expired})");
                }
            }
            unreachable(reason, Some(Source::new(e)))
        })
}

/// Connects a tool (not a parent, not a runner) to `url`, one server or a
/// comma-separated list, with the options of the conventional environment
/// (see [`options_from_env`](crate::connect::options_from_env)), within `timeout`. Credentials written in
/// the URL (`user:password@`, `token@`) take the place of `NATS_USER`/
/// `NATS_PASSWORD` and `NATS_TOKEN`. Fails with [`Error::NatsUnreachable`]
/// naming the URL without credentials (and, when the server refuses
/// credentials from the URL, saying that they came from it).
pub async fn connect_tool(
    url: &str,
    name: &str,
    timeout: Duration,
) -> Result<async_nats::Client, Error> {
    connect_tool_with(url, name, timeout, |options| options).await
}

/// [`connect_tool`], with `adjust` applied to the options last, before
/// flame sets the name, timeouts and reconnect pacing: e.g. an
/// `event_callback` to learn what the server refuses (the `flame` command
/// says `permission denied on <subject>` that way), or a
/// `custom_inbox_prefix`.
pub async fn connect_tool_with(
    url: &str,
    name: &str,
    timeout: Duration,
    adjust: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
) -> Result<async_nats::Client, Error> {
    let credentials = UrlCredentials::from_url(url)?;
    let options = adjust(options_from_env_and(credentials.as_ref()).await?);
    connect_with(
        url,
        name.to_string(),
        timeout,
        options,
        credentials.as_ref(),
    )
    .await
}
