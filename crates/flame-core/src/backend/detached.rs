//! Cleanup that outlives its caller, for backends whose runners live on
//! another platform (a boot dropped mid-way must still remove what it made).

use futures::future::BoxFuture;
use futures::FutureExt;

/// Runs `work` even when whoever started it is gone: on the current tokio
/// runtime, or on a thread of its own when there is none (a pool dropped
/// after its runtime). Returns a future that resolves when `work` is done;
/// dropping that future does not stop the work. `what` names what is
/// cleaned up, for the warning when no runtime can be made.
///
/// Use it from a guard's `Drop` (a boot future the pool dropped) and from
/// [`StopRunner::stop`](super::StopRunner::stop), whose future the pool may
/// drop too.
pub fn run_detached(
    what: &'static str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> BoxFuture<'static, ()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let work = async move {
        work.await;
        let _ = done_tx.send(());
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(work);
        }
        Err(_) => {
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(work),
                    Err(e) => tracing::warn!("cannot clean up {what}: no runtime ({e})"),
                }
            });
        }
    }
    async move {
        let _ = done_rx.await;
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn work_runs_to_its_end_without_a_runtime_and_when_its_future_is_dropped() {
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        // No runtime here: the work gets a thread of its own.
        let done = run_detached("a test", async move { r.store(true, Ordering::SeqCst) });
        futures::executor::block_on(done);
        assert!(ran.load(Ordering::SeqCst));

        let rt = tokio::runtime::Runtime::new().unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        rt.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            drop(run_detached("a test", async move {
                r.store(true, Ordering::SeqCst);
                let _ = tx.send(());
            }));
            rx.await.unwrap();
        });
        assert!(ran.load(Ordering::SeqCst));
    }
}
