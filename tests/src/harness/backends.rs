//! Backends that wrap another for tests: counting boots, hiding runner
//! exits, failing the first boots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flame::{Backend, BootSpec, Booted, BoxError};
use futures::future::BoxFuture;

/// Wraps a backend and counts its runner processes from the boot request to
/// the process exit: what really runs, whatever the pool believes.
#[derive(Debug, Clone)]
pub struct CountingBackend {
    inner: Arc<dyn Backend>,
    live: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    boots: Arc<AtomicUsize>,
}

impl CountingBackend {
    /// Counts the runners of `inner`.
    pub fn new(inner: impl Backend) -> CountingBackend {
        CountingBackend {
            inner: Arc::new(inner),
            live: Arc::default(),
            peak: Arc::default(),
            boots: Arc::default(),
        }
    }

    /// Runner processes booting or running now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Most runner processes booting or running at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Boots asked for so far.
    pub fn boots(&self) -> usize {
        self.boots.load(Ordering::SeqCst)
    }
}

impl Backend for CountingBackend {
    fn runners_are_local(&self) -> bool {
        self.inner.runners_are_local()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.boots.fetch_add(1, Ordering::SeqCst);
        let live = self.live.clone();
        let boot = self.inner.boot(spec);
        Box::pin(async move {
            match boot.await {
                Ok(mut booted) => {
                    let exited = booted.exited.take().expect("local backend reports exits");
                    booted.exited = Some(Box::pin(async move {
                        let reason = exited.await;
                        live.fetch_sub(1, Ordering::SeqCst);
                        reason
                    }));
                    Ok(booted)
                }
                Err(e) => {
                    live.fetch_sub(1, Ordering::SeqCst);
                    Err(e)
                }
            }
        })
    }
}

/// Wraps a backend and hides runner exits from the pool, like a backend of
/// remote machines: the pool must rely on heartbeats.
#[derive(Debug)]
pub struct NoExitNotice<B>(pub B);

impl<B: Backend> Backend for NoExitNotice<B> {
    fn runners_are_local(&self) -> bool {
        self.0.runners_are_local()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let boot = self.0.boot(spec);
        Box::pin(async move {
            let mut booted = boot.await?;
            if let Some(exited) = booted.exited.take() {
                // Still reap the child; just do not tell the pool.
                tokio::spawn(exited);
            }
            Ok(booted)
        })
    }
}

/// Wraps a backend and fails its first `n` boots.
#[derive(Debug)]
pub struct FailingFirst<B> {
    inner: B,
    left: AtomicUsize,
}

impl<B> FailingFirst<B> {
    /// Fails the first `n` boots of `inner`.
    pub fn new(n: usize, inner: B) -> FailingFirst<B> {
        FailingFirst {
            inner,
            left: AtomicUsize::new(n),
        }
    }
}

impl<B: Backend> Backend for FailingFirst<B> {
    fn runners_are_local(&self) -> bool {
        self.inner.runners_are_local()
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let fail = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err("injected boot failure".into()) });
        }
        self.inner.boot(spec)
    }
}
