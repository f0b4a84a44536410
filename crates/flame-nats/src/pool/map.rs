//! Many calls of one function: [`Pool::map`] and [`Pool::map_unordered`].

use flame_core::{Error, RemoteFn};
use futures::stream::{self, Stream, StreamExt};

use super::Pool;

impl Pool {
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
    /// calls under way (as dropping a call does) and starts no more. Each
    /// call runs on a task of its own (spread over the runtime's threads, as
    /// independent callers are), so the stream must be polled inside a
    /// Tokio runtime.
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
        let pool = self.clone();
        stream::iter(items)
            .map(move |args| {
                let pool = pool.clone();
                Spawned(tokio::spawn(async move { pool.call::<F>(args).await }))
            })
            .buffered(in_flight.max(1))
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
        let pool = self.clone();
        stream::iter(items)
            .enumerate()
            .map(move |(i, args)| {
                let pool = pool.clone();
                Spawned(tokio::spawn(async move { (i, pool.call::<F>(args).await) }))
            })
            .buffer_unordered(in_flight.max(1))
    }
}

/// A call on a task of its own, so that the calls of a `map` spread over
/// the runtime's threads like independent callers (one task polling them
/// all would do every call's work on one thread). Dropping it (the stream
/// dropped) aborts the task, which cancels the call.
struct Spawned<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for Spawned<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        match std::pin::Pin::new(&mut self.0).poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(Ok(value)) => std::task::Poll::Ready(value),
            // A call does not panic (its errors are values); pass one on.
            std::task::Poll::Ready(Err(e)) if e.is_panic() => {
                std::panic::resume_unwind(e.into_panic())
            }
            // Aborted only by our own drop, after which nobody polls.
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Pending,
        }
    }
}
