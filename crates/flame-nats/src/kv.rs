//! The JetStream KV bucket of a shared pool: opening it, and reading or
//! changing JSON values with compare-and-set.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, Store, UpdateErrorKind};
use bytes::Bytes;
use flame_core::Error;
use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::lease::Slots;
use crate::protocol::subjects;

/// Opens the pool's bucket, creating it with `replicas` if needed (the first
/// parent does).
pub(crate) async fn open_bucket(
    client: &async_nats::Client,
    pool: &str,
    replicas: usize,
) -> Result<Store, Error> {
    if !client.server_info().jetstream {
        return Err(Error::JetStreamDisabled { pool: pool.into() });
    }
    let js = async_nats::jetstream::new(client.clone());
    let name = subjects::bucket(pool);
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.clone(),
            description: format!("flame shared pool {pool}: runner leases, parents, scalers"),
            history: 1,
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another parent created it meanwhile: open theirs.
        Err(created) => js.get_key_value(&name).await.map_err(|e| {
            let context =
                format!("cannot open the KV bucket {name} (creating it failed: {created})");
            Error::nats(context, e)
        }),
    }
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
