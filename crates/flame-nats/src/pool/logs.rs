//! The parent's side of log forwarding (`PoolBuilder::forward_runner_logs`):
//! a runner's signed batches of log lines, logged again in the parent's own
//! subscriber.

use std::sync::Arc;

use tracing::{debug, Level};

use super::model::RunnerId;
use super::PoolInner;
use crate::protocol::logs::{LogBatch, LogLine, HEADER_PROOF};

/// Logs the lines of a batch, if its runner signed it and it is new.
pub(super) fn forward(pool: &PoolInner, msg: &async_nats::Message) {
    let Ok(batch) = serde_json::from_slice::<LogBatch>(&msg.payload) else {
        debug!(pool = %pool.config.name, "ignoring log lines that are not a flame batch");
        return;
    };
    let proof = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(HEADER_PROOF))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let id: RunnerId = Arc::from(batch.runner.as_str());
    {
        let mut st = pool.state.lock().unwrap();
        let Some(entry) = st.runners.get_mut(&id) else {
            debug!(pool = %pool.config.name, runner = %id, "ignoring log lines of an unknown runner");
            return;
        };
        let signed = entry
            .key
            .as_ref()
            .is_some_and(|key| key.verify_logs(&msg.payload, &proof));
        if !signed || batch.seq <= entry.log_seq {
            debug!(pool = %pool.config.name, runner = %id, "ignoring log lines not signed by the runner, or replayed");
            return;
        }
        entry.log_seq = batch.seq;
    }
    let pool = pool.config.name.as_str();
    if batch.dropped > 0 {
        tracing::warn!(target: "flame::runner", pool, runner = %id, "runner dropped {} log lines (too many to send)", batch.dropped);
    }
    for line in &batch.lines {
        emit(pool, &id, line);
    }
}

/// One line, at its own level, as an event of target `flame::runner`.
fn emit(pool: &str, runner: &str, line: &LogLine) {
    let (from, message) = (line.target.as_str(), line.message.as_str());
    match line.level.parse::<Level>().unwrap_or(Level::INFO) {
        Level::ERROR => {
            tracing::error!(target: "flame::runner", pool, runner, from, "{message}")
        }
        Level::WARN => tracing::warn!(target: "flame::runner", pool, runner, from, "{message}"),
        Level::INFO => tracing::info!(target: "flame::runner", pool, runner, from, "{message}"),
        Level::DEBUG => {
            tracing::debug!(target: "flame::runner", pool, runner, from, "{message}")
        }
        Level::TRACE => {
            tracing::trace!(target: "flame::runner", pool, runner, from, "{message}")
        }
    }
}
