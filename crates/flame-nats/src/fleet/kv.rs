//! The JetStream KV bucket of a shared pool: opening it, and reading or
//! changing JSON values with compare-and-set.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, Store, UpdateErrorKind};
use bytes::Bytes;
use flame_core::Error;
use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::lease::Slots;
use crate::protocol::subjects;

/// Longest wait for one JetStream request (a KV read, write or watch, or a
/// call to the JetStream API). The connection has no request timeout of its
/// own (calls have their deadlines), so without this a JetStream that
/// never answers (no meta leader, a bucket without a leader) would hold a
/// KV operation forever.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// First pause between attempts on a JetStream that is not ready yet; the
/// pauses double up to [`MAX_PAUSE`], with jitter.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// The JetStream context every KV operation goes through: each request
/// bounded by [`REQUEST_TIMEOUT`].
fn jetstream(client: &async_nats::Client) -> async_nats::jetstream::Context {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(REQUEST_TIMEOUT);
    js
}

/// What a failed attempt means for the next one.
enum Attempt {
    /// Worth trying again: JetStream is not ready (no answer, no leader,
    /// not enough servers for the replicas yet).
    NotReady(String),
    /// Trying again will not help.
    Fatal(Error),
}

/// Runs `attempt` until it succeeds, retrying a JetStream that is not
/// ready yet with exponential backoff and jitter, each attempt bounded by
/// what is left of `bound` (and by [`REQUEST_TIMEOUT`] per request). After
/// `bound`, fails with [`Error::JetStreamNotReady`] saying what was tried
/// (`tried`) and what the last attempt got. A refused permission only
/// shows as a request that gets no answer: the caller wraps this in
/// [`crate::connect::Permissions::guard`], which turns the server's report
/// into [`Error::PermissionDenied`] at once.
async fn retry_not_ready<T, F, Fut>(
    pool: &str,
    tried: &str,
    bound: Duration,
    mut attempt: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    let started = tokio::time::Instant::now();
    let deadline = started + bound;
    let mut backoff = flame_core::backoff::Backoff::new(FIRST_PAUSE, MAX_PAUSE);
    let mut attempts = 0u32;
    loop {
        // A leaderless JetStream does not answer at all: bound each attempt
        // (1 s, then 2 s, 4 s, up to the request timeout) so that the next
        // one comes before the bound runs out.
        let limit = (Duration::from_secs(1) * 2u32.pow(attempts.min(3))).min(REQUEST_TIMEOUT);
        let attempt_started = tokio::time::Instant::now();
        let attempt_deadline = deadline.min(attempt_started + limit);
        attempts += 1;
        let last = match tokio::time::timeout_at(attempt_deadline, attempt()).await {
            Ok(Ok(value)) => {
                if attempts > 1 {
                    tracing::info!(
                        pool,
                        "JetStream is ready: {tried} took {:?} ({attempts} attempts)",
                        started.elapsed()
                    );
                }
                return Ok(value);
            }
            Ok(Err(Attempt::Fatal(e))) => return Err(e),
            Ok(Err(Attempt::NotReady(why))) => why,
            Err(_) => format!("no answer within {:?}", attempt_started.elapsed()),
        };
        if attempts == 1 {
            tracing::info!(
                pool,
                "JetStream is not ready yet ({last}); retrying to {tried} for up to {bound:?}"
            );
        } else {
            tracing::debug!(pool, attempts, "JetStream still not ready: {last}");
        }
        if !backoff.pause_until(deadline).await {
            return Err(Error::JetStreamNotReady {
                pool: pool.to_string(),
                tried: tried.to_string(),
                attempts,
                waited: started.elapsed(),
                last,
            });
        }
    }
}

/// Opens the pool's bucket, creating it with `replicas` if needed (the first
/// parent does). A JetStream that is not ready yet (a cluster electing its
/// meta leader, as when NATS and the app start together) is retried with
/// backoff for up to `bound`, then [`Error::JetStreamNotReady`].
pub(crate) async fn open_bucket(
    client: &async_nats::Client,
    pool: &str,
    replicas: usize,
    bound: Duration,
) -> Result<Store, Error> {
    if !client.server_info().jetstream {
        return Err(Error::JetStreamDisabled { pool: pool.into() });
    }
    let js = jetstream(client);
    let name = subjects::bucket(pool);
    let tried = format!("open or create the KV bucket {name} ({replicas} replicas)");
    retry_not_ready(pool, &tried, bound, || {
        open_or_create(&js, &name, pool, replicas)
    })
    .await
}

/// One attempt at opening the bucket, or creating it when absent.
async fn open_or_create(
    js: &async_nats::jetstream::Context,
    name: &str,
    pool: &str,
    replicas: usize,
) -> Result<Store, Attempt> {
    let opened = match js.get_key_value(name).await {
        Ok(store) => return Ok(store),
        Err(e) => e,
    };
    let created = js
        .create_key_value(kv::Config {
            bucket: name.to_string(),
            description: format!("flame shared pool {pool}: runner leases, parents, scalers"),
            history: 1,
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    let created = match created {
        Ok(store) => return Ok(store),
        Err(created) => created,
    };
    let words = created.to_string();
    if words.contains("not supported in non-clustered mode") {
        return Err(Attempt::Fatal(Error::Config(format!(
            "pool `{pool}`: kv_replicas({replicas}) needs a JetStream cluster, and this NATS server runs alone ({words})"
        ))));
    }
    // Another parent created it meanwhile: open theirs.
    match js.get_key_value(name).await {
        Ok(store) => Ok(store),
        Err(again) => Err(Attempt::NotReady(format!(
            "opening it: {opened}; creating it: {created}; opening it again: {again}"
        ))),
    }
}

/// Runs one KV operation of a pool at start, retrying it while JetStream
/// is not ready (the bucket's own stream may still be electing its leader
/// right after the bucket was created on a cluster), for up to `bound`.
pub(crate) async fn when_ready<T, F, Fut>(
    pool: &str,
    tried: &str,
    bound: Duration,
    mut op: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    retry_not_ready(pool, tried, bound, || {
        let attempt = op();
        async move { attempt.await.map_err(|e| Attempt::NotReady(e.to_string())) }
    })
    .await
}

/// Reads a JSON value and its revision. `None` when absent or deleted.
pub(crate) async fn read<T: DeserializeOwned>(
    store: &Store,
    key: &str,
) -> Result<Option<(T, u64)>, Error> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| Error::nats(format!("cannot read {key}"), e))?;
    Ok(entry.and_then(|e| {
        if e.operation != Operation::Put {
            return None;
        }
        serde_json::from_slice(&e.value)
            .ok()
            .map(|v| (v, e.revision))
    }))
}

/// A value as JSON.
pub(crate) fn to_json<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("lease types serialize"))
}

/// What a compare-and-set did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cas {
    /// Written; the new revision.
    Written(u64),
    /// Someone else changed (or created, or removed) the key first.
    Conflict,
}

/// Writes `value` if the key is still at `revision` (`None`: if it does
/// not exist). A lost race is [`Cas::Conflict`]; any other failure is an
/// error.
pub(crate) async fn compare_and_set<T: Serialize>(
    store: &Store,
    key: &str,
    value: &T,
    revision: Option<u64>,
) -> Result<Cas, Error> {
    match revision {
        Some(r) => match store.update(key, to_json(value), r).await {
            Ok(revision) => Ok(Cas::Written(revision)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(Cas::Conflict),
            Err(e) => Err(Error::nats(format!("cannot update {key}"), e)),
        },
        None => match store.create(key, to_json(value)).await {
            Ok(revision) => Ok(Cas::Written(revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(Cas::Conflict),
            Err(e) => Err(Error::nats(format!("cannot create {key}"), e)),
        },
    }
}

/// Read-modify-write of a JSON value with compare-and-set, retried on
/// conflicts (and only on conflicts). `change` returns false to leave the
/// value as it is. A missing value starts from `missing()`, or is left
/// missing when that is `None`. Returns whether a change was written.
pub(crate) async fn update<T, F>(
    store: &Store,
    key: &str,
    missing: impl Fn() -> Option<T>,
    mut change: F,
) -> Result<bool, Error>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(&mut T) -> bool,
{
    for attempt in 0..50 {
        let (mut value, revision) = match read::<T>(store, key).await? {
            Some((v, r)) => (v, Some(r)),
            None => match missing() {
                Some(v) => (v, None),
                None => return Ok(false),
            },
        };
        if !change(&mut value) {
            return Ok(false);
        }
        if let Cas::Written(_) = compare_and_set(store, key, &value, revision).await? {
            return Ok(true);
        }
        // Lost a race: read again, with a little jitter so racers spread.
        tokio::time::sleep(Duration::from_millis(1 + (attempt % 5))).await;
    }
    Err(Error::nats(
        format!("could not update {key}"),
        "too many concurrent changes",
    ))
}

/// Adds a runner to `slots` if fewer than `max` are counted. False when full.
pub(crate) async fn take_slot(store: &Store, runner: &str, max: usize) -> Result<bool, Error> {
    update(
        store,
        subjects::SLOTS_KEY,
        || Some(Slots::default()),
        |slots: &mut Slots| {
            if slots.runners.len() >= max || slots.runners.iter().any(|r| r == runner) {
                return false;
            }
            slots.runners.push(runner.to_string());
            true
        },
    )
    .await
}

/// Removes a runner from `slots`.
pub(crate) async fn free_slot(store: &Store, runner: &str) -> Result<(), Error> {
    update(
        store,
        subjects::SLOTS_KEY,
        || Some(Slots::default()),
        |slots: &mut Slots| {
            let before = slots.runners.len();
            slots.runners.retain(|r| r != runner);
            slots.runners.len() != before
        },
    )
    .await
    .map(|_| ())
}
