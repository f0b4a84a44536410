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
        let pool = self.clone();
        stream::iter(items)
            .map(move |args| {
                let pool = pool.clone();
                async move { pool.call::<F>(args).await }
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
                async move { (i, pool.call::<F>(args).await) }
            })
            .buffer_unordered(in_flight.max(1))
    }
}
