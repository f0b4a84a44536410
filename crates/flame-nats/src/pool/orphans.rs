//! Runners left behind by parents that died: a Fly Machine created by a
//! parent killed in the middle of its boot has nobody to stop it. A private
//! pool lists its runners through the backend when it starts and every so
//! often, and terminates those whose parent no longer answers.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::PoolInner;
use crate::protocol::reports::ReportKind;
use crate::protocol::subjects;

/// How long a parent of a left-over runner has to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a pool looks for runners left behind.
const SCAN_EVERY: Duration = Duration::from_secs(30);

/// Looks for left-over runners now and every [`SCAN_EVERY`] until the
/// pool closes.
pub(super) async fn reap(pool: Arc<PoolInner>) {
    let mut tick = tokio::time::interval(SCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = pool.closed.cancelled() => return,
            _ = tick.tick() => {}
        }
        let backend = pool.boots.booter.backend().clone();
        let listed = match backend.list(&pool.config.name).await {
            Ok(listed) => listed,
            Err(e) => {
                debug!(pool = %pool.config.name, "cannot list the pool's runners: {e}");
                continue;
            }
        };
        let others: Vec<_> = listed
            .into_iter()
            .filter(|r| !r.parent_id.is_empty() && r.parent_id != pool.parent.parent_id)
            .collect();
        // Parents of a shared pool of the same name do not answer on
        // event subjects; while any answers `alive`, leave all be.
        if others.is_empty()
            || pool
                .parent
                .anyone_answers(subjects::alive(&pool.config.name), ASK_TIMEOUT)
                .await
        {
            continue;
        }
        for runner in others {
            let theirs = &runner.parent_id;
            let events = subjects::parent_event(&pool.config.name, theirs, ReportKind::Ping);
            if pool.parent.anyone_answers(events, ASK_TIMEOUT).await {
                continue;
            }
            warn!(pool = %pool.config.name, runner = %runner.runner_id, handle = %runner.handle, parent = %theirs, "terminating a runner its parent left behind");
            if let Err(e) = backend.terminate(&runner.handle, &runner.runner_id).await {
                warn!(pool = %pool.config.name, runner = %runner.runner_id, "cannot terminate a left-over runner: {e}");
            }
        }
    }
}
