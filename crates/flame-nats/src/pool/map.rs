//! Many calls of one function, behind [`Pool::map`] and
//! [`Pool::map_unordered`]: a lazy stream of calls with bounded work in
//! flight.

use flame_core::{Error, RemoteFn};
use futures::stream::{self, Stream, StreamExt};

use super::Pool;

/// The stream of [`Pool::map`]: results in the order of the items.
pub(super) fn ordered<F, I>(
    pool: Pool,
    items: I,
    in_flight: usize,
) -> impl Stream<Item = Result<F::Output, Error>> + Send
where
    F: RemoteFn,
    I: IntoIterator<Item = F::Args>,
    I::IntoIter: Send,
{
    stream::iter(items)
        .map(move |args| {
            let pool = pool.clone();
            async move { pool.call::<F>(args).await }
        })
        .buffered(in_flight.max(1))
}

/// The stream of [`Pool::map_unordered`]: results as calls finish, each
/// with the index of its item.
pub(super) fn unordered<F, I>(
    pool: Pool,
    items: I,
    in_flight: usize,
) -> impl Stream<Item = (usize, Result<F::Output, Error>)> + Send
where
    F: RemoteFn,
    I: IntoIterator<Item = F::Args>,
    I::IntoIter: Send,
{
    stream::iter(items)
        .enumerate()
        .map(move |(i, args)| {
            let pool = pool.clone();
            async move { (i, pool.call::<F>(args).await) }
        })
        .buffer_unordered(in_flight.max(1))
}
