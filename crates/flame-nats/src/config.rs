//! Pool settings.

use std::time::Duration;

use flame_core::Error;

use crate::protocol::subjects;

/// Settings of one pool. Defaults follow the reference FLAME library where it
/// has one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Pool name: ASCII letters, digits, `-`, `_`. Appears in subjects and in
    /// the runners' micro service name (`flame-<name>`).
    pub name: String,
    /// Runners kept up. Default 0.
    pub min: usize,
    /// Runners booted or booting never exceed this. Default 1.
    pub max: usize,
    /// Concurrent calls per runner. Default 100.
    pub max_concurrency: usize,
    /// Default timeout of a call, including time spent waiting for a runner.
    /// Default 30 s.
    pub timeout: Duration,
    /// Limit for a runner to boot and report ready. Default 30 s.
    pub boot_timeout: Duration,
    /// After a permanent boot failure (bad credentials, an invalid
    /// configuration, an image that cannot start, a runner that exits
    /// before it is ready), calls that need a new runner fail at once with
    /// that error for this long; the first call after it boots again.
    /// Default 5 s.
    pub boot_cooldown: Duration,
    /// A runner with no work for this long stops. Default 30 s.
    pub idle_shutdown_after: Duration,
    /// The same for the `min` runners; `None` keeps them up. Default `None`.
    pub min_idle_shutdown_after: Option<Duration>,
    /// Drain time for in-flight work when a runner stops. Default 30 s.
    pub shutdown_timeout: Duration,
    /// A runner that cannot reach NATS and its parent within this time after
    /// starting exits. Default 20 s.
    pub failsafe_timeout: Duration,
    /// A runner keeps serving this long after it last heard from its parent.
    /// Default 5 s.
    pub parent_grace: Duration,
    /// Interval of the runner's liveness pings. The parent counts a runner as
    /// down after two intervals without one. Default 1.5 s.
    pub heartbeat: Duration,
    /// Environment variables copied from the parent into each runner.
    pub forward_env: Vec<String>,
    /// Each runner takes one call or cast and then stops. Default false.
    pub single_use: bool,
    /// Registered name of a function (no arguments, returns `bool`) that an
    /// idle runner runs before it stops; it stops only if that returns true.
    /// Set with `PoolBuilder::idle_shutdown_when`. Default `None`.
    pub idle_shutdown_check: Option<&'static str>,
    /// One pool for every parent on the NATS server that uses this name:
    /// runners are leased in a JetStream KV bucket, any parent's calls run on
    /// any runner, and one elected scaler boots and retires them for all.
    /// Default false (this parent's own runners).
    pub shared: bool,
    /// Shared pools: replicas of the pool's KV bucket when this parent
    /// creates it (1 to 5; more than 1 needs a JetStream cluster, and 3 is
    /// what survives the loss of any one server). A bucket that exists
    /// already is used as it is. Default 1.
    pub kv_replicas: usize,
    /// Hot start: when the calls on the ready runners reach this percentage
    /// of their capacity (`max_concurrency` each) and no runner is booting,
    /// one more is booted before anyone has to wait (within `max`). Set
    /// with `PoolBuilder::hot_start`. Default `None` (boot only for callers
    /// already waiting).
    pub hot_start_percent: Option<u8>,
    /// Runners send their log lines to this parent, which logs them in its
    /// own subscriber (target `flame::runner`). Needs the app to add
    /// `runner_log_layer()` to its subscriber. Private pools only. Set with
    /// `PoolBuilder::forward_runner_logs`. Default false.
    pub forward_runner_logs: bool,
}

impl PoolConfig {
    /// Defaults for a pool called `name`.
    pub fn new(name: impl Into<String>) -> PoolConfig {
        PoolConfig {
            name: name.into(),
            min: 0,
            max: 1,
            max_concurrency: 100,
            timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(30),
            boot_cooldown: Duration::from_secs(5),
            idle_shutdown_after: Duration::from_secs(30),
            min_idle_shutdown_after: None,
            shutdown_timeout: Duration::from_secs(30),
            failsafe_timeout: Duration::from_secs(20),
            parent_grace: Duration::from_secs(5),
            heartbeat: Duration::from_millis(1500),
            forward_env: Vec::new(),
            single_use: false,
            idle_shutdown_check: None,
            shared: false,
            kv_replicas: 1,
            hot_start_percent: None,
            forward_runner_logs: false,
        }
    }

    /// Checks the settings, with a message naming the setting at fault.
    pub fn validate(&self) -> Result<(), Error> {
        subjects::validate_pool_name(&self.name)?;
        let bad = |msg: String| Err(Error::Config(format!("pool `{}`: {msg}", self.name)));
        validate_limits(&self.name, self.min, self.max)?;
        if self.max_concurrency == 0 {
            return bad("max_concurrency must be at least 1".into());
        }
        if self.shared && self.forward_runner_logs {
            return bad(
                "forward_runner_logs works for private pools only (a shared pool's runners serve every parent)"
                    .into(),
            );
        }
        for (what, d) in [
            ("timeout", self.timeout),
            ("boot_timeout", self.boot_timeout),
            ("idle_shutdown_after", self.idle_shutdown_after),
            ("failsafe_timeout", self.failsafe_timeout),
            ("parent_grace", self.parent_grace),
            ("heartbeat", self.heartbeat),
        ] {
            if d.is_zero() {
                return bad(format!("{what} must be longer than zero"));
            }
        }
        if self.heartbeat >= self.parent_grace {
            return bad(format!(
                "heartbeat ({:?}) must be shorter than parent_grace ({:?})",
                self.heartbeat, self.parent_grace
            ));
        }
        if !(1..=5).contains(&self.kv_replicas) {
            return bad(format!(
                "kv_replicas must be 1 to 5 (JetStream's limit), not {}",
                self.kv_replicas
            ));
        }
        if self.hot_start_percent.is_some_and(|p| p == 0 || p > 100) {
            return bad("hot_start must be above 0 and at most 1".into());
        }
        for var in &self.forward_env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return bad(format!("`{var}` is not a valid environment variable name"));
            }
        }
        Ok(())
    }
}

/// Checks a `min` and `max` pair for the pool named `pool`.
pub(crate) fn validate_limits(pool: &str, min: usize, max: usize) -> Result<(), Error> {
    if max == 0 {
        return Err(Error::Config(format!(
            "pool `{pool}`: max must be at least 1"
        )));
    }
    if min > max {
        return Err(Error::Config(format!(
            "pool `{pool}`: min ({min}) is larger than max ({max})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_mistakes_are_named() {
        assert!(PoolConfig::new("p").validate().is_ok());
        let mut c = PoolConfig::new("p");
        c.min = 3;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("min (3) is larger than max (1)"), "{err}");
        let mut c = PoolConfig::new("p");
        c.max_concurrency = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_concurrency"));
        let mut c = PoolConfig::new("p");
        c.forward_env = vec!["A=B".into()];
        assert!(c.validate().is_err());
        assert!(PoolConfig::new("bad.name").validate().is_err());
    }
}
