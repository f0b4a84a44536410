//! Children: long-lived work placed on a runner (the reference's
//! `place_child`). A child is a call that runs as long as the child does:
//! it holds one slot of its runner for its whole life (so the runner does
//! not idle down), and talks with its caller over channels passed as its
//! arguments.

use std::sync::Arc;
use std::time::Duration;

use flame_core::stream::StreamTransport;
use flame_core::{Error, RemoteFn};
use tokio::task::JoinHandle;
use tracing::{Instrument, Span};

use super::call::{call_span, decode_result, encode_args, record_outcome, run, Kind};
use super::Pool;

/// A child's time limit when none is given: about ten years.
const NO_LIMIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Options of one child.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChildOptions {
    /// When true (the default), the child is stopped when its [`Child`]
    /// handle is dropped. When false it runs on to its end.
    pub link: bool,
    /// Longest the child may live; `None` (the default) for no limit.
    pub timeout: Option<Duration>,
}

impl Default for ChildOptions {
    fn default() -> Self {
        ChildOptions {
            link: true,
            timeout: None,
        }
    }
}

impl ChildOptions {
    /// Linked, no time limit.
    pub fn new() -> ChildOptions {
        ChildOptions::default()
    }

    /// Whether dropping the handle stops the child (default true).
    pub fn link(mut self, link: bool) -> Self {
        self.link = link;
        self
    }

    /// Stops the child after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// How a child ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum ChildExit<R> {
    /// The child's function returned this (often a `Result` of its own).
    Finished(R),
    /// The child panicked (the message), or its time limit passed.
    Failed(Error),
    /// Its runner went down (crashed, was killed, lost NATS).
    RunnerDown(Error),
    /// It was stopped through [`Child::stop`].
    Stopped,
}

/// A child running on a runner. Talk to it over the channels you passed
/// it; [`Child::exit`] waits for its end, [`Child::stop`] stops it.
/// Dropping a linked child (the default) stops it.
#[derive(Debug)]
pub struct Child<R> {
    task: Option<JoinHandle<Result<R, Error>>>,
    link: bool,
}

impl<R> Child<R> {
    /// True once the child has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the child to end and says how it did.
    pub async fn exit(mut self) -> ChildExit<R> {
        match self.task.take() {
            Some(task) => exit_of(task.await),
            None => ChildExit::Stopped,
        }
    }

    /// Stops the child (its work on the runner is cancelled at its next
    /// await) and says how it ended: [`ChildExit::Stopped`], unless it had
    /// ended already.
    pub async fn stop(mut self) -> ChildExit<R> {
        let Some(task) = self.task.take() else {
            return ChildExit::Stopped;
        };
        if task.is_finished() {
            return exit_of(task.await);
        }
        task.abort();
        match task.await {
            Err(join) if join.is_cancelled() => ChildExit::Stopped,
            other => exit_of(other),
        }
    }
}

fn exit_of<R>(joined: Result<Result<R, Error>, tokio::task::JoinError>) -> ChildExit<R> {
    match joined {
        Ok(Ok(value)) => ChildExit::Finished(value),
        Ok(Err(e @ Error::RunnerDown { .. })) => ChildExit::RunnerDown(e),
        Ok(Err(e)) => ChildExit::Failed(e),
        Err(_) => ChildExit::Stopped,
    }
}

impl<R> Drop for Child<R> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            if self.link {
                // Cancelling the call cancels the child on the runner.
                task.abort();
            }
        }
    }
}

/// Starts `F` as a child through `pool`: see
/// [`Pool::place_child_with`].
pub(super) fn place<F: RemoteFn>(
    pool: &Pool,
    args: F::Args,
    options: ChildOptions,
) -> Result<Child<F::Output>, Error> {
    let inner = &pool.inner;
    if inner.closed.is_cancelled() {
        return Err(Error::PoolClosed(inner.config.name.clone()));
    }
    let streams: Arc<dyn StreamTransport> = inner.parent.streams.clone();
    // Encoded now, so that its channels are set up before this returns.
    let payload = encode_args::<F>(&streams, &args, &inner.parent.build_id)?;
    drop(streams);
    let timeout = options.timeout.unwrap_or(NO_LIMIT);
    let (span, trace) = call_span(&inner.config.name, F::NAME, "child");
    let inner = inner.clone();
    // The pool handle lives as long as the child: a child keeps its
    // pool (and runner) up.
    let pool = pool.clone();
    let task = tokio::spawn(
        async move {
            let _pool = pool;
            let kind = Kind::Call { link: true };
            let hub = inner.parent.streams.clone();
            let ran = run(inner, F::NAME, payload, timeout, kind, trace).await;
            let result = ran.and_then(|(bytes, slot)| decode_result::<F>(&hub, &bytes, slot));
            record_outcome(&Span::current(), result.as_ref().err());
            result
        }
        .instrument(span),
    );
    Ok(Child {
        task: Some(task),
        link: options.link,
    })
}
