//! One boot through the backend: the runner's environment, the grow and
//! shrink hooks, and the boot timeout ([`Booter`]).

use std::sync::Arc;
use std::time::Duration;

use flame_core::backend::{Backend, BootError, BootSpec, Booted};
use flame_core::Error;

use super::hooks::{Hooks, PoolChange};
use super::retry::BootFailure;
use crate::config::PoolConfig;
use crate::parent::ParentContext;
use crate::protocol::bootstrap::ParentInfo;
use crate::protocol::reports::ReportKey;
use crate::protocol::sign::CallKey;

/// Time a backend is given past the boot timeout to clean up what a boot
/// that ran out of time made (a machine to destroy) before the pool stops
/// waiting for it. Backends end their waits by the boot timeout
/// ([`BootSpec::boot_timeout`]); this only catches one that does not.
pub(crate) const BOOT_CLEANUP_MARGIN: Duration = Duration::from_secs(3);

/// Boots the runners of one pool.
pub(crate) struct Booter {
    pool: String,
    backend: Arc<dyn Backend>,
    hooks: Hooks,
    boot_timeout: Duration,
    /// `FLAME_PARENT` of every runner, but for its id and key.
    template: ParentInfo,
    /// Variables copied from the parent, and the credentials of the NATS
    /// URL, if it had any ([`crate::env::NATS_URL_CREDENTIALS`]).
    forwarded: Vec<(String, String)>,
    /// Shared pools with a secret: the `event_key` of every runner, from
    /// which the key that signs calls to them derives.
    shared_key: Option<ReportKey>,
    /// That call key.
    shared_call_key: Option<CallKey>,
}

impl std::fmt::Debug for Booter {
    /// The forwarded variables' names only: their values hold secrets
    /// (forwarded credentials, the URL's).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let forwarded: Vec<&str> = self.forwarded.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Booter")
            .field("pool", &self.pool)
            .field("backend", &self.backend)
            .field("hooks", &self.hooks)
            .field("boot_timeout", &self.boot_timeout)
            .field("template", &self.template)
            .field("forwarded", &forwarded)
            .finish()
    }
}

impl Booter {
    pub(crate) fn new(
        parent: &ParentContext,
        config: &PoolConfig,
        backend: Arc<dyn Backend>,
        hooks: Hooks,
        forwarded: Vec<(String, String)>,
        shared_key: Option<ReportKey>,
    ) -> Booter {
        let template = ParentInfo {
            parent_id: parent.parent_id.clone(),
            pool: config.name.clone(),
            runner_id: String::new(),
            // Never with credentials: those written in a URL go to the
            // runner in a variable of their own (see `spec`).
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
            // The private server has no permissions to refuse anything, and
            // runners use it unless told to use another URL.
            open_server: parent.embedded.lock().unwrap().is_some()
                && !parent.runner_nats_url.explicit,
            event_key: String::new(),
        };
        let mut forwarded = forwarded;
        if let Some(credentials) = &parent.runner_nats_url.credentials {
            // Last, so that a forwarded variable of the same name (there
            // should be none) does not replace it.
            forwarded.push(credentials.handover());
        }
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

    /// The environment of a new runner: `FLAME_PARENT`, the forwarded
    /// variables and the URL's credentials. A private pool's runner gets its own key; a shared pool's
    /// the pool's (derived from its secret, without telling the secret),
    /// or none without a secret.
    fn spec(&self, runner_id: &str, key: Option<&ReportKey>) -> BootSpec {
        let mut info = self.template.clone();
        info.runner_id = runner_id.to_string();
        info.event_key = key
            .or(self.shared_key.as_ref())
            .map(ReportKey::to_hex)
            .unwrap_or_default();
        let mut env = vec![(crate::env::PARENT.to_string(), info.to_env_value())];
        env.extend(self.forwarded.iter().cloned());
        BootSpec::new(self.pool.clone(), runner_id.to_string(), env)
            .parent(&self.template.parent_id)
            .boot_timeout(self.boot_timeout)
    }

    /// Asks the backend for a runner, within the boot timeout. Fires
    /// `on_grow_start` with `runners` (booted or booting, this one
    /// included); the caller reports the end with [`Booter::grow_end`].
    pub(crate) async fn start(
        &self,
        runner_id: &str,
        key: Option<&ReportKey>,
        runners: usize,
    ) -> Result<Booted, BootFailure> {
        self.hooks.fire(PoolChange::GrowStart {
            pool: self.pool.clone(),
            runners,
        });
        tracing::debug!(pool = %self.pool, runner = %runner_id, "booting runner");
        let boot = self.backend.boot(self.spec(runner_id, key));
        match tokio::time::timeout(self.boot_timeout + BOOT_CLEANUP_MARGIN, boot).await {
            Ok(Ok(booted)) => Ok(booted),
            Ok(Err(e)) => {
                let permanent = BootError::is_permanent_error(e.as_ref());
                Err(BootFailure {
                    error: Error::boot_failed(&self.pool, e),
                    permanent,
                })
            }
            Err(_) => Err(BootFailure::transient(Error::BootTimeout {
                pool: self.pool.clone(),
                timeout: self.boot_timeout,
            })),
        }
    }

    /// Reports a finished boot to `on_grow_end`.
    pub(crate) fn grow_end(&self, runners: usize, result: Result<(), Error>) {
        if let Err(e) = &result {
            tracing::warn!(pool = %self.pool, "boot failed: {e}");
        }
        self.hooks.fire(PoolChange::GrowEnd {
            pool: self.pool.clone(),
            runners,
            result,
        });
    }

    /// Reports a runner leaving to `on_shrink`.
    pub(crate) fn shrink(&self, runners: usize, reason: String) {
        self.hooks.fire(PoolChange::Shrink {
            pool: self.pool.clone(),
            runners,
            reason,
        });
    }
}
