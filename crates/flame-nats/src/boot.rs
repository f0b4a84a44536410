//! Booting runners: the one path private and shared pools share. It builds
//! the runner's environment, fires the grow hooks, bounds the backend by
//! the boot timeout, and paces retries after a failure.

use std::sync::Arc;
use std::time::Duration;

use flame_core::backend::{Backend, BootSpec, Booted};
use flame_core::Error;
use tokio::time::Instant;

use crate::config::PoolConfig;
use crate::hooks::{Hooks, PoolEvent};
use crate::parent::ParentContext;
use crate::protocol::bootstrap::{ParentInfo, PARENT_ENV};
use crate::protocol::events::EventKey;
use crate::protocol::sign::CallKey;

/// Pause before booting again after a failed boot, while demand remains.
pub(crate) const BOOT_RETRY_DEBOUNCE: Duration = Duration::from_secs(1);

/// Boots the runners of one pool.
#[derive(Debug)]
pub(crate) struct Booter {
    pool: String,
    backend: Arc<dyn Backend>,
    hooks: Hooks,
    boot_timeout: Duration,
    /// `FLAME_PARENT` of every runner, but for its id and key.
    template: ParentInfo,
    /// Variables copied from the parent.
    forwarded: Vec<(String, String)>,
    /// Shared pools with a secret: the `event_key` of every runner, from
    /// which the key that signs calls to them derives.
    shared_key: Option<EventKey>,
    /// That call key.
    shared_call_key: Option<CallKey>,
}

impl Booter {
    pub(crate) fn new(
        parent: &ParentContext,
        config: &PoolConfig,
        backend: Arc<dyn Backend>,
        hooks: Hooks,
        forwarded: Vec<(String, String)>,
        shared_key: Option<EventKey>,
    ) -> Booter {
        let template = ParentInfo {
            parent_id: parent.parent_id.clone(),
            pool: config.name.clone(),
            runner_id: String::new(),
            // Runners connect with credentials of their own (the same
            // environment variables), never ones taken from the URL.
            nats_url: parent.runner_nats_url.url.clone(),
            max_concurrency: config.max_concurrency,
            idle_shutdown_after_ms: config.idle_shutdown_after.as_millis() as u64,
            shutdown_timeout_ms: config.shutdown_timeout.as_millis() as u64,
            failsafe_timeout_ms: config.failsafe_timeout.as_millis() as u64,
            parent_grace_ms: config.parent_grace.as_millis() as u64,
            heartbeat_ms: config.heartbeat.as_millis() as u64,
            single_use: config.single_use,
            idle_shutdown_check: config.idle_shutdown_check.map(str::to_string),
            shared: config.shared,
            forward_logs: config.forward_runner_logs,
            event_key: String::new(),
        };
        Booter {
            pool: config.name.clone(),
            backend,
            hooks,
            boot_timeout: config.boot_timeout,
            template,
            forwarded,
            shared_call_key: shared_key.as_ref().map(CallKey::of_runner),
            shared_key,
        }
    }

    /// The key calls to a shared pool's runners are signed with, if the
    /// pool has a secret.
    pub(crate) fn shared_call_key(&self) -> Option<&CallKey> {
        self.shared_call_key.as_ref()
    }

    /// The backend, e.g. to terminate a runner by its handle.
    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The environment of a new runner: `FLAME_PARENT` and the forwarded
    /// variables. A private pool's runner gets its own key; a shared pool's
    /// the pool's (derived from its secret, without telling the secret),
    /// or none without a secret.
    fn spec(&self, runner_id: &str, key: Option<&EventKey>) -> BootSpec {
        let mut info = self.template.clone();
        info.runner_id = runner_id.to_string();
        info.event_key = key
            .or(self.shared_key.as_ref())
            .map(EventKey::to_hex)
            .unwrap_or_default();
        let mut env = vec![(PARENT_ENV.to_string(), info.to_env_value())];
        env.extend(self.forwarded.iter().cloned());
        BootSpec::new(self.pool.clone(), runner_id.to_string(), env)
            .parent(&self.template.parent_id)
    }

    /// Asks the backend for a runner, within the boot timeout. Fires
    /// `on_grow_start` with `runners` (booted or booting, this one
    /// included); the caller reports the end with [`Booter::grow_end`].
    pub(crate) async fn start(
        &self,
        runner_id: &str,
        key: Option<&EventKey>,
        runners: usize,
    ) -> Result<Booted, Error> {
        self.hooks.fire(PoolEvent::GrowStart {
            pool: self.pool.clone(),
            runners,
        });
        tracing::debug!(pool = %self.pool, runner = %runner_id, "booting runner");
        let boot = self.backend.boot(self.spec(runner_id, key));
        match tokio::time::timeout(self.boot_timeout, boot).await {
            Ok(Ok(booted)) => Ok(booted),
            Ok(Err(e)) => Err(Error::boot_failed(&self.pool, e)),
            Err(_) => Err(Error::BootTimeout {
                pool: self.pool.clone(),
                timeout: self.boot_timeout,
            }),
        }
    }

    /// Reports a finished boot to `on_grow_end`.
    pub(crate) fn grow_end(&self, runners: usize, result: Result<(), Error>) {
        if let Err(e) = &result {
            tracing::warn!(pool = %self.pool, "boot failed: {e}");
        }
        self.hooks.fire(PoolEvent::GrowEnd {
            pool: self.pool.clone(),
            runners,
            result,
        });
    }

    /// Reports a runner leaving to `on_shrink`.
    pub(crate) fn shrink(&self, runners: usize, reason: String) {
        self.hooks.fire(PoolEvent::Shrink {
            pool: self.pool.clone(),
            runners,
            reason,
        });
    }
}

/// Holds boots back for [`BOOT_RETRY_DEBOUNCE`] after a failure.
#[derive(Debug, Default)]
pub(crate) struct RetryGate {
    closed_until: Option<Instant>,
}

impl RetryGate {
    /// A boot failed: hold the next one back.
    pub(crate) fn failed(&mut self) {
        self.closed_until = Some(Instant::now() + BOOT_RETRY_DEBOUNCE);
    }

    /// True when a boot may start now.
    pub(crate) fn is_open(&mut self) -> bool {
        match self.closed_until {
            Some(at) if Instant::now() < at => false,
            _ => {
                self.closed_until = None;
                true
            }
        }
    }
}
