//! How a runner learns who it is: the `FLAME_PARENT` environment variable,
//! set by the parent's backend when it boots the runner.

use std::fmt;
use std::time::Duration;

use flame_core::Error;

use super::reports::ReportKey;

/// Everything a runner needs to know about the parent that booted it.
///
/// Serialized as JSON into the [`crate::env::PARENT`] environment variable, so it can
/// be read with `ps e` or `/proc/<pid>/environ` when debugging.
///
/// It holds no NATS credentials: runners read those from the conventional
/// variables, as the parent does. It does hold the runner's event key (a
/// secret, redacted in `Debug`).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ParentInfo {
    /// Id of the parent instance (unique per process).
    pub parent_id: String,
    /// The pool this runner serves.
    pub pool: String,
    /// This runner's id, chosen by the parent.
    pub runner_id: String,
    /// NATS server the runner connects to: one URL or a comma-separated list.
    pub nats_url: String,
    /// Most calls the runner runs at once.
    pub max_concurrency: usize,
    /// Idle time after which the runner asks to stop, in milliseconds.
    pub idle_shutdown_after_ms: u64,
    /// Drain time for in-flight work when stopping, in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// The runner gives up if it is not connected and acknowledged within
    /// this time after start, in milliseconds.
    pub failsafe_timeout_ms: u64,
    /// How long the runner keeps going without hearing from its parent (or
    /// NATS), in milliseconds.
    pub parent_grace_ms: u64,
    /// Interval of the runner's liveness pings to its parent, in milliseconds.
    pub heartbeat_ms: u64,
    /// The runner stops after its first call or cast.
    #[serde(default)]
    pub single_use: bool,
    /// Registered name of the function an idle runner asks before stopping.
    #[serde(default)]
    pub idle_shutdown_check: Option<String>,
    /// The runner belongs to a shared pool: it keeps a lease in the pool's KV
    /// bucket, serves any parent of the pool, and is retired by the scaler.
    #[serde(default)]
    pub shared: bool,
    /// The runner sends its log lines to the parent (through the layer of
    /// `runner_log_layer`), as `PoolBuilder::forward_runner_logs` asks.
    #[serde(default)]
    pub forward_logs: bool,
    /// The NATS server is the parent's private one, which flame started
    /// without users or permissions: no subscription can be refused, so the
    /// runner announces itself without first making sure of that (which
    /// costs a reconnection).
    #[serde(default)]
    pub open_server: bool,
    /// Signs the runner's events to its parent (64 hex digits); see
    /// `PROTOCOL.md`. Secret.
    #[serde(default)]
    pub(crate) event_key: String,
}

impl fmt::Debug for ParentInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParentInfo")
            .field("parent_id", &self.parent_id)
            .field("pool", &self.pool)
            .field("runner_id", &self.runner_id)
            .field("nats_url", &self.nats_url)
            .field("max_concurrency", &self.max_concurrency)
            .field("idle_shutdown_after_ms", &self.idle_shutdown_after_ms)
            .field("shutdown_timeout_ms", &self.shutdown_timeout_ms)
            .field("failsafe_timeout_ms", &self.failsafe_timeout_ms)
            .field("parent_grace_ms", &self.parent_grace_ms)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("single_use", &self.single_use)
            .field("idle_shutdown_check", &self.idle_shutdown_check)
            .field("shared", &self.shared)
            .field("forward_logs", &self.forward_logs)
            .field("open_server", &self.open_server)
            .field("event_key", &"<redacted>")
            .finish()
    }
}

impl ParentInfo {
    /// Serializes for the environment variable.
    pub fn to_env_value(&self) -> String {
        serde_json::to_string(self).expect("ParentInfo always serializes")
    }

    /// Parses the environment variable's value.
    pub fn from_env_value(value: &str) -> Result<ParentInfo, Error> {
        serde_json::from_str(value)
            .map_err(|e| Error::Config(format!("FLAME_PARENT is not valid runner info: {e}")))
    }

    /// Idle shutdown as a duration.
    pub fn idle_shutdown_after(&self) -> Duration {
        Duration::from_millis(self.idle_shutdown_after_ms)
    }

    /// The key the runner signs its events with.
    pub(crate) fn event_key(&self) -> Option<ReportKey> {
        ReportKey::from_hex(&self.event_key)
    }
}

/// Returns the parent's info when this process is a runner, `None` in a
/// parent (or an app not using flame).
///
/// Use it to skip work a runner does not need, such as starting a web server:
///
/// ```
/// if flame_nats::parent().is_none() {
///     // start the HTTP server only in the parent
/// }
/// ```
pub fn parent() -> Option<ParentInfo> {
    let value = std::env::var(crate::env::PARENT).ok()?;
    ParentInfo::from_env_value(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_info_round_trips_redacts_its_key_and_rejects_garbage() {
        let key = ReportKey::random();
        let info = ParentInfo {
            parent_id: "p".into(),
            pool: "thumbs".into(),
            runner_id: "r".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            max_concurrency: 3,
            idle_shutdown_after_ms: 1000,
            shutdown_timeout_ms: 2000,
            failsafe_timeout_ms: 3000,
            parent_grace_ms: 4000,
            heartbeat_ms: 500,
            single_use: true,
            idle_shutdown_check: Some("app::may_stop".into()),
            shared: false,
            forward_logs: false,
            open_server: false,
            event_key: key.to_hex(),
        };
        let back = ParentInfo::from_env_value(&info.to_env_value()).unwrap();
        assert_eq!(back, info);
        assert_eq!(back.event_key(), Some(key.clone()));
        assert!(!format!("{info:?}").contains(&key.to_hex()));
        assert!(matches!(
            ParentInfo::from_env_value("{"),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn a_runner_makes_sure_of_its_subscriptions_unless_told_the_server_is_open() {
        // Written without the optional fields, as the example of PROTOCOL.md
        // is: the runner settles its subscriptions.
        let minimal = r#"{"parent_id":"p","pool":"thumbs","runner_id":"r",
            "nats_url":"nats://127.0.0.1:4222","max_concurrency":1,
            "idle_shutdown_after_ms":1,"shutdown_timeout_ms":1,
            "failsafe_timeout_ms":1,"parent_grace_ms":2,"heartbeat_ms":1}"#;
        let info = ParentInfo::from_env_value(minimal).unwrap();
        assert!(!info.open_server);
        let open = minimal.replace(
            "\"heartbeat_ms\":1",
            "\"heartbeat_ms\":1,\"open_server\":true",
        );
        assert!(ParentInfo::from_env_value(&open).unwrap().open_server);
    }
}
