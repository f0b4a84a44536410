//! [`Pool`], the handle apps hold: all its methods, the pool's public API.
//! Each hands the work to the module that does it: calls and casts to
//! `call`, children to `child`, `map` to `map`, limits to `booting`, and
//! shutting down to the pool itself; `status` and `runners` read the
//! pool's state, in what [`PoolStatus`] and [`RunnerInfo`] say.

use std::sync::Arc;

use flame_core::{Error, RemoteFn};
use futures::stream::Stream;

use super::call::{self, CallOptions};
use super::child::{self, Child, ChildOptions};
use super::model::RunnerState;
use super::{booting, map, Owner, Pool, PoolInner};
use crate::config::{validate_limits, PoolConfig};

/// How many runners a pool has, by state, and how many callers wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Being booted.
    pub booting: usize,
    /// Taking calls.
    pub ready: usize,
    /// Stopping.
    pub draining: usize,
    /// Callers waiting for a slot.
    pub waiting: usize,
}

/// One runner of a pool, as [`Pool::runners`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerInfo {
    /// The runner's id (the last token of its subject).
    pub id: String,
    /// Booting, ready or draining.
    pub state: RunnerState,
    /// This parent's calls running there now.
    pub load: usize,
    /// How the backend knows it (`pid 4242`, a Fly Machine id); `None`
    /// until the backend has started it, and for runners another parent of
    /// a shared pool booted.
    pub handle: Option<String>,
}

impl Pool {
    /// The handle of a started pool: the pool shuts down when the last
    /// clone of it goes.
    pub(super) fn new(inner: Arc<PoolInner>) -> Pool {
        Pool {
            inner: inner.clone(),
            _owner: Arc::new(Owner(inner)),
        }
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Changes `min` and `max` of the live pool. Raising `min` boots runners
    /// now; lowering `max` below the runners up retires the surplus, idle
    /// ones first (each finishes its in-flight work first). In a shared pool
    /// the scaler's limits count, and it retires idle runners only.
    pub fn set_limits(&self, min: usize, max: usize) -> Result<(), Error> {
        validate_limits(&self.inner.config.name, min, max)?;
        booting::set_limits(&self.inner, min, max);
        Ok(())
    }

    /// The current `min` and `max`.
    pub fn limits(&self) -> (usize, usize) {
        self.inner.limits()
    }

    /// A snapshot of the pool as this parent sees it.
    pub fn status(&self) -> PoolStatus {
        let st = self.inner.state.lock().unwrap();
        PoolStatus {
            booting: st.model.count(RunnerState::Booting),
            ready: st.model.count(RunnerState::Ready),
            draining: st.model.count(RunnerState::Draining),
            waiting: st.model.waiting(),
        }
    }

    /// The pool's runners as this parent sees them, sorted by id.
    pub fn runners(&self) -> Vec<RunnerInfo> {
        let st = self.inner.state.lock().unwrap();
        let mut runners: Vec<RunnerInfo> = st
            .runners
            .iter()
            .filter_map(|(id, entry)| {
                let (state, load) = st.model.runner(id)?;
                Some(RunnerInfo {
                    id: id.to_string(),
                    state,
                    load,
                    handle: entry.handle.clone(),
                })
            })
            .collect();
        runners.sort_by(|a, b| a.id.cmp(&b.id));
        runners
    }

    /// Stops every runner (each drains up to the shutdown timeout) and fails
    /// queued callers. Later calls fail with [`Error::PoolClosed`].
    ///
    /// In a shared pool this parent leaves it: the runners it booted go on
    /// serving the other parents, or are retired if it was the last.
    ///
    /// Boots still under way are waited for (each is bounded by the boot
    /// timeout), and what they started is stopped too: nothing this parent
    /// booted runs on after `shutdown` returns.
    pub async fn shutdown(&self) {
        self.inner
            .shut_down(self.inner.config.shutdown_timeout)
            .await;
    }

    /// Calls a remote function and waits for its result.
    ///
    /// Usually written `flame::call!(pool, function(args..))`.
    pub async fn call<F: RemoteFn>(&self, args: F::Args) -> Result<F::Output, Error> {
        self.call_with::<F>(args, CallOptions::default()).await
    }

    /// [`Pool::call`] with options.
    pub async fn call_with<F: RemoteFn>(
        &self,
        args: F::Args,
        options: CallOptions,
    ) -> Result<F::Output, Error> {
        call::call::<F>(&self.inner, args, options).await
    }

    /// Runs a remote function without waiting for it. Returns once the work
    /// is handed to the pool; it then finds or boots a runner on its own.
    /// Failures are logged and counted on the runner (`nats micro stats`).
    ///
    /// Usually written `flame::cast!(pool, function(args..))`.
    pub fn cast<F: RemoteFn>(&self, args: F::Args) -> Result<(), Error> {
        self.cast_with::<F>(args, CallOptions::default())
    }

    /// [`Pool::cast`] with options.
    pub fn cast_with<F: RemoteFn>(&self, args: F::Args, options: CallOptions) -> Result<(), Error> {
        call::cast::<F>(&self.inner, args, options)
    }

    /// Starts `F` as a child on a runner of this pool and returns at once.
    /// Pass it the ends of [`flame_core::channel`]s to talk with it: a
    /// `Stream` to read your messages, a `Sender` to send its own.
    ///
    /// Usually written `flame::place_child!(pool, function(args..))`.
    pub fn place_child<F: RemoteFn>(&self, args: F::Args) -> Result<Child<F::Output>, Error> {
        self.place_child_with::<F>(args, ChildOptions::default())
    }

    /// [`Pool::place_child`] with options.
    pub fn place_child_with<F: RemoteFn>(
        &self,
        args: F::Args,
        options: ChildOptions,
    ) -> Result<Child<F::Output>, Error> {
        child::place::<F>(self, args, options)
    }

    /// Calls `F` once per item of `items`, with at most `in_flight` calls
    /// under way at once, and yields each call's result in the order of
    /// the items (a slow item holds back the results after it; see
    /// [`Pool::map_unordered`]).
    ///
    /// The stream lives as long as `items` does (a `'static` iterator, e.g.
    /// one that owns its data, makes a stream that can be spawned).
    ///
    /// Lazy: calls start as the stream is polled, so a consumer that reads
    /// slowly holds back new calls too. Each item has its own result: one
    /// failed call does not end the stream. Dropping the stream cancels the
    /// calls under way (as dropping a call does) and starts no more.
    ///
    /// Set `in_flight` to the work the pool can take at once
    /// (`max × max_concurrency`) to keep it busy; more just queues in the
    /// parent. 0 counts as 1.
    ///
    /// ```no_run
    /// # use flame_core::RemoteFn;
    /// // `square` is a `#[flame::remote] fn square(x: u64) -> u64`.
    /// # async fn run<square: RemoteFn<Args = (u64,), Output = u64>>(pool: flame_nats::Pool) {
    /// use futures::StreamExt;
    /// let squares: Vec<Result<u64, flame_core::Error>> = pool
    ///     .map::<square, _>((0..1000u64).map(|x| (x,)), 64)
    ///     .collect()
    ///     .await;
    /// # }
    /// ```
    pub fn map<F, I>(
        &self,
        items: I,
        in_flight: usize,
    ) -> impl Stream<Item = Result<F::Output, Error>> + Send
    where
        F: RemoteFn,
        I: IntoIterator<Item = F::Args>,
        I::IntoIter: Send,
    {
        map::ordered::<F, I>(self.clone(), items, in_flight)
    }

    /// [`Pool::map`], yielding results as calls finish, each with the index
    /// of its item.
    pub fn map_unordered<F, I>(
        &self,
        items: I,
        in_flight: usize,
    ) -> impl Stream<Item = (usize, Result<F::Output, Error>)> + Send
    where
        F: RemoteFn,
        I: IntoIterator<Item = F::Args>,
        I::IntoIter: Send,
    {
        map::unordered::<F, I>(self.clone(), items, in_flight)
    }
}
