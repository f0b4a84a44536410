//! Leaving the pool: this parent's lease removed, the scaler role handed
//! on, and the runners of its build retired when it is the last parent of
//! that build. [`leave`] takes the whole [`Fleet`] (its bucket, its
//! mirror, its events), so it is a function of this module, called as
//! `leave::leave(&fleet)` by the parent loop's last step.

use std::time::Duration;

use flame_core::backend::StopRunner;
use futures::future::BoxFuture;
use futures::StreamExt;
use tracing::{debug, warn};

use super::{bucket_subjects, Fleet};
use crate::ops::{Counts, Outgoing};
use crate::protocol::pool_events::{EventKind, Reason};
use crate::protocol::subjects;

/// Longest wait for the bucket while leaving the pool (removing this
/// parent's lease and scaler term, listing the other parents): shutdown
/// stays bounded whatever the server answers.
const LEAVE_BUCKET_LIMIT: Duration = Duration::from_secs(1);

/// Leaves the pool: removes this parent's lease and hands the scaler role
/// on. The runners of this parent's build are stopped (draining) when no
/// other parent of the build is left to use them. Called by the parent loop as its last
/// step only: a renewal still under way would otherwise bring the lease
/// back after its removal, and two parents leaving together would each
/// see the other and leave the runners behind.
pub(super) async fn leave(fleet: &Fleet) {
    leave_now(fleet).await;
    fleet.left.send_replace(true);
}

async fn leave_now(fleet: &Fleet) {
    let me = fleet.parent.parent_id.clone();
    let (leading, owned) = {
        let mut st = fleet.state.lock().unwrap();
        let owned: Vec<(String, Box<dyn StopRunner>)> = st.owned.drain().collect();
        (st.leading.take(), owned)
    };
    // Bounded, and cut short by a refusal: a bucket this parent may no
    // longer use must not hold up its shutdown.
    let permissions = &fleet.parent.events.permissions;
    let mark = permissions.mark_about(bucket_subjects(&fleet.config.name));
    let bucket = async {
        let _ = fleet.store.delete(subjects::parent_key(&me)).await;
        if let Some(term) = leading {
            let _ = fleet
                .store
                .delete_expect_revision(&fleet.scaler_key, Some(term))
                .await;
        }
        Ok(others_of_my_build_remain(fleet).await)
    };
    let others_remain =
        tokio::time::timeout(LEAVE_BUCKET_LIMIT, permissions.guard(&mark, bucket)).await;
    let others_remain = match others_remain {
        Ok(Ok(others)) => others,
        Ok(Err(e)) => {
            warn!(pool = %fleet.config.name, "leaving the pool without the bucket: {e}");
            true
        }
        Err(_) => {
            warn!(pool = %fleet.config.name, "leaving the pool without the bucket: no answer within {LEAVE_BUCKET_LIMIT:?}");
            true
        }
    };
    if others_remain {
        // The other parents go on using these runners; their scaler
        // stops them when they are no longer wanted.
        for (_, stopper) in &owned {
            stopper.detach();
        }
        return;
    }
    // The last parent of this build out: retire every runner of the
    // build (runners of other builds are their parents' business).
    let ids: Vec<String> = {
        let st = fleet.state.lock().unwrap();
        let ids: Vec<String> = st
            .runners
            .iter()
            .filter(|(_, seen)| *seen.value.build == *fleet.parent.build_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            fleet.announce(&st, |c| {
                Outgoing::new(EventKind::RunnerRetiring, c)
                    .runner(id.as_str())
                    .reason(Reason::Shutdown)
            });
        }
        ids
    };
    for id in &ids {
        fleet.send_retire(id).await;
    }
    let _ = fleet.parent.client.flush().await;
    let grace = fleet.config.shutdown_timeout;
    let gone = |id: String| {
        const SHUT_DOWN: &str = "the pool was shut down";
        Outgoing::new(EventKind::RunnerGone, Counts::default())
            .runner(id)
            .reason(Reason::Shutdown)
            .detail(SHUT_DOWN)
    };
    let mut stops: Vec<BoxFuture<'_, ()>> = owned
        .iter()
        .map(|(id, s)| {
            let stop = s.stop(grace);
            let id = id.clone();
            Box::pin(async move {
                stop.await;
                fleet.events.send(gone(id));
            }) as BoxFuture<'_, ()>
        })
        .collect();
    // Runners another parent booted: gone once their lease is (they
    // remove it when they exit), within the same grace.
    for id in ids
        .into_iter()
        .filter(|id| !owned.iter().any(|(o, _)| o == id))
    {
        let mark = mark.clone();
        stops.push(Box::pin(async move {
            let key = subjects::runner_key(&id);
            let deadline = tokio::time::Instant::now() + grace;
            let gone_yet = async {
                while tokio::time::Instant::now() < deadline {
                    match tokio::time::timeout_at(deadline, fleet.store.get(&key)).await {
                        Ok(Ok(None)) => return Ok(true),
                        Ok(Ok(Some(_))) => {}
                        // The bucket cannot tell: do not wait out the
                        // grace on it.
                        Ok(Err(e)) => {
                            debug!(runner = %id, "cannot read its lease while leaving: {e}");
                            return Ok(false);
                        }
                        Err(_) => return Ok(false),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(false)
            };
            if let Ok(true) = fleet.parent.events.permissions.guard(&mark, gone_yet).await {
                fleet.events.send(gone(id));
            }
        }));
    }
    futures::future::join_all(stops).await;
}

/// After this parent removed its own lease: are other parents of its
/// build left?
///
/// Asks the bucket itself, not the mirror, so that parents leaving
/// together cannot each see the other and leave the runners behind:
/// the deletes are ordered in the bucket, and the last to read sees
/// none. A parent whose lease this one has seen go silent, or whose
/// lease says another build, does not count; one not seen yet does.
async fn others_of_my_build_remain(fleet: &Fleet) -> bool {
    let me = subjects::parent_key(&fleet.parent.parent_id);
    let keys = match fleet.store.keys().await {
        Ok(keys) => keys,
        Err(e) => {
            debug!("cannot list the pool's parents: {e}");
            // Unsure: keep the runners; they stop on their own after
            // parent_grace if nobody is left.
            return true;
        }
    };
    let keys: Vec<String> = keys.filter_map(|k| async { k.ok() }).collect().await;
    let st = fleet.state.lock().unwrap();
    let stale_after = fleet.stale_after();
    keys.iter()
        .filter(|k| k.starts_with("parents.") && **k != me)
        .any(|k| {
            let id = &k["parents.".len()..];
            st.parents.get(id).is_none_or(|seen| {
                seen.changed.elapsed() <= stale_after && *seen.value.build == *fleet.parent.build_id
            })
        })
}
