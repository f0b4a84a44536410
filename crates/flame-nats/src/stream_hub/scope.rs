//! Which streams end together: the streams and channels of one call end
//! with its error when it fails, and those of every call on a runner with
//! `RunnerDown` when it goes down. While a call's arguments or result are
//! encoded or decoded, its scope (and what its streams keep alive) is
//! current on the thread, which is how a stream made then finds them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use flame_core::Error;

/// Something a stream keeps alive while it is open (a call's slot on the
/// parent, a call's permit on the runner).
pub(super) type Hold = Arc<dyn std::any::Any + Send + Sync>;

thread_local! {
    static HOLD: std::cell::RefCell<Option<Hold>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` so that streams it offers or opens keep `hold` alive until
/// they end: a stream in a call's result holds the call's resources.
pub(crate) fn holding<R>(hold: Hold, f: impl FnOnce() -> R) -> R {
    let previous = HOLD.with(|h| h.replace(Some(hold)));
    struct Restore(Option<Hold>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            HOLD.with(|h| *h.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

pub(super) fn current_hold() -> Option<Hold> {
    HOLD.with(|h| h.borrow().clone())
}

/// The streams and channels set up for one call (by its arguments, or by
/// its result): they end together, at once, when the call fails or its
/// runner is known to be down, instead of when the keepalive goes silent.
#[derive(Clone)]
pub(crate) struct CallStreams(Arc<Ending>);

pub(crate) struct Ending {
    function: &'static str,
    /// (One allocation per call and scope, the `Arc`: calls pay for it
    /// whether they have streams or not.)
    ended: AtomicBool,
    wake: tokio::sync::Notify,
    why: OnceLock<Error>,
    /// Some stream or channel took part (most calls have none).
    used: AtomicBool,
}

impl CallStreams {
    pub(crate) fn new(function: &'static str) -> CallStreams {
        CallStreams(Arc::new(Ending {
            function,
            ended: AtomicBool::new(false),
            wake: tokio::sync::Notify::const_new(),
            why: OnceLock::new(),
            used: AtomicBool::new(false),
        }))
    }

    /// Whether any stream or channel was set up in its scope.
    pub(crate) fn used(&self) -> bool {
        self.0.used.load(Ordering::Relaxed)
    }

    /// Ends its streams with `error` (the first error given wins).
    pub(crate) fn end(&self, error: Error) {
        let _ = self.0.why.set(error);
        self.0.ended.store(true, Ordering::SeqCst);
        self.0.wake.notify_waiters();
    }

    /// Ends its streams: `runner`, where the call ran, is down.
    pub(crate) fn runner_down(&self, runner: &str, reason: &str) {
        self.end(Error::RunnerDown {
            function: self.0.function.to_string(),
            runner: runner.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Waits for its end; the error it ended with.
    async fn ended(&self) -> Error {
        loop {
            let woken = self.0.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.0.ended.load(Ordering::SeqCst) {
                break;
            }
            woken.await;
        }
        self.0
            .why
            .get()
            .cloned()
            .unwrap_or_else(|| Error::Stream("its call ended".into()))
    }
}

/// Waits for `scope`'s end, or for ever without one.
pub(super) async fn scope_ended(scope: &Option<CallStreams>) -> Error {
    match scope {
        Some(scope) => scope.ended().await,
        None => std::future::pending().await,
    }
}

thread_local! {
    static SCOPE: std::cell::RefCell<Option<CallStreams>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` so that the streams and channels it sets up end with `scope`.
pub(crate) fn scoped<R>(scope: Option<CallStreams>, f: impl FnOnce() -> R) -> R {
    let previous = SCOPE.with(|c| c.replace(scope));
    struct Restore(Option<CallStreams>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SCOPE.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

/// The current scope, marked as used.
pub(super) fn current_scope() -> Option<CallStreams> {
    let scope = SCOPE.with(|c| c.borrow().clone());
    if let Some(scope) = &scope {
        scope.0.used.store(true, Ordering::Relaxed);
    }
    scope
}

/// The streams of the calls on one runner: ended at once when the runner
/// is known to be down.
#[derive(Default, Clone)]
pub(crate) struct RunnerStreams(Arc<Mutex<Following>>);

#[derive(Default)]
struct Following {
    /// Set once the runner is down: (runner, reason).
    down: Option<(String, String)>,
    streams: Vec<Weak<Ending>>,
    /// Length at which ended scopes are next swept out.
    sweep_at: usize,
}

impl std::fmt::Debug for RunnerStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let following = self.0.lock().unwrap();
        f.debug_struct("RunnerStreams")
            .field("following", &following.streams.len())
            .field("down", &following.down.is_some())
            .finish()
    }
}

impl RunnerStreams {
    /// `scope`'s streams end when the runner goes down (at once if it is).
    pub(crate) fn follow(&self, scope: &CallStreams) {
        let mut following = self.0.lock().unwrap();
        if let Some((runner, reason)) = &following.down {
            scope.runner_down(runner, reason);
            return;
        }
        if following.streams.len() >= following.sweep_at {
            following.streams.retain(|w| w.strong_count() > 0);
            following.sweep_at = (following.streams.len() * 2).max(16);
        }
        following.streams.push(Arc::downgrade(&scope.0));
    }

    /// Forgets `scope` (its call went to another runner).
    pub(crate) fn unfollow(&self, scope: &CallStreams) {
        let target = Arc::as_ptr(&scope.0);
        self.0
            .lock()
            .unwrap()
            .streams
            .retain(|w| w.as_ptr() != target);
    }

    /// The runner is down: ends every stream that follows it.
    pub(crate) fn down(&self, runner: &str, reason: &str) {
        let streams = {
            let mut following = self.0.lock().unwrap();
            following.down = Some((runner.to_string(), reason.to_string()));
            std::mem::take(&mut following.streams)
        };
        for ending in streams.iter().filter_map(Weak::upgrade) {
            CallStreams(ending).runner_down(runner, reason);
        }
    }
}
